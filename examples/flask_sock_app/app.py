"""A flask-sock WebSocket app served through a reverse-HTTP/2 tunnel, unchanged.

Nothing here knows about rhttp-wsgi: the same file runs under ``flask run``,
gunicorn or ``rhttp-wsgi worker``.  Routes:

* ``GET /``: a page with an echo box (JavaScript WebSocket client);
* ``GET /hello``: plain text (a plain request beside the sockets);
* ``WS /echo``: echoes every text and binary message.  The text message
  ``close CODE REASON`` makes the server close with that code and reason;
* ``WS /private?key=...``: the same echo, but an upgrade without the right key
  gets an ordinary ``403`` (refused before any WebSocket exists);
* ``GET /closes``: JSON ``{"count": N, "recent": [...]}``: how many sockets
  ended, and the close codes and reasons the server saw from clients, most
  recent last (so a test, or you, can see both sides of a close).

Run it (see README.md)::

    rhttp-wsgi worker examples.flask_sock_app.app:app --proxy HOST:PORT --cert w.crt --key w.key --ca ca.crt
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from flask import Flask, abort, jsonify, render_template_string, request
from flask.typing import ResponseReturnValue
from flask_sock import ConnectionClosed, Sock

app = Flask(__name__)
# simple-websocket options for every route: the subprotocol the server speaks when a client offers
# it, and a keep-alive ping every 25 s so that an idle socket is not cut by a proxy's idle timeout
# (HAProxy's `timeout tunnel`, the worker's websocket idle timeout).
app.config["SOCK_SERVER_OPTIONS"] = {"subprotocols": ["echo.v1"], "ping_interval": 25}
sock = Sock(app)

PRIVATE_KEY = "letmein"
_closes: deque[dict[str, Any]] = deque(maxlen=100)
_close_count = 0
_closes_lock = threading.Lock()

PAGE = """<!doctype html>
<title>flask-sock behind rhttp-wsgi</title>
<h1>WebSocket echo, behind the tunnel</h1>
<form id="f"><input id="msg" value="hello" autocomplete="off"> <button>Send</button></form>
<ol id="log"></ol>
<script>
  const log = (text) => {
    const li = document.createElement("li");
    li.textContent = text;
    document.getElementById("log").appendChild(li);
  };
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "{{ url_for('echo') }}", ["echo.v1"]);
  ws.onopen = () => log("open (subprotocol " + (ws.protocol || "none") + ")");
  ws.onmessage = (e) => log("echo: " + e.data);
  ws.onclose = (e) => log("closed " + e.code + " " + e.reason);
  document.getElementById("f").onsubmit = (e) => {
    e.preventDefault();
    ws.send(document.getElementById("msg").value);
  };
</script>
"""


def _echo(ws: Any) -> None:
    """Echo until the client closes (recorded) or asks the server to close."""
    global _close_count
    try:
        while True:
            data = ws.receive()
            if isinstance(data, str) and data.startswith("close "):
                _, code, *reason = data.split(" ", 2)
                ws.close(reason=int(code), message=reason[0] if reason else "")
                return
            ws.send(data)
    except ConnectionClosed as e:
        with _closes_lock:
            _closes.append({"code": e.reason, "reason": e.message})
            _close_count += 1
        raise  # flask-sock ends the socket quietly


@app.get("/")
def index() -> str:
    return render_template_string(PAGE)


@app.get("/hello")
def hello() -> ResponseReturnValue:
    return "hello from flask-sock\n", 200, {"Content-Type": "text/plain"}


@app.get("/closes")
def closes() -> ResponseReturnValue:
    with _closes_lock:
        return jsonify(count=_close_count, recent=list(_closes))


@sock.route("/echo")
def echo(ws: Any) -> None:
    _echo(ws)


@app.before_request
def check_private_key() -> None:
    # An upgrade can be refused like any request, before the WebSocket exists: the client gets a
    # plain 403 (a browser's WebSocket fires `error` then `close` with code 1006).
    if request.path == "/private" and request.args.get("key") != PRIVATE_KEY:
        abort(403)


@sock.route("/private")
def private(ws: Any) -> None:
    _echo(ws)
