"""The example apps (``examples/flask_app``, ``examples/django_project``), run as their READMEs say.

For each launcher (``rhttp-wsgi worker MODULE:APP --proxy ...`` and ``gunicorn -k
rhttp_wsgi.gunicorn_worker.RHTTPWorker MODULE:APP`` with ``RHTTP_*`` variables)
one subprocess per module serves the example through a real
:class:`~rhttp_wsgi.proxy.Proxy` in the test process (real mTLS on 127.0.0.1);
requests go to the proxy's public port with ``http.client``.  Subprocesses
are stopped by pid (SIGTERM, bounded wait, SIGKILL), gunicorn's workers too.
"""

from __future__ import annotations

import hashlib
import html
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

import pytest

from rhttp_wsgi.pki import DemoPKI
from rhttp_wsgi.proxy import Proxy

ROOT = Path(__file__).resolve().parents[2]
WAIT = 20.0
FLASK_APP = "examples.flask_app.app:app"
DJANGO_APP = "examples.django_project.wsgi:application"
LAUNCHERS = ("cli", "gunicorn")


class Served:
    """A real Proxy (in this process) and one worker subprocess serving ``spec`` through it."""

    def __init__(self, tmp: Path, spec: str, launcher: str) -> None:
        self.spec = spec
        self.pki = DemoPKI.create(tmp / "pki", worker_names=("example",))
        self.proxy = Proxy(cert=str(self.pki.server_cert), key=str(self.pki.server_key),
                           workers_ca=str(self.pki.ca_cert), tunnel_bind="127.0.0.1:0",
                           public_bind="127.0.0.1:0", shutdown_timeout=5.0)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = tmp / f"{launcher}.log"
        self._log = self.log_path.open("wb")
        try:
            tunnel_host, tunnel_port = self.proxy.start_tunnels()
            self.public = self.proxy.start_public()
            cert, key = self.pki.workers["example"]
            env = {k: v for k, v in os.environ.items() if not k.startswith(("RHTTP_", "GUNICORN_", "DJANGO_"))}
            env.update(PYTHONPATH=str(ROOT), XDG_RUNTIME_DIR=str(tmp))
            settings = {"proxy": f"{tunnel_host}:{tunnel_port}", "cert": str(cert), "key": str(key),
                        "ca": str(self.pki.ca_cert), "server-name": "localhost"}
            if launcher == "cli":
                flags = [x for name, value in settings.items() for x in (f"--{name}", value)]
                cmd = [sys.executable, "-m", "rhttp_wsgi", "worker", spec, *flags]
            else:
                env.update({"RHTTP_" + name.upper().replace("-", "_"): value for name, value in settings.items()})
                cmd = [sys.executable, "-m", "gunicorn", "-k", "rhttp_wsgi.gunicorn_worker.RHTTPWorker",
                       "-b", "127.0.0.1:0", "--workers", "1", "--graceful-timeout", "5", spec]
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
            assert self.proxy.wait_for_workers(1, WAIT), self.log()
        except BaseException:
            self.close()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def conn(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(*self.public, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes, list[tuple[str, str]]]:
        c = self.conn()
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            data = r.read()
            raw = r.getheaders()
            return r.status, {k.lower(): v for k, v in raw}, data, raw
        finally:
            c.close()

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            # gunicorn's workers, by pid, should the master have left one behind
            for pid in re.findall(r"Booting worker with pid: (\d+)", self.log()):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if self.spec.encode() in cmdline:
                    os.kill(int(pid), signal.SIGKILL)
        finally:
            self._log.close()
            self.proxy.shutdown(5.0)


@pytest.fixture(scope="module", params=LAUNCHERS)
def flask_app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    pytest.importorskip("flask", reason="flask is in the 'test' extra")
    s = Served(tmp_path_factory.mktemp(f"flask-{request.param}"), FLASK_APP, request.param)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module", params=LAUNCHERS)
def django_app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    pytest.importorskip("django", reason="django is in the 'test' extra")
    s = Served(tmp_path_factory.mktemp(f"django-{request.param}"), DJANGO_APP, request.param)
    try:
        yield s
    finally:
        s.close()


# -- Flask ------------------------------------------------------------------------------------


def test_flask_page(flask_app: Served) -> None:
    status, headers, body, _ = flask_app.request("GET", "/")
    assert status == 200, body
    assert headers["content-type"].startswith("text/html")
    page = body.decode()
    assert "Hello from Flask, behind the tunnel" in page
    assert f"Host: {flask_app.public[0]}:{flask_app.public[1]}" in page and "Scheme: http" in page


def test_flask_sse_events_arrive_one_by_one(flask_app: Served) -> None:
    n = 4
    events = _sse_events(flask_app, f"/events?n={n}&interval=0")
    assert events[:n] == [f"id: {i}\ndata: tick {i} on {flask_app.public[0]}:{flask_app.public[1]}".encode()
                          for i in range(n)]
    assert events[n:] == [b"event: done\ndata: bye"]
    # Each tick leaves as the app yields it, not held back until the end.  The app runs in another
    # process (no clock to move), so the proof is an order of events, not a measured gap: with a
    # minute between ticks, tick 0 arrives on its own, well within the read timeout, while tick 1
    # cannot exist yet.  Then the client goes away, which ends the app's wait (rhttp.cancelled).
    c = flask_app.conn(timeout=10.0)
    try:
        c.request("GET", "/events?n=2&interval=60", headers={"Accept": "text/event-stream"})
        r = c.getresponse()
        assert r.status == 200
        buf = b""
        while b"\n\n" not in buf:
            chunk = r.read1(65536)
            assert chunk, f"the stream ended before its first event: {buf!r}"
            buf += chunk
        assert buf == f"id: 0\ndata: tick 0 on {flask_app.public[0]}:{flask_app.public[1]}\n\n".encode()
    finally:
        c.close()


def _sse_events(served: Served, path: str) -> list[bytes]:
    """The events of one server-sent-events response, read as they come."""
    c = served.conn()
    try:
        c.request("GET", path, headers={"Accept": "text/event-stream"})
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Content-Type", "").startswith("text/event-stream")
        buf = b""
        events: list[bytes] = []
        while True:
            chunk = r.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                events.append(event)
    finally:
        c.close()
    return events


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in fields.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
    for name, (filename, data, ctype) in files.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def test_flask_multipart_upload_round_trips(flask_app: Served) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # several flow-control windows' worth
    body, ctype = _multipart({"note": "hello"}, {"file": ("blob.bin", data, "application/octet-stream")})
    status, headers, out, _ = flask_app.request("POST", "/upload", body=body, headers={"Content-Type": ctype})
    assert status == 200, out[:500]
    assert headers["content-type"] == "application/json"
    assert json.loads(out) == {"filename": "blob.bin", "size": len(data),
                               "sha256": hashlib.sha256(data).hexdigest(), "fields": ["note"]}


# -- Django -----------------------------------------------------------------------------------


def _csrf(page: str, raw_headers: list[tuple[str, str]]) -> tuple[str, str]:
    """(the form's hidden csrfmiddlewaretoken, the csrftoken cookie)."""
    m = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert m, page
    jar: SimpleCookie = SimpleCookie()
    for k, v in raw_headers:
        if k.lower() == "set-cookie":
            jar.load(v)
    assert "csrftoken" in jar, raw_headers
    return m.group(1), jar["csrftoken"].value


def test_django_page(django_app: Served) -> None:
    status, headers, body, raw = django_app.request("GET", "/")
    assert status == 200, body[:500]
    page = body.decode()
    assert "Hello from Django, behind the tunnel" in page
    assert f"Served for {django_app.public[0]}:{django_app.public[1]} over http." in page
    assert headers["x-frame-options"] == "DENY"
    _csrf(page, raw)


def test_django_form_post_with_csrf_token(django_app: Served) -> None:
    _, _, body, raw = django_app.request("GET", "/")
    token, cookie = _csrf(body.decode(), raw)
    form = {"name": "Ada <script>", "message": "Through the tunnel & back"}
    ctype = {"Content-Type": "application/x-www-form-urlencoded"}

    status, _, out, _ = django_app.request("POST", "/", urlencode({**form, "csrfmiddlewaretoken": token}).encode(),
                                           {**ctype, "Cookie": f"csrftoken={cookie}"})
    assert status == 200, out[:1000]
    page = out.decode()
    assert f"Thanks, {html.escape(form['name'])}!" in page
    assert html.escape(form["message"]) in page
    assert re.search(r"HTTP/2 stream \d+ ", page), page

    # Without the token pair, Django's CSRF middleware refuses the POST.
    status, _, out, _ = django_app.request("POST", "/", urlencode(form).encode(), ctype)
    assert status == 403, out[:500]
    # A token but an invalid form: the form comes back with its errors.
    status, _, out, _ = django_app.request("POST", "/", urlencode({"name": "x", "csrfmiddlewaretoken": token}).encode(),
                                           {**ctype, "Cookie": f"csrftoken={cookie}"})
    assert status == 400 and b"This field is required" in out, out[:1000]
