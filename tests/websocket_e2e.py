"""WebSocket end-to-end checks with a real client, and worker subprocesses that serve the examples.

The checks drive ``websockets``' sync client against the flask-sock example
(``examples/flask_sock_app``: ``/echo``, ``/private``, ``/hello``, ``/closes``)
wherever it is served: through our proxy, through HAProxy, directly by
gunicorn.  Each check owns its sockets and closes them; every wait is bounded.

:class:`WorkerProcess` runs ``rhttp-wsgi worker`` or ``gunicorn -k
rhttp_wsgi.gunicorn_worker.RHTTPWorker`` as a subprocess dialing a tunnel
port (ours or HAProxy's) and stops it, and any gunicorn worker it booted, by
pid.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

websockets_sync = pytest.importorskip("websockets.sync.client", reason="websockets is in the 'test' extra")
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402 (after the skip)

ROOT = Path(__file__).resolve().parents[1]
FLASK_SOCK_APP = "examples.flask_sock_app.app:app"
FLASK_SOCKETIO_APP = "examples.flask_socketio_app.app:app"
LAUNCHERS = ("cli", "gunicorn")
#: Bound on every single wait (a message, a handshake, a close).
WAIT = 20.0
MIB = 1 << 20


# -- the client ----------------------------------------------------------------------------------


def ws_connect(url: str, **kwargs: Any) -> Any:
    """A ``websockets`` sync client connection with bounded handshake/close and room for 1 MiB + frames."""
    kwargs.setdefault("open_timeout", WAIT)
    kwargs.setdefault("close_timeout", WAIT)
    kwargs.setdefault("max_size", 4 * MIB)
    # No keepalive pings from the client: an incoming ping wakes a server that missed data it already
    # had (seen: a worker's socket read only part of what arrived and its selector slept), which
    # would turn a stall into a slow success instead of a failure.  check_ping_pong pings on purpose.
    kwargs.setdefault("ping_interval", None)
    # Entered at once: websockets >= 16 wants connect() used as a context manager (it warns
    # otherwise), and entering gives the ClientConnection in every version; the caller closes it
    # (``with`` on the connection, or close()).
    return websockets_sync.connect(url, **kwargs).__enter__()


def http_get(host: str, port: int, path: str, timeout: float = WAIT) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


class Endpoint:
    """Where the flask-sock example answers: ``ws://host:port`` and ``http://host:port``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def ws(self, path: str) -> str:
        return f"ws://{self.host}:{self.port}{path}"

    def get(self, path: str) -> tuple[int, bytes]:
        return http_get(self.host, self.port, path)

    def _closes(self) -> dict[str, Any]:
        status, body = self.get("/closes")
        assert status == 200, body[:300]
        return dict(json.loads(body))

    def server_closes(self) -> list[dict[str, Any]]:
        """The most recent closes the app saw (code and reason from the client), oldest first."""
        return list(self._closes()["recent"])

    def server_close_count(self) -> int:
        """How many sockets the app saw end with a ConnectionClosed, ever."""
        return int(self._closes()["count"])


# -- the checks (flask-sock example) ---------------------------------------------------------------


def check_echo_text_and_binary(ep: Endpoint) -> None:
    """Text (non-ASCII) and a 1 MiB binary message come back intact; the subprotocol is negotiated."""
    with ws_connect(ep.ws("/echo"), subprotocols=["echo.v1"]) as ws:
        assert ws.subprotocol == "echo.v1"
        text = "héllo through the tunnel ✓"
        ws.send(text)
        assert ws.recv(WAIT) == text
        blob = random.Random(12).randbytes(MIB)
        ws.send(blob)
        back = ws.recv(WAIT)
        assert isinstance(back, bytes) and len(back) == MIB and back == blob
        ws.send(b"")  # an empty binary message is a message too
        assert ws.recv(WAIT) == b""
        # Sizes around the servers' read sizes (simple-websocket reads 4 KiB at a time) and the
        # HTTP/2 frame size (16 KiB): each must come back at once, not when the next bytes arrive.
        rnd = random.Random(13)
        for size in (4095, 4096, 4097, 5000, 16383, 16384, 16385, 17000, 65536, 300_000):
            blob = rnd.randbytes(size)
            ws.send(blob)
            assert ws.recv(WAIT) == blob, size


def check_messages_in_order(ep: Endpoint, n: int = 100) -> None:
    """``n`` messages sent back to back (not waiting for each echo) come back in order."""
    with ws_connect(ep.ws("/echo")) as ws:
        for i in range(n):
            ws.send(f"message {i}" if i % 2 else f"message {i}".encode())
        got = [ws.recv(WAIT) for _ in range(n)]
    assert got == [f"message {i}" if i % 2 else f"message {i}".encode() for i in range(n)]


def check_many_sockets_at_once(ep: Endpoint, n: int = 20) -> None:
    """``n`` sockets open at the same time, each echoing its own messages from its own thread."""
    sockets = []
    try:
        for _ in range(n):
            sockets.append(ws_connect(ep.ws("/echo")))
        errors: list[BaseException] = []

        def talk(i: int) -> None:
            try:
                ws = sockets[i]
                for j in range(5):
                    ws.send(f"socket {i} message {j}")
                    assert ws.recv(WAIT) == f"socket {i} message {j}"
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=talk, args=(i,), name=f"ws-client-{i}") for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 3 * WAIT
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not [t for t in threads if t.is_alive()], "client threads still talking"
        assert not errors, errors[:3]
    finally:
        for ws in sockets:
            ws.close()


def check_ping_pong(ep: Endpoint) -> None:
    """The client's pings are answered (pongs come back with their payload) and echo still works."""
    with ws_connect(ep.ws("/echo")) as ws:
        for i in range(3):
            assert ws.ping(f"ping {i}".encode()).wait(WAIT), f"no pong for ping {i}"
        ws.send("after the pings")
        assert ws.recv(WAIT) == "after the pings"


def check_close_codes_both_ways(ep: Endpoint) -> None:
    """A server-initiated close reaches the client with its code and reason, and the reverse."""
    with ws_connect(ep.ws("/echo")) as ws:
        ws.send("close 4001 server says bye")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(WAIT)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "server says bye")

    token = f"client says bye {uuid.uuid4().hex[:8]}"
    ws = ws_connect(ep.ws("/echo"))
    ws.send("ready?")
    assert ws.recv(WAIT) == "ready?"
    ws.close(4002, token)
    assert ws.close_code == 4002  # the server answered the close handshake with the same code
    # The server saw it too: the app records what its WebSocket library raised (polled, bounded).
    deadline = time.monotonic() + WAIT
    while {"code": 4002, "reason": token} not in (seen := ep.server_closes()):
        assert time.monotonic() < deadline, f"the server never saw the client's close: {seen[-5:]}"
        time.sleep(0.02)


def check_plain_request_alongside(ep: Endpoint) -> None:
    """While a socket is open and busy, plain HTTP requests are answered, and the socket still works."""
    with ws_connect(ep.ws("/echo")) as ws:
        ws.send("before")
        assert ws.recv(WAIT) == "before"
        for _ in range(5):
            assert ep.get("/hello") == (200, b"hello from flask-sock\n")
        ws.send("after")
        assert ws.recv(WAIT) == "after"


def check_refused_upgrade_passes_status(ep: Endpoint) -> None:
    """An app that refuses the upgrade with 403 gives the client that 403 (not a 101, not a hang)."""
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(ep.ws("/private?key=wrong"))
    assert refused.value.response.status_code == 403
    with ws_connect(ep.ws("/private?key=letmein")) as ws:
        ws.send("let in")
        assert ws.recv(WAIT) == "let in"


ALL_CHECKS: Sequence[Callable[[Endpoint], None]] = (
    check_echo_text_and_binary, check_messages_in_order, check_many_sockets_at_once, check_ping_pong,
    check_close_codes_both_ways, check_plain_request_alongside, check_refused_upgrade_passes_status,
)


# -- Socket.IO over a plain WebSocket (examples/flask_socketio_app) ------------------------------------


class SocketIOClient:
    """Just enough of Engine.IO 4 / Socket.IO 5 over the WebSocket transport for the tests.

    Connects straight to the WebSocket transport (no long-polling first), joins the default
    namespace, emits events and reads them back; answers the server's pings.
    """

    def __init__(self, base: str) -> None:
        self.ws = ws_connect(f"{base}/socket.io/?EIO=4&transport=websocket")
        opening = self.ws.recv(WAIT)
        assert isinstance(opening, str) and opening.startswith("0"), opening
        self.engine = json.loads(opening[1:])
        self.ws.send("40")  # CONNECT to the "/" namespace
        reply = self._next_packet()
        assert isinstance(reply, str) and reply.startswith("40"), reply
        self.sid = json.loads(reply[2:])["sid"]

    def _next_packet(self) -> str | bytes:
        while True:
            packet = self.ws.recv(WAIT)
            if packet == "2":  # Engine.IO ping: answer, keep reading
                self.ws.send("3")
                continue
            return packet  # type: ignore[no-any-return]

    def emit(self, event: str, data: Any) -> None:
        if isinstance(data, bytes):
            # One binary attachment: a placeholder in the JSON, then the bytes as their own message.
            self.ws.send("451-" + json.dumps([event, {"_placeholder": True, "num": 0}]))
            self.ws.send(data)
        else:
            self.ws.send("42" + json.dumps([event, data]))

    def receive(self) -> tuple[str, Any]:
        packet = self._next_packet()
        assert isinstance(packet, str), packet
        if packet.startswith("451-"):
            event, _placeholder = json.loads(packet[4:])
            attachment = self._next_packet()
            assert isinstance(attachment, bytes), attachment
            return event, attachment
        assert packet.startswith("42"), packet
        event, data = json.loads(packet[2:])
        return event, data

    def close(self) -> None:
        try:
            self.ws.send("41")  # DISCONNECT from the namespace
        except ConnectionClosed:
            pass
        self.ws.close()


# -- worker subprocesses -------------------------------------------------------------------------


class WorkerProcess:
    """``rhttp-wsgi worker SPEC`` or gunicorn with our worker class, dialing ``tunnel`` over mTLS."""

    def __init__(self, spec: str, launcher: str, tunnel: tuple[str, int], *, cert: Path, key: Path, ca: Path,
                 log_path: Path, settings: Mapping[str, str] | None = None,
                 gunicorn_args: Sequence[str] = ("--workers", "1")) -> None:
        self.spec = spec
        self.log_path = log_path
        self._log = log_path.open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RHTTP_", "GUNICORN_"))}
        env.update(PYTHONPATH=str(ROOT), XDG_RUNTIME_DIR=str(log_path.parent))
        every = {"proxy": f"{tunnel[0]}:{tunnel[1]}", "cert": str(cert), "key": str(key), "ca": str(ca),
                 "server-name": "localhost", **(settings or {})}
        if launcher == "cli":
            flags = [x for name, value in every.items() for x in (f"--{name}", value)]
            cmd = [sys.executable, "-m", "rhttp_wsgi", "worker", spec, *flags]
        elif launcher == "gunicorn":
            env.update({"RHTTP_" + name.upper().replace("-", "_"): value for name, value in every.items()})
            cmd = [sys.executable, "-m", "gunicorn", "-k", "rhttp_wsgi.gunicorn_worker.RHTTPWorker",
                   "-b", "127.0.0.1:0", "--graceful-timeout", "5", *gunicorn_args, spec]
        else:
            raise ValueError(f"unknown launcher {launcher!r}")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def booted(self) -> list[int]:
        """The pids gunicorn says it booted (empty for the CLI)."""
        return [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", self.log())]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            for pid in self.booted():  # gunicorn's workers, should the master have left one behind
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if self.spec.encode() in cmdline:
                    os.kill(pid, signal.SIGKILL)
        finally:
            self._log.close()


@contextmanager
def worker_process(*args: Any, **kwargs: Any) -> Iterator[WorkerProcess]:
    w = WorkerProcess(*args, **kwargs)
    try:
        yield w
    finally:
        w.close()
