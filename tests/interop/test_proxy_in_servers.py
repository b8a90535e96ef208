"""The proxy's forwarder app inside third-party WSGI servers, as users run it.

Each test starts one real subprocess from ``examples/``:

* gunicorn (gthread, one process): ``gunicorn -c examples/gunicorn_proxy_conf.py
  examples.proxy_in_gunicorn:app``;
* waitress: ``python examples/proxy_in_waitress.py``;
* werkzeug's threaded development server: ``python examples/proxy_in_werkzeug.py``;

configured only through ``RHTTP_*`` environment variables that point at a
throwaway PKI and free ports on 127.0.0.1.  A :class:`~rhttp_wsgi.WorkerPool`
in the test process dials the subprocess's tunnel port and serves the test
app.  Servers are stopped by PID (SIGTERM, bounded wait, SIGKILL); their output
goes to a log file that is printed at teardown, so a failing test shows it
("Captured stdout teardown").  Every wait is bounded; nothing sleeps hoping.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import http.client
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rhttp_wsgi.pki import DemoPKI
from rhttp_wsgi.worker import WorkerPool

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("gunicorn", "waitress", "werkzeug")
#: Bound for any single expected event (a response, a chunk, a cancellation).
WAIT = 5.0
#: Bound for a server subprocess to listen on both ports.
START_TIMEOUT = 15.0
SSE_EVENTS = 5
TICK = 0.05


# ---------------------------------------------------------------------------
# Ports and processes
# ---------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (the server binds them; a race is retried)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    # If pytest dies without tearing down, the kernel sends SIGTERM to the server.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def server_command(kind: str) -> list[str]:
    if kind == "gunicorn":
        return [sys.executable, "-m", "gunicorn", "-c", "examples/gunicorn_proxy_conf.py",
                "--threads", "16", "--graceful-timeout", "3", "examples.proxy_in_gunicorn:app"]
    if kind == "waitress":
        return [sys.executable, "examples/proxy_in_waitress.py", "--threads=16"]
    return [sys.executable, "examples/proxy_in_werkzeug.py"]


class ServerProcess:
    """One server subprocess running the proxy example for ``kind``."""

    def __init__(self, kind: str, pki: DemoPKI, log_path: Path) -> None:
        self.kind = kind
        self.pki = pki
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.public_port = 0
        self.tunnel_port = 0

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RHTTP_", "GUNICORN_"))}
        env.update(
            RHTTP_CERT=str(self.pki.server_cert), RHTTP_KEY=str(self.pki.server_key),
            RHTTP_WORKERS_CA=str(self.pki.ca_cert),
            RHTTP_TUNNEL_BIND=f"127.0.0.1:{self.tunnel_port}", RHTTP_PUBLIC_BIND=f"127.0.0.1:{self.public_port}",
            RHTTP_SHUTDOWN_TIMEOUT="3", RHTTP_LOG_LEVEL="info", PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        )
        return env

    def start(self, attempts: int = 3) -> ServerProcess:
        for attempt in range(1, attempts + 1):
            self.public_port, self.tunnel_port = free_ports(2)
            with open(self.log_path, "ab") as logf:
                logf.write(f"===== {self.kind} start #{attempt}: public {self.public_port}, tunnels "
                           f"{self.tunnel_port} =====\n".encode())
                logf.flush()
                self.proc = subprocess.Popen(server_command(self.kind), cwd=ROOT, env=self.environ(),
                                             stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                             preexec_fn=_set_pdeathsig)
            if self._wait_listening():
                return self
            self.stop()
            if "Address already in use" not in self.log_text():
                break  # not a port race: do not hide a real failure behind retries
        raise AssertionError(f"{self.kind} did not start:\n{self.log_text()}")

    def _wait_listening(self) -> bool:
        """Poll-connect both ports until they accept, within START_TIMEOUT; False if the server exits."""
        deadline = time.monotonic() + START_TIMEOUT
        pending = [self.public_port, self.tunnel_port]
        while pending:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            if port_open(pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by PID, bounded wait, then SIGKILL; always reaps."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout)
        with open(self.log_path, "ab") as logf:
            logf.write(f"===== {self.kind} (pid {p.pid}) exited rc={p.returncode} =====\n".encode())
        return p.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes()[-200_000:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"


# ---------------------------------------------------------------------------
# The app the worker serves, and what it saw
# ---------------------------------------------------------------------------


class Scenario:
    """The worker app plus the events the test and the app share."""

    def __init__(self) -> None:
        self.acks = [threading.Event() for _ in range(SSE_EVENTS)]
        self.sent_at: list[float] = []
        self.problems: list[str] = []
        self.cancelled = threading.Event()  # the worker stream's rhttp.cancelled was set
        self.cancel_latency: float | None = None
        self.stream_started = threading.Event()
        self.environ: dict[str, Any] = {}
        self.release = threading.Event()  # teardown: every app loop ends

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if path == "/echo":
            body = environ["wsgi.input"].read()
            start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("X-Sha256", hashlib.sha256(body).hexdigest())])
            return [body]
        if path == "/sse":
            start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
            return self._sse()
        if path in ("/ticks", "/quiet"):
            start_response("200 OK", [("Content-Type", "text/event-stream")])
            return self._until_cancelled(environ["rhttp.cancelled"], ticking=path == "/ticks")
        self.environ = dict(environ)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"hello {environ['REQUEST_METHOD']} {environ.get('RAW_URI', '')}".encode()]

    def _sse(self) -> Iterator[bytes]:
        for i in range(SSE_EVENTS):
            self.sent_at.append(time.monotonic())
            yield f"id: {i}\ndata: event {i}\n\n".encode()
            # The next event is produced only once the client has *received*
            # this one: a server that buffers small writes never gets there.
            if not self.acks[i].wait(WAIT) or self.release.is_set():
                self.problems.append(f"the client never received event {i}")
                return

    def _until_cancelled(self, cancelled: threading.Event, *, ticking: bool) -> Iterator[bytes]:
        self.stream_started.set()
        started = time.monotonic()
        yield b"data: first\n\n"
        deadline = started + 3 * WAIT
        closed_at = None
        while time.monotonic() < deadline and not self.release.is_set():
            # The public server only notices a closed client when it writes,
            # so /ticks keeps writing; /quiet stays silent and relies on the
            # example's disconnect probe.
            if cancelled.wait(TICK):
                closed_at = time.monotonic()
                break
            if ticking:
                yield b"data: tick\n\n"
        if closed_at is not None:
            self.cancelled.set()


def read_event(resp: http.client.HTTPResponse, buf: bytearray) -> bytes:
    """Read one SSE event (up to a blank line) from a streamed response; bounded by the socket timeout."""
    while b"\n\n" not in buf:
        data = resp.read1(65536)
        if not data:
            raise AssertionError(f"the stream ended early; have {bytes(buf)!r}")
        buf += data
    event, _, rest = bytes(buf).partition(b"\n\n")
    buf[:] = rest
    return event


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


class Setup:
    def __init__(self, server: ServerProcess, pki: DemoPKI) -> None:
        self.server = server
        self.pki = pki
        self.scenario = Scenario()
        self.pool: WorkerPool | None = None
        self.conns: list[http.client.HTTPConnection] = []

    def start_worker(self) -> WorkerPool:
        cert, key = self.pki.workers["worker"]
        self.pool = WorkerPool(self.scenario.app, proxy=f"127.0.0.1:{self.server.tunnel_port}", cert=str(cert),
                               key=str(key), ca=str(self.pki.ca_cert), connections=1, threads=8,
                               reconnect_min=0.05, reconnect_max=0.5)
        self.pool.start()
        assert self.pool.wait_ready(WAIT), f"the worker did not connect: {self.pool.tunnels()}"
        # The tunnel is up; the proxy attaches the worker once its SETTINGS
        # arrived (a moment later): poll until a request gets through.
        deadline = time.monotonic() + WAIT
        while True:
            status, _, _ = self.request("GET", "/ready")
            if status == 200 or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        assert status == 200, f"the proxy never forwarded to the attached worker (last status {status})"
        return self.pool

    def conn(self, timeout: float = WAIT) -> http.client.HTTPConnection:
        c = http.client.HTTPConnection("127.0.0.1", self.server.public_port, timeout=timeout)
        self.conns.append(c)
        return c

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        c = self.conn()
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            data = r.read()
        finally:
            c.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data

    def close(self) -> None:
        self.scenario.release.set()
        for c in self.conns:
            c.close()
        if self.pool is not None:
            self.pool.shutdown(WAIT)


@pytest.fixture(params=SERVERS)
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    kind: str = request.param
    pytest.importorskip(kind)  # a failure under CI=true (tests/conftest.py): setup.cfg's test extra has it
    pki = DemoPKI.create(tmp_path / "pki", worker_names=("worker",))
    server = ServerProcess(kind, pki, tmp_path / f"{kind}.log")
    s = Setup(server, pki)
    try:
        server.start()
        yield s
    finally:
        try:
            s.close()
        finally:
            rc = server.stop()
            # Shown by pytest for a failing test ("Captured stdout teardown").
            print(f"----- {kind} output (exit code {rc}) -----\n{server.log_text()}")


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def test_get(setup: Setup) -> None:
    setup.start_worker()
    status, headers, body = setup.request("GET", "/a%2Fb/c?x=1&y=%20", headers={"Host": "app.example"})
    assert status == 200, body
    # The request target reaches the worker byte for byte (%2F stays encoded).
    assert body == b"hello GET /a%2Fb/c?x=1&y=%20"
    env = setup.scenario.environ
    assert env["PATH_INFO"] == "/a/b/c" and env["QUERY_STRING"] == "x=1&y=%20"
    assert env["HTTP_HOST"] == "app.example"
    assert env["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
    assert env["HTTP_X_FORWARDED_PROTO"] == "http"
    assert headers["content-type"] == "text/plain"


def test_post_1mib_echoed_byte_identical(setup: Setup) -> None:
    setup.start_worker()
    payload = os.urandom(1 << 20)
    status, headers, body = setup.request("POST", "/echo", body=payload,
                                          headers={"Content-Type": "application/octet-stream"})
    assert status == 200
    assert len(body) == len(payload)
    assert headers["x-sha256"] == hashlib.sha256(payload).hexdigest()
    assert body == payload


def test_sse_events_arrive_one_by_one(setup: Setup) -> None:
    """Each event reaches the client while the worker app waits for the client to acknowledge it."""
    setup.start_worker()
    sc = setup.scenario
    c = setup.conn()
    c.request("GET", "/sse", headers={"Accept": "text/event-stream"})
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
    buf = bytearray()
    latencies = []
    for i in range(SSE_EVENTS):
        event = read_event(r, buf)  # raises on the socket timeout (WAIT) when an event is held back
        latencies.append(time.monotonic() - sc.sent_at[i])
        assert event == f"id: {i}\ndata: event {i}".encode()
        sc.acks[i].set()
    assert r.read() == b""
    assert not sc.problems
    assert max(latencies) < 2.0, latencies


@pytest.mark.parametrize("path", ["/ticks", "/quiet"])
def test_client_disconnect_cancels_the_worker_stream(setup: Setup, path: str) -> None:
    """The client closes its socket mid-stream: the worker's ``rhttp.cancelled`` is set.

    ``/ticks`` keeps writing every 50 ms, so the server finds the closed
    socket on a write and closes the forwarder's body (CANCEL).  ``/quiet``
    writes nothing after the first event: only the examples' disconnect probe
    (``rhttp.client_disconnected``) can notice it.
    """
    if path == "/quiet" and setup.server.kind != "waitress" and not hasattr(select, "POLLRDHUP"):
        pytest.skip("optional: the gunicorn and werkzeug examples' disconnect probe needs POLLRDHUP (Linux)")
    setup.start_worker()
    sc = setup.scenario
    s = socket.create_connection(("127.0.0.1", setup.server.public_port), timeout=WAIT)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: app.example\r\n\r\n".encode())
        got = b""
        while b"data: first\n\n" not in got:
            data = s.recv(65536)
            assert data, f"connection closed before the first event: {got!r}"
            got += data
        assert got.startswith(b"HTTP/1.1 200 ")
    finally:
        s.close()
    closed = time.monotonic()
    assert sc.cancelled.wait(WAIT), f"the worker's stream was not cancelled within {WAIT}s of the client closing"
    assert time.monotonic() - closed < WAIT


def test_503_without_a_worker(setup: Setup) -> None:
    status, headers, body = setup.request("GET", "/")
    assert status == 503
    assert headers["retry-after"] == "1"
    assert b"no worker" in body
