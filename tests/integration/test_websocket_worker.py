"""WebSocket apps unchanged behind the real proxy and a real worker pool (mutual TLS on 127.0.0.1).

The client is the real ``websockets`` sync client on the proxy's public port; the proxy turns its
upgrade into an RFC 8441 extended CONNECT; the worker (a ``WorkerPool``) hands it to the app as the
HTTP/1.1 upgrade flask-sock, Flask-SocketIO (threading mode), simple-websocket and wsproto expect.
(Frame-level behaviour of the worker: ``tests/tunnel/test_websocket_worker.py``.)
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from .proxy_fixtures import WAIT, Env, env_fixture, pki_fixture, wait_until  # noqa: F401  (fixtures)

ws_client = pytest.importorskip("websockets.sync.client", reason="needs the websockets package (test extra)")
ws_exceptions = pytest.importorskip("websockets.exceptions", reason="needs the websockets package (test extra)")
flask = pytest.importorskip("flask", reason="needs flask (test extra)")
flask_sock = pytest.importorskip("flask_sock", reason="needs flask-sock (test extra)")
wsproto = pytest.importorskip("wsproto", reason="needs wsproto (test extra)")

pytestmark = pytest.mark.timeout(60)


def url(env: Env, path: str = "/ws") -> str:
    return f"ws://{env.public[0]}:{env.public[1]}{path}"


class Seen:
    """What the apps saw, for the test thread (bounded waits)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: list[Any] = []

    def add(self, item: Any) -> None:
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()

    def wait(self, n: int) -> list[Any]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, WAIT), f"saw {self.items}"
            return list(self.items)


def flask_sock_app(seen: Seen) -> Any:
    app = flask.Flask(__name__)
    sock = flask_sock.Sock(app)

    @sock.route("/ws")
    def echo(ws: Any) -> None:
        try:
            while True:
                data = ws.receive()
                if data == "close please":
                    ws.close(reason=4001, message="as asked")
                    return
                ws.send(data)
        except flask_sock.ConnectionClosed:
            seen.add(("closed by client", ws.close_reason, flask.request.environ["rhttp.cancelled"].is_set()))
            raise

    @app.route("/plain")
    def plain() -> str:
        return "plain"

    return app


@pytest.fixture
def flask_sock_env(env: Env) -> Iterator[tuple[Env, Seen]]:
    seen = Seen()
    env.start_proxy()
    env.start_worker(flask_sock_app(seen))
    yield env, seen


def test_flask_sock_echo_through_the_proxy(flask_sock_env: tuple[Env, Seen]) -> None:
    env, _ = flask_sock_env
    with ws_client.connect(url(env), open_timeout=WAIT, max_size=None) as c:
        c.send("hello")
        assert c.recv(WAIT) == "hello"
        big = bytes(range(256)) * 4096  # 1 MiB binary
        c.send(big)
        assert c.recv(WAIT) == big
        for i in range(100):
            c.send(f"m{i}")
        assert [c.recv(WAIT) for _ in range(100)] == [f"m{i}" for i in range(100)]
        c.ping(b"are you there").wait(WAIT)  # answered by simple-websocket through the tunnel
        status, _, body, _ = env.request("GET", "/plain")  # a plain request alongside
        assert (status, body) == (200, b"plain")


def test_close_codes_are_seen_by_both_sides(flask_sock_env: tuple[Env, Seen]) -> None:
    env, seen = flask_sock_env
    with ws_client.connect(url(env), open_timeout=WAIT) as c:
        c.send("close please")
        with pytest.raises(ws_exceptions.ConnectionClosed):
            c.recv(WAIT)
        assert (c.close_code, c.close_reason) == (4001, "as asked")
    with ws_client.connect(url(env), open_timeout=WAIT) as c:
        c.close(4002, "client done")
    assert seen.wait(1)[0][:2] == ("closed by client", 4002)


def test_twenty_sockets_at_once(flask_sock_env: tuple[Env, Seen]) -> None:
    env, _ = flask_sock_env
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(ws_client.connect(url(env), open_timeout=WAIT)) for _ in range(20)]
        for i, c in enumerate(clients):
            c.send(f"socket {i}")
        assert [c.recv(WAIT) for c in clients] == [f"socket {i}" for i in range(20)]


def test_max_websockets_on_the_worker_is_503_and_requests_still_run(env: Env) -> None:
    seen = Seen()
    env.start_proxy()
    env.start_worker(flask_sock_app(seen), max_websockets=1, threads=1)
    with ws_client.connect(url(env), open_timeout=WAIT) as c:
        with pytest.raises(ws_exceptions.InvalidStatus) as err:
            ws_client.connect(url(env), open_timeout=WAIT)
        assert err.value.response.status_code == 503
        assert b"max_websockets" in err.value.response.body
        assert env.request("GET", "/plain")[2] == b"plain"
        c.send("still")
        assert c.recv(WAIT) == "still"


def test_the_client_vanishing_ends_the_app(env: Env) -> None:
    seen = Seen()
    env.start_proxy()
    pool = env.start_worker(flask_sock_app(seen))
    with ws_client.connect(url(env), open_timeout=WAIT) as c:
        c.send("x")
        assert c.recv(WAIT) == "x"
        c.socket.shutdown(socket.SHUT_RDWR)  # no close frame: the TCP connection just goes
        event, _, cancelled = seen.wait(1)[0]
        assert (event, cancelled) == ("closed by client", True)
    # the app returned: no WebSocket holds a worker thread any more
    assert wait_until(lambda: all(t.in_flight == 0 for t in pool.tunnels()))


def test_wsproto_app_using_the_socket_directly(env: Env) -> None:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sock = environ["gunicorn.socket"]
        conn = WSConnection(ConnectionType.SERVER)
        head = "GET / HTTP/1.1\r\n" + "".join(
            f"{k[5:].replace('_', '-').title()}: {v}\r\n" for k, v in environ.items() if k.startswith("HTTP_"))
        conn.receive_data(head.encode("latin-1") + b"\r\n")
        assert isinstance(next(conn.events()), Request)
        sock.sendall(conn.send(AcceptConnection()))
        while data := sock.recv(65536):
            conn.receive_data(data)
            for ev in conn.events():
                if isinstance(ev, TextMessage):
                    sock.sendall(conn.send(TextMessage(data=ev.data.upper())))
                elif isinstance(ev, CloseConnection):
                    sock.sendall(conn.send(ev.response()))
                    sock.close()
                    raise StopIteration  # what flask-sock raises under gunicorn
        return []

    env.start_proxy()
    env.start_worker(app)
    with ws_client.connect(url(env), open_timeout=WAIT) as c:
        c.send("shout")
        assert c.recv(WAIT) == "SHOUT"


def test_flask_socketio_threading_mode(env: Env) -> None:
    flask_socketio = pytest.importorskip("flask_socketio", reason="needs flask-socketio (test extra)")
    app = flask.Flask(__name__)
    # (a short ping interval: Engine.IO's per-socket ping thread ends within it once the socket closes)
    sio = flask_socketio.SocketIO(app, async_mode="threading", ping_interval=0.5)

    @sio.on("echo")
    def echo(data: Any) -> None:
        flask_socketio.emit("echoed", data)

    env.start_proxy()
    env.start_worker(app)
    try:
        socketio_round_trip(env)
    finally:
        sio.server.shutdown()  # (its service thread)


def socketio_round_trip(env: Env) -> None:
    # Engine.IO v4 over a bare WebSocket, spoken by hand: open, connect, an event and its answer.
    with ws_client.connect(url(env, "/socket.io/?EIO=4&transport=websocket"), open_timeout=WAIT) as c:
        opened = c.recv(WAIT)
        assert isinstance(opened, str) and opened.startswith("0")
        assert "sid" in json.loads(opened[1:])
        c.send("40")
        assert str(c.recv(WAIT)).startswith("40")
        c.send('42["echo",{"n":1}]')
        while True:
            msg = str(c.recv(WAIT))
            if msg == "2":  # Engine.IO ping: answer it
                c.send("3")
                continue
            assert msg == '42["echoed",{"n":1}]'
            break


def flask_sock_ping_app(seen: Seen) -> Any:
    """flask-sock echo with ping_interval: simple-websocket then waits in a selector on fileno()."""
    app = flask.Flask(__name__)
    app.config["SOCK_SERVER_OPTIONS"] = {"ping_interval": 300}  # (no ping comes to the rescue)
    sock = flask_sock.Sock(app)

    @sock.route("/ws")
    def echo(ws: Any) -> None:
        try:
            while True:
                ws.send(ws.receive())
        except flask_sock.ConnectionClosed:
            seen.add(("closed", flask.request.environ["rhttp.cancelled"].is_set()))
            raise

    return app


def test_ping_interval_app_echoes_large_messages_at_once(env: Env) -> None:
    env.start_proxy()
    env.start_worker(flask_sock_ping_app(Seen()))
    with ws_client.connect(url(env), open_timeout=WAIT, max_size=None) as c:
        for size in (4097, 5008, 300_000, 1 << 20):
            payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            c.send(payload)
            assert c.recv(WAIT) == payload
            c.send("t" * size)
            assert c.recv(WAIT) == "t" * size


def test_shutdown_ends_open_websockets_promptly(env: Env) -> None:
    """A WebSocket has no end of its own: the drain ends it (EOF to the app) instead of waiting
    for shutdown_timeout (30 s here)."""
    import time

    seen = Seen()
    env.start_proxy()
    pool = env.start_worker(flask_sock_ping_app(seen), shutdown_timeout=30.0)
    with ws_client.connect(url(env), open_timeout=WAIT) as c1, ws_client.connect(url(env), open_timeout=WAIT) as c2:
        for c in (c1, c2):
            c.send("hi")
            assert c.recv(WAIT) == "hi"
        started = time.monotonic()
        assert pool.shutdown(30.0)
        took = time.monotonic() - started
        assert took < WAIT, f"shutdown took {took:.1f}s"
        assert seen.wait(2) == [("closed", True)] * 2
        for c in (c1, c2):
            with pytest.raises(ws_exceptions.ConnectionClosed):
                c.recv(WAIT)
