"""Flow control (RFC 9113 §6.9), windows and padding, and WINDOW_UPDATE decisions against h2's.

The harness (our end, raw frames from the peer, h2 as the reference) is ``h2core_harness.py``.
"""

from __future__ import annotations

import random
from typing import Any

import h2.events as ev
import h2.exceptions as h2x
import hpack
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes as E
from h2.settings import SettingCodes as S

from rhttp_wsgi._protocol import PREFACE, TunnelProtocol
from tests.unit.h2core_harness import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    MAX_WINDOW,
    PADDED,
    REQ,
    RESP,
    ROLES,
    Raw,
    config,
    data,
    frame,
    of,
    open_stream,
    options,
    parse,
    settings,
    window_update,
    wu,
)

pytestmark = pytest.mark.timeout(60)


# ===================================================================================================
# §6.9 flow control
# ===================================================================================================


@pytest.mark.parametrize("role", ROLES)
def test_outbound_stream_window(role: str) -> None:
    r = Raw(role, peer_settings={S.INITIAL_WINDOW_SIZE: 10})
    open_stream(r, 1)
    if role == "server":
        r.core.send_headers(1, RESP)
        r.out()
    assert r.core.local_flow_control_window(1) == 10
    with pytest.raises(h2x.FlowControlError):
        r.core.send_data(1, b"x" * 11)
    r.core.send_data(1, b"x" * 10)
    assert r.core.local_flow_control_window(1) == 0
    with pytest.raises(h2x.FlowControlError):
        r.core.send_data(1, b"x")
    r.out()
    [upd] = of(r.feed(window_update(1, 5)), ev.WindowUpdated)
    assert (upd.stream_id, upd.delta) == (1, 5)
    assert r.core.local_flow_control_window(1) == 5
    assert r.core.outbound_flow_control_window == 65535 - 10


@pytest.mark.parametrize("role", ROLES)
def test_outbound_connection_window(role: str) -> None:
    r = Raw(role, peer_settings={S.INITIAL_WINDOW_SIZE: 40000})
    for sid in (1, 3):
        open_stream(r, sid)
        if role == "server":
            r.core.send_headers(sid, RESP)
    r.out()
    r.core.send_data(1, b"a" * 16384)
    r.core.send_data(1, b"a" * 16384)
    r.core.send_data(3, b"b" * 16384)
    assert r.core.local_flow_control_window(3) == 65535 - 3 * 16384  # the connection window is smaller
    with pytest.raises(h2x.FlowControlError):
        r.core.send_data(3, b"b" * (65535 - 3 * 16384 + 1))
    r.core.send_data(3, b"b" * (65535 - 3 * 16384))
    assert r.core.local_flow_control_window(1) == 0
    [upd] = of(r.feed(window_update(0, 1000)), ev.WindowUpdated)
    assert (upd.stream_id, upd.delta) == (0, 1000)
    assert r.core.local_flow_control_window(1) == 1000
    sent = [f for f in r.out() if f.type == DATA]
    assert sum(len(f.payload) for f in sent) == 65535


def test_send_data_beyond_max_frame_size_raises() -> None:
    r = Raw("server", peer_settings={S.INITIAL_WINDOW_SIZE: 100000})
    r.request_ok(1)
    r.core.send_headers(1, RESP)
    with pytest.raises(h2x.FrameTooLargeError):
        r.core.send_data(1, b"x" * 16385)


@pytest.mark.parametrize("role", ROLES)
def test_inbound_stream_window_overrun_is_stream_error(role: str) -> None:
    r = Raw(role, cfg=config(role, initial_window_size=100))
    open_stream(r, 1)
    r.feed(data(1, b"x" * 60))
    r.stream_error(data(1, b"x" * 41), 1, E.FLOW_CONTROL_ERROR)
    open_stream(r, 3)


@pytest.mark.parametrize("role", ROLES)
def test_inbound_connection_window_overrun_is_connection_error(role: str) -> None:
    r = Raw(role, options(role, connection_window_size=65535))
    open_stream(r, 1)
    for _ in range(3):
        r.feed(data(1, b"x" * 16384))
    r.feed(data(1, b"x" * (65535 - 3 * 16384)))
    r.conn_error(data(1, b"x"), E.FLOW_CONTROL_ERROR)


@pytest.mark.parametrize("role", ROLES)
def test_window_update_overflow(role: str) -> None:
    r = Raw(role)
    open_stream(r, 1)
    open_stream(r, 3)
    r.feed(window_update(1, MAX_WINDOW - 65535))  # exactly 2^31-1: allowed (the peer's window starts at 65535)
    r.stream_error(window_update(1, 1), 1, E.FLOW_CONTROL_ERROR)  # 2^31: one too many
    r.feed(window_update(0, MAX_WINDOW - 65535))
    assert r.core.outbound_flow_control_window == MAX_WINDOW
    r.conn_error(window_update(0, 1), E.FLOW_CONTROL_ERROR)


@pytest.mark.parametrize("role", ROLES)
def test_window_update_zero_increment(role: str) -> None:
    r = Raw(role)
    open_stream(r, 1)
    r.stream_error(window_update(1, 0), 1, E.PROTOCOL_ERROR)
    open_stream(r, 3)
    r.conn_error(window_update(0, 0), E.PROTOCOL_ERROR)


@pytest.mark.parametrize("role", ROLES)
def test_window_update_reserved_bit_ignored(role: str) -> None:
    r = Raw(role)
    open_stream(r, 1)
    [upd] = of(r.feed(window_update(1, 0x80000000 | 7)), ev.WindowUpdated)
    assert upd.delta == 7


@pytest.mark.parametrize("role", ROLES)
def test_initial_window_size_change_adjusts_open_streams(role: str) -> None:
    r = Raw(role, peer_settings={S.INITIAL_WINDOW_SIZE: 100})
    open_stream(r, 1)
    if role == "server":
        r.core.send_headers(1, RESP)
    r.core.send_data(1, b"x" * 100)
    r.out()
    r.feed(settings({S.INITIAL_WINDOW_SIZE: 50}))  # 0 + (50 - 100): negative (§6.9.2)
    assert r.core.streams[1].out_window == -50
    assert r.core.local_flow_control_window(1) == -50
    with pytest.raises(h2x.FlowControlError):
        r.core.send_data(1, b"x")
    r.feed(window_update(1, 60))
    assert r.core.local_flow_control_window(1) == 10
    r.feed(settings({S.INITIAL_WINDOW_SIZE: 1000}))
    assert r.core.local_flow_control_window(1) == 960
    r.core.send_data(1, b"x" * 960)
    # a stream opened afterwards starts from the new value
    open_stream(r, 3)
    assert r.core.streams[3].out_window == 1000


@pytest.mark.parametrize("role", ROLES)
def test_initial_window_size_change_overflowing_a_stream(role: str) -> None:
    r = Raw(role)
    open_stream(r, 1)
    r.feed(window_update(1, MAX_WINDOW - 65535))
    r.out()
    r.conn_error(settings({S.INITIAL_WINDOW_SIZE: 65536}), E.FLOW_CONTROL_ERROR)


@pytest.mark.parametrize("role", ROLES)
def test_padding_counts_against_windows(role: str) -> None:
    r = Raw(role, cfg=config(role, initial_window_size=200))  # connection window: 65,535
    open_stream(r, 1)
    events = r.feed(data(1, b"abc", pad=96))  # 1 + 3 + 96 = 100
    [d] = of(events, ev.DataReceived)
    assert (d.data, d.flow_controlled_length) == (b"abc", 100)
    assert r.core.streams[1].in_window == 100
    assert r.core.inbound_window == 65535 - 100
    r.stream_error(data(1, b"a" * 50, pad=50), 1, E.FLOW_CONTROL_ERROR)  # 101 > 100


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("pad_len,payload_len", [(5, 5), (9, 5), (255, 1)])
def test_padding_beyond_payload_is_protocol_error(role: str, pad_len: int, payload_len: int) -> None:
    r = Raw(role)
    open_stream(r, 1)
    r.conn_error(frame(DATA, PADDED, 1, bytes((pad_len,)) + b"\0" * (payload_len - 1)), E.PROTOCOL_ERROR)


@pytest.mark.parametrize("role", ROLES)
def test_padded_headers(role: str) -> None:
    r = Raw(role)
    sid = 1
    if role == "client":
        r.core.send_headers(1, REQ, end_stream=True)
        r.out()
    block = r.block(REQ if role == "server" else RESP)
    events = r.feed(frame(HEADERS, END_HEADERS | END_STREAM | PADDED, sid, b"\x04" + block + b"\0" * 4))
    assert of(events, ev.RequestReceived if role == "server" else ev.ResponseReceived)
    r2 = Raw(role)
    if role == "client":
        r2.core.send_headers(1, REQ, end_stream=True)
        r2.out()
    r2.conn_error(frame(HEADERS, END_HEADERS | PADDED, 1, b"\x10" + b"\0" * 4), E.PROTOCOL_ERROR)


def _window_differential(extra: int, steps: Any) -> int:
    """Feed the same DATA frames and acknowledgements to our core and to h2's H2Connection (server
    side); the WINDOW_UPDATE frames each emits must be identical after every step.  ``steps`` is a
    generator receiving the credit the peer has (connection, per stream, unacknowledged) and yielding
    ("data", sid, n, pad) or ("ack", sid, k).  Returns how many WINDOW_UPDATEs were compared."""
    ours = TunnelProtocol("server", options("server", initial_window_size=65535, connection_window_size=65535 + extra,
                                                max_resets=0, control_frame_rate=0))
    ours.initiate(0.0)
    ours.data_to_send()
    theirs = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    theirs.initiate_connection()
    if extra:
        theirs.increment_flow_control_window(extra)
    theirs.data_to_send()
    enc = hpack.Encoder()
    start = settings() + frame(HEADERS, END_HEADERS, 1, enc.encode(REQ)) + frame(HEADERS, END_HEADERS, 3,
                                                                                  enc.encode(REQ))
    assert len(of(ours.receive(start, 1.0), ev.RequestReceived)) == 2
    assert len(of(theirs.receive_data(PREFACE + start), ev.RequestReceived)) == 2
    ours.data_to_send()
    theirs.data_to_send()
    state = {"conn": 65535 + extra, 1: 65535, 3: 65535, "unacked1": 0, "unacked3": 0}
    seen = 0
    gen = steps(state)
    for step in gen:
        if step[0] == "data":
            _, sid, n, pad = step
            assert 0 < n <= min(16384, state["conn"], state[sid])
            f = data(sid, b"d" * (n - 1 - pad), pad=pad) if pad is not None else data(sid, b"d" * n)
            ours.receive(f, 1.0)
            theirs.receive_data(f)
            state["conn"] -= n
            state[sid] -= n
            state[f"unacked{sid}"] += n
        else:
            _, sid, k = step
            state[f"unacked{sid}"] -= k
            ours.acknowledge_received_data(k, sid)
            theirs.acknowledge_received_data(k, sid)
        o = wu(parse(ours.data_to_send()))
        t = wu(parse(theirs.data_to_send()))
        assert o == t, step
        for s, inc in o:
            seen += 1
            state["conn" if s == 0 else s] += inc
    return seen


@pytest.mark.parametrize("seed", range(6))
def test_window_updates_match_h2_window_manager(seed: int) -> None:
    """Differential (random): h2's WindowManager rule, WINDOW_UPDATE for WINDOW_UPDATE."""
    rng = random.Random(seed)

    def steps(st: dict[Any, int]) -> Any:
        for _ in range(400):
            sid = rng.choice((1, 3))
            room = min(16384, st["conn"], st[sid])
            if rng.random() < 0.55 and room > 0:
                n = rng.randint(1, room)
                yield ("data", sid, n, rng.randint(0, min(255, n - 1)) if rng.random() < 0.3 else None)
            elif st[f"unacked{sid}"]:
                yield ("ack", sid, rng.randint(1, st[f"unacked{sid}"]))

    assert _window_differential((0, 100000, 1 << 20)[seed % 3], steps) >= 10  # the rule was exercised


@pytest.mark.parametrize("ack", [1000, 1024, 1025, 1500, 16383, 16384])
def test_window_update_on_an_exhausted_window_matches_h2(ack: int) -> None:
    """Differential (scripted): a window drained to 0 gets credit back early (h2: above min(1024, max/4))."""
    def steps(st: dict[Any, int]) -> Any:
        while st[1]:
            yield ("data", 1, min(16384, st[1]), None)
        yield ("ack", 1, ack)
        yield ("ack", 1, 1)
        yield ("ack", 1, st["unacked1"])

    assert _window_differential(0, steps) >= 2


def test_acknowledge_after_end_stream_returns_connection_credit_only() -> None:
    r = Raw("server", options("server", initial_window_size=65535, connection_window_size=65535))
    r.request_ok(1, end=False)
    r.feed(data(1, b"x" * 16000), data(1, b"x" * 16000), data(1, b"x" * 8000, end=True))
    r.core.acknowledge_received_data(40000, 1)
    assert wu(r.out()) == [(0, 40000)]  # no WINDOW_UPDATE for a stream the peer finished
