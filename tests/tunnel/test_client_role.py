"""The proxy's side of a tunnel (``Tunnel`` in the client role): early hints, stream-id exhaustion.

The worker end is h2's ``H2Connection`` (server side, which can send 1xx
responses; our worker core never does) on the other half of a socketpair, so a
test sends exactly the responses it wants.  (Against the real proxy, with the
raw-frame worker of ``tests/h2peer.py``: ``tests/integration/test_abuse_proxy.py``.)
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import pytest

from rhttp_wsgi._protocol import PREFACE, TunnelProtocol
from rhttp_wsgi._tunnel import Tunnel
from rhttp_wsgi.errors import TunnelClosed
from rhttp_wsgi.options import TunnelOptions

pytestmark = pytest.mark.timeout(30)

WAIT = 5.0
REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"x")]


class HandWorker:
    """h2's server side on a socket, driven by the test thread (a worker dials, so it sends the preface)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.proto = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.proto.receive_data(PREFACE)  # (the proxy side sends none; h2's server expects it)
        self.proto.initiate_connection()
        self.sock.sendall(PREFACE + self.proto.data_to_send())

    def flush(self) -> None:
        data = self.proto.data_to_send()
        if data:
            self.sock.sendall(data)

    def wait_request(self) -> int:
        self.sock.settimeout(WAIT)
        while True:
            data = self.sock.recv(65536)
            assert data, "the proxy side closed the tunnel"
            events = self.proto.receive_data(data)
            self.flush()
            for ev in events:
                if isinstance(ev, h2.events.RequestReceived):
                    return int(ev.stream_id)


@pytest.fixture
def pair() -> Iterator[tuple[Tunnel, HandWorker]]:
    a, b = socket.socketpair()
    options = TunnelOptions()
    tunnel = Tunnel(a, None, TunnelProtocol("client", options), options, name="proxy-side")
    thread = threading.Thread(target=tunnel.run, name="proxy-side", daemon=True)
    thread.start()
    worker = HandWorker(b)
    assert tunnel.ready.wait(WAIT)
    try:
        yield tunnel, worker
    finally:
        tunnel.close("test teardown")
        thread.join(WAIT)
        b.close()


def test_only_the_latest_103_early_hints_is_kept(pair: tuple[Tunnel, HandWorker]) -> None:
    """A worker that sends 1xx after 1xx grows nothing on the proxy: one header list at most."""
    tunnel, w = pair
    ch = tunnel.open_stream(REQUEST, end_stream=True)
    sid = w.wait_request()
    for i in range(200):
        w.proto.send_headers(sid, [(b":status", b"103"), (b"link", f"</{i}.css>; rel=preload".encode())])
        w.proto.send_headers(sid, [(b":status", b"100")])
    w.proto.send_headers(sid, [(b":status", b"200"), (b"content-length", b"0")], end_stream=True)
    w.flush()
    assert ch.wait_response(WAIT)[0] == (b":status", b"200")
    assert ch.early_hints == [(b":status", b"103"), (b"link", b"</199.css>; rel=preload")]


def test_wait_response_can_return_early_hints_before_the_final_response(pair: tuple[Tunnel, HandWorker]) -> None:
    tunnel, w = pair
    ch = tunnel.open_stream(REQUEST, end_stream=True)
    sid = w.wait_request()
    w.proto.send_headers(sid, [(b":status", b"103"), (b"link", b"</a.css>; rel=preload")])
    w.flush()
    assert ch.wait_response(WAIT, early_hints=True) == [(b":status", b"103"), (b"link", b"</a.css>; rel=preload")]
    assert ch.early_hints is None  # taken
    w.proto.send_headers(sid, [(b":status", b"204")], end_stream=True)
    w.flush()
    assert ch.wait_response(WAIT, early_hints=True) == [(b":status", b"204")]


def test_client_role_retires_a_tunnel_whose_stream_ids_are_exhausted() -> None:
    """After 2^30 streams the proxy side drains the tunnel instead of failing requests with 500."""
    a, b = socket.socketpair()
    try:
        options = TunnelOptions()
        t = Tunnel(a, None, TunnelProtocol("client", options), options, name="exhausted")
        t.proto.initiate(0.0)
        # the last stream id there is, opened the regular way: no id is left after it
        t.proto.send_headers(2**31 - 1, [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                                         (b":authority", b"x")], end_stream=True)
        with pytest.raises(TunnelClosed, match="stream ids exhausted"):
            t.open_stream([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                           (b":authority", b"x")], end_stream=True)
        assert t.closing and not t.accepting
    finally:
        a.close()
        b.close()


def test_read_chunk_hands_large_frames_over_whole_and_joins_small_ones(pair: tuple[Tunnel, HandWorker]) -> None:
    """The proxy's response body reads: every byte once and in order; a frame of COALESCE bytes or
    more comes back alone, as it arrived (never copied into a join); small ones may be joined."""
    from rhttp_wsgi._tunnel import COALESCE

    tunnel, w = pair
    ch = tunnel.open_stream(REQUEST, end_stream=True)
    sid = w.wait_request()
    assert COALESCE <= TunnelOptions().max_frame_size  # (a frame that large may come to us)
    sizes = [100, 200, COALESCE, 50, 60, COALESCE, 30_000, 40_000, *[10] * 300, COALESCE, 5]
    frames = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    w.proto.send_headers(sid, [(":status", "200")])
    for f in frames:
        w.proto.send_data(sid, f)
    w.proto.end_stream(sid)
    w.flush()
    assert ch.wait_response(WAIT)
    chunks = []
    while True:
        c = ch.read_chunk(WAIT)
        if not c:
            break
        chunks.append(c)
    assert b"".join(chunks) == b"".join(frames)
    large = [f for f in frames if len(f) >= COALESCE]
    assert [c for c in chunks if len(c) >= COALESCE and c in large] == large  # each alone, whole
    assert len(chunks) < len(frames)  # (the 300 ten-byte frames did not cost a read each)


class RecordingSocket:
    """A socket whose recv sizes are recorded (everything else is the real socket's)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.asked: list[int] = []

    def recv(self, n: int) -> bytes:
        self.asked.append(n)
        return self._sock.recv(n)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def test_the_reader_asks_for_small_reads_until_one_comes_back_full() -> None:
    """recv(n) allocates n bytes first (an mmap above glibc's threshold): the reader asks for
    SMALL_RECV, and for RECV_SIZE only after a read that came back full, until a short one."""
    from rhttp_wsgi._tunnel import RECV_SIZE, SMALL_RECV

    a, b = socket.socketpair()
    rec = RecordingSocket(a)
    options = TunnelOptions()
    tunnel = Tunnel(rec, None, TunnelProtocol("client", options), options, name="proxy-side")  # type: ignore[arg-type]
    thread = threading.Thread(target=tunnel.run, name="proxy-side", daemon=True)
    thread.start()
    try:
        w = HandWorker(b)
        assert tunnel.ready.wait(WAIT)
        ch = tunnel.open_stream(REQUEST, end_stream=True)
        sid = w.wait_request()
        w.proto.send_headers(sid, [(":status", "200")])
        w.flush()
        assert ch.wait_response(WAIT)
        small = len(rec.asked)
        assert set(rec.asked) == {SMALL_RECV}  # the handshake and a response head: short reads
        body = b"x" * (3 * SMALL_RECV)
        for i in range(0, len(body), 16384):  # more than SMALL_RECV waiting at once
            w.proto.send_data(sid, body[i:i + 16384])
        w.proto.end_stream(sid)
        b.sendall(w.proto.data_to_send())
        got = b""
        while True:
            c = ch.read_chunk(WAIT)
            if not c:
                break
            got += c
        assert got == body
        later = rec.asked[small:]
        assert RECV_SIZE in later  # a full read: the next asked for more
        assert rec.asked[-1] == SMALL_RECV  # (the short read that followed went back to small)
    finally:
        tunnel.close("test teardown")
        thread.join(WAIT)
        b.close()


def test_a_closed_tunnel_gives_its_window_growth_back(pair: tuple[Tunnel, HandWorker]) -> None:
    """Tunnel.run() ends by returning the connection window's growth to the process's budget
    (tests/unit/test_window_tuning.py checks what is given back)."""
    tunnel, _w = pair
    calls: list[int] = []
    release = tunnel.proto.release_window_growth

    def counted() -> None:
        calls.append(1)
        release()

    tunnel.proto.release_window_growth = counted  # type: ignore[method-assign]
    tunnel.close("test")
    assert tunnel.closed.wait(WAIT)
    assert calls == [1]
