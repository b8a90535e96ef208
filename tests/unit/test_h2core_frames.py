"""The frame layer (RFC 9113 §4, §6): lengths, CONTINUATION, split reads, PING, GOAWAY, unknown frames.

The harness (our end, raw frames from the peer, h2 as the reference) is ``h2core_harness.py``.
"""

from __future__ import annotations

import itertools
import random
import struct
from typing import Any

import h2.events as ev
import pytest
from h2.errors import ErrorCodes as E
from h2.settings import SettingCodes as S

from rhttp_wsgi._protocol import PREFACE
from tests.unit.h2core_harness import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PRIORITY,
    PRIORITY_FLAG,
    REQ,
    RESP,
    ROLES,
    RST_STREAM,
    WINDOW_UPDATE,
    F,
    Pair,
    Raw,
    client_with_streams,
    config,
    data,
    frame,
    goaway,
    of,
    open_stream,
    options,
    ping,
    priority,
    rst,
    settings,
    settings_ack,
    window_update,
)

pytestmark = pytest.mark.timeout(60)


# ===================================================================================================
# §4 / §6 frame layer
# ===================================================================================================


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("ftype", [DATA, HEADERS, 0x42])
def test_oversized_frame_refused_from_its_header_alone(role: str, ftype: int) -> None:
    r = Raw(role)
    r.conn_error(frame(ftype, 0, 1, length=options(role).max_frame_size + 1), E.FRAME_SIZE_ERROR)  # 9 bytes only


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("head", [1, 4, 8])
def test_oversized_frame_refused_once_its_split_header_completes(role: str, head: int) -> None:
    # The first read ends inside the frame header (a partial frame is buffered); the
    # read that completes the header is refused at once, without waiting for a payload.
    r = Raw(role)
    if role == "client":
        r.core.send_headers(1, REQ, end_stream=True)
        r.out()
    oversized = frame(DATA, 0, 1, length=options(role).max_frame_size + 1)
    assert [type(e) for e in r.feed(ping(b"pingpong") + oversized[:head])] == [ev.PingReceived]
    r.conn_error(oversized[head:9] + b"x" * 100, E.FRAME_SIZE_ERROR)


def test_frame_completed_across_reads_then_more_frames_in_the_same_read() -> None:
    # One read finishes a partial DATA frame and carries two whole frames and the start
    # of a fourth: each is delivered once, in order, with its own bytes.
    r = Raw("server")
    r.request_ok(1, end=False)
    stream = data(1, b"a" * 3000) + data(1, b"b" * 10) + data(1, b"c" * 20) + data(1, b"d" * 500, end=True)
    cuts = [0, 1000, 3100, len(stream) - 200, len(stream)]
    got: list[Any] = []
    for a, b in itertools.pairwise(cuts):
        got += r.feed(stream[a:b])
    datas = of(got, ev.DataReceived)
    assert [bytes(d.data) for d in datas] == [b"a" * 3000, b"b" * 10, b"c" * 20, b"d" * 500]
    assert of(got, ev.StreamEnded)


def test_larger_advertised_max_frame_size_is_accepted() -> None:
    r = Raw("server", cfg=config("server", max_frame_size=32768))
    r.request_ok(1, end=False)
    [d] = of(r.feed(data(1, b"x" * 32768)), ev.DataReceived)
    assert len(d.data) == 32768
    r.conn_error(frame(DATA, 0, 1, length=32769), E.FRAME_SIZE_ERROR)


def _server_exchange(r: Raw) -> bytes:
    """Everything a proxy might send a worker, as one byte string (after the handshake frames)."""
    block = r.block([*REQ, (b"x-a", b"1" * 40), (b"content-length", b"5")])
    third = len(block) // 3
    parts = [
        settings({S.INITIAL_WINDOW_SIZE: 1000, S.MAX_FRAME_SIZE: 20000}), settings_ack(),
        frame(HEADERS, PRIORITY_FLAG, 1, struct.pack(">LB", 0, 7) + block[:third]),
        frame(CONTINUATION, 0, 1, block[third:2 * third]),
        frame(CONTINUATION, END_HEADERS, 1, block[2 * third:]),
        data(1, b"ab", pad=7), ping(b"pingpong"), priority(9, 1), frame(0x20, 0xFF, 7, b"unknown"),
        window_update(0, 100), data(1, b"cde"),
        r.headers(1, [(b"x-trailer", b"t")], end=True),
        r.headers(3, REQ, end=True), r.headers(5, [*REQ, (b"Bad", b"1")]),
        r.headers(7, REQ), rst(7, E.CANCEL), data(7, b"late"), window_update(3, 10),
        ping(b"ackackac", ack=True), goaway(7, E.NO_ERROR, b"bye"),
    ]
    return settings() + b"".join(parts)


def _client_exchange(r: Raw) -> bytes:
    block = r.block([*RESP, (b"x-a", b"1" * 40)])
    half = len(block) // 2
    parts = [
        PREFACE, settings({S.INITIAL_WINDOW_SIZE: 1000}), settings_ack(),
        frame(HEADERS, 0, 1, block[:half]), frame(CONTINUATION, END_HEADERS, 1, block[half:]),
        data(1, b"ab", pad=3), ping(b"pingpong"), frame(0x30, 0, 0, b""), window_update(1, 100),
        r.headers(1, [(b"x-trailer", b"t")], end=True),
        r.headers(3, [(b":status", b"100")]), r.headers(3, [(b":status", b"abc")]),
        rst(5, E.CANCEL), data(5, b"x"), goaway(5, E.NO_ERROR),
    ]
    return b"".join(parts)


def _run_chunked(role: str, cut: Any) -> tuple[list[str], bytes]:
    r = Raw(role, options(role, **({"max_resets": 0} if role == "server" else {})), handshake=False)
    if role == "client":
        for sid in (1, 3, 5):
            r.core.send_headers(sid, REQ, end_stream=True)
        r.proto.data_to_send()
    stream = _server_exchange(r) if role == "server" else _client_exchange(r)
    events: list[Any] = []
    pos = 0
    for n in cut(len(stream)):
        events += r.feed(stream[pos:pos + n])
        pos += n
    assert pos == len(stream)
    assert not r.core.closed
    return [repr(e) for e in events], r.proto.data_to_send()


@pytest.mark.parametrize("role", ROLES)
def test_frames_split_at_every_byte_and_random_chunks_give_the_same_events(role: str) -> None:
    whole_events, whole_out = _run_chunked(role, lambda n: [n])
    kinds = {e.split(" ", 1)[0] for e in whole_events}
    if role == "server":
        assert {"<RequestReceived", "<DataReceived", "<TrailersReceived", "<StreamReset", "<PingReceived",
                "<PingAckReceived", "<ConnectionTerminated", "<WindowUpdated"} <= kinds, kinds
    else:
        assert {"<ResponseReceived", "<InformationalResponseReceived", "<TrailersReceived",
                "<StreamReset", "<ConnectionTerminated"} <= kinds, kinds
    assert (whole_events, whole_out) == _run_chunked(role, lambda n: [1] * n)
    for seed in range(30):
        rng = random.Random(seed)
        # small reads (inside frame headers and payloads), and reads that finish a
        # partial frame and carry whole frames after it
        largest = 60 if seed < 15 else 400

        def cut(n: int, rng: random.Random = rng, largest: int = largest) -> list[int]:
            sizes: list[int] = []
            while sum(sizes) < n:
                sizes.append(min(rng.randint(1, largest), n - sum(sizes)))
            return sizes

        assert (whole_events, whole_out) == _run_chunked(role, cut), seed


@pytest.mark.parametrize("role", ROLES)
def test_continuation_reassembly(role: str) -> None:
    r = Raw(role)
    if role == "client":
        r.core.send_headers(1, REQ, end_stream=True)
        r.out()
    fields = (REQ if role == "server" else RESP) + [(f"x-{i}".encode(), b"v" * 30) for i in range(20)]
    block = r.block(fields)
    chunks = [block[i:i + 50] for i in range(0, len(block), 50)]
    assert len(chunks) >= 4
    stream = frame(HEADERS, END_STREAM, 1, chunks[0]) + b"".join(
        frame(CONTINUATION, END_HEADERS if i == len(chunks) - 1 else 0, 1, c) for i, c in enumerate(chunks[1:], 1))
    events = r.feed(stream)
    [msg] = of(events, ev.RequestReceived if role == "server" else ev.ResponseReceived)
    assert msg.headers == fields
    assert of(events, ev.StreamEnded)  # END_STREAM from the HEADERS frame


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("intruder", ["ping", "data-other", "headers-other", "continuation-other", "unknown",
                                      "settings", "window_update"])
def test_frame_interleaved_in_a_header_block(role: str, intruder: str) -> None:
    r = Raw(role)
    if role == "client":
        for sid in (1, 3):
            r.core.send_headers(sid, REQ)
        r.out()
        r.feed(r.headers(3, RESP))
    else:
        r.request_ok(3, end=False)
    block = r.block(REQ if role == "server" else RESP)
    bad = {"ping": ping(), "data-other": data(3, b"x"), "headers-other": r.headers(5, REQ),
           "continuation-other": frame(CONTINUATION, 0, 3, b""), "unknown": frame(0x21, 0, 0, b""),
           "settings": settings(), "window_update": window_update(0, 1)}[intruder]
    r.feed(frame(HEADERS, 0, 1, block[:2]))
    r.conn_error(bad, E.PROTOCOL_ERROR)  # refused for itself, before the block's end


@pytest.mark.parametrize("role", ROLES)
def test_continuation_count_limit(role: str) -> None:
    def run(n: int) -> Raw:
        r = Raw(role)
        if role == "client":
            r.core.send_headers(1, REQ, end_stream=True)
            r.out()
        block = r.block(REQ if role == "server" else RESP)
        r.feed(frame(HEADERS, END_STREAM, 1, block))
        for _ in range(n - 1):
            r.feed(frame(CONTINUATION, 0, 1, b""))
        return r

    r = run(64)
    assert of(r.feed(frame(CONTINUATION, END_HEADERS, 1, b"")), ev.StreamEnded)  # 64 CONTINUATIONs: fine
    r = run(65)
    r.conn_error(frame(CONTINUATION, END_HEADERS, 1, b""), E.PROTOCOL_ERROR)


@pytest.mark.parametrize("role", ROLES)
def test_continuation_without_a_header_block(role: str) -> None:
    r = Raw(role)
    open_stream(r, 1)
    r.conn_error(frame(CONTINUATION, END_HEADERS, 1, r.block([(b"x", b"y")])), E.PROTOCOL_ERROR)


@pytest.mark.parametrize("role", ROLES)
def test_continuation_after_end_headers(role: str) -> None:
    r = Raw(role)
    open_stream(r, 1)
    r.conn_error(frame(CONTINUATION, END_HEADERS, 1, b""), E.PROTOCOL_ERROR)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("bad,code", [
    (frame(PRIORITY, 0, 1, b"\0" * 4), E.FRAME_SIZE_ERROR),
    (frame(PRIORITY, 0, 1, b"\0" * 6), E.FRAME_SIZE_ERROR),
    (priority(1, 1), E.PROTOCOL_ERROR),
    (priority(1, 0x80000001), E.PROTOCOL_ERROR),  # exclusive bit set, still itself
    (priority(0, 1), E.PROTOCOL_ERROR),
    (frame(RST_STREAM, 0, 1, b"\0" * 3), E.FRAME_SIZE_ERROR),
    (frame(RST_STREAM, 0, 1, b"\0" * 5), E.FRAME_SIZE_ERROR),
    (rst(0, E.CANCEL), E.PROTOCOL_ERROR),
    (frame(PING, 0, 0, b"\0" * 7), E.FRAME_SIZE_ERROR),
    (frame(PING, 0, 0, b"\0" * 9), E.FRAME_SIZE_ERROR),
    (frame(PING, 0, 1, b"\0" * 8), E.PROTOCOL_ERROR),
    (frame(WINDOW_UPDATE, 0, 0, b"\0\0\0"), E.FRAME_SIZE_ERROR),
    (frame(WINDOW_UPDATE, 0, 1, b"\0\0\0\1\0"), E.FRAME_SIZE_ERROR),
    (frame(GOAWAY, 0, 0, b"\0" * 7), E.FRAME_SIZE_ERROR),
    (frame(GOAWAY, 0, 1, b"\0" * 8), E.PROTOCOL_ERROR),
    (data(0, b"x"), E.PROTOCOL_ERROR),
    (frame(HEADERS, END_HEADERS, 0, b"\x82"), E.PROTOCOL_ERROR),
    (frame(DATA, PADDED, 1, b""), E.FRAME_SIZE_ERROR),
], ids=lambda v: v.hex()[:24] if isinstance(v, bytes) else str(v))
def test_frame_length_and_stream_checks(role: str, bad: bytes, code: int) -> None:
    r = Raw(role)
    open_stream(r, 1)
    r.conn_error(bad, code)


@pytest.mark.parametrize("role", ROLES)
def test_headers_priority_fields(role: str) -> None:
    r = Raw(role)
    if role == "client":
        r.core.send_headers(1, REQ, end_stream=True)
        r.core.send_headers(3, REQ, end_stream=True)
        r.out()
    fields = REQ if role == "server" else RESP
    events = r.feed(frame(HEADERS, END_HEADERS | END_STREAM | PRIORITY_FLAG, 1,
                          struct.pack(">LB", 0x80000000, 200) + r.block(fields)))
    assert of(events, ev.RequestReceived if role == "server" else ev.ResponseReceived)[0].headers == fields
    r.conn_error(frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 3, struct.pack(">LB", 3, 1) + r.block(fields)),
                 E.PROTOCOL_ERROR)
    r2 = Raw(role)
    r2.conn_error(frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, b"\0\0\0"), E.FRAME_SIZE_ERROR)


@pytest.mark.parametrize("role", ROLES)
def test_unknown_frame_types_and_flags_are_ignored(role: str) -> None:
    r = Raw(role)
    open_stream(r, 1)
    events = r.feed(frame(0x0A, 0, 0, b"origin?"), frame(0xFA, 0xFF, 1, b"x" * 100), frame(0xFB, 0, 99, b""),
                    frame(PING, 0xFE, 0, b"abcdefgh"))  # unknown flags on PING (ACK clear): still a PING
    assert [type(e) for e in events] == [ev.PingReceived]
    assert r.out() == [F(PING, ACK, 0, b"abcdefgh")]
    events = r.feed(frame(DATA, 0xF6, 1, b"abc"))  # undefined DATA flags: ignored (no END_STREAM, no PADDED)
    assert [e.data for e in of(events, ev.DataReceived)] == [b"abc"]
    assert not r.core.closed


@pytest.mark.parametrize("role", ROLES)
def test_ping_and_ping_ack(role: str) -> None:
    r = Raw(role)
    assert [e.ping_data for e in r.feed(ping(b"\x01" * 8))] == [b"\x01" * 8]
    assert r.out() == [F(PING, ACK, 0, b"\x01" * 8)]
    [ack] = r.feed(ping(b"\x02" * 8, ack=True))
    assert isinstance(ack, ev.PingAckReceived) and ack.ping_data == b"\x02" * 8
    assert r.out() == []


def test_goaway_is_reported_and_in_flight_streams_complete_server_role() -> None:
    r = Raw("server")
    r.request_ok(1, end=False)
    events = r.feed(goaway(1, E.NO_ERROR, b"draining"))
    [term] = of(events, ev.ConnectionTerminated)
    assert (term.error_code, term.last_stream_id, term.additional_data) == (E.NO_ERROR, 1, b"draining")
    assert not r.core.closed and r.out() == []
    events = r.feed(data(1, b"body", end=True))
    assert [e.data for e in of(events, ev.DataReceived)] == [b"body"] and of(events, ev.StreamEnded)
    r.core.send_headers(1, RESP)
    r.core.send_data(1, b"answer", end_stream=True)
    assert [f.type for f in r.out()] == [HEADERS, DATA]
    assert not r.core.streams


def test_goaway_is_reported_and_in_flight_streams_complete_client_role() -> None:
    p = Pair("client")
    p.pump()
    p.core.send_headers(1, REQ, end_stream=True)
    p.core.send_headers(3, REQ, end_stream=True)
    _, theirs = p.pump()
    assert len(of(theirs, ev.RequestReceived)) == 2
    p.peer.close_connection(error_code=E.NO_ERROR, additional_data=b"bye", last_stream_id=3)
    ours, _ = p.pump()
    [term] = of(ours, ev.ConnectionTerminated)
    assert (term.error_code, term.last_stream_id, term.additional_data) == (E.NO_ERROR, 3, b"bye")
    assert p.proto.goaway_received is term and not p.core.closed
    # h2 closed itself after sending GOAWAY; the responses it would still owe come from a raw peer instead
    raw = client_with_streams(2)
    raw.feed(goaway(3, E.NO_ERROR))
    events = raw.feed(raw.headers(1, RESP, end=True), raw.headers(3, RESP), data(3, b"x", end=True))
    assert len(of(events, ev.ResponseReceived)) == 2 and len(of(events, ev.StreamEnded)) == 2


def test_goaway_with_an_unknown_error_code() -> None:
    r = Raw("server")
    [term] = r.feed(goaway(0, 0xABCDEF))
    assert term.error_code == 0xABCDEF
    assert not r.core.closed


def _norm(events: list[Any]) -> list[tuple[Any, ...]]:
    """Events as comparable tuples (h2's header tuples and ours compare as plain byte pairs)."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        t = type(e).__name__
        if isinstance(e, (ev.RequestReceived, ev.TrailersReceived)):
            out.append((t, e.stream_id, [(bytes(k), bytes(v)) for k, v in e.headers]))
        elif isinstance(e, ev.DataReceived):
            out.append((t, e.stream_id, bytes(e.data), e.flow_controlled_length))
        elif isinstance(e, (ev.StreamEnded, ev.StreamReset)):
            out.append((t, e.stream_id, getattr(e, "error_code", None)))
        elif isinstance(e, ev.WindowUpdated):
            out.append((t, e.stream_id, e.delta))
        elif isinstance(e, (ev.PingReceived, ev.PingAckReceived)):
            out.append((t, e.ping_data))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_split_reads_give_h2s_events(seed: int) -> None:
    """Differential against h2: the same valid frames -- requests, bodies of every size up to
    16 KiB per frame (a bulk body of ~400 KiB among them), padding, trailers, PINGs, window
    updates, resets -- cut into random reads (a byte to 300 KiB, as bytes or as a memoryview, as
    the tunnel reader hands over a large read) give our core and h2's H2Connection the same events."""
    import hpack
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    from rhttp_wsgi._protocol import TunnelProtocol

    rng = random.Random(seed)
    enc = hpack.Encoder()
    frames = [settings(), settings_ack()]
    body = {1: b"", 3: b"", 5: b""}
    for sid in (1, 3, 5):
        frames.append(frame(HEADERS, END_HEADERS, sid, enc.encode([*REQ, (b"x-n", str(sid).encode())])))
    for i in range(60):
        sid = rng.choice((1, 3, 5))
        n = rng.choice((1, 100, 5000, 16384))
        chunk = rng.randbytes(n)
        body[sid] += chunk
        frames.append(data(sid, chunk, pad=rng.choice((None, None, 0, 7)) if n < 16384 else None))
        if i % 9 == 0:
            frames.append(ping(rng.randbytes(8)))
        if i % 13 == 0:
            frames.append(window_update(0, rng.randint(1, 1000)))
    frames += [data(1, b"", end=True), frame(HEADERS, END_HEADERS | END_STREAM, 3, enc.encode([(b"x-t", b"1")])),
               rst(5, E.CANCEL)]
    stream = b"".join(frames)

    ours = TunnelProtocol("server", options("server", max_resets=0, control_frame_rate=0,
                                            initial_window_size=1 << 24, connection_window_size=1 << 26))
    ours.initiate(0.0)
    ours.data_to_send()
    theirs = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    theirs.initiate_connection()
    theirs.update_settings({S.INITIAL_WINDOW_SIZE: 1 << 24})
    theirs.increment_flow_control_window((1 << 26) - 65535)
    theirs.data_to_send()
    theirs.receive_data(PREFACE)
    got_ours: list[Any] = []
    got_theirs: list[Any] = []
    pos = 0
    while pos < len(stream):
        n = min(rng.choice((1, 7, 9, 100, 16393, 40_000, 300_000)), len(stream) - pos)
        piece = stream[pos:pos + n]
        got_ours += ours.receive(memoryview(piece) if rng.random() < 0.5 else piece, 1.0)
        got_theirs += theirs.receive_data(piece)
        pos += n
    assert _norm(got_ours) == _norm(got_theirs)
    assert sum(len(e.data) for e in got_ours if isinstance(e, ev.DataReceived)) == sum(map(len, body.values()))
