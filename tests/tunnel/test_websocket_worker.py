"""WebSockets on the worker (RFC 8441), frame by frame: the extended CONNECT in, the app's upgrade out.

A real worker-role tunnel with its ``StreamPolicy`` and a ``WebSocketService`` (the worker's
WebSocket pool and limit) against the raw-frame proxy peer of ``tests/h2peer.py``, which plays
the proxy: it sends ``:method CONNECT`` + ``:protocol websocket`` and speaks RFC 6455 frames in
DATA (wsproto's frame codec, client side).  The apps are real: flask-sock, simple-websocket and
wsproto used directly, as they run under gunicorn/werkzeug.
"""

from __future__ import annotations

import base64
import errno
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flask
import pytest
import simple_websocket
from flask_sock import Sock
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame, RstStreamFrame, WindowUpdateFrame
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, RejectData, Request
from wsproto.events import TextMessage as WsText
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import Frame, FrameProtocol, Opcode

from rhttp_wsgi.streams import StreamPolicy
from rhttp_wsgi.websocket import TunnelSocket, WebSocketService, upgrade_fields
from tests.h2peer import DEFAULT_TIMEOUT, ProxyPeer
from tests.tunnel.harness import FakeClock, WorkerHarness, worker_options

pytestmark = pytest.mark.timeout(60)

App = Callable[..., Any]


# -- the proxy's side: an extended CONNECT and RFC 6455 frames in DATA -----------------------------


class WSClient:
    """One WebSocket as the proxy peer opens it on stream ``sid``: frames out, frames in."""

    def __init__(self, peer: ProxyPeer, sid: int) -> None:
        self.peer = peer
        self.sid = sid
        self.codec = FrameProtocol(client=True, extensions=[])
        self._seen = 0  # DATA frames of the stream already fed to the codec
        self._frames: list[Frame] = []

    def open(self, path: str = "/ws", headers: list[tuple[str, str]] | None = None,
             authority: str = "chat.example:8443") -> tuple[int, dict[str, str]]:
        """Send the extended CONNECT; return the response's status and fields."""
        hs: list[tuple[str | bytes, str | bytes]] = [
            (":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"), (":path", path),
            (":authority", authority)]
        hs += headers if headers is not None else [("sec-websocket-version", "13")]
        self.peer.send_headers(self.sid, hs, end_stream=False)
        f = self.peer.wait_headers(self.sid)
        decoded = dict(f.decoded)  # type: ignore[attr-defined]
        return int(decoded.pop(":status")), decoded

    def send(self, data: bytes | str) -> None:
        self.peer.send_body(self.sid, bytes(self.codec.send_data(data)), end_stream=False)

    def send_raw(self, data: bytes) -> None:
        self.peer.send_body(self.sid, data, end_stream=False)

    def ping(self, payload: bytes) -> None:
        self.peer.send_body(self.sid, bytes(self.codec.ping(payload)), end_stream=False)

    def close(self, code: int = 1000, reason: str = "bye") -> None:
        self.peer.send_body(self.sid, bytes(self.codec.close(code, reason)), end_stream=False)

    def _pull(self) -> bool:
        data = [f for f in self.peer.stream_frames(self.sid) if isinstance(f, DataFrame)]
        new = data[self._seen:]
        self._seen = len(data)
        for f in new:
            self.codec.receive_bytes(f.data)
        self._frames += list(self.codec.received_frames())
        return bool(self._frames)

    def frame(self, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """The next whole frame from the app."""
        self.peer.wait_until(self._pull, timeout, f"a WebSocket frame on stream {self.sid}")
        return self._frames.pop(0)

    def message(self, timeout: float = DEFAULT_TIMEOUT) -> bytes | str:
        """The next data message (control frames skipped; fragments joined)."""
        parts: list[Any] = []
        while True:
            f = self.frame(timeout)
            if f.opcode in (Opcode.PING, Opcode.PONG):
                continue
            parts.append(f.payload)
            if f.message_finished:
                return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)


@pytest.fixture
def ws_worker() -> Iterator[Callable[..., WorkerHarness]]:
    """``ws_worker(app, max_websockets=..., idle=..., clock=..., **harness_kw)``: a harness whose
    policy has a WebSocketService; teardown stops both pools (tests/conftest.py checks for threads left)."""
    made: list[tuple[WorkerHarness, WebSocketService]] = []

    def factory(app: App, *, max_websockets: int = 8, idle: float = 0.0, clock: FakeClock | None = None,
                options: Any = None, **kw: Any) -> WorkerHarness:
        options = options or worker_options()
        if clock is not None:
            kw["tunnel_kw"] = {"clock": clock}
        h = WorkerHarness(app, options=options, handshake=False, **kw)
        svc = WebSocketService(max_websockets, idle, clock=clock or time.monotonic)
        # (before the handshake no stream can arrive: the policy is swapped before any is opened)
        h.tunnel.streams = StreamPolicy(options, h.ctx, h.pool.submit, websockets=svc)
        h.peer.handshake()
        assert h.tunnel.ready.wait(DEFAULT_TIMEOUT)
        h.websockets = svc  # type: ignore[attr-defined]
        made.append((h, svc))
        return h

    yield factory
    for h, svc in made:
        h.close()
        assert svc.shutdown(DEFAULT_TIMEOUT), "WebSocket threads did not exit"


def wait_open(svc: WebSocketService, n: int) -> None:
    """Until ``n`` sockets are open in ``svc`` (their handlers running), bounded."""
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    while svc.open != n:
        assert time.monotonic() < deadline, f"{svc.open} WebSockets open, expected {n}"
        threading.Event().wait(0.005)


def wait_len(items: list[Any], n: int) -> None:
    """Until an app thread appended ``n`` items, bounded."""
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    while len(items) < n:
        assert time.monotonic() < deadline, f"only {items}"
        threading.Event().wait(0.005)


# -- apps --------------------------------------------------------------------------------------------


def flask_sock_echo(**server_options: Any) -> flask.Flask:
    app = flask.Flask(__name__)
    app.config["SOCK_SERVER_OPTIONS"] = server_options
    sock = Sock(app)

    @sock.route("/ws")
    def echo(ws: Any) -> None:
        while True:
            data = ws.receive()
            if data == "close":
                ws.close(reason=4000, message="asked to")
                return
            ws.send(data)

    @app.route("/plain")
    def plain() -> str:
        return "plain"

    return app


# -- the SETTINGS ----------------------------------------------------------------------------------------


def test_the_worker_advertises_extended_connect_by_default(ws_worker: Any) -> None:
    h = ws_worker(flask_sock_echo())
    assert h.peer.remote_settings.get(SettingCodes.ENABLE_CONNECT_PROTOCOL) == 1


def test_with_websockets_off_the_setting_is_absent_and_protocol_is_malformed(make_worker: Any) -> None:
    h = make_worker(flask_sock_echo(), options=worker_options(websockets=False))
    assert SettingCodes.ENABLE_CONNECT_PROTOCOL not in h.peer.remote_settings
    WSClient(h.peer, 1).peer.send_headers(1, [(":method", "CONNECT"), (":protocol", "websocket"), (
        ":scheme", "https"), (":path", "/ws"), (":authority", "x")], end_stream=False)
    assert h.peer.wait_rst(1).error_code == ErrorCodes.PROTOCOL_ERROR


# -- flask-sock / simple-websocket -----------------------------------------------------------------


def test_flask_sock_echo_text_and_binary_then_the_app_closes(ws_worker: Any) -> None:
    h = ws_worker(flask_sock_echo())
    c = WSClient(h.peer, 1)
    status, fields = c.open()
    assert status == 200  # RFC 8441: 200, not 101, and no Sec-WebSocket-Accept
    assert "sec-websocket-accept" not in fields and "upgrade" not in fields and "connection" not in fields
    c.send("hello")
    assert c.message() == "hello"
    big = bytes(range(256)) * 4096  # 1 MiB: flow control both ways
    c.send(big)
    assert c.message() == big
    for i in range(100):
        c.send(f"m{i}")
    assert [c.message() for _ in range(100)] == [f"m{i}" for i in range(100)]
    c.send("close")
    f = c.frame()
    assert f.opcode == Opcode.CLOSE and f.payload == (4000, "asked to")
    # the handler returned: the stream ends cleanly (END_STREAM), never a reset with an error
    r = h.peer.response(1)
    assert r.ended and r.reset in (None, ErrorCodes.NO_ERROR)
    wait_open(h.websockets, 0)


def test_the_client_closing_ends_the_app_and_the_stream(ws_worker: Any) -> None:
    h = ws_worker(flask_sock_echo())
    c = WSClient(h.peer, 1)
    assert c.open()[0] == 200
    c.close(1001, "going away")
    f = c.frame()  # simple-websocket answers the close
    assert f.opcode == Opcode.CLOSE and f.payload[0] == 1001
    r = h.peer.response(1)
    assert r.ended and r.reset in (None, ErrorCodes.NO_ERROR)
    wait_open(h.websockets, 0)


def test_subprotocol_and_extension_negotiated_by_the_app_reach_the_response(ws_worker: Any) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(environ)
        ws = simple_websocket.Server(environ, subprotocols=["v2.chat"])
        ws.send(ws.receive())
        ws.close()
        return []

    h = ws_worker(app)
    c = WSClient(h.peer, 1)
    status, fields = c.open(headers=[("sec-websocket-version", "13"), ("sec-websocket-protocol", "v1.chat, v2.chat"),
                                     ("sec-websocket-extensions", "permessage-deflate"),
                                     ("origin", "https://chat.example")])
    assert status == 200
    assert fields["sec-websocket-protocol"] == "v2.chat"
    assert fields["sec-websocket-extensions"].startswith("permessage-deflate")
    assert seen["HTTP_SEC_WEBSOCKET_PROTOCOL"] == "v1.chat, v2.chat"
    assert seen["HTTP_ORIGIN"] == "https://chat.example"
    deflate = PerMessageDeflate()  # the extension as the app negotiated it: messages are compressed
    deflate.finalize(fields["sec-websocket-extensions"])
    c.codec = FrameProtocol(client=True, extensions=[deflate])
    c.send("x" * 1000)
    assert c.message() == "x" * 1000


def test_the_environ_is_the_http11_upgrade_the_libraries_parse(ws_worker: Any) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(environ)
        start_response("403 Forbidden", [("Content-Type", "text/plain")])
        return [b"no"]

    h = ws_worker(app)
    status, _ = WSClient(h.peer, 1).open("/socket.io/?EIO=4&transport=websocket")
    assert status == 403
    assert seen["REQUEST_METHOD"] == "GET" and seen["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert (seen["PATH_INFO"], seen["QUERY_STRING"]) == ("/socket.io/", "EIO=4&transport=websocket")
    assert seen["HTTP_UPGRADE"] == "websocket" and seen["HTTP_CONNECTION"] == "Upgrade"
    assert seen["HTTP_HOST"] == "chat.example:8443"
    assert seen["SERVER_NAME"] == "chat.example" and seen["SERVER_PORT"] == "8443"
    assert seen["HTTP_SEC_WEBSOCKET_VERSION"] == "13"
    assert len(base64.b64decode(seen["HTTP_SEC_WEBSOCKET_KEY"], validate=True)) == 16  # synthesised
    assert "CONTENT_LENGTH" not in seen and seen["wsgi.input"].read() == b""
    assert seen["werkzeug.socket"] is seen["gunicorn.socket"] is seen["rhttp.websocket"]
    assert isinstance(seen["werkzeug.socket"], TunnelSocket)
    assert "HTTP_PROTOCOL" not in seen and ":protocol" not in str(seen.keys())


def test_a_key_sent_by_the_proxy_is_kept() -> None:
    fields = upgrade_fields([(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":path", b"/"),
                             (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                             (b"sec-websocket-version", b"13")])
    assert fields.count((b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ==")) == 1
    assert [n for n, _ in fields].count(b"sec-websocket-version") == 1
    assert (b":method", b"GET") in fields and not any(n == b":protocol" for n, _ in fields)


# -- answers that are not an upgrade --------------------------------------------------------------


def test_an_app_answering_200_without_upgrading_gets_502_never_200(ws_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/html")])
        return [b"<html>not a websocket</html>"]

    h = ws_worker(app)
    status, _ = WSClient(h.peer, 1).open()
    assert status == 502
    r = h.peer.response(1)
    assert b"did not accept the WebSocket" in r.body and b"<html>" not in r.body


def test_a_flask_route_that_is_not_a_websocket_route_is_not_a_200(ws_worker: Any) -> None:
    h = ws_worker(flask_sock_echo())
    status, _ = WSClient(h.peer, 1).open("/plain")
    assert status != 200 and status >= 400  # werkzeug's WebsocketMismatch (400)


def wsproto_server(environ: dict[str, Any]) -> WSConnection:
    """A wsproto server fed the request from the environ, as a WSGI app using wsproto directly does."""
    conn = WSConnection(ConnectionType.SERVER)
    head = "GET / HTTP/1.1\r\n" + "".join(
        f"{k[5:].replace('_', '-').title()}: {v}\r\n" for k, v in environ.items() if k.startswith("HTTP_"))
    conn.receive_data(head.encode("latin-1") + b"\r\n")
    assert isinstance(next(conn.events()), Request)
    return conn


def test_wsproto_rejection_written_to_the_socket_passes_through(ws_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sock = environ["gunicorn.socket"]
        conn = wsproto_server(environ)
        sock.sendall(conn.send(RejectConnection(status_code=426, headers=[
            (b"sec-websocket-version", b"13"), (b"content-length", b"4")], has_body=True)))
        sock.sendall(conn.send(RejectData(data=b"nope")))
        return []

    h = ws_worker(app)
    status, fields = WSClient(h.peer, 1).open()
    r = h.peer.response(1)
    assert (status, fields.get("sec-websocket-version"), r.body, r.ended) == (426, "13", b"nope", True)


def test_an_app_writing_a_2xx_head_to_the_socket_gets_502(ws_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["werkzeug.socket"].sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        return []

    h = ws_worker(app)
    assert WSClient(h.peer, 1).open()[0] == 502
    assert b"abc" not in h.peer.response(1).body


def test_a_head_split_across_writes_still_upgrades(ws_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = wsproto_server(environ)
        head = conn.send(AcceptConnection())
        sock = environ["werkzeug.socket"]
        for i in range(len(head)):  # one byte at a time
            sock.send(head[i:i + 1])
        sock.sendall(conn.send(WsText(data="hi")))
        while True:
            data = sock.recv(4096)
            if not data:
                return []
            conn.receive_data(data)
            for ev in conn.events():
                if isinstance(ev, CloseConnection):
                    sock.sendall(conn.send(ev.response()))
                    sock.close()
                    return []

    h = ws_worker(app)
    c = WSClient(h.peer, 1)
    assert c.open()[0] == 200
    assert c.message() == "hi"
    c.close()
    assert c.frame().opcode == Opcode.CLOSE
    assert h.peer.response(1).ended


def test_start_response_101_is_an_upgrade_too(ws_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("101 Switching Protocols", [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                                   ("Sec-WebSocket-Protocol", "raw")])
        yield bytes(FrameProtocol(client=False, extensions=[]).send_data("from the body"))

    h = ws_worker(app)
    c = WSClient(h.peer, 1)
    status, fields = c.open()
    assert (status, fields["sec-websocket-protocol"]) == (200, "raw")
    assert c.message() == "from the body"
    assert h.peer.response(1).ended


def test_other_protocols_get_501(ws_worker: Any) -> None:
    h = ws_worker(flask_sock_echo())
    h.peer.send_headers(1, [(":method", "CONNECT"), (":protocol", "connect-udp"), (":scheme", "https"),
                            (":path", "/.well-known/masque/udp/x/53/"), (":authority", "x")], end_stream=False)
    r = h.peer.response(1)
    assert r.status == 501 and b"connect-udp" in r.body


# -- the client going away, the idle timeout, limits ----------------------------------------------


def test_a_reset_from_the_proxy_cancels_the_app_and_its_reads_return_eof(ws_worker: Any) -> None:
    got: list[Any] = []
    done = threading.Event()

    def raw(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sock = environ["gunicorn.socket"]
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        got.append(sock.recv(100))  # blocks until the reset
        got.append(environ["rhttp.cancelled"].is_set())
        done.set()
        return []

    h = ws_worker(raw)
    c = WSClient(h.peer, 1)
    assert c.open()[0] == 200
    h.peer.send_rst(1, ErrorCodes.CANCEL)
    assert done.wait(DEFAULT_TIMEOUT)
    assert got == [b"", True]
    wait_open(h.websockets, 0)


def test_the_client_ending_its_side_is_eof_for_the_app(ws_worker: Any) -> None:
    got: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sock = environ["gunicorn.socket"]
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        while data := sock.recv(3):
            got.append(data)
        got.append(b"EOF" if environ["rhttp.cancelled"].is_set() else b"EOF, not cancelled")
        sock.sendall(b"bye")
        raise StopIteration  # flask-sock's gunicorn mode: the server closes the connection

    h = ws_worker(app)
    c = WSClient(h.peer, 1)
    assert c.open()[0] == 200
    h.peer.send_body(1, b"abcdefg", end_stream=True)
    r = h.peer.response(1)
    assert (b"".join(got), r.body, r.ended, r.reset) == (b"abcdefgEOF", b"bye", True, None)


def test_idle_websocket_is_reset_after_its_idle_timeout_and_traffic_rearms_it(ws_worker: Any) -> None:
    clock = FakeClock()
    h = ws_worker(flask_sock_echo(), idle=10.0, clock=clock)
    c = WSClient(h.peer, 1)
    assert c.open()[0] == 200
    clock.advance(6)
    c.send("still here")  # traffic at t+6 re-arms: the deadline is now t+16
    assert c.message() == "still here"
    clock.advance(6)  # t+12: past the first deadline, not the second
    h.peer.barrier()
    assert not h.peer.find(RstStreamFrame, 1)
    clock.advance(5)  # t+17
    h.peer.barrier()
    assert h.peer.wait_rst(1).error_code == ErrorCodes.CANCEL
    wait_open(h.websockets, 0)  # the app saw EOF and returned


def test_request_timeout_does_not_apply_to_websockets(ws_worker: Any) -> None:
    clock = FakeClock()
    h = ws_worker(flask_sock_echo(), clock=clock, options=worker_options(request_timeout=1.0))
    c = WSClient(h.peer, 1)
    assert c.open()[0] == 200
    clock.advance(100)
    h.peer.barrier()  # (PINGs keep working on a tunnel with an open WebSocket)
    c.send("alive")
    assert c.message() == "alive"
    assert not h.peer.find(RstStreamFrame, 1)


def test_over_max_websockets_is_503_and_plain_requests_still_run(ws_worker: Any) -> None:
    h = ws_worker(flask_sock_echo(), max_websockets=2, threads=1)
    first, second = WSClient(h.peer, 1), WSClient(h.peer, 3)
    assert first.open()[0] == 200 and second.open()[0] == 200
    status, fields = WSClient(h.peer, 5).open()
    r = h.peer.response(5)
    assert status == 503 and b"max_websockets" in r.body and fields.get("retry-after") == "1"
    # two sockets hold their threads, yet the app's own pool (1 thread) still serves requests
    h.peer.request(7, "GET", "/plain")
    assert h.peer.response(7).body == b"plain"
    first.send("close")
    assert first.frame().opcode == Opcode.CLOSE
    wait_open(h.websockets, 1)
    assert WSClient(h.peer, 9).open()[0] == 200  # a freed slot is reusable
    assert h.websockets.refused == 1


def test_the_app_not_reading_stops_credit_to_the_client(ws_worker: Any) -> None:
    release = threading.Event()
    got = bytearray()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sock = environ["gunicorn.socket"]
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        release.wait(DEFAULT_TIMEOUT)
        while len(got) < 65535:
            got.extend(sock.recv(65536))
        return []

    h = ws_worker(app, options=worker_options(initial_window_size=65535))
    c = WSClient(h.peer, 1)
    assert c.open()[0] == 200
    mark = h.peer.mark()
    c.send_raw(b"x" * 65535)  # the whole stream window
    h.peer.barrier()
    assert not h.peer.find(lambda f: isinstance(f, WindowUpdateFrame) and f.stream_id == 1, start=mark)
    release.set()
    h.peer.wait_for(lambda f: isinstance(f, WindowUpdateFrame) and f.stream_id == 1, start=mark)
    assert h.peer.response(1).ended and len(got) == 65535


def test_simple_websocket_ping_interval_uses_fileno_and_still_echoes(ws_worker: Any) -> None:
    """simple-websocket with ping_interval waits in a selector on the socket's fileno()."""
    h = ws_worker(flask_sock_echo(ping_interval=0.2))
    c = WSClient(h.peer, 1)
    assert c.open()[0] == 200
    f = c.frame()  # nothing sent: the app's ping timer fires (the selector timed out)
    assert f.opcode == Opcode.PING
    h.peer.send_body(1, bytes(c.codec.pong(f.payload)), end_stream=False)
    c.send("after ping")
    assert c.message() == "after ping"  # readable through the selector
    c.send("close")
    while c.frame().opcode != Opcode.CLOSE:
        pass
    assert h.peer.response(1).ended


def test_the_app_failing_after_the_upgrade_resets_the_stream(ws_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["werkzeug.socket"].sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                           b"Connection: Upgrade\r\n\r\n")
        raise RuntimeError("app bug")

    h = ws_worker(app)
    assert WSClient(h.peer, 1).open()[0] == 200
    assert h.peer.wait_rst(1).error_code == ErrorCodes.INTERNAL_ERROR


def test_a_library_thread_waiting_in_its_selector_wakes_when_the_websocket_ends(ws_worker: Any) -> None:
    """simple-websocket's reader waits in select() for up to ping_interval: ending the WebSocket
    must wake it (the descriptor polls readable), not leave it parked for the interval."""
    def reader_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if "simple_websocket" in t.name]

    h = ws_worker(flask_sock_echo(ping_interval=300))
    c = WSClient(h.peer, 1)
    assert c.open()[0] == 200
    c.send("hi")
    assert c.message() == "hi"
    assert len(reader_threads()) == 1
    c.send("close")  # the app closes and returns while its reader waits in the selector
    assert c.frame().opcode == Opcode.CLOSE
    assert h.peer.response(1).ended
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    while reader_threads():
        assert time.monotonic() < deadline, "simple-websocket's reader is still parked in its selector"
        threading.Event().wait(0.01)


def test_the_access_log_has_one_line_when_the_websocket_ends_with_101_and_its_bytes(
        ws_worker: Any, caplog: pytest.LogCaptureFixture) -> None:
    from rhttp_wsgi.accesslog import AccessLog

    caplog.set_level("INFO", logger="rhttp_wsgi.access")
    log = AccessLog("%(r)s %(s)s %(b)s", side="worker", background=False)
    h = ws_worker(flask_sock_echo(), ctx_kw={"access_log": log})
    c = WSClient(h.peer, 1)
    assert c.open("/ws?room=1")[0] == 200
    c.send("x" * 100)
    assert c.message() == "x" * 100
    assert not [r for r in caplog.records if r.name == "rhttp_wsgi.access"]  # not while it is open
    c.send("close")
    assert c.frame().opcode == Opcode.CLOSE
    wait_open(h.websockets, 0)
    [line] = [r.getMessage() for r in caplog.records if r.name == "rhttp_wsgi.access"]
    sent = line.rsplit(" ", 1)[1]
    assert line.startswith("GET /ws?room=1 HTTP/1.1 101 ") and int(sent) > 100  # 101, then the frames


def test_the_socket_behaves_like_a_socket_for_timeouts_errors_and_close(ws_worker: Any) -> None:
    outcomes: list[Any] = []
    done = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sock = environ["gunicorn.socket"]
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        sock.setblocking(False)
        for exc in (BlockingIOError, TimeoutError):
            try:
                sock.recv(10)
            except exc as e:
                outcomes.append(type(e).__name__)
            sock.settimeout(0.01)
        sock.settimeout(None)
        outcomes.append(sock.recv(10))  # b"go"
        outcomes.append(sock.recv(10))  # b"": the proxy reset the stream
        try:
            sock.sendall(b"late")
        except BrokenPipeError:
            outcomes.append("BrokenPipeError")
        sock.close()
        try:
            sock.recv(1)
        except OSError as e:
            outcomes.append(e.errno == errno.EBADF)
        done.set()
        return []

    h = ws_worker(app)
    c = WSClient(h.peer, 1)
    assert c.open()[0] == 200
    wait_len(outcomes, 2)  # the two timeouts
    c.send_raw(b"go")
    wait_len(outcomes, 3)  # the bytes
    h.peer.send_rst(1, ErrorCodes.CANCEL)
    assert done.wait(DEFAULT_TIMEOUT)
    assert outcomes == ["BlockingIOError", "TimeoutError", b"go", b"", "BrokenPipeError", True]


# -- fileno(): level-triggered readiness, like a real socket's ---------------------------------------------


def readable(fd: int, timeout: float = 0.0) -> bool:
    import select
    return bool(select.select([fd], [], [], timeout)[0])


def test_the_descriptor_is_readable_exactly_while_bytes_wait_and_at_the_end(ws_worker: Any) -> None:
    """recv() hands out at most what was asked; the rest keeps fileno() readable, as on a socket."""
    seen: list[Any] = []
    step = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sock = environ["gunicorn.socket"]
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        fd = sock.fileno()
        seen.append(readable(fd))  # nothing sent yet
        step.set()
        seen.append(readable(fd, DEFAULT_TIMEOUT))  # the 10 bytes arrived
        for _ in range(4):
            seen.append(sock.recv(3))
            seen.append(readable(fd))  # True while bytes remain, False after the last one
        seen.append(readable(fd, DEFAULT_TIMEOUT))  # the client ended its side
        seen.append(sock.recv(3))
        seen.append(readable(fd))  # EOF stays readable
        return []

    h = ws_worker(app)
    c = WSClient(h.peer, 1)
    assert c.open()[0] == 200
    assert step.wait(DEFAULT_TIMEOUT)
    c.send_raw(b"0123456789")  # one DATA frame
    wait_len(seen, 10)
    h.peer.send_body(1, b"", end_stream=True)
    assert h.peer.response(1).ended
    assert seen == [False, True, b"012", True, b"345", True, b"678", True, b"9", False, True, b"", True]


@pytest.mark.parametrize("size", [4097, 5008, 70000, 1 << 20])
def test_simple_websocket_with_ping_interval_echoes_a_message_longer_than_its_reads_at_once(
        ws_worker: Any, size: int) -> None:
    """simple-websocket reads 4 KiB, then waits in its selector: the bytes left over must keep the
    descriptor readable, not wait for the next ping (300 s here) to be noticed."""
    h = ws_worker(flask_sock_echo(ping_interval=300))
    c = WSClient(h.peer, 1)
    assert c.open()[0] == 200
    for payload in (b"\x01" * size, "t" * size):
        c.send(payload)
        assert c.message() == payload
    c.send("close")
    while c.frame().opcode != Opcode.CLOSE:
        pass
    assert h.peer.response(1).ended


def wait_in_epoll(thread: threading.Thread) -> None:
    """Until ``thread`` sleeps in epoll_wait (Linux: its wchan), bounded; elsewhere a short pause."""
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    try:
        while "epoll" not in open(f"/proc/self/task/{thread.native_id}/wchan").read():
            assert time.monotonic() < deadline, "the waiter never reached epoll_wait"
            threading.Event().wait(0.002)
    except OSError:
        threading.Event().wait(0.1)


@pytest.mark.parametrize("ending", ["close", "return"])
def test_a_selector_waiting_on_the_descriptor_wakes_when_the_socket_closes_or_the_handler_returns(
        ws_worker: Any, ending: str) -> None:
    """Closing the descriptor a selector waits on wakes nothing (epoll drops it): ending the socket
    must make it readable instead, and keep it so while anything may still poll it."""
    import selectors

    woke: list[Any] = []
    waiting = threading.Event()
    stop_waiter = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sock = environ["gunicorn.socket"]
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)

        def waiter() -> None:  # a library's reader thread (simple-websocket's, with ping_interval)
            try:
                waiting.set()
                woke.append(bool(sel.select(30 if not stop_waiter.is_set() else 0)))
                woke.append(bool(sel.select(0)))  # still readable when asked again
            finally:
                sel.close()

        thread = threading.Thread(target=waiter, name="test-ws-waiter")
        thread.start()
        assert waiting.wait(DEFAULT_TIMEOUT)
        wait_in_epoll(thread)
        if ending == "close":
            sock.close()
        return []

    h = ws_worker(app)
    assert WSClient(h.peer, 1).open()[0] == 200
    try:
        wait_len(woke, 2)
    finally:
        stop_waiter.set()
    assert woke == [True, True]
    assert h.peer.response(1).ended


# -- the worker's shutdown ends its WebSockets promptly -------------------------------------------------


def test_drain_ends_open_websockets_through_their_library_and_ends_the_streams(ws_worker: Any) -> None:
    closed: list[Any] = []
    app = flask.Flask(__name__)
    app.config["SOCK_SERVER_OPTIONS"] = {"ping_interval": 300}
    sock = Sock(app)

    @sock.route("/ws")
    def echo(ws: Any) -> None:
        try:
            while True:
                ws.send(ws.receive())
        except simple_websocket.ConnectionClosed:
            closed.append(flask.request.environ["rhttp.cancelled"].is_set())
            raise

    h = ws_worker(app)
    clients = [WSClient(h.peer, sid) for sid in (1, 3)]
    for c in clients:
        assert c.open()[0] == 200
        c.send("hi")
        assert c.message() == "hi"
    assert h.websockets.drain(grace=30.0) == 2
    for c in clients:
        r = h.peer.response(c.sid)  # ended by the app's return, long before the grace
        # (then RST_STREAM(NO_ERROR): the response is complete, the client's side is not wanted)
        assert r.ended and r.reset in (None, ErrorCodes.NO_ERROR)
    wait_len(closed, 2)
    assert closed == [True, True]
    wait_open(h.websockets, 0)


def test_drain_resets_a_websocket_whose_app_ignores_the_end_after_the_grace(ws_worker: Any) -> None:
    outcomes: list[Any] = []

    def pusher(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sock = environ["gunicorn.socket"]
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        outcomes.append("open")
        try:
            for _ in range(2000):  # never reads: only the reset stops it (bounded: 20 s)
                sock.sendall(b"tick")
                threading.Event().wait(0.01)
        except BrokenPipeError:
            outcomes.append("reset")
        return []

    h = ws_worker(pusher)
    c = WSClient(h.peer, 1)
    assert c.open()[0] == 200
    wait_len(outcomes, 1)
    started = time.monotonic()
    assert h.websockets.drain(grace=0.3) == 1
    assert h.peer.wait_rst(1).error_code == ErrorCodes.CANCEL
    assert 0.2 < time.monotonic() - started < DEFAULT_TIMEOUT
    wait_len(outcomes, 2)
    assert outcomes == ["open", "reset"]
    wait_open(h.websockets, 0)


def test_a_websocket_starting_during_the_drain_ends_at_once(ws_worker: Any) -> None:
    got: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sock = environ["gunicorn.socket"]
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        got.append(sock.recv(10))
        got.append(environ["rhttp.cancelled"].is_set())
        return []

    h = ws_worker(app)
    assert h.websockets.drain(grace=30.0) == 0
    assert WSClient(h.peer, 1).open()[0] == 200
    r = h.peer.response(1)
    assert r.ended and r.reset in (None, ErrorCodes.NO_ERROR) and got == [b"", True]
