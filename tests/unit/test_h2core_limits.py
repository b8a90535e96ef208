"""Bounds a peer cannot get around, and leniency that costs it budget: the flood guard (RST_STREAM on
idle streams, 1xx responses, control frames), the HPACK encoder's table, the soft header limits
(reported, not answered), memory under a CONTINUATION flood or an HPACK bomb, the configuration and
the rate limiter.  (The same attacks over the wire, against a real worker tunnel:
``tests/tunnel/test_abuse_worker.py``.)

The harness (our end, raw frames from the peer, h2 as the reference) is ``h2core_harness.py``.
"""

from __future__ import annotations

import dataclasses
import random
import tracemalloc
from collections.abc import Callable

import h2.events as ev
import hpack
import pytest
from h2.errors import ErrorCodes as E
from h2.settings import SettingCodes as S

from rhttp_wsgi._h2core import H2Config, HeadersOverLimit, RateLimiter
from rhttp_wsgi._protocol import PREFACE, TunnelProtocol, core_config
from rhttp_wsgi.errors import ProtocolViolation
from tests.h2peer import hpack_bomb
from tests.unit.h2core_harness import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    REQ,
    RESP,
    RST_STREAM,
    Pair,
    Raw,
    client_with_streams,
    data,
    frame,
    of,
    options,
    parse,
    ping,
    rst,
    settings,
)

pytestmark = pytest.mark.timeout(60)


# ===================================================================================================
# RST_STREAM on idle streams: HAProxy's retries never cost a tunnel, a flood still does
# ===================================================================================================


def haproxy_upgrade_retries(first: int) -> bytes:
    """What HAProxy 3.0 sends for one public ``Upgrade: websocket`` request when we did not advertise
    SETTINGS_ENABLE_CONNECT_PROTOCOL: RST_STREAM(INTERNAL_ERROR) on six stream ids it never opened."""
    return b"".join(rst(sid, E.INTERNAL_ERROR) for sid in range(first, first + 12, 2))


def test_haproxy_resets_on_streams_it_never_opened_do_not_cost_the_tunnel() -> None:
    r = Raw("server")  # production worker options
    assert r.feed(haproxy_upgrade_retries(1)) == [] and r.out() == []
    r.request_ok(13)  # the next public request is served
    r.respond(13)
    r.request_ok(15, end=False)  # a request in flight while another public client asks for a WebSocket
    assert r.feed(haproxy_upgrade_retries(17)) == [] and r.out() == []
    events = r.feed(data(15, b"body", end=True))
    assert [e.data for e in of(events, ev.DataReceived)] == [b"body"] and of(events, ev.StreamEnded)
    r.respond(15)
    r.request_ok(29)
    assert not r.core.closed


def test_a_flood_of_rst_stream_on_idle_streams_is_enhance_your_calm() -> None:
    r = Raw("server", options("server", control_frame_rate=10, control_frame_burst=30))
    sids = iter(range(1, 10001, 2))

    def resets(n: int) -> list[bytes]:
        return [rst(next(sids), E.INTERNAL_ERROR) for _ in range(n)]

    assert r.feed(*resets(29)) == []  # the handshake's SETTINGS took the 30th token
    r.now += 1.0  # +10 tokens
    assert r.feed(*resets(10)) == []
    r.conn_error(b"".join(resets(1)), E.ENHANCE_YOUR_CALM)


def test_the_default_burst_stops_an_idle_rst_stream_flood() -> None:
    r = Raw("server")
    r.conn_error(b"".join(rst(sid, E.CANCEL) for sid in range(1, 2203, 2)), E.ENHANCE_YOUR_CALM)  # 1,101 at once


# ===================================================================================================
# 1xx responses (client role) are charged to the flood budget
# ===================================================================================================


def test_endless_informational_responses_are_enhance_your_calm() -> None:
    r = client_with_streams(2, opts=options("client", control_frame_rate=10, control_frame_burst=20))
    early = [(b":status", b"103"), (b"link", b"</style.css>; rel=preload")]
    for _ in range(19):  # the handshake's SETTINGS took one token
        [info] = r.feed(r.headers(1, early))
        assert isinstance(info, ev.InformationalResponseReceived)
    r.now += 0.5  # +5
    for _ in range(5):
        assert of(r.feed(r.headers(3, early)), ev.InformationalResponseReceived)
    r.conn_error(r.headers(1, early), E.ENHANCE_YOUR_CALM)


def test_informational_responses_within_the_budget_are_reported() -> None:
    r = client_with_streams(1)
    events = r.feed(r.headers(1, [(b":status", b"100")]), r.headers(1, [(b":status", b"103")]),
                    r.headers(1, RESP, end=True))
    assert [e.headers[0][1] for e in of(events, ev.InformationalResponseReceived)] == [b"100", b"103"]
    assert of(events, ev.ResponseReceived)


# ===================================================================================================
# HPACK encoder: the peer's SETTINGS_HEADER_TABLE_SIZE is honoured up to 4,096 bytes
# ===================================================================================================


def _send(r: Raw, sid: int, fields: list[tuple[bytes, bytes]]) -> bytes:
    if r.role == "server":
        r.request_ok(sid)
        r.core.send_headers(sid, RESP + fields, end_stream=True)
    else:
        r.core.send_headers(sid, REQ + fields, end_stream=True)
    frames = r.out()
    assert r.decode(frames, sid)[-len(fields):] == fields
    return b"".join(f.payload for f in frames if f.type == HEADERS)


@pytest.mark.parametrize("role", ["server", "client"])
def test_encoder_table_is_capped_at_4096_whatever_the_peer_allows(role: str) -> None:
    r = Raw(role, peer_settings={S.HEADER_TABLE_SIZE: 2**32 - 1})
    r.dec.max_allowed_table_size = 2**32 - 1  # the peer's decoder accepts any size it advertised
    first = _send(r, 1, [(b"x-a", b"1")])
    assert first[0] & 0xE0 != 0x20  # 4,096 is the size already in use: no size update to signal
    rng = random.Random(3)
    for i in range(200):  # ~ 20 KB of distinct fields (public clients' cookies, say)
        _send(r, 3 + 2 * i, [(b"x-unique", bytes(rng.randrange(97, 123) for _ in range(60)))])
    assert r.core.encoder.table_size <= 4096
    assert sum(len(n) + len(v) + 32 for n, v in r.dec.header_table.dynamic_entries) <= 4096
    # a smaller size is honoured and signalled (RFC 7541 §4.2), and back up to the cap
    r.feed(settings({S.HEADER_TABLE_SIZE: 100}))
    r.out()
    assert _send(r, 1001, [(b"x-b", b"2")])[:2] == b"\x3f\x45"  # size update to 100
    r.feed(settings({S.HEADER_TABLE_SIZE: 2**32 - 1}))
    r.out()
    assert _send(r, 1003, [(b"x-c", b"3")])[:3] == b"\x3f\xe1\x1f"  # size update to 4,096
    assert r.core.remote_settings.header_table_size == 2**32 - 1  # the peer's value, as advertised


def test_encoder_table_cap_differential_with_h2() -> None:
    """h2 as the peer advertises a 2^32-1 table: it decodes every block we send (our encoder stays
    within 4,096 bytes, which any decoder allowing more accepts), where h2's own encoder would grow."""
    p = Pair("server")
    p.pump()
    p.peer.update_settings({S.HEADER_TABLE_SIZE: 2**32 - 1})
    p.pump()
    assert p.core.remote_settings.header_table_size == 2**32 - 1
    rng = random.Random(4)
    for i in range(150):
        sid = 1 + 2 * i
        p.peer.send_headers(sid, REQ, end_stream=True)
        ours, _ = p.pump()
        assert of(ours, ev.RequestReceived)
        fields = [(b":status", b"200"), (b"set-cookie", bytes(rng.randrange(97, 123) for _ in range(80)))]
        p.proto.send_headers(sid, fields, end_stream=True)
        _, theirs = p.pump()
        assert of(theirs, ev.ResponseReceived)[0].headers == fields
    assert p.core.encoder.table_size <= 4096


# ===================================================================================================
# The soft header limits: reported to the stream's owner, who answers (431); the core never does
# ===================================================================================================


@pytest.mark.parametrize("end", [True, False], ids=["ended", "body-coming"])
def test_request_above_max_header_count_is_reported_not_answered(end: bool) -> None:
    r = Raw("server", options("server", max_header_count=3))
    fields = [*REQ, (b"x-a", b"1"), (b"x-b", b"2"), (b"x-c", b"3"), (b"x-d", b"4")]
    events = r.feed(r.headers(1, fields, end=end))
    [over] = events
    assert isinstance(over, HeadersOverLimit)
    assert (over.stream_id, over.stream_ended) == (1, end)
    assert "4 header fields (max_header_count 3)" in over.reason
    assert r.out() == []  # no 431 from the core: that is the stream owner's policy
    assert 1 in r.core.streams and r.proto.open_inbound_streams() == 1
    if not end:  # the body keeps coming until the owner answers; it is reported as usual
        assert of(r.feed(data(1, b"abc")), ev.DataReceived)
    # the owner's answer: 431, then (body still coming) RST_STREAM(NO_ERROR) (RFC 9113 §8.1)
    r.proto.send_headers(1, [(b":status", b"431"), (b"content-length", b"0")], end_stream=True)
    if not end:
        r.proto.reset_stream(1, E.NO_ERROR)
    out = r.out()
    assert [f.type for f in out] == [HEADERS] + ([RST_STREAM] if not end else [])
    assert r.decode(out, 1) == [(b":status", b"431"), (b"content-length", b"0")]
    assert not r.core.streams
    if not end:
        assert r.feed(data(1, b"late", end=True)) == []  # ignored: we reset it
    # HPACK stayed in sync: the same fields again, now mostly references to the dynamic table
    r.request_ok(3, fields[:6])


def test_request_above_max_header_list_size_is_reported_and_hpack_stays_in_sync() -> None:
    r = Raw("server")  # 64 KiB soft, 256 KiB hard
    block = r.block([*REQ, (b"x-big", b"a" * 70000)])  # ~44 KB once Huffman-coded: 3 frames
    chunks = [block[i:i + 16384] for i in range(0, len(block), 16384)]
    events = r.feed(frame(HEADERS, END_STREAM, 1, chunks[0]),
                    *(frame(CONTINUATION, END_HEADERS if c is chunks[-1] else 0, 1, c) for c in chunks[1:]))
    [over] = events
    assert isinstance(over, HeadersOverLimit) and over.stream_ended
    assert "max_header_list_size 65536" in over.reason
    assert r.out() == []
    r.proto.send_headers(1, [(b":status", b"431")], end_stream=True)
    r.out()
    r.request_ok(3)


def test_trailers_above_the_soft_limits_are_malformed() -> None:
    r = Raw("server", options("server", max_header_count=2))
    r.request_ok(1, end=False)
    r.stream_error(r.headers(1, [(b"x-a", b"1"), (b"x-b", b"2"), (b"x-c", b"3")], end=True), 1, E.PROTOCOL_ERROR)


def test_the_proxy_role_has_no_soft_header_limits() -> None:
    r = client_with_streams(1)
    fields = [*RESP, *((f"x-{i}".encode(), b"v") for i in range(150))]
    [resp] = of(r.feed(r.headers(1, fields, end=True)), ev.ResponseReceived)
    assert len(resp.headers) == 151


# ===================================================================================================
# Memory under a flood: the worker's protocol object, measured under tracemalloc
# ===================================================================================================

MB = 1 << 20


def server_core() -> TunnelProtocol:
    """The worker's sans-I/O protocol after the handshake."""
    proto = TunnelProtocol("server", options("server"))
    proto.initiate(0.0)
    proto.data_to_send()
    proto.receive(settings(), 0.0)
    proto.data_to_send()
    return proto


def traced_peak(fn: Callable[[], None]) -> int:
    """Peak bytes allocated (above the start) while ``fn`` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


def test_continuation_flood_memory_stays_flat() -> None:
    proto = server_core()
    head = frame(HEADERS, END_STREAM, 1, hpack.Encoder().encode(REQ))
    chunk = frame(CONTINUATION, 0, 1, b"\x00" * 16000) * 4
    fed = [0]
    errors: list[ProtocolViolation] = []

    def feed() -> None:
        try:
            proto.receive(head, 0.0)
            while fed[0] < 10 * MB:
                proto.receive(chunk, 0.0)
                fed[0] += len(chunk)
        except ProtocolViolation as e:
            errors.append(e)

    peak = traced_peak(feed)
    assert errors and errors[0].error_code == E.ENHANCE_YOUR_CALM
    assert fed[0] <= 4 * 65536, "refused once the block passed 4 x max_header_list_size"
    assert peak < 2 * MB, f"peak {peak} bytes while 10 MB were offered"


def test_hpack_bomb_is_refused_without_expanding() -> None:
    proto = server_core()
    first, second = hpack_bomb(hpack.Encoder(), REQ, refs=1000)  # ~4 MB once expanded
    events = proto.receive(frame(HEADERS, END_HEADERS | END_STREAM, 1, first), 0.0)
    assert any(type(e).__name__ == "RequestReceived" for e in events)
    bomb = frame(HEADERS, END_HEADERS | END_STREAM, 3, second)
    errors: list[ProtocolViolation] = []

    def feed() -> None:
        try:
            proto.receive(bomb, 0.0)
        except ProtocolViolation as e:
            errors.append(e)

    peak = traced_peak(feed)
    assert errors and errors[0].error_code == E.ENHANCE_YOUR_CALM
    assert peak < MB // 2, f"peak {peak} bytes: the bomb was expanded"
    assert any(f.type == GOAWAY for f in parse(proto.data_to_send()))


# ===================================================================================================
# Configuration and the rate limiter
# ===================================================================================================


def test_core_config_comes_from_the_options() -> None:
    worker = core_config("server", options("server", max_header_count=7, max_resets=9, control_frame_rate=11.0,
                                           control_frame_burst=12, max_header_list_size=4096))
    assert (worker.client_side, worker.validate_outbound) == (False, False)
    assert (worker.soft_max_header_count, worker.soft_max_header_list_size, worker.hard_max_header_list_size,
            worker.max_header_block) == (7, 4096, 4 * 4096, 4 * 4096)
    assert (worker.max_resets, worker.reset_window, worker.control_frame_rate, worker.control_frame_burst) == \
        (9, 10.0, 11.0, 12)
    assert (worker.enable_connect_protocol, worker.max_encoder_table_size) == (True, 4096)  # (websockets)
    assert not core_config("server", options("server", websockets=False)).enable_connect_protocol
    proxy = core_config("client", options("client", max_header_list_size=4096))
    assert (proxy.client_side, proxy.validate_outbound) == (True, True)
    assert (proxy.soft_max_header_count, proxy.soft_max_header_list_size, proxy.max_resets) == (0, 0, 0)
    assert proxy.hard_max_header_list_size == 4096
    # a worker built from options that are not WorkerOptions has no worker-only limits
    from rhttp_wsgi.options import TunnelOptions

    bare = core_config("server", TunnelOptions(cert="c", key="k"))
    assert (bare.soft_max_header_count, bare.max_resets) == (0, 0)


def test_config_is_frozen() -> None:
    cfg = H2Config(client_side=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_resets = 1  # type: ignore[misc]


def test_rate_limiter_is_a_token_bucket_fed_the_time() -> None:
    bucket = RateLimiter(rate=2.0, burst=3)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(100.4) is False  # 0.8 token
    assert bucket.take(100.5) is True  # 1.0
    assert [bucket.take(1000.0) for _ in range(4)] == [True, True, True, False]  # refill capped at the burst
    assert bucket.take(999.0) is False  # time going backwards refills nothing


def test_no_flood_guard_when_the_rate_is_zero() -> None:
    r = Raw("server", options("server", control_frame_rate=0))
    assert r.feed(*(rst(sid, E.CANCEL) for sid in range(1, 4001, 2))) == []
    assert not r.core.closed and not [f for f in r.out() if f.type != DATA]


def test_control_frame_flood_guard_is_a_token_bucket_that_refills() -> None:
    """The core's bucket, sans I/O: a burst, a refill at the sustained rate, then a flood."""
    proto = TunnelProtocol("client", options("client", control_frame_rate=10, control_frame_burst=5,
                                             ping_interval=3600))
    proto.initiate(0.0)
    proto.data_to_send()
    first = settings()  # the first SETTINGS costs one token too
    proto.receive(PREFACE + first, 0.0)

    def pings(n: int) -> bytes:
        return b"".join(ping(b"%08d" % i) for i in range(n))

    proto.receive(pings(4), 0.0)  # 5 tokens used
    proto.receive(pings(5), 0.5)  # 0.5 s at 10/s refilled 5
    proto.receive(pings(5), 10.0)  # refill is capped at the burst
    with pytest.raises(ProtocolViolation) as exc:
        proto.receive(pings(1), 10.0)
    assert exc.value.error_code == E.ENHANCE_YOUR_CALM
    assert proto.goaway_sent
    unlimited = TunnelProtocol("client", options("client", control_frame_rate=0, ping_interval=3600))
    unlimited.initiate(0.0)
    unlimited.receive(PREFACE + first + pings(5000), 0.0)  # 0 = no limit
