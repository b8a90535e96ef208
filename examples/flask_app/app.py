"""A small Flask app served through a reverse-HTTP/2 tunnel.

Routes:

* ``GET /``: an HTML page;
* ``GET /events?n=5&interval=1``: server-sent events, one every ``interval``
  seconds (each ``yield`` reaches the browser at once: rhttp-wsgi sends every
  chunk the app yields as it comes);
* ``GET /upload``: a form; ``POST /upload`` (multipart, field ``file``):
  answers the file's name, size and SHA-256 as JSON.

Run it (see README.md)::

    rhttp-wsgi worker examples.flask_app.app:app --proxy HOST:PORT --cert w.crt --key w.key --ca ca.crt
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

from flask import Flask, Response, jsonify, render_template_string, request, stream_with_context

app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = 32 * 1024 * 1024  # uploads above 32 MiB get 413

PAGE = """<!doctype html>
<title>Flask behind rhttp-wsgi</title>
<h1>Hello from Flask, behind the tunnel</h1>
<p>This worker has no inbound port: it dialled the proxy, and your request came back down that tunnel.</p>
<ul>
  <li>Host: {{ host }}</li>
  <li>Scheme: {{ scheme }}</li>
  <li>HTTP/2 stream: {{ stream }}</li>
</ul>
<p><a href="{{ url_for('upload') }}">Upload a file</a></p>
<h2>Server-sent events</h2>
<ol id="events"></ol>
<script>
  const source = new EventSource("{{ url_for('events') }}?n=10");
  source.onmessage = (e) => {
    const li = document.createElement("li");
    li.textContent = e.data;
    document.getElementById("events").appendChild(li);
  };
  source.addEventListener("done", () => source.close());
</script>
"""

UPLOAD_FORM = """<!doctype html>
<title>Upload</title>
<form method="post" enctype="multipart/form-data">
  <input type="file" name="file"> <button>Upload</button>
</form>
"""


@app.get("/")
def index() -> str:
    return render_template_string(PAGE, host=request.host, scheme=request.scheme,
                                  stream=request.environ.get("rhttp.stream_id"))


@app.get("/events")
def events() -> Response:
    count = min(request.args.get("n", 5, type=int), 1000)
    interval = min(max(request.args.get("interval", 1.0, type=float), 0.0), 60.0)
    # rhttp-wsgi sets this event when the client goes away (the proxy resets
    # the stream): the generator stops instead of ticking into the void.
    cancelled = request.environ.get("rhttp.cancelled")

    def pause() -> bool:
        """Wait ``interval`` seconds; True if the client went away meanwhile."""
        if cancelled is None:  # not running under rhttp-wsgi
            time.sleep(interval)
            return False
        return bool(cancelled.wait(interval))

    @stream_with_context
    def generate() -> Iterator[str]:
        for i in range(count):
            if i and pause():
                return
            yield f"id: {i}\ndata: tick {i} on {request.host}\n\n"
        yield "event: done\ndata: bye\n\n"

    return Response(generate(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@app.route("/upload", methods=["GET", "POST"])
def upload() -> Response | str | tuple[Response, int]:
    if request.method == "GET":
        return UPLOAD_FORM
    f = request.files.get("file")
    if f is None:
        return jsonify(error="no 'file' field in the form"), 400
    digest = hashlib.sha256()
    size = 0
    while chunk := f.stream.read(64 * 1024):
        digest.update(chunk)
        size += len(chunk)
    return jsonify(filename=f.filename, size=size, sha256=digest.hexdigest(),
                   fields=sorted(request.form))
