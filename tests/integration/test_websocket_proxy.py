"""The proxy side of WebSockets: a public HTTP/1.1 upgrade through the turnkey server becomes an
RFC 8441 extended CONNECT on a worker's tunnel, answered 101 and relayed both ways.

The worker here is a raw HTTP/2 peer (:class:`tests.h2peer.WorkerPeer`) that advertises
SETTINGS_ENABLE_CONNECT_PROTOCOL and runs a wsproto server connection per CONNECT stream (an
echo), so every frame the proxy sends is seen as sent; the client is the real ``websockets``
sync client, or a raw socket for the handshake checks.  (The real worker behind the real proxy:
the end-to-end tests at the bottom, with a simple-websocket app; skipped when the worker does not
advertise SETTINGS_ENABLE_CONNECT_PROTOCOL.)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hyperframe.frame import DataFrame, Frame, HeadersFrame, RstStreamFrame

from tests.h2peer import S, WorkerPeer

from .proxy_fixtures import (  # noqa: F401  (fixtures)
    WAIT,
    Env,
    env_fixture,
    hello_app,
    pki_fixture,
    read_until_close,
    wait_until,
)

ws_client = pytest.importorskip("websockets.sync.client", reason="needs the websockets package (test extra)")
wsproto_conn = pytest.importorskip("wsproto.connection", reason="needs wsproto (test extra)")
wsproto_events = pytest.importorskip("wsproto.events", reason="needs wsproto (test extra)")
ws_exceptions = pytest.importorskip("websockets.exceptions", reason="needs the websockets package (test extra)")

pytestmark = pytest.mark.timeout(60)

ENABLE_CONNECT_PROTOCOL = 0x8
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
#: RFC 6455 §1.3's worked example: the accept for KEY.
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


class EchoWorker(WorkerPeer):
    """A raw worker that takes extended CONNECTs: answers ``status`` (200: a wsproto echo server on
    the stream; else that status with a body) and records every CONNECT's header fields.

    ``subprotocol``: echoed back as the negotiated sec-websocket-protocol when the request offers it.
    ``echo=False``: accept, then keep quiet (for the idle and close tests).
    ``refuse``: that many first CONNECTs get RST_STREAM(REFUSED_STREAM).
    """

    def __init__(self, env: Env, *, status: int = 200, advertise: bool = True, subprotocol: str | None = None,
                 echo: bool = True, refuse: int = 0) -> None:
        self.status = status
        self.refuse = refuse
        self.subprotocol = subprotocol
        self.echo = echo
        self.connects: dict[int, list[tuple[bytes, bytes]]] = {}
        self.ws: dict[int, Any] = {}
        self.ended_by_proxy: set[int] = set()
        self.we_ended: set[int] = set()
        self.send_failures: list[str] = []
        settings = {S.MAX_CONCURRENT_STREAMS: 100, S.INITIAL_WINDOW_SIZE: 1 << 20}
        if advertise:
            settings[ENABLE_CONNECT_PROTOCOL] = 1
        cert, key = env.pki.workers["worker"]
        # Replies go out on a thread of their own: waiting for send window on the reader thread
        # would wait for the WINDOW_UPDATE that only the reader can take in.
        self.outbox: queue.Queue[tuple[int, bytes, bool] | None] = queue.Queue()
        self.sender = threading.Thread(target=self._send_loop, name="echo-worker-sender", daemon=True)
        self.sender.start()
        super().__init__(env.tunnel_port, str(cert), str(key), str(env.pki.ca_cert), settings=settings)

    def _send_loop(self) -> None:
        while (item := self.outbox.get()) is not None:
            sid, data, end = item
            try:
                self.send_body(sid, data, end_stream=end, timeout=3 * WAIT)
            except AssertionError as e:  # no window: the stream or the tunnel is gone
                self.send_failures.append(str(e)[:300])

    def close(self, timeout: float = 5.0) -> None:
        self.outbox.put(None)
        self.sender.join(timeout)
        super().close(timeout)

    def _received_locked(self, f: Frame, block: HeadersFrame | None) -> Callable[[], None] | None:
        if block is not None:
            fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in block.decoded]  # type: ignore[attr-defined]
            if (b":method", b"CONNECT") in fields:
                sid = block.stream_id
                self.connects[sid] = fields
                return lambda: self._answer(sid, fields)
            return super()._received_locked(f, block)
        if isinstance(f, DataFrame) and f.stream_id in self.connects:
            sid, data, end = f.stream_id, f.data, "END_STREAM" in f.flags
            if end:
                self.ended_by_proxy.add(sid)
            return lambda: self._on_data(sid, data, end)
        return super()._received_locked(f, block)

    def _answer(self, sid: int, fields: list[tuple[bytes, bytes]]) -> None:
        if self.refuse:
            self.refuse -= 1
            self.send_rst(sid, 7)  # REFUSED_STREAM
            return
        if self.status != 200:
            self.respond(sid, self.status, b"no websocket here\n", [(b"content-type", b"text/plain")])
            return
        headers = [(b":status", b"200")]
        offered = dict(fields).get(b"sec-websocket-protocol")
        if self.subprotocol and offered and self.subprotocol.encode() in offered:
            headers.append((b"sec-websocket-protocol", self.subprotocol.encode()))
        self.ws[sid] = wsproto_conn.Connection(wsproto_conn.ConnectionType.SERVER)
        with self.cond:
            self.send_stream_window.setdefault(sid, self.remote_settings.get(S.INITIAL_WINDOW_SIZE, 65535))
        self.send_frame(self.headers_frame(sid, headers))

    def _on_data(self, sid: int, data: bytes, end: bool) -> None:
        conn = self.ws.get(sid)
        if conn is None or not self.echo:
            return
        if data:
            conn.receive_data(data)
        out = b""
        closing = False
        for ev in conn.events():
            if isinstance(ev, wsproto_events.Message):
                out += conn.send(type(ev)(data=ev.data, message_finished=ev.message_finished))
            elif isinstance(ev, wsproto_events.Ping):
                out += conn.send(ev.response())
            elif isinstance(ev, wsproto_events.CloseConnection):
                out += conn.send(ev.response())
                closing = True
        if sid in self.we_ended:
            return
        if closing or end:
            self.we_ended.add(sid)
        if out or closing or end:
            self.outbox.put((sid, out, closing or end))

    def push(self, sid: int, data: bytes, *, end: bool = False) -> None:
        """Send raw bytes down a WebSocket stream (DATA), optionally ending our side."""
        if end:
            self.we_ended.add(sid)
        self.outbox.put((sid, data, end))

    def frames_of(self, sid: int) -> list[Frame]:
        with self.cond:
            return [f for f in self.frames if f.stream_id == sid]


@pytest.fixture(name="worker")
def worker_fixture(env: Env) -> Iterator[Callable[..., EchoWorker]]:
    peers: list[EchoWorker] = []

    def start(**kw: Any) -> EchoWorker:
        if env._proxy is None:
            env.start_proxy()
        before = len(env.proxy.workers())
        w = EchoWorker(env, **kw)
        peers.append(w)
        assert env.proxy.wait_for_workers(before + 1, WAIT)
        return w

    try:
        yield start
    finally:
        for w in peers:
            w.close()


def ws_url(env: Env, path: str = "/chat") -> str:
    return f"ws://{env.public[0]}:{env.public[1]}{path}"


def handshake(path: str = "/chat", *, key: str = KEY, version: str = "13", extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: app.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n{extra}\r\n").encode()


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response with a Content-Length: (head, body)."""
    data = read_head(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head, body


# -- the handshake ---------------------------------------------------------------------------------


def test_upgrade_becomes_an_extended_connect_and_the_client_gets_101_with_the_accept(env: Env, worker: Any) -> None:
    w = worker(subprotocol="chat.v2")
    s = env.raw()
    s.sendall(handshake("/chat?room=1", extra="Sec-WebSocket-Protocol: chat.v1, chat.v2\r\n"
                        "Sec-WebSocket-Extensions: permessage-deflate\r\nOrigin: https://app.example\r\n"))
    head = read_head(s)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 101 Switching Protocols", head
    fields = {k.lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:] if ln)}
    assert fields[b"upgrade"] == b"websocket" and fields[b"connection"].lower() == b"upgrade"
    assert fields[b"sec-websocket-accept"] == ACCEPT.encode()
    assert fields[b"sec-websocket-protocol"] == b"chat.v2"
    assert b"content-length" not in fields and b"transfer-encoding" not in fields
    [(sid, sent)] = w.connects.items()
    names = [k for k, _ in sent]
    assert sent[:2] == [(b":method", b"CONNECT"), (b":protocol", b"websocket")]
    d = dict(sent)
    assert (d[b":scheme"], d[b":authority"], d[b":path"]) == (b"http", b"app.example", b"/chat?room=1")
    assert d[b"sec-websocket-version"] == b"13"
    assert d[b"sec-websocket-protocol"] == b"chat.v1, chat.v2"
    assert d[b"sec-websocket-extensions"] == b"permessage-deflate"
    assert d[b"origin"] == b"https://app.example"
    assert b"x-request-id" in d
    for gone in (b"sec-websocket-key", b"upgrade", b"connection", b"host", b"content-length"):
        assert gone not in names, sent
    # The HEADERS did not end the stream: it is the socket's.
    [h] = [f for f in w.frames_of(sid) if isinstance(f, HeadersFrame)]
    assert "END_STREAM" not in h.flags


def test_accept_is_computed_from_the_clients_key(env: Env, worker: Any) -> None:
    worker()
    key = base64.b64encode(os.urandom(16)).decode()
    s = env.raw()
    s.sendall(handshake(key=key))
    head = read_head(s)
    want = base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    assert head.startswith(b"HTTP/1.1 101 ") and b"sec-websocket-accept: " + want + b"\r\n" in head, head


@pytest.mark.parametrize("version", ["8", "", "13x"])
def test_other_websocket_versions_get_426_naming_13(env: Env, worker: Any, version: str) -> None:
    w = worker()
    s = env.raw()
    s.sendall(handshake(version=version))
    out = read_head(s)
    assert out.startswith(b"HTTP/1.1 426 "), out
    assert b"sec-websocket-version: 13\r\n" in out.lower()
    assert not w.connects


@pytest.mark.parametrize("key", ["", "short", base64.b64encode(b"x" * 15).decode(), "!" * 24])
def test_a_key_that_is_not_16_base64_bytes_gets_400(env: Env, worker: Any, key: str) -> None:
    w = worker()
    s = env.raw()
    s.sendall(handshake(key=key))
    out = read_head(s)
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert not w.connects


def test_no_worker_that_advertised_extended_connect_is_503_with_the_reason(env: Env, worker: Any) -> None:
    w = worker(advertise=False)
    s = env.raw()
    s.sendall(handshake())
    head, body = read_response(s)
    assert head.startswith(b"HTTP/1.1 503 "), head
    assert b"no attached worker accepts WebSockets" in body and b"SETTINGS_ENABLE_CONNECT_PROTOCOL" in body, body
    assert not w.connects
    # Plain requests still go to that worker.
    status, _, data, _ = env.request("GET", "/plain")
    assert (status, data) == (200, b"ok /plain")


def test_upgrades_go_only_to_workers_that_advertised(env: Env, worker: Any) -> None:
    plain = worker(advertise=False)
    ws = worker()
    for _ in range(4):
        with ws_client.connect(ws_url(env), open_timeout=WAIT) as c:
            c.send("x")
            assert c.recv(WAIT) == "x"
    assert len(ws.connects) == 4 and not plain.connects


def test_a_worker_answer_that_is_not_2xx_passes_through_as_a_response(env: Env, worker: Any) -> None:
    worker(status=403)
    s = env.raw()
    s.sendall(handshake())
    s.settimeout(WAIT)
    out = b""
    while b"no websocket here\n" not in out:
        chunk = s.recv(4096)
        if not chunk:
            break
        out += chunk
    assert out.startswith(b"HTTP/1.1 403 "), out
    assert out.endswith(b"no websocket here\n") and b"sec-websocket-accept" not in out.lower()
    # The connection is still an HTTP/1.1 one: the next request on it is served.
    s.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    rest = read_until_close(s)
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"ok /after"), rest


def test_upgrade_without_a_socket_to_take_over_is_501(env: Env, worker: Any) -> None:
    """Mounted in a WSGI server that offers no socket (no rhttp.upgrade, werkzeug.socket or gunicorn.socket)."""
    w = worker()
    seen: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/chat", "SERVER_NAME": "x", "SERVER_PORT": "80",
               "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http", "HTTP_HOST": "x",
               "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade", "HTTP_SEC_WEBSOCKET_KEY": KEY,
               "HTTP_SEC_WEBSOCKET_VERSION": "13", "REMOTE_ADDR": "127.0.0.1"}
    body = b"".join(env.proxy.wsgi_app(environ, lambda status, headers, exc=None: seen.append(status)))
    assert seen == ["501 Not Implemented"], seen
    assert b"take over the client connection" in body
    assert not w.connects


def test_websockets_off_forwards_the_upgrade_as_a_plain_get(env: Env, worker: Any) -> None:
    env.start_proxy(websockets=False)
    w = worker()
    s = env.raw()
    s.sendall(handshake())
    out = read_head(s)
    assert out.startswith(b"HTTP/1.1 200 "), out
    assert not w.connects


# -- the relay ------------------------------------------------------------------------------------


def test_echo_text_and_binary_in_order_through_the_real_client(env: Env, worker: Any) -> None:
    worker()
    with ws_client.connect(ws_url(env), open_timeout=WAIT, max_size=None) as c:
        for i in range(100):
            c.send(f"message {i}")
        assert [c.recv(WAIT) for _ in range(100)] == [f"message {i}" for i in range(100)]
        blob = os.urandom(1 << 20)
        c.send(blob)
        assert c.recv(WAIT) == blob
        c.send(b"")  # a 6-byte frame up, a 2-byte frame down
        assert c.recv(WAIT) == b""
        c.ping(b"p").wait(WAIT)
    stats = env.proxy.websocket_stats()
    assert stats["total"] == 1 and stats["bytes_up"] > (1 << 20) and stats["bytes_down"] > (1 << 20)
    assert wait_until(lambda: env.proxy.websocket_stats()["open"] == 0)


def test_twenty_sockets_at_once_and_a_plain_request_alongside(env: Env, worker: Any) -> None:
    worker()
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(ws_client.connect(ws_url(env, f"/s{i}"), open_timeout=WAIT))
                   for i in range(20)]
        assert env.proxy.websocket_stats()["open"] == 20
        status, _, data, _ = env.request("GET", "/plain")
        assert (status, data) == (200, b"ok /plain")
        for i, c in enumerate(clients):
            c.send(f"hello {i}")
        assert [c.recv(WAIT) for c in clients] == [f"hello {i}" for i in range(20)]
    assert wait_until(lambda: env.proxy.websocket_stats()["open"] == 0)
    assert [w.in_flight for w in env.proxy.workers()] == [0]


def test_client_close_code_reaches_the_worker_and_the_stream_ends_cleanly(env: Env, worker: Any) -> None:
    w = worker()
    with ws_client.connect(ws_url(env), open_timeout=WAIT) as c:
        c.close(code=4001, reason="bye")
    assert c.close_code == 4001  # the worker's wsproto echoed the close
    [sid] = w.connects
    w.wait_until(lambda: sid in w.ended_by_proxy, WAIT, "END_STREAM from the proxy")
    assert not any(isinstance(f, RstStreamFrame) for f in w.frames_of(sid))
    assert wait_until(lambda: env.proxy.websocket_stats()["open"] == 0)


def test_worker_close_reaches_the_client_with_its_code(env: Env, worker: Any) -> None:
    w = worker(echo=False)
    with ws_client.connect(ws_url(env), open_timeout=WAIT) as c:
        [sid] = w.connects
        conn = w.ws[sid]
        w.push(sid, conn.send(wsproto_events.CloseConnection(code=4002, reason="server says bye")), end=True)
        with pytest.raises(ws_exceptions.ConnectionClosed):
            c.recv(WAIT)
        assert c.close_code == 4002 and c.close_reason == "server says bye"
    assert wait_until(lambda: env.proxy.websocket_stats()["open"] == 0)


def test_client_vanishing_cancels_the_workers_stream(env: Env, worker: Any) -> None:
    w = worker()
    s = env.raw()
    s.sendall(handshake())
    assert read_head(s).startswith(b"HTTP/1.1 101 ")
    [sid] = w.connects
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()  # RST: an error, not a clean end
    env.socks.remove(s)
    w.wait_until(lambda: any(isinstance(f, RstStreamFrame) or "END_STREAM" in f.flags
                             for f in w.frames_of(sid) if isinstance(f, (RstStreamFrame, DataFrame))),
                 WAIT, "the stream to end")
    assert wait_until(lambda: env.proxy.websocket_stats()["open"] == 0)


def test_an_upgrade_the_worker_refused_is_retried(env: Env, worker: Any) -> None:
    w = worker(refuse=1)
    with ws_client.connect(ws_url(env), open_timeout=WAIT) as c:
        c.send("after a refusal")
        assert c.recv(WAIT) == "after a refusal"
    assert len(w.connects) == 2


def test_worker_resetting_the_stream_cuts_the_client(env: Env, worker: Any) -> None:
    w = worker()
    with ws_client.connect(ws_url(env), open_timeout=WAIT) as c:
        c.send("x")
        assert c.recv(WAIT) == "x"
        [sid] = w.connects
        w.send_rst(sid, 2)  # INTERNAL_ERROR: the app died
        with pytest.raises(ws_exceptions.ConnectionClosedError):
            c.recv(WAIT)
    assert wait_until(lambda: env.proxy.websocket_stats()["open"] == 0)
    assert wait_until(lambda: [x.in_flight for x in env.proxy.workers()] == [0])


def test_a_client_that_does_not_read_holds_the_worker_back(env: Env, worker: Any) -> None:
    """Backpressure worker → client: the proxy credits the worker only as the client takes bytes."""
    w = worker(echo=False)
    s = env.raw(timeout=3 * WAIT)  # (48 MiB through TLS and the relay, on a busy machine)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(handshake())
    head = read_head(s)
    assert head.startswith(b"HTTP/1.1 101 ")
    early = head.partition(b"\r\n\r\n")[2]
    [sid] = w.connects
    total = 48 << 20
    payload = os.urandom(1 << 20)
    for _ in range(total >> 20):
        w.push(sid, payload)

    def held_back() -> bool:
        with w.cond:
            return w.send_stream_window.get(sid, 1) <= 0 and w.outbox.qsize() > 0

    # The worker runs out of window with most of the 48 MiB still unsent: nothing buffers it all.
    # (Polled: the window reaches 0 on the peer's sending thread, which notifies no one.)
    assert wait_until(held_back, 10), "the worker never ran out of send window"
    assert early == payload[:len(early)]
    got = len(early)
    while got < total:  # now read: everything arrives, in order
        chunk = s.recv(1 << 20)
        assert chunk, f"EOF after {got} bytes"
        offset = got % len(payload)
        assert chunk == (payload * 2)[offset:offset + len(chunk)], f"wrong bytes at {got}"
        got += len(chunk)
    assert got == total
    assert not w.send_failures


def test_a_worker_that_does_not_read_holds_the_client_back(env: Env, worker: Any) -> None:
    """Backpressure client → worker: the relay stops reading the client while the stream has no window."""
    w = worker(echo=False)
    s = env.raw(timeout=3 * WAIT)
    s.sendall(handshake())
    assert read_head(s).startswith(b"HTTP/1.1 101 ")
    [sid] = w.connects
    w.auto_window = False  # the app reads nothing: no credit for the proxy
    total = 32 << 20
    payload = os.urandom(1 << 20)
    sent = [0]
    done = threading.Event()

    def upload() -> None:
        try:
            for _ in range(total >> 20):
                s.sendall(payload)
                sent[0] += len(payload)
        except OSError:
            pass
        done.set()

    t = threading.Thread(target=upload, name="test-upload", daemon=True)
    t.start()
    try:
        def received() -> int:
            return len(b"".join(f.data for f in w.frames_of(sid) if isinstance(f, DataFrame)))

        # The proxy sends up to the connection window the peer granted (64 KiB), then waits.
        assert wait_until(lambda: received() >= 65535 - 16384, WAIT)
        # Meanwhile the client is stopped by TCP once the relay stopped reading: it cannot get
        # 32 MiB out (the relay holds one chunk plus the tunnel's high-water mark, the kernel a few MiB).
        assert not done.wait(1.0), f"the client got all {sent[0]} bytes out while the worker read nothing"
        assert sent[0] < total
        assert not w.violations  # never more than the windows granted
        # The app reads: everything arrives, in order.
        got = received()
        w.auto_window = True
        w.send_window_update(0, 64 << 20)
        w.send_window_update(sid, 64 << 20)
        assert wait_until(lambda: received() == total, 6 * WAIT), received()
        data = b"".join(f.data for f in w.frames_of(sid) if isinstance(f, DataFrame))
        assert data == payload * (total >> 20) and got <= total
    finally:
        s.close()
        t.join(WAIT)


def test_bytes_the_client_sends_with_its_handshake_are_relayed(env: Env, worker: Any) -> None:
    w = worker(echo=False)
    client = wsproto_conn.Connection(wsproto_conn.ConnectionType.CLIENT)
    frame = client.send(wsproto_events.TextMessage(data="early"))
    s = env.raw()
    s.sendall(handshake() + frame)  # before the 101: in the server's buffer with the head
    assert read_head(s).startswith(b"HTTP/1.1 101 ")
    [sid] = w.connects
    w.wait_until(lambda: b"".join(f.data for f in w.frames_of(sid) if isinstance(f, DataFrame)) == frame,
                 WAIT, "the early frame")


def test_idle_websocket_is_closed_after_websocket_idle_timeout(env: Env, worker: Any,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "rhttp_wsgi")
    env.start_proxy(websocket_idle_timeout=1.0)
    w = worker(echo=False)
    s = env.raw(timeout=10)
    s.sendall(handshake())
    assert read_head(s).startswith(b"HTTP/1.1 101 ")
    [sid] = w.connects
    assert s.recv(10) == b""  # cut by the proxy, no data ever came
    w.wait_until(lambda: any(isinstance(f, RstStreamFrame) for f in w.frames_of(sid)), WAIT, "RST_STREAM")
    [rst] = [f for f in w.frames_of(sid) if isinstance(f, RstStreamFrame)]
    assert rst.error_code == 8  # CANCEL
    assert "no traffic for 1s" in caplog.text


def test_traffic_keeps_a_websocket_open_past_the_idle_timeout(env: Env, worker: Any) -> None:
    env.start_proxy(websocket_idle_timeout=1.0)
    worker()
    with ws_client.connect(ws_url(env), open_timeout=WAIT) as c:
        done = threading.Event()
        for i in range(8):  # 8 x 0.3 s > 1 s, with traffic every 0.3 s
            c.send(str(i))
            assert c.recv(WAIT) == str(i)
            done.wait(0.3)
        c.send("still here")
        assert c.recv(WAIT) == "still here"


def test_max_websockets_refuses_one_more_with_503(env: Env, worker: Any) -> None:
    env.start_proxy(max_websockets=2)
    worker()
    with ws_client.connect(ws_url(env), open_timeout=WAIT), ws_client.connect(ws_url(env), open_timeout=WAIT):
        s = env.raw()
        s.sendall(handshake())
        head, body = read_response(s)
        assert head.startswith(b"HTTP/1.1 503 "), head
        assert b"retry-after" in head.lower() and b"max_websockets" in body
    assert wait_until(lambda: env.proxy.websocket_stats()["open"] == 0)
    with ws_client.connect(ws_url(env), open_timeout=WAIT) as c:
        c.send("again")
        assert c.recv(WAIT) == "again"


def test_the_access_log_has_one_line_when_the_socket_ends(env: Env, worker: Any,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "rhttp_wsgi.access")
    worker()
    with ws_client.connect(ws_url(env, "/logged"), open_timeout=WAIT) as c:
        c.send("x" * 1000)
        assert c.recv(WAIT) == "x" * 1000
        assert not [r for r in caplog.records if "/logged" in r.getMessage()]
    assert wait_until(lambda: any("/logged" in r.getMessage() for r in caplog.records))
    [line] = [r.getMessage() for r in caplog.records if "/logged" in r.getMessage()]
    assert '"GET /logged HTTP/1.1" 101 ' in line, line
    sent = int(line.split('" 101 ')[1].split()[0])
    assert sent >= 1000, line


def test_metrics_count_sockets_and_bytes(env: Env, worker: Any) -> None:
    pytest.importorskip("prometheus_client", reason="needs prometheus_client (prometheus extra)")
    from rhttp_wsgi.metrics import ProxyMetrics

    env.start_proxy(public=False)
    metrics = ProxyMetrics(env.proxy)
    env.public = env.proxy.start_public()
    worker()
    from prometheus_client import generate_latest

    with ws_client.connect(ws_url(env), open_timeout=WAIT) as c:
        c.send(b"\x00" * 5000)
        assert c.recv(WAIT) == b"\x00" * 5000
        text = generate_latest(metrics.registry).decode()
        assert "rhttp_proxy_websockets_open 1.0" in text, text
    assert wait_until(lambda: env.proxy.websocket_stats()["open"] == 0)
    text = generate_latest(metrics.registry).decode()
    assert "rhttp_proxy_websockets_open 0.0" in text
    assert "rhttp_proxy_websockets_total 1.0" in text
    assert 'rhttp_proxy_forwards_total{status="101"} 1.0' in text
    assert 'status="0"' not in text
    up = float(text.split('rhttp_proxy_websocket_bytes_total{direction="up"} ')[1].split()[0])
    down = float(text.split('rhttp_proxy_websocket_bytes_total{direction="down"} ')[1].split()[0])
    assert up > 5000 and down > 5000


def test_over_public_tls(env: Env, worker: Any) -> None:
    """The relay over an ssl.SSLSocket: both directions at once must never overlap in OpenSSL."""
    env.start_proxy(public_cert=str(env.pki.server_cert), public_key=str(env.pki.server_key))
    worker()
    ctx = ssl.create_default_context(cafile=str(env.pki.ca_cert))
    url = f"wss://localhost:{env.public[1]}/tls"
    with ws_client.connect(url, ssl=ctx, open_timeout=WAIT, max_size=None) as c:
        blobs = [os.urandom(300_000) for _ in range(4)]
        for b in blobs:  # several in flight both ways
            c.send(b)
        assert [c.recv(WAIT) for _ in blobs] == blobs
        for i in range(50):
            c.send(f"t{i}")
        assert [c.recv(WAIT) for _ in range(50)] == [f"t{i}" for i in range(50)]
    assert wait_until(lambda: env.proxy.websocket_stats()["open"] == 0)


def test_mounted_in_werkzeug_takes_over_its_socket(env: Env, worker: Any) -> None:
    serving = pytest.importorskip("werkzeug.serving", reason="needs werkzeug (test extra)")
    env.start_proxy(public=False)
    worker()
    server = serving.make_server("127.0.0.1", 0, env.proxy.wsgi_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="werkzeug", daemon=True)
    thread.start()
    try:
        with ws_client.connect(f"ws://127.0.0.1:{server.server_port}/wz", open_timeout=WAIT) as c:
            c.send("through werkzeug")
            assert c.recv(WAIT) == "through werkzeug"
        assert wait_until(lambda: env.proxy.websocket_stats()["open"] == 0)
        assert env.proxy.websocket_stats()["total"] == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


# -- end to end: the real worker (rhttp_wsgi.websocket) behind the real proxy ------------------------


def simple_websocket_echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """A plain WSGI app on simple-websocket, as flask-sock runs it: echo until the client closes."""
    if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"plain " + environ["PATH_INFO"].encode()]
    import simple_websocket

    ws = simple_websocket.Server(environ, max_message_size=None)
    try:
        while True:
            msg = ws.receive(timeout=WAIT * 4)
            if msg is None:
                break
            if msg == "close-4003":
                ws.close(4003, "app closed")
                break
            ws.send(msg)
    except simple_websocket.ConnectionClosed:
        pass
    return []


@pytest.fixture(name="real_worker")
def real_worker_fixture(env: Env) -> Env:
    pytest.importorskip("simple_websocket", reason="needs simple-websocket (test extra)")
    env.start_proxy()
    pool = env.start_worker(simple_websocket_echo, threads=4)
    if not all(w.extended_connect for w in env.proxy.workers()):
        pool.shutdown(WAIT)
        pytest.skip("the worker does not advertise SETTINGS_ENABLE_CONNECT_PROTOCOL (rhttp_wsgi.websocket)")
    return env


def test_real_worker_echo_text_binary_ping_and_order(real_worker: Env) -> None:
    env = real_worker
    with ws_client.connect(ws_url(env, "/e2e"), open_timeout=WAIT, max_size=None) as c:
        for i in range(100):
            c.send(f"m{i}")
        assert [c.recv(WAIT) for _ in range(100)] == [f"m{i}" for i in range(100)]
        blob = os.urandom(1 << 20)
        c.send(blob)
        assert c.recv(WAIT * 2) == blob
        c.send(b"")
        assert c.recv(WAIT) == b""
        c.ping(b"p").wait(WAIT)
        status, _, data, _ = env.request("GET", "/alongside")
        assert (status, data) == (200, b"plain /alongside")
    assert wait_until(lambda: env.proxy.websocket_stats()["open"] == 0)


def test_real_worker_twenty_sockets(real_worker: Env) -> None:
    env = real_worker
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(ws_client.connect(ws_url(env, f"/n{i}"), open_timeout=WAIT))
                   for i in range(20)]
        for i, c in enumerate(clients):
            c.send(f"hi {i}")
        assert [c.recv(WAIT) for c in clients] == [f"hi {i}" for i in range(20)]
    assert wait_until(lambda: env.proxy.websocket_stats()["open"] == 0)
    assert wait_until(lambda: [w.in_flight for w in env.proxy.workers()] == [0])


def test_real_worker_close_codes_both_ways(real_worker: Env) -> None:
    env = real_worker
    with ws_client.connect(ws_url(env), open_timeout=WAIT) as c:
        c.send("close-4003")
        with pytest.raises(ws_exceptions.ConnectionClosed):
            c.recv(WAIT)
        assert (c.close_code, c.close_reason) == (4003, "app closed")
    with ws_client.connect(ws_url(env), open_timeout=WAIT) as c:
        c.send("x")
        assert c.recv(WAIT) == "x"
        c.close(4004, "client closed")
        assert c.close_code == 4004
    assert wait_until(lambda: env.proxy.websocket_stats()["open"] == 0)


def test_proxy_shutdown_cuts_open_websockets_at_its_deadline(real_worker: Env) -> None:
    env = real_worker
    with ws_client.connect(ws_url(env), open_timeout=WAIT) as c:
        c.send("before")
        assert c.recv(WAIT) == "before"
        started = time.monotonic()
        ok = env.proxy.shutdown(1.0)
        took = time.monotonic() - started
        assert not ok  # the socket was still open at the deadline
        assert took < 1.0 + 2 * WAIT, took
        with pytest.raises(ws_exceptions.ConnectionClosed):
            c.recv(WAIT)
    assert env.proxy.websocket_stats()["open"] == 0
