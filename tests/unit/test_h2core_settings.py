"""Handshake and SETTINGS (RFC 9113 §3.4, §6.5) of ``_h2core.H2Core`` in both tunnel roles.

The harness (our end, raw frames from the peer, h2 as the reference) is ``h2core_harness.py``.
"""

from __future__ import annotations

import struct
from typing import Any

import h2.events as ev
import pytest
from h2.errors import ErrorCodes as E
from h2.settings import SettingCodes as S

from rhttp_wsgi._protocol import PREFACE
from rhttp_wsgi.errors import ProtocolViolation
from tests.unit.h2core_harness import (
    ACK,
    GOAWAY,
    HEADERS,
    MAX_WINDOW,
    REQ,
    RESP,
    ROLES,
    SETTINGS,
    F,
    Pair,
    Raw,
    code_of,
    frame,
    of,
    options,
    parse,
    ping,
    settings,
    settings_ack,
    window_update,
    wu,
)

pytestmark = pytest.mark.timeout(60)


# ===================================================================================================
# §3.4 / §6.5 handshake and SETTINGS
# ===================================================================================================


def test_worker_writes_preface_then_settings() -> None:
    r = Raw("server", handshake=False)
    assert r.initial.startswith(PREFACE)
    frames = parse(r.initial[len(PREFACE):])
    assert frames[0].type == SETTINGS and not frames[0].flags and frames[0].sid == 0
    got = dict(struct.unpack(">HL", frames[0].payload[i:i + 6]) for i in range(0, len(frames[0].payload), 6))
    s = options("server")
    assert got == {S.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams, S.INITIAL_WINDOW_SIZE: s.initial_window_size,
                   S.MAX_FRAME_SIZE: s.max_frame_size, S.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
                   S.ENABLE_CONNECT_PROTOCOL: 1}  # (RFC 8441: option websockets, on by default)
    assert S.ENABLE_PUSH not in got  # a server never sends ENABLE_PUSH
    assert wu(frames[1:]) == [(0, s.connection_window_size - 65535)]
    events = r.handshake({S.MAX_CONCURRENT_STREAMS: 7})
    assert r.proto.settings_received
    [changed] = of(events, ev.RemoteSettingsChanged)
    assert changed.changed_settings[S.MAX_CONCURRENT_STREAMS].new_value == 7


def test_proxy_consumes_preface_and_sends_enable_push_0() -> None:
    r = Raw("client", handshake=False)
    frames = parse(r.initial)  # no preface from the proxy
    assert frames[0].type == SETTINGS
    got = dict(struct.unpack(">HL", frames[0].payload[i:i + 6]) for i in range(0, len(frames[0].payload), 6))
    assert got[S.ENABLE_PUSH] == 0
    stream = PREFACE + settings({S.MAX_FRAME_SIZE: 20000}) + settings_ack()
    events: list[Any] = []
    for i in range(len(stream)):  # the preface and the frames, one byte at a time
        events += r.feed(stream[i:i + 1])
    assert r.out() == [F(SETTINGS, ACK, 0, b"")]
    assert r.core.remote_settings.max_frame_size == 20000
    assert len(of(events, ev.RemoteSettingsChanged)) == 1


def test_proxy_rejects_a_bad_preface() -> None:
    r = Raw("client", handshake=False)
    r.feed(PREFACE[:10])
    r.conn_error(b"X" + PREFACE[11:] + settings(), E.PROTOCOL_ERROR)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("first", ["ping", "window_update", "settings_ack", "headers"])
def test_first_frame_must_be_settings(role: str, first: str) -> None:
    r = Raw(role, handshake=False)
    bad = {"ping": ping(), "window_update": window_update(0, 10), "settings_ack": settings_ack(),
           "headers": r.headers(1, REQ, end=True)}[first]
    r.conn_error((PREFACE if role == "client" else b"") + bad + settings(), E.PROTOCOL_ERROR)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("split", [1, 3, 4, 5, 8])
def test_first_frame_settings_ack_refused_however_the_bytes_are_split(role: str, split: int) -> None:
    """The first-frame check reads type *and* flags, even when a read ends inside the frame header."""
    r = Raw(role, handshake=False)
    data = (PREFACE if role == "client" else b"") + settings_ack() + settings()
    cut = (len(PREFACE) if role == "client" else 0) + split
    with pytest.raises(ProtocolViolation) as ei:
        r.feed(data[:cut])
        r.feed(data[cut:])
    assert ei.value.error_code == E.PROTOCOL_ERROR
    assert [code_of(f) for f in r.out() if f.type == GOAWAY] == [E.PROTOCOL_ERROR]


@pytest.mark.parametrize("role", ROLES)
def test_handshake_and_exchange_with_h2(role: str) -> None:
    p = Pair(role)
    ours, theirs = p.pump()
    assert of(ours, ev.RemoteSettingsChanged) and of(theirs, ev.RemoteSettingsChanged)
    assert of(theirs, ev.SettingsAcknowledged)  # we ACKed h2's SETTINGS
    assert p.peer.remote_settings.max_concurrent_streams == 100
    assert p.peer.remote_settings.initial_window_size == 1 << 20
    if role == "server":
        p.peer.send_headers(1, REQ, end_stream=False)
        p.peer.send_data(1, b"hello", end_stream=True)
        ours, _ = p.pump()
        [req] = of(ours, ev.RequestReceived)
        assert req.headers == REQ
        assert [e.data for e in of(ours, ev.DataReceived)] == [b"hello"]
        p.core.send_headers(1, RESP)
        p.core.send_data(1, b"world", end_stream=True)
        _, theirs = p.pump()
        assert of(theirs, ev.ResponseReceived)[0].headers == RESP
        assert [e.data for e in of(theirs, ev.DataReceived)] == [b"world"]
        assert of(theirs, ev.StreamEnded)
    else:
        p.core.send_headers(1, REQ, end_stream=True)
        _, theirs = p.pump()
        [req] = of(theirs, ev.RequestReceived)
        assert req.headers == REQ
        p.peer.send_headers(1, RESP)
        p.peer.send_data(1, b"world", end_stream=True)
        ours, _ = p.pump()
        assert of(ours, ev.ResponseReceived)[0].headers == RESP
        assert [e.data for e in of(ours, ev.DataReceived)] == [b"world"]
    assert 1 not in p.core.streams  # both sides ended: closed


@pytest.mark.parametrize("role", ROLES)
def test_settings_enable_push_above_1(role: str) -> None:
    Raw(role).conn_error(settings({S.ENABLE_PUSH: 2}), E.PROTOCOL_ERROR)


def test_settings_enable_push_1_refused_by_client_accepted_by_server() -> None:
    Raw("client").conn_error(settings({S.ENABLE_PUSH: 1}), E.PROTOCOL_ERROR)
    r = Raw("server")
    events = r.feed(settings({S.ENABLE_PUSH: 1}))
    assert of(events, ev.RemoteSettingsChanged)
    assert r.out() == [F(SETTINGS, ACK, 0, b"")]


@pytest.mark.parametrize("role", ROLES)
def test_settings_initial_window_size_limit(role: str) -> None:
    r = Raw(role)
    r.feed(settings({S.INITIAL_WINDOW_SIZE: MAX_WINDOW}))
    assert r.out() == [F(SETTINGS, ACK, 0, b"")]
    r.conn_error(settings({S.INITIAL_WINDOW_SIZE: MAX_WINDOW + 1}), E.FLOW_CONTROL_ERROR)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("value,ok", [(16383, False), (16384, True), (16777215, True), (16777216, False), (0, False)])
def test_settings_max_frame_size_range(role: str, value: int, ok: bool) -> None:
    r = Raw(role)
    if ok:
        r.feed(settings({S.MAX_FRAME_SIZE: value}))
        assert r.core.remote_settings.max_frame_size == value
    else:
        r.conn_error(settings({S.MAX_FRAME_SIZE: value}), E.PROTOCOL_ERROR)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("length", [1, 5, 7, 11])
def test_settings_length_not_multiple_of_6(role: str, length: int) -> None:
    Raw(role).conn_error(frame(SETTINGS, 0, 0, b"\0" * length), E.FRAME_SIZE_ERROR)


@pytest.mark.parametrize("role", ROLES)
def test_settings_ack_with_payload_and_settings_on_a_stream(role: str) -> None:
    Raw(role).conn_error(frame(SETTINGS, ACK, 0, b"\0" * 6), E.FRAME_SIZE_ERROR)
    Raw(role).conn_error(frame(SETTINGS, 0, 1, b""), E.PROTOCOL_ERROR)


@pytest.mark.parametrize("role", ROLES)
def test_unknown_settings_are_ignored_and_changed_settings_reported(role: str) -> None:
    r = Raw(role)
    events = r.feed(settings(raw=[(0xFF, 12345), (S.MAX_CONCURRENT_STREAMS, 5), (0x1234, 0xFFFFFFFF),
                                  (S.INITIAL_WINDOW_SIZE, 1000), (S.MAX_CONCURRENT_STREAMS, 9)]))
    assert r.out() == [F(SETTINGS, ACK, 0, b"")]
    [changed] = of(events, ev.RemoteSettingsChanged)
    cs = changed.changed_settings
    assert set(cs) == {S.MAX_CONCURRENT_STREAMS, S.INITIAL_WINDOW_SIZE}
    # the same setting twice in one frame: the original value first, the last value wins (§6.5.3: in order)
    assert (cs[S.MAX_CONCURRENT_STREAMS].original_value, cs[S.MAX_CONCURRENT_STREAMS].new_value) == (2**32 + 1, 9)
    assert (cs[S.INITIAL_WINDOW_SIZE].original_value, cs[S.INITIAL_WINDOW_SIZE].new_value) == (65535, 1000)
    assert r.core.remote_settings.max_concurrent_streams == 9


@pytest.mark.parametrize("role", ROLES)
def test_header_table_size_from_the_peer_is_honoured(role: str) -> None:
    """After SETTINGS_HEADER_TABLE_SIZE 0 our encoder signals the size and stops indexing; back to 4096 it indexes."""
    r = Raw(role)
    fields = [(b"x-custom", b"some-value-that-gets-indexed")]
    sid = 1

    def send_one() -> tuple[bytes, list[tuple[bytes, bytes]]]:
        nonlocal sid
        if role == "server":
            r.request_ok(sid)
            r.core.send_headers(sid, RESP + fields, end_stream=True)
            expect = RESP + fields
        else:
            r.core.send_headers(sid, REQ + fields, end_stream=True)
            expect = REQ + fields
        frames = r.out()
        block = b"".join(f.payload for f in frames if f.type == HEADERS)
        got = r.decode(frames, sid)
        assert got == expect
        sid += 2
        return block, got

    send_one()
    assert len(r.dec.header_table.dynamic_entries) > 0
    r.feed(settings({S.HEADER_TABLE_SIZE: 0}))
    r.dec.max_allowed_table_size = 0  # our decoder now enforces what it advertised
    r.out()
    block, _ = send_one()
    assert block[0] == 0x20  # dynamic table size update to 0, first in the block (RFC 7541 §4.2)
    assert len(r.dec.header_table.dynamic_entries) == 0
    send_one()
    assert len(r.dec.header_table.dynamic_entries) == 0
    r.feed(settings({S.HEADER_TABLE_SIZE: 4096}))
    r.dec.max_allowed_table_size = 4096
    r.out()
    block, _ = send_one()
    assert block[:3] == b"\x3f\xe1\x1f"  # size update to 4096
    block2, _ = send_one()
    assert len(block2) < len(block)  # indexing again: the second block refers to the table
    assert len(r.dec.header_table.dynamic_entries) > 0
