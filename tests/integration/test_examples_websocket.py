"""The WebSocket examples (``examples/flask_sock_app``, ``examples/flask_socketio_app``), run as their READMEs say.

For each launcher (``rhttp-wsgi worker MODULE:APP --proxy ...`` and ``gunicorn -k
rhttp_wsgi.gunicorn_worker.RHTTPWorker MODULE:APP`` with ``RHTTP_*`` variables) one
subprocess per example serves it through a real :class:`~rhttp_wsgi.proxy.Proxy` in
the test process (real mTLS on 127.0.0.1).  A real client (``websockets``' sync
client) upgrades on the proxy's public port: the proxy sends an RFC 8441 extended
CONNECT down the tunnel and the unchanged flask-sock / Flask-SocketIO app answers.
Subprocesses are stopped by pid (tests/websocket_e2e.py).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flask_sock", reason="flask-sock is in the 'test' extra")
pytest.importorskip("flask_socketio", reason="flask-socketio is in the 'test' extra")

from rhttp_wsgi.pki import DemoPKI
from rhttp_wsgi.proxy import Proxy
from tests.websocket_e2e import (
    ALL_CHECKS,
    FLASK_SOCK_APP,
    FLASK_SOCKETIO_APP,
    LAUNCHERS,
    MIB,
    WAIT,
    Endpoint,
    SocketIOClient,
    WorkerProcess,
)

pytestmark = pytest.mark.timeout(180)


class Served:
    """A real Proxy (in this process) and one worker subprocess serving ``spec`` through it."""

    def __init__(self, tmp: Path, spec: str, launcher: str) -> None:
        self.pki = DemoPKI.create(tmp / "pki", worker_names=("example",))
        self.proxy = Proxy(cert=str(self.pki.server_cert), key=str(self.pki.server_key),
                           workers_ca=str(self.pki.ca_cert), tunnel_bind="127.0.0.1:0",
                           public_bind="127.0.0.1:0", shutdown_timeout=5.0)
        self.worker: WorkerProcess | None = None
        try:
            tunnel = self.proxy.start_tunnels()
            host, port = self.proxy.start_public()
            self.endpoint = Endpoint(host, port)
            cert, key = self.pki.workers["example"]
            self.worker = WorkerProcess(spec, launcher, tunnel, cert=cert, key=key, ca=self.pki.ca_cert,
                                        log_path=tmp / f"{launcher}.log")
            assert self.proxy.wait_for_workers(1, WAIT), self.worker.log()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            if self.worker is not None:
                self.worker.close()
        finally:
            self.proxy.shutdown(5.0)


def _served(spec: str) -> Callable[[pytest.FixtureRequest, pytest.TempPathFactory], Iterator[Served]]:
    def fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
        s = Served(tmp_path_factory.mktemp(f"{spec.split('.')[1]}-{request.param}"), spec, request.param)
        try:
            yield s
        finally:
            s.close()
    return fixture


flask_sock = pytest.fixture(scope="module", params=LAUNCHERS)(_served(FLASK_SOCK_APP))
flask_socketio = pytest.fixture(scope="module", params=LAUNCHERS)(_served(FLASK_SOCKETIO_APP))


# -- flask-sock ---------------------------------------------------------------------------------


def test_flask_sock_page_and_plain_routes_are_served(flask_sock: Served) -> None:
    status, body = flask_sock.endpoint.get("/")
    assert status == 200 and b"WebSocket echo, behind the tunnel" in body, body[:300]
    assert flask_sock.endpoint.get("/hello") == (200, b"hello from flask-sock\n")


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_flask_sock_websocket_through_our_proxy(flask_sock: Served, check: Callable[[Endpoint], None]) -> None:
    check(flask_sock.endpoint)


# -- Flask-SocketIO (threading mode, WebSocket transport) ------------------------------------------


def _client(served: Served) -> SocketIOClient:
    return SocketIOClient(f"ws://{served.endpoint.host}:{served.endpoint.port}")


def test_flask_socketio_connects_over_the_websocket_transport(flask_socketio: Served) -> None:
    c = _client(flask_socketio)
    try:
        assert c.engine["sid"] and c.sid
        assert c.engine["upgrades"] == []  # already on the WebSocket transport: nothing to upgrade to
    finally:
        c.close()


def test_flask_socketio_echo_round_trips_text_json_and_binary(flask_socketio: Served) -> None:
    c = _client(flask_socketio)
    try:
        for payload in ("héllo ✓", {"n": 1, "list": [1, 2, 3]}):
            c.emit("echo", payload)
            assert c.receive() == ("echo", payload)
        blob = bytes(range(256)) * (MIB // 4 // 256)  # 256 KiB: under Engine.IO's 1 MB payload limit
        c.emit("echo", blob)
        assert c.receive() == ("echo", blob)
        for i in range(100):  # in order, back to back
            c.emit("echo", i)
        assert [c.receive() for _ in range(100)] == [("echo", i) for i in range(100)]
    finally:
        c.close()


def test_flask_socketio_chat_is_broadcast_to_every_client(flask_socketio: Served) -> None:
    clients = [_client(flask_socketio) for _ in range(3)]
    try:
        clients[0].emit("chat", "hello, everyone")
        for c in clients:
            assert c.receive() == ("chat", "hello, everyone")
        assert flask_socketio.endpoint.get("/hello") == (200, b"hello from flask-socketio\n")
    finally:
        for c in clients:
            c.close()


# -- Flask-SocketIO with the real python-socketio client (long-polling, then the upgrade) ----------


class _RealClient:
    """A ``socketio.Client`` with default transports (polling first, then the WebSocket upgrade).

    Every event it receives goes to a queue; reconnection is off so a failure stays a failure.
    """

    def __init__(self, served: Served) -> None:
        socketio = pytest.importorskip("socketio", reason="python-socketio[client] is in the 'test' extra")
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.sio = socketio.Client(reconnection=False, request_timeout=WAIT)
        for event in ("echo", "chat"):
            self.sio.on(event, lambda data, event=event: self.events.put((event, data)))
        self.sio.connect(f"http://{served.endpoint.host}:{served.endpoint.port}", wait_timeout=WAIT)

    def next_event(self) -> tuple[str, Any]:
        return self.events.get(timeout=WAIT)

    def wait_for_websocket(self) -> str:
        """The transport once the upgrade is done, or the last one seen after WAIT seconds."""
        done = threading.Event()
        deadline = time.monotonic() + WAIT
        while self.sio.transport() != "websocket" and time.monotonic() < deadline:
            done.wait(0.05)  # bounded poll: the upgrade has no event of its own to wait on
        return str(self.sio.transport())

    def close(self) -> None:
        if self.sio.connected:
            self.sio.disconnect()
        self.sio.wait()  # returns once the background tasks are done (no reconnection)


def test_flask_socketio_real_client_polls_then_upgrades_to_websocket(flask_socketio: Served) -> None:
    a = _RealClient(flask_socketio)
    try:
        # The polling handshake offered the upgrade, and the client took it.
        assert "websocket" in a.sio.eio.upgrades, a.sio.eio.upgrades
        assert a.wait_for_websocket() == "websocket"
        assert a.sio.sid

        # echo: the server acks the call (the handler returns nothing) and emits the payload back.
        for payload in ("héllo ✓", {"n": 1, "list": [1, 2, 3]}, bytes(range(256))):
            assert a.sio.call("echo", payload, timeout=WAIT) is None
            assert a.next_event() == ("echo", payload)

        # chat: broadcast to every client, sender included.
        b = _RealClient(flask_socketio)
        try:
            assert b.wait_for_websocket() == "websocket"
            a.sio.emit("chat", "hello from a")
            assert a.next_event() == ("chat", "hello from a")
            assert b.next_event() == ("chat", "hello from a")
        finally:
            b.close()
        assert not b.sio.connected
    finally:
        a.close()
    assert not a.sio.connected and a.sio.eio.state == "disconnected"
    assert flask_socketio.endpoint.get("/hello") == (200, b"hello from flask-socketio\n")
