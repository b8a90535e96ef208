"""A malicious or broken proxy against the worker: "hard to break".

Whatever a malicious or broken proxy sends, the worker answers with the RFC's
error, keeps every other stream and tunnel working, and keeps memory and
thread counts bounded.  The worker is the real thing (``Tunnel`` +
``run_wsgi`` over a socketpair, see ``harness.py``); the proxy is the
raw-frame peer of ``tests/h2peer.py``, so each test sends exactly the abusive
bytes and checks exactly what comes back on the wire.  (The same bounds on the
sans-I/O core, memory measured under ``tracemalloc``:
``tests/unit/test_h2core_limits.py``; TLS that must be refused:
``tests/integration/test_abuse_tls.py``.)

Time is injected (``FakeClock``) wherever a rate limit or a deadline is
asserted, so nothing depends on the machine's speed.
"""

from __future__ import annotations

import logging
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
)

from rhttp_wsgi import wsgi
from rhttp_wsgi._protocol import PREFACE
from rhttp_wsgi._tunnel import HIGH_WATER, RECV_SIZE
from rhttp_wsgi.errors import StreamReset, StreamTimeout
from tests.h2peer import DEFAULT_TIMEOUT, ProxyPeer, S, hpack_bomb
from tests.tunnel.harness import FakeClock, worker_options

pytestmark = pytest.mark.timeout(60)

E = ErrorCodes
REQ: list[tuple[str, str]] = [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                              (":authority", "example.com")]
MB = 1 << 20


# -- helpers ------------------------------------------------------------------------------------


class Recorder:
    """A WSGI app that records the paths it was called for and answers 'hello'."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        self.calls.append(environ["PATH_INFO"])
        environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello"]


def get(h: Any, sid: int, path: str = "/", **kw: Any) -> Any:
    h.peer.request(sid, "GET", path, **kw)
    return h.peer.response(sid)


def headers_frame(p: ProxyPeer, sid: int, headers: list[tuple[str, str]] = REQ, end_stream: bool = True) -> bytes:
    """One complete HEADERS frame, encoded now (HPACK order = call order)."""
    return p.headers_frame(sid, headers, end_stream=end_stream).serialize()


def rst_frame(sid: int, code: int = E.CANCEL) -> bytes:
    return RstStreamFrame(sid, error_code=code).serialize()


def raw_frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


def is_goaway(f: Frame) -> bool:
    return isinstance(f, GoAwayFrame)


def refused(p: ProxyPeer, end: int | None = None) -> list[Frame]:
    return p.find(lambda f: isinstance(f, RstStreamFrame) and f.error_code == E.REFUSED_STREAM, end=end)


def flood(p: ProxyPeer, chunk: bytes, limit: int, stop: Callable[[], bool] = lambda: False) -> int:
    """Send ``chunk`` again and again until the worker hangs up (or ``limit`` bytes); returns bytes sent."""
    sent = 0
    while sent < limit and not p.eof and not stop():
        try:
            p.send_raw(chunk)
        except OSError:
            break
        sent += len(chunk)
    return sent


def settle(p: ProxyPeer) -> None:
    """Everything sent so far was processed *and dispatched* to the app pool.

    One barrier proves the frames were processed; the worker dispatches new
    streams after releasing its lock, which may be after the PING ACK left.
    It reads again only after dispatching, so a second PING's ACK proves it.
    """
    p.barrier()
    p.barrier()


def assert_serves_on(h: Any, sid: int) -> None:
    r = get(h, sid, "/still-serving")
    assert (r.status, r.reset) == (200, None), h.peer.dump()
    assert not h.peer.find(is_goaway)
    assert not h.tunnel.closing


# == CONTINUATION flood ==========================================================================


def test_continuation_flood_is_enhance_your_calm_within_a_bounded_block(make_worker: Any) -> None:
    h = make_worker(Recorder())
    p = h.peer
    # HEADERS without END_HEADERS, then CONTINUATION frames that never end the block
    p.send_frame(HeadersFrame(1, data=p.encode(REQ), flags=["END_STREAM"]))
    junk = ContinuationFrame(1, data=b"\x00" * 16384).serialize() * 4
    sent = flood(p, junk, 10 * MB)
    assert p.wait_goaway().error_code == E.ENHANCE_YOUR_CALM
    reason = h.wait_closed()
    assert "CONTINUATION" in reason
    # 4 x max_header_list_size (256 KiB) of block, plus a read and the socket buffers
    assert sent < 2 * MB, sent
    pending = h.proto.core.pending_header_block_size()
    assert pending <= 4 * 65536 + RECV_SIZE
    assert h.dispatched == 0


def test_empty_continuation_flood_stops_at_the_frame_cap(make_worker: Any) -> None:
    h = make_worker(Recorder())
    p = h.peer
    p.send_frame(HeadersFrame(1, data=p.encode(REQ), flags=["END_STREAM"]))
    # zero-length CONTINUATIONs grow no byte count; h2 caps the block at 64 frames
    p.send_raw(ContinuationFrame(1, data=b"").serialize() * 1000)
    assert p.wait_goaway().error_code == E.PROTOCOL_ERROR
    h.wait_closed()
    assert h.dispatched == 0


# == HPACK bomb ==================================================================================


def test_hpack_bomb_on_the_wire_is_goaway_enhance_your_calm(make_worker: Any) -> None:
    app = Recorder()
    h = make_worker(app)
    p = h.peer
    first, second = hpack_bomb(p.encoder, REQ, refs=1000)
    p.send_frame(HeadersFrame(1, data=first, flags=["END_HEADERS", "END_STREAM"]))
    assert p.response(1).status == 200
    p.send_frame(HeadersFrame(3, data=second, flags=["END_HEADERS", "END_STREAM"]))
    assert p.wait_goaway().error_code == E.ENHANCE_YOUR_CALM
    h.wait_closed()
    assert app.calls == ["/"]


def test_small_hpack_bomb_is_431_and_hpack_stays_in_sync(make_worker: Any) -> None:
    got: list[str | None] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        got.append(environ.get("HTTP_X_BOMB"))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    h = make_worker(app)
    p = h.peer
    # 20 x 4 KB: above max_header_list_size (64 KiB), below the 4x HPACK abort
    first, second = hpack_bomb(p.encoder, REQ, refs=20)
    p.send_frame(HeadersFrame(1, data=first, flags=["END_HEADERS", "END_STREAM"]))
    assert p.response(1).status == 200
    p.send_frame(HeadersFrame(3, data=second, flags=["END_HEADERS", "END_STREAM"]))
    r = p.response(3)
    assert (r.status, r.reset, r.ended) == (431, None, True)
    # stream 5 refers to the same dynamic-table entry: HPACK is still in sync
    p.send_frame(HeadersFrame(5, data=p.encoder.encode([(k.encode(), v.encode()) for k, v in REQ])
                              + bytes([0x80 | 62]), flags=["END_HEADERS", "END_STREAM"]))
    assert p.response(5).status == 200
    assert got == ["b" * 4000, "b" * 4000]
    assert_serves_on(h, 7)


# == Too many headers / oversized header list ===================================================


@pytest.mark.parametrize("n,status", [(100, 200), (101, 431)])
def test_header_count_up_to_max_header_count_passes_one_more_is_431(make_worker: Any, n: int, status: int) -> None:
    app = Recorder()
    h = make_worker(app)
    r = get(h, 1, "/many", headers=[(f"x-h{i}", "v") for i in range(n)])
    assert (r.status, r.reset) == (status, None)
    assert app.calls == (["/many"] if status == 200 else [])
    assert_serves_on(h, 3)


def test_thousands_of_tiny_headers_cost_only_their_stream(make_worker: Any) -> None:
    """5,000 one-letter fields (a 49 KB HTTP/1.1 head; ~170 KB in RFC 9113 accounting) -> 431, not GOAWAY."""
    app = Recorder()
    h = make_worker(app)
    h.peer.request(1, "POST", "/in-flight", end_stream=False)  # a stream in flight on the same tunnel
    r = get(h, 3, "/huge", headers=[("a", "1")] * 5000)
    assert (r.status, r.reset) == (431, None)
    h.peer.send_data(1, b"body", end_stream=True)
    assert h.peer.response(1).status == 200  # ... was not cut off
    assert app.calls == ["/in-flight"]
    assert_serves_on(h, 5)


def test_max_header_count_is_configurable(make_worker: Any) -> None:
    app = Recorder()
    h = make_worker(app, options=worker_options(max_header_count=3))
    assert get(h, 1, "/three", headers=[("a", "1"), ("b", "2"), ("c", "3")]).status == 200
    assert get(h, 3, "/four", headers=[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]).status == 431
    assert app.calls == ["/three"]
    assert h.tunnel.streams_refused == 1


def test_oversized_header_list_is_431_and_the_body_is_stopped(make_worker: Any) -> None:
    app = Recorder()
    h = make_worker(app)
    p = h.peer
    # ~70 KB of list (> 64 KiB), Huffman-coded to ~44 KB: a HEADERS + CONTINUATION block
    p.request(1, "POST", "/big", headers=[("x-big", "a" * 70000)], end_stream=False)
    r = p.response(1)
    assert (r.status, r.ended) == (431, True)
    assert p.wait_rst(1).error_code == E.NO_ERROR  # the body is not wanted (RFC 9113 §8.1)
    p.send_data(1, b"late body", end_stream=True)  # harmless
    assert app.calls == []
    assert_serves_on(h, 3)


def test_oversized_trailers_reset_the_stream(make_worker: Any) -> None:
    seen: list[BaseException] = []
    started = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        started.set()
        try:
            environ["wsgi.input"].read()
        except StreamReset as e:
            seen.append(e)
            raise
        start_response("200 OK", [])
        return [b"never"]

    h = make_worker(app, options=worker_options(max_header_count=5))
    p = h.peer
    p.request(1, "POST", "/", body=b"abc", end_stream=False)
    assert started.wait(DEFAULT_TIMEOUT)
    p.send_headers(1, [(f"x-t{i}", "1") for i in range(6)], end_stream=True)
    # beyond the advertised limits a message may be treated as malformed (RFC 9113 §10.5.1)
    assert p.wait_rst(1).error_code == E.PROTOCOL_ERROR
    h.wait_served(1)
    assert seen and isinstance(seen[0], StreamReset)
    assert_serves_on(h, 3)


# == Rapid Reset =================================================================================


def test_rapid_reset_in_one_read_never_reaches_the_app(make_worker: Any) -> None:
    app = Recorder()
    h = make_worker(app)
    p = h.peer
    # 100 HEADERS + RST_STREAM pairs in one write: one read on the worker side
    p.send_raw(b"".join(headers_frame(p, sid) + rst_frame(sid) for sid in range(1, 201, 2)))
    settle(p)
    assert h.dispatched == 0 and app.calls == [], "a stream reset in the same read must not be dispatched"
    assert h.tunnel.streams_total == 100
    assert_serves_on(h, 201)


def test_reset_rate_limit_is_a_token_bucket(make_worker: Any) -> None:
    clock = FakeClock()
    h = make_worker(Recorder(), options=worker_options(max_resets=20),
                    tunnel_kw={"clock": clock})
    p = h.peer
    sids = iter(range(1, 1001, 2))

    def pairs(n: int) -> None:
        p.send_raw(b"".join(headers_frame(p, sid) + rst_frame(sid) for sid in [next(sids) for _ in range(n)]))

    pairs(20)  # the whole burst
    settle(p)
    assert not p.find(is_goaway)
    clock.advance(5.0)  # half a window refills half the bucket
    pairs(10)
    p.barrier()
    assert not p.find(is_goaway)
    pairs(1)  # one too many
    assert p.wait_goaway().error_code == E.ENHANCE_YOUR_CALM
    assert "stream resets" in h.wait_closed()
    assert h.dispatched == 0


def test_rapid_reset_with_a_stuck_app_keeps_threads_and_queue_bounded(make_worker: Any) -> None:
    release = threading.Event()
    started: list[int] = []
    started_cond = threading.Condition()

    def stuck(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with started_cond:
            started.append(environ["rhttp.stream_id"])
            started_cond.notify_all()
        release.wait(DEFAULT_TIMEOUT)  # ignores rhttp.cancelled
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"late"]

    mcs, threads = 8, 4
    h = make_worker(stuck, options=worker_options(max_concurrent_streams=mcs), threads=threads)
    p = h.peer
    try:
        for i, sid in enumerate(range(1, 201, 2)):
            p.send_headers(sid, REQ, end_stream=True)
            p.barrier()  # its own read: the stream is handed to the app pool ...
            if i < threads:  # (the first ones really are in the app, the next ones queue)
                with started_cond:
                    assert started_cond.wait_for(lambda i=i: len(started) > i, DEFAULT_TIMEOUT)
            p.send_rst(sid)  # ... and only then reset
        settle(p)
        # Each reset stream frees its h2 slot but not its (stuck or queued) app call:
        # at MAX_CONCURRENT_STREAMS such calls new streams are refused, so neither
        # the thread pool nor its queue grows with the peer's resets.
        assert h.dispatched == mcs
        assert h.tunnel.lingering == mcs
        assert h.pool.size <= threads
        assert len(refused(p)) == 100 - mcs
        assert not p.find(is_goaway)
    finally:
        release.set()
    h.wait_served(mcs)
    assert len(started) == threads, "queued calls of reset streams never run the app"
    p.wait_until(lambda: h.tunnel.lingering == 0, what="lingering app calls to end")
    assert_serves_on(h, 201)


# == MadeYouReset ================================================================================


def streaming_until_cancelled(log: dict[str, threading.Event]) -> Callable[..., Any]:
    class Body:
        def __init__(self, environ: dict[str, Any]) -> None:
            self.cancelled = environ["rhttp.cancelled"]

        def __iter__(self) -> Any:
            yield b"first"
            if self.cancelled.wait(DEFAULT_TIMEOUT):
                log["cancelled"].set()
            yield b"never"

        def close(self) -> None:
            log["closed"].set()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        if environ["PATH_INFO"] == "/still-serving":
            return [b"ok"]
        return Body(environ)

    return app


MADE_YOU_RESET = {
    # RFC 9113 §6.9: a zero increment on a stream is a stream error
    "zero-window-update": (lambda p, sid: p.send_raw(raw_frame(0x8, 0, sid, b"\0\0\0\0")), E.PROTOCOL_ERROR),
    # §6.9.1: a stream window beyond 2^31-1 is a stream error
    "window-overflow": (lambda p, sid: p.send_window_update(sid, 2**31 - 1), E.FLOW_CONTROL_ERROR),
    # §5.1: frames after END_STREAM (half-closed remote) are a stream error
    "data-after-end-stream": (lambda p, sid: p.send_data(sid, b"x"), E.STREAM_CLOSED),
}


@pytest.mark.parametrize("how", list(MADE_YOU_RESET))
def test_made_you_reset_cancels_the_app_and_closes_its_iterable(make_worker: Any, how: str) -> None:
    log = {"cancelled": threading.Event(), "closed": threading.Event()}
    h = make_worker(streaming_until_cancelled(log))
    p = h.peer
    p.request(1, "GET", "/stream")
    p.wait_for(lambda f: isinstance(f, DataFrame) and f.stream_id == 1 and f.data == b"first")
    send, code = MADE_YOU_RESET[how]
    send(p, 1)
    assert p.wait_rst(1).error_code == code
    assert log["cancelled"].wait(DEFAULT_TIMEOUT), "rhttp.cancelled was not set"
    assert log["closed"].wait(DEFAULT_TIMEOUT), "the iterable was not closed"
    h.wait_served(1)
    assert not p.find(lambda f: isinstance(f, DataFrame) and f.data == b"never")
    assert_serves_on(h, 3)


def test_worker_side_resets_count_toward_the_reset_limit(make_worker: Any) -> None:
    log = {"cancelled": threading.Event(), "closed": threading.Event()}
    h = make_worker(streaming_until_cancelled(log), options=worker_options(max_resets=3),
                    tunnel_kw={"clock": FakeClock()})
    p = h.peer
    kinds = list(MADE_YOU_RESET.items())
    for i in range(4):
        sid = 1 + 2 * i
        p.request(sid, "GET", "/stream")
        p.wait_for(lambda f, sid=sid: isinstance(f, DataFrame) and f.stream_id == sid)
        send, code = kinds[i % len(kinds)][1]
        send(p, sid)
        if i < 3:
            assert p.wait_rst(sid).error_code == code
            assert not p.find(is_goaway)
    assert p.wait_goaway().error_code == E.ENHANCE_YOUR_CALM
    h.wait_closed()


# == Streams beyond MAX_CONCURRENT_STREAMS ========================================================


def blocking_app(release: threading.Event) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        release.wait(DEFAULT_TIMEOUT)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(environ["rhttp.stream_id"]).encode()]
    return app


def test_a_thousand_streams_at_once_are_refused_without_a_hidden_queue(make_worker: Any) -> None:
    release = threading.Event()
    h = make_worker(blocking_app(release), threads=4,
                    options=worker_options(max_concurrent_streams=10, max_resets=0))
    p = h.peer
    try:
        p.send_raw(b"".join(headers_frame(p, 1 + 2 * i) for i in range(1000)))
        settle(p)
        assert sorted(f.stream_id for f in refused(p)) == list(range(21, 2001, 2))
        assert h.dispatched == 10
        assert h.pool.size <= 4
        assert h.proto.open_inbound_streams() == 10
    finally:
        release.set()
    for sid in range(1, 21, 2):
        assert p.response(sid).body == str(sid).encode()
    assert_serves_on(h, 2001)


def test_ignoring_max_concurrent_streams_counts_as_abuse(make_worker: Any) -> None:
    release = threading.Event()
    h = make_worker(blocking_app(release), threads=4, tunnel_kw={"clock": FakeClock()},
                    options=worker_options(max_concurrent_streams=10, max_resets=100))
    p = h.peer
    try:
        p.send_raw(b"".join(headers_frame(p, 1 + 2 * i) for i in range(1000)))
        goaway = p.wait_goaway()
        assert goaway.error_code == E.ENHANCE_YOUR_CALM
        h.wait_closed()
        # charged per frame: the refusal that empties the bucket is the last one
        assert len(refused(p)) == 101
    finally:
        release.set()


# == SETTINGS / PING / empty-DATA floods =========================================================


def test_ping_flood_from_a_peer_that_does_not_read_is_cut_off(make_worker: Any) -> None:
    cap = 100_000
    # the rate limit is off here: only the output backlog can stop this flood
    h = make_worker(Recorder(), options=worker_options(control_frame_rate=0, max_output_backlog=cap))
    p = h.peer
    p.pause_reading()
    try:
        sent = flood(p, PingFrame(0, opaque_data=b"flood!!!").serialize() * 1000, 50 * MB,
                     stop=h.tunnel.closed.is_set)
        reason = h.wait_closed(timeout=10)
    finally:
        p.resume_reading()
    assert "not reading" in reason, reason
    # what reached the worker: the backlog cap, a read, and the socket buffers -- not 50 MB
    assert sent < 4 * MB, sent


@pytest.mark.parametrize("kind", ["ping", "settings", "empty-data", "priority", "unknown-type", "rst-idle-stream"])
def test_control_frame_flood_is_enhance_your_calm(make_worker: Any, kind: str) -> None:
    h = make_worker(Recorder())
    p = h.peer
    if kind == "empty-data":
        p.request(1, "POST", "/", end_stream=False)
    frame = {
        "ping": PingFrame(0, opaque_data=b"12345678").serialize(),
        "settings": SettingsFrame(0).serialize(),
        "empty-data": DataFrame(1, data=b"").serialize(),
        "priority": PriorityFrame(3, depends_on=0, stream_weight=10).serialize(),
        "unknown-type": raw_frame(0xFA, 0, 0, b"x"),
        # ignored, but not for free (see test_haproxy_resets_on_streams_it_never_opened_leave_the_tunnel_serving)
        "rst-idle-stream": rst_frame(3, E.INTERNAL_ERROR),
    }[kind]
    p.send_raw(frame * 1100)  # the default burst is 1000
    assert p.wait_goaway().error_code == E.ENHANCE_YOUR_CALM
    h.wait_closed()


def test_control_frames_within_the_rate_are_fine(make_worker: Any) -> None:
    clock = FakeClock()
    h = make_worker(Recorder(), tunnel_kw={"clock": clock},
                    options=worker_options(control_frame_rate=10, control_frame_burst=50))
    p = h.peer
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    # 1 (the handshake's SETTINGS) + 47 + 1 (the barrier's PING) = 49 of 50
    p.send_raw(ping * 47)
    p.barrier()
    clock.advance(2.0)  # +20 tokens: 21
    p.send_raw(ping * 19)
    p.barrier()  # 20 used, 1 left
    assert not p.find(is_goaway)
    p.send_raw(ping * 2)
    assert p.wait_goaway().error_code == E.ENHANCE_YOUR_CALM
    h.wait_closed()


# == Zero window / send timeout ==================================================================


@pytest.mark.parametrize("window", [0, 1])
def test_no_credit_send_timeout_resets_the_stream_and_frees_the_thread(make_worker: Any, window: int) -> None:
    outcome: dict[str, BaseException] = {}
    queued = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
        if environ["PATH_INFO"] == "/small":
            return [b"small"]
        try:
            write(b"x" * HIGH_WATER)  # queued, up to the watermark: returns ...
            queued.set()
            write(b"x" * 65536)  # ... past it, with no credit: blocks
        except BaseException as e:
            outcome["exc"] = e
            raise
        return []

    clock = FakeClock()
    start = clock.t
    h = make_worker(app, peer_settings={S.INITIAL_WINDOW_SIZE: window}, auto_window=False,
                    options=worker_options(send_timeout=0.5), tunnel_kw={"clock": clock})
    p = h.peer
    p.request(1, "GET", "/big")
    assert queued.wait(DEFAULT_TIMEOUT)
    p.barrier()  # the writer tried to send the queued bytes and found no credit: the stall runs from `start`
    clock.set(start + 0.499)  # just before send_timeout, as the tunnel sees time ...
    p.barrier()  # (the writer ran its timers before it sent the PING ACK)
    assert not p.find(RstStreamFrame, 1) and "exc" not in outcome  # ... the response still waits
    clock.set(start + 0.5)  # at send_timeout
    assert p.wait_rst(1).error_code == E.CANCEL
    h.wait_served(1)  # the app thread is free
    assert isinstance(outcome["exc"], StreamTimeout)
    assert sum(len(f.data) for f in p.find(lambda f: isinstance(f, DataFrame) and f.stream_id == 1)) == window
    assert h.tunnel.streams_timed_out == 1
    # another stream still flows once it gets credit
    p.request(3, "GET", "/small")
    p.wait_headers(3)
    p.send_window_update(3, 100)
    r = p.response(3)
    assert (r.status, r.body, r.reset) == (200, b"small", None)
    assert not p.find(is_goaway)


def test_send_timeout_frees_a_response_the_app_already_finished(make_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"x" * 1000]

    h = make_worker(app, peer_settings={S.INITIAL_WINDOW_SIZE: 0}, auto_window=False,
                    options=worker_options(send_timeout=0.3))
    p = h.peer
    p.request(1)
    h.wait_served(1)  # the app returned at once ...
    assert h.tunnel.in_flight == 1  # ... but its response waits for credit, holding a slot
    assert p.wait_rst(1).error_code == E.CANCEL
    h.wait_in_flight(0)


# == Slow request body ===========================================================================


def test_stalled_request_body_gets_408(make_worker: Any) -> None:
    got: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        inp = environ["wsgi.input"]
        while True:
            chunk = inp.read(1)  # raises StreamTimeout after body_timeout without a byte
            if not chunk:
                break
            got.append(chunk)
        start_response("200 OK", [])
        return [b"never"]

    h = make_worker(app, ctx_kw={"body_timeout": 1.0})
    p = h.peer
    p.request(1, "POST", "/", end_stream=False)
    for b in (b"a", b"b", b"c"):  # a trickle within the timeout keeps it alive ...
        p.send_data(1, b)
        time.sleep(0.1)
    r = p.response(1, timeout=10)  # ... then it stops
    assert (r.status, r.ended) == (408, True)
    assert p.wait_rst(1).error_code == E.NO_ERROR  # and the rest of the body is not wanted
    h.wait_served(1)
    assert got == [b"a", b"b", b"c"]
    assert_serves_on(h, 3)


def test_a_byte_every_few_seconds_ends_at_the_minimum_rate(make_worker: Any, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    got: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        inp = environ["wsgi.input"]
        while True:
            chunk = inp.read(1)  # one clock read per call (the rate check), then a wait for a byte
            if not chunk:
                break
            got.append(chunk)
        start_response("200 OK", [])
        return [b"never"]

    # wsgi.input measures the rate with wsgi.py's time.monotonic (WSGIContext takes no clock):
    # this test's clock stands in for it, so the rate is checked at the times the test says.
    clock = FakeClock()
    monkeypatch.setattr(wsgi, "time", types.SimpleNamespace(monotonic=clock))
    # A byte every 3.5 s, each well within the 10 s idle timeout, but far below 10 B/s: the
    # allowance (10 s + 0.1 s per byte) is 10.3 s after three bytes, and the fourth read comes at 10.5 s.
    caplog.set_level(logging.INFO, "rhttp_wsgi")
    h = make_worker(app, ctx_kw={"body_timeout": 10.0, "body_min_rate": 10})
    p = h.peer
    p.request(1, "POST", "/", end_stream=False)
    t0 = time.monotonic()
    for n in range(1, 4):
        clock.wait_reads(n)  # the app's n-th read measured the time: it waits for byte n ...
        clock.advance(3.5)  # ... which comes 3.5 s later, within the allowance
        p.send_data(1, b"x")
    r = p.response(1)  # the 4th read measures 10.5 s > 10.3 s: no more waiting
    assert (r.status, r.ended) == (408, True)
    assert got == [b"x"] * 3, got
    assert "request body slower than 10 bytes/s" in caplog.text  # the rate ended it, not the idle timeout
    assert time.monotonic() - t0 < 5
    h.wait_served(1)


def test_stalled_body_after_the_response_started_is_reset(make_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"started"
        environ["wsgi.input"].read()
        yield b"never"

    h = make_worker(app, ctx_kw={"body_timeout": 0.3})
    p = h.peer
    p.request(1, "POST", "/", end_stream=False)
    r = p.response(1)
    assert (r.status, r.body, r.reset) == (200, b"started", E.CANCEL)
    h.wait_served(1)


# == Content-Length and body size ===============================================================


def test_conflicting_content_length_values_are_malformed(make_worker: Any) -> None:
    app = Recorder()
    h = make_worker(app)
    h.peer.request(1, "POST", "/", headers=[("content-length", "3"), ("content-length", "5")],
                   end_stream=False)
    assert h.peer.wait_rst(1).error_code == E.PROTOCOL_ERROR
    assert app.calls == []
    assert_serves_on(h, 3)


def test_repeated_equal_content_length_is_accepted(make_worker: Any) -> None:
    app = Recorder()
    h = make_worker(app)
    h.peer.request(1, "POST", "/", headers=[("content-length", "3"), ("content-length", "3")], body=b"abc")
    assert h.peer.response(1).status == 200


def test_content_length_above_max_body_size_is_413_before_the_app(make_worker: Any) -> None:
    app = Recorder()
    h = make_worker(app, options=worker_options(max_body_size=100))
    p = h.peer
    p.request(1, "POST", "/too-big", headers=[("content-length", "101")], end_stream=False)
    r = p.response(1)
    assert (r.status, r.ended) == (413, True)
    assert p.wait_rst(1).error_code == E.NO_ERROR
    p.send_data(1, b"x" * 101, end_stream=True)  # late body: harmless
    p.request(3, "POST", "/fits", headers=[("content-length", "100")], body=b"y" * 100)
    assert p.response(3).status == 200
    assert app.calls == ["/fits"]
    assert_serves_on(h, 5)


@pytest.mark.parametrize("app_running", [True, False], ids=["app-reading", "same-read"])
def test_streamed_body_growing_past_max_body_size_gets_413(make_worker: Any, app_running: bool) -> None:
    seen: list[BaseException] = []
    started = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/still-serving":
            start_response("200 OK", [])
            return [b"ok"]
        started.set()
        try:
            environ["wsgi.input"].read()
        except StreamReset as e:
            seen.append(e)
            raise
        start_response("200 OK", [])
        return [b"never"]

    h = make_worker(app, options=worker_options(max_body_size=100))
    p = h.peer
    if app_running:
        p.request(1, "POST", "/", end_stream=False)  # no content-length
        p.send_data(1, b"a" * 60)
        assert started.wait(DEFAULT_TIMEOUT)
        p.send_data(1, b"b" * 60)
    else:  # the limit is crossed in the read that opens the stream: the app never runs
        p.send_raw(headers_frame(p, 1, [*REQ[1:], (":method", "POST")], end_stream=False)
                   + DataFrame(1, data=b"a" * 101).serialize())
    r = p.response(1)
    assert (r.status, r.ended) == (413, True)
    assert p.wait_rst(1).error_code == E.NO_ERROR
    if app_running:
        h.wait_served(1)
        assert seen, "the app's read must fail"
    else:
        settle(p)
        assert h.dispatched == 0 and not started.is_set()
    assert_serves_on(h, 3)


def test_body_past_the_limit_after_the_response_started_is_reset(make_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"started"
        environ["wsgi.input"].read()

    h = make_worker(app, options=worker_options(max_body_size=100))
    p = h.peer
    p.request(1, "POST", "/", end_stream=False)
    p.wait_for(lambda f: isinstance(f, DataFrame) and f.stream_id == 1)
    p.send_data(1, b"a" * 101)
    r = p.response(1)
    assert (r.status, r.reset) == (200, E.CANCEL)
    h.wait_served(1)


# == Header validation ==========================================================================


def _req(*extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [*REQ, *extra]


MALFORMED: dict[str, list[tuple[str, str]]] = {
    "cr-in-value": _req(("x-a", "a\rb")),
    "lf-in-value": _req(("x-a", "a\nb")),
    "nul-in-value": _req(("x-a", "a\x00b")),
    "leading-space-in-value": _req(("x-a", " a")),
    "uppercase-name": _req(("X-Upper", "1")),
    "space-in-name": _req(("x a", "1")),
    "empty-name": _req(("", "1")),
    "connection": _req(("connection", "close")),
    "keep-alive": _req(("keep-alive", "1")),
    "proxy-connection": _req(("proxy-connection", "keep-alive")),
    "transfer-encoding": _req(("transfer-encoding", "chunked")),
    "upgrade": _req(("upgrade", "h2c")),
    "te-gzip": _req(("te", "gzip")),
    "pseudo-after-regular": [(":method", "GET"), (":scheme", "https"), ("x-a", "1"), (":path", "/"),
                             (":authority", "x")],
    "missing-method": [(":scheme", "https"), (":path", "/"), (":authority", "x")],
    "missing-scheme": [(":method", "GET"), (":path", "/"), (":authority", "x")],
    "missing-path": [(":method", "GET"), (":scheme", "https"), (":authority", "x")],
    "duplicate-method": _req((":method", "POST")),
    "duplicate-path": _req((":path", "/again")),
    "unknown-pseudo": _req((":foo", "1")),
    "response-pseudo": _req((":status", "200")),
    "empty-path": [(":method", "GET"), (":scheme", "https"), (":path", ""), (":authority", "x")],
    "host-differs-from-authority": _req(("host", "other.example")),
    "connect-with-path": [(":method", "CONNECT"), (":authority", "x:443"), (":scheme", "https"),
                          (":path", "/")],
    "empty-method": [(":method", ""), (":scheme", "https"), (":path", "/"), (":authority", "x")],
    # RFC 8441 §3: :protocol only once the worker advertised SETTINGS_ENABLE_CONNECT_PROTOCOL (here it
    # does not: websockets=False, see the test)
    "extended-connect-not-advertised": [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
                                        (":path", "/"), (":authority", "x")],
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_rst_protocol_error(make_worker: Any, case: str) -> None:
    app = Recorder()
    h = make_worker(app, options=worker_options(websockets=case != "extended-connect-not-advertised"))
    h.peer.send_headers(1, MALFORMED[case], end_stream=True)
    r = h.peer.response(1)
    assert (r.status, r.reset) == (None, E.PROTOCOL_ERROR)  # RFC 9113 §8.1.1: a stream error
    assert app.calls == [] and h.dispatched == 0
    assert_serves_on(h, 3)


@pytest.mark.parametrize("headers,status", [
    # h2 lets these through; the WSGI adapter refuses them before the app
    ([(":method", "CONNECT"), (":authority", "x:443")], 501),
    ([(":method", "GET"), (":scheme", "https"), (":path", "foo"), (":authority", "x")], 400),
    ([(":method", "GET"), (":scheme", "https"), (":path", "https://x/y"), (":authority", "x")], 400),
    ([(":method", "GET"), (":scheme", "https"), (":path", "*"), (":authority", "x")], 400),
    # and these are fine
    (_req(("te", "trailers")), 200),
    ([(":method", "OPTIONS"), (":scheme", "https"), (":path", "*"), (":authority", "x")], 200),
], ids=["connect", "relative-path", "absolute-form-path", "asterisk-path-for-get",
        "te-trailers", "options-asterisk"])
def test_requests_answered_without_or_with_the_app(make_worker: Any, headers: list[tuple[str, str]],
                                                      status: int) -> None:
    app = Recorder()
    h = make_worker(app)
    h.peer.send_headers(1, headers, end_stream=status != 501)  # (a CONNECT stream stays open)
    r = h.peer.response(1)
    assert (r.status, r.ended) == (status, True)
    assert len(app.calls) == (status == 200)
    assert_serves_on(h, 3)


def test_underscore_header_cannot_shadow_its_dash_twin(make_worker: Any) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update({k: v for k, v in environ.items() if k.startswith("HTTP_X_")})
        start_response("200 OK", [])
        return [b""]

    h = make_worker(app)
    assert get(h, 1, headers=[("x_foo", "underscore"), ("x-foo", "dash"), ("x_bar", "only")]).status == 200
    assert seen == {"HTTP_X_FOO": "dash"}


# == Framing ====================================================================================


def _open(p: ProxyPeer, sid: int = 1) -> bytes:
    return headers_frame(p, sid, end_stream=False)


FRAMING: dict[str, tuple[Callable[[ProxyPeer], bytes], ErrorCodes]] = {
    "data-on-stream-0": (lambda p: raw_frame(0x0, 0, 0, b"x"), E.PROTOCOL_ERROR),
    "headers-on-even-stream": (lambda p: headers_frame(p, 2), E.PROTOCOL_ERROR),
    "decreasing-stream-id": (lambda p: headers_frame(p, 5) + headers_frame(p, 3), E.PROTOCOL_ERROR),
    "push-promise-to-server": (lambda p: _open(p) + PushPromiseFrame(1, promised_stream_id=2, data=b"",
                                                                     flags=["END_HEADERS"]).serialize(),
                               E.PROTOCOL_ERROR),
    "rst-on-stream-0": (lambda p: raw_frame(0x3, 0, 0, b"\0\0\0\x08"), E.PROTOCOL_ERROR),
    "rst-wrong-length": (lambda p: _open(p) + raw_frame(0x3, 0, 1, b"\0\0\x08"), E.FRAME_SIZE_ERROR),
    "window-update-on-idle-stream": (lambda p: raw_frame(0x8, 0, 9, b"\0\0\0\x10"), E.PROTOCOL_ERROR),
    "zero-window-update-on-connection": (lambda p: raw_frame(0x8, 0, 0, b"\0\0\0\0"), E.PROTOCOL_ERROR),
    "window-update-wrong-length": (lambda p: raw_frame(0x8, 0, 0, b"\0\0\x10"), E.FRAME_SIZE_ERROR),
    "connection-window-overflow": (lambda p: raw_frame(0x8, 0, 0, (2**31 - 1).to_bytes(4, "big")),
                                   E.FLOW_CONTROL_ERROR),
    "initial-window-overflows-open-stream": (
        lambda p: _open(p) + raw_frame(0x8, 0, 1, (2**31 - 1 - 65535).to_bytes(4, "big"))
        + SettingsFrame(0, settings={S.INITIAL_WINDOW_SIZE: 65536}).serialize(), E.FLOW_CONTROL_ERROR),
    "settings-initial-window-too-large": (
        lambda p: SettingsFrame(0, settings={S.INITIAL_WINDOW_SIZE: 2**31}).serialize(), E.FLOW_CONTROL_ERROR),
    "settings-max-frame-size-too-small": (
        lambda p: SettingsFrame(0, settings={S.MAX_FRAME_SIZE: 1000}).serialize(), E.PROTOCOL_ERROR),
    "settings-enable-push-2": (lambda p: SettingsFrame(0, settings={S.ENABLE_PUSH: 2}).serialize(),
                               E.PROTOCOL_ERROR),
    "settings-wrong-length": (lambda p: raw_frame(0x4, 0, 0, b"\0\x03\0\0\0"), E.FRAME_SIZE_ERROR),
    "settings-ack-with-payload": (lambda p: raw_frame(0x4, 0x1, 0, b"\0\x03\0\0\0\x01"), E.FRAME_SIZE_ERROR),
    "settings-on-stream-1": (lambda p: raw_frame(0x4, 0, 1, b""), E.PROTOCOL_ERROR),
    "ping-wrong-length": (lambda p: raw_frame(0x6, 0, 0, b"1234567"), E.FRAME_SIZE_ERROR),
    "ping-on-stream-1": (lambda p: raw_frame(0x6, 0, 1, b"12345678"), E.PROTOCOL_ERROR),
    "goaway-on-stream-1": (lambda p: raw_frame(0x7, 0, 1, b"\0" * 8), E.PROTOCOL_ERROR),
    "priority-wrong-length": (lambda p: raw_frame(0x2, 0, 3, b"\0\0\0\0"), E.FRAME_SIZE_ERROR),
    "priority-self-dependency": (lambda p: PriorityFrame(3, depends_on=3).serialize(), E.PROTOCOL_ERROR),
    "continuation-without-headers": (lambda p: ContinuationFrame(1, data=b"", flags=["END_HEADERS"]).serialize(),
                                     E.PROTOCOL_ERROR),
    "data-on-idle-stream": (lambda p: DataFrame(3, data=b"x").serialize(), E.PROTOCOL_ERROR),
    "data-padding-beyond-payload": (lambda p: _open(p) + raw_frame(0x0, 0x8, 1, b"\x05ab"), E.PROTOCOL_ERROR),
    "headers-padding-beyond-payload": (lambda p: raw_frame(0x1, 0xC, 1, b"\x05ab"), E.PROTOCOL_ERROR),
    # (the header alone is refused: a peer that then wrote the whole payload would meet a closed socket)
    "frame-above-max-frame-size": (lambda p: _open(p) + (worker_options().max_frame_size + 1).to_bytes(3, "big")
                                   + b"\x00\x00" + (1).to_bytes(4, "big") + b"x" * 100, E.FRAME_SIZE_ERROR),
}


@pytest.mark.parametrize("case", list(FRAMING))
def test_framing_errors_are_connection_errors_with_the_rfc_code(make_worker: Any, case: str) -> None:
    build, code = FRAMING[case]
    h = make_worker(Recorder())
    p = h.peer
    p.send_raw(build(p))
    assert p.wait_goaway().error_code == code
    h.wait_closed()
    p.wait_closed()


def test_oversized_frame_is_refused_from_its_header_alone(make_worker: Any) -> None:
    h = make_worker(Recorder())
    p = h.peer
    p.send_raw(_open(p))
    # announce a 16 MiB DATA frame and send none of it: no need to buffer it to refuse it
    p.send_raw(raw_frame(0x0, 0, 1, b"")[:0] + (2**24 - 1).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01")
    assert p.wait_goaway().error_code == E.FRAME_SIZE_ERROR
    assert "16777215-byte frame" in h.wait_closed()


def test_unknown_frame_types_are_ignored(make_worker: Any) -> None:
    h = make_worker(Recorder())
    h.peer.send_raw(raw_frame(0xFA, 0, 0, b"abc") + raw_frame(0xFB, 0xFF, 1, b""))
    assert_serves_on(h, 1)


# == Reversed-role handshake ===================================================================


def test_peer_sending_a_client_preface_is_protocol_error(make_worker: Any) -> None:
    h = make_worker(Recorder(), handshake=False)
    p = h.peer
    p.wait_for(lambda f: isinstance(f, SettingsFrame))
    p.send_raw(PREFACE + SettingsFrame(0).serialize())  # the proxy must not send a preface
    assert p.wait_goaway().error_code == E.PROTOCOL_ERROR
    h.wait_closed()
    assert not h.tunnel.ready.is_set()


def test_incomplete_settings_times_out(make_worker: Any) -> None:
    h = make_worker(Recorder(), handshake=False, options=worker_options(handshake_timeout=0.3))
    p = h.peer
    p.send_raw(SettingsFrame(0, settings={S.MAX_CONCURRENT_STREAMS: 5}).serialize()[:12])  # then silence
    assert p.wait_goaway().error_code == E.SETTINGS_TIMEOUT
    h.wait_closed()
    assert not h.tunnel.ready.is_set()


@pytest.mark.parametrize("code", [E.NO_ERROR, E.ENHANCE_YOUR_CALM])
def test_goaway_mid_flight_finishes_in_flight_streams(make_worker: Any, code: ErrorCodes) -> None:
    release = threading.Event()
    h = make_worker(blocking_app(release))
    p = h.peer
    p.request(1)
    p.request(3)
    p.barrier()
    # last-stream-id 0: the worker opened no stream; the proxy's own streams still finish
    p.send_goaway(0, code)
    p.barrier()
    release.set()
    assert p.response(1).body == b"1" and p.response(3).body == b"3"
    h.wait_closed()
    p.wait_closed()


# == App misbehaviour ==========================================================================


def misbehaving_app(kind: str) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/still-serving":
            start_response("200 OK", [])
            return [b"ok"]
        if kind == "bad-status-no-space":
            start_response("200OK", [])
        elif kind == "bad-status-letters":
            start_response("abc Nope", [])
        elif kind == "status-not-str":
            start_response(200, [])
        elif kind == "status-1xx":
            start_response("103 Early Hints", [])
        elif kind == "crlf-in-header-value":
            start_response("200 OK", [("X-Bad", "a\r\nSet-Cookie: x=1")])
        elif kind == "start-response-twice":
            start_response("200 OK", [])
            start_response("200 OK", [])
        return [b"body"]
    return app


@pytest.mark.parametrize("kind", ["bad-status-no-space", "bad-status-letters", "status-not-str", "status-1xx",
                                  "crlf-in-header-value", "start-response-twice"])
def test_app_errors_before_headers_give_500(make_worker: Any, kind: str) -> None:
    h = make_worker(misbehaving_app(kind))
    r = get(h, 1, "/bad")
    assert (r.status, r.reset, r.ended) == (500, None, True)
    assert "set-cookie" not in r.header_names()
    assert_serves_on(h, 3)


def test_request_timeout_cancels_a_cooperative_app(make_worker: Any) -> None:
    saw_cancel = threading.Event()
    closed = threading.Event()

    class Body:
        def __iter__(self) -> Any:
            return iter([b"too late"])

        def close(self) -> None:
            closed.set()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/still-serving":
            start_response("200 OK", [])
            return [b"ok"]
        if environ["rhttp.cancelled"].wait(DEFAULT_TIMEOUT):
            saw_cancel.set()
        start_response("200 OK", [])
        return Body()

    h = make_worker(app, options=worker_options(request_timeout=0.3))
    p = h.peer
    p.request(1, "GET", "/slow")
    assert p.wait_rst(1).error_code == E.CANCEL
    assert saw_cancel.wait(DEFAULT_TIMEOUT) and closed.wait(DEFAULT_TIMEOUT)
    h.wait_served(1)
    p.wait_until(lambda: h.tunnel.lingering == 0, what="no lingering app call")
    assert h.tunnel.streams_timed_out == 1
    assert_serves_on(h, 3)


def test_request_timeout_with_a_stuck_app_frees_the_slot_and_counts_the_thread(make_worker: Any) -> None:
    release = threading.Event()

    def stuck(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] != "/still-serving":
            release.wait(DEFAULT_TIMEOUT)  # ignores rhttp.cancelled: Python cannot interrupt it
        start_response("200 OK", [])
        return [b"ok"]

    h = make_worker(stuck, threads=4, options=worker_options(max_concurrent_streams=2, request_timeout=0.3))
    p = h.peer
    try:
        p.request(1, "GET", "/stuck")
        p.request(3, "GET", "/stuck")
        assert p.wait_rst(1).error_code == E.CANCEL and p.wait_rst(3).error_code == E.CANCEL
        # the h2 slots are free, the threads are not: they are counted, and they hold
        # the stream budget so that stuck calls cannot pile up without bound
        assert h.proto.open_inbound_streams() == 0
        assert h.tunnel.lingering == 2
        p.request(5, "GET", "/still-serving")
        assert p.wait_rst(5).error_code == E.REFUSED_STREAM
        assert h.served == 0
    finally:
        release.set()
    h.wait_served(2)
    p.wait_until(lambda: h.tunnel.lingering == 0, what="the stuck calls to return")
    assert_serves_on(h, 7)


# == One public request never costs a tunnel; bounded state under any peer ======================


def test_haproxy_resets_on_streams_it_never_opened_leave_the_tunnel_serving(make_worker: Any) -> None:
    """HAProxy 3.0 without SETTINGS_ENABLE_CONNECT_PROTOCOL from us, for one public ``Upgrade: websocket``
    request: RST_STREAM(INTERNAL_ERROR) on six stream ids it never opened (its retries).  RFC 9113 §6.4
    would allow a connection error (every stream of the tunnel lost, then 503s); h2 and we ignore it."""
    app = Recorder()
    h = make_worker(app)
    p = h.peer
    p.send_raw(b"".join(rst_frame(sid, E.INTERNAL_ERROR) for sid in range(1, 13, 2)))
    assert get(h, 13, "/next").status == 200
    p.request(15, "POST", "/in-flight", end_stream=False)  # another public request in flight ...
    p.send_raw(b"".join(rst_frame(sid, E.INTERNAL_ERROR) for sid in range(17, 29, 2)))
    p.send_data(15, b"body", end_stream=True)
    assert p.response(15).status == 200  # ... is not cut off
    assert_serves_on(h, 29)
    assert app.calls == ["/next", "/in-flight", "/still-serving"]
    assert not p.find(lambda f: isinstance(f, RstStreamFrame))  # nothing answered, nothing reset


def test_data_on_a_stream_we_reset_is_ignored_after_thousands_of_closures(make_worker: Any) -> None:
    """An early answer to an upload resets its stream (RST_STREAM NO_ERROR, RFC 9113 §8.1); the
    upload's DATA still in flight must be ignored -- and credited to the connection window -- however
    many streams closed since (here 5,000, more than the core remembers individually)."""
    def early(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"no thanks" if environ["PATH_INFO"] == "/upload" else b"ok"]

    h = make_worker(early, options=worker_options(connection_window_size=65535))
    p = h.peer
    p.request(1, "POST", "/upload", end_stream=False)
    assert p.wait_rst(1).error_code == E.NO_ERROR
    sid = 3
    for _ in range(100):  # 5,000 requests, 50 at a time
        start = len(p.frames)
        p.send_raw(b"".join(headers_frame(p, s) for s in range(sid, sid + 100, 2)))
        sid += 100
        h.wait_served(1 + (sid - 3) // 2)
        # A stream stays open until its END_STREAM is on the wire (the writer sends it after the
        # app returned, and it may lag the app by more than a batch): wait for the 50 answers, as a
        # client must, or open streams exceed MAX_CONCURRENT_STREAMS and are refused
        # (REFUSED_STREAM) -- correctly, but that is not what this test is about.
        p.wait_until(lambda start=start: sum(1 for f in p.frames[start:]
                                 if isinstance(f, DataFrame) and "END_STREAM" in f.flags) >= 50,
                     what="the batch's 50 responses")
    settle(p)
    for _ in range(6):  # 96,000 bytes > the 65,535-byte connection window: accepted only if credited
        p.send_data(1, b"x" * 16000)
    p.send_data(1, b"", end_stream=True)
    assert_serves_on(h, sid)
    assert not p.find(lambda f: isinstance(f, RstStreamFrame) and f.stream_id == 1 and f.error_code != E.NO_ERROR)
