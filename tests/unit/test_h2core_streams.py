"""Stream states (RFC 9113 §5.1): idle, half-closed, closed, reset, refused -- both tunnel roles.

The harness (our end, raw frames from the peer, h2 as the reference) is ``h2core_harness.py``.
"""

from __future__ import annotations

import struct

import h2.events as ev
import hpack
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes as E

from rhttp_wsgi._h2core import CLOSED_STREAM_MEMORY, StreamRefused
from rhttp_wsgi._protocol import PREFACE
from tests.unit.h2core_harness import (
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PUSH_PROMISE,
    REQ,
    RESP,
    ROLES,
    RST_STREAM,
    WINDOW_UPDATE,
    Pair,
    Raw,
    client_with_streams,
    code_of,
    data,
    frame,
    of,
    open_stream,
    options,
    priority,
    rst,
    settings,
    window_update,
    wu,
)

pytestmark = pytest.mark.timeout(60)


# ===================================================================================================
# §5.1 stream states
# ===================================================================================================


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("kind", ["data", "window_update"])
def test_frames_on_idle_streams(role: str, kind: str) -> None:
    r = Raw(role)
    sid = 5 if role == "server" else 1  # the peer's idle stream / one we never opened
    bad = {"data": data(sid, b"x"), "window_update": window_update(sid, 1)}[kind]
    r.conn_error(bad, E.PROTOCOL_ERROR)


@pytest.mark.parametrize("kind", ["window_update", "data"])
def test_frames_on_our_idle_even_streams_in_server_role(kind: str) -> None:
    r = Raw("server")
    bad = {"data": data(2, b"x"), "window_update": window_update(2, 1)}[kind]
    r.conn_error(bad, E.PROTOCOL_ERROR)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("whose", ["peer", "ours"])
def test_rst_stream_on_an_idle_stream_is_ignored(role: str, whose: str) -> None:
    """RFC 9113 §6.4 allows a connection error; h2 ignores it, and HAProxy sends it (see
    test_h2core_limits.py): ignored, nothing sent, the stream id still usable."""
    r = Raw(role)
    sid = {("server", "peer"): 5, ("server", "ours"): 2, ("client", "peer"): 2, ("client", "ours"): 1}[role, whose]
    assert r.feed(rst(sid, E.INTERNAL_ERROR)) == []
    assert r.out() == []
    assert not r.core.closed and not r.core.streams
    if role == "server":
        r.request_ok(5 if whose == "peer" else 1)
    else:
        open_stream(r, 1)


def test_rst_stream_on_an_idle_stream_is_ignored_like_h2() -> None:
    """Differential: after a first stream (h2's connection state machine refuses RST_STREAM before
    any stream -- a difference we keep on purpose: HAProxy's first public request may be the one
    asking for a WebSocket) h2 ignores RST_STREAM on idle streams of either parity, as we do."""
    p = Pair("server")
    p.pump()
    p.peer.send_headers(1, REQ, end_stream=True)
    ours, _ = p.pump()
    assert of(ours, ev.RequestReceived)
    theirs = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    theirs.initiate_connection()
    theirs.data_to_send()
    enc = hpack.Encoder()
    theirs.receive_data(PREFACE + settings() + frame(HEADERS, END_HEADERS | END_STREAM, 1, enc.encode(REQ)))
    theirs.data_to_send()
    for sid in (3, 5, 2, 4):
        bad = rst(sid, E.INTERNAL_ERROR)
        assert theirs.receive_data(bad) == [] and theirs.data_to_send() == b""
        assert p.proto.receive(bad, 2.0) == [] and not p.proto.has_output()


def test_priority_on_idle_stream_is_allowed() -> None:
    r = Raw("server")
    assert r.feed(priority(7, 0)) == []
    assert r.out() == []
    r.request_ok(1)


@pytest.mark.parametrize("kind", ["data", "headers"])
def test_frames_on_half_closed_remote_stream_are_stream_errors(kind: str) -> None:
    r = Raw("server")
    r.request_ok(1, end=True)  # half-closed (remote)
    bad = data(1, b"late") if kind == "data" else r.headers(1, [(b"x-t", b"1")], end=True)
    r.stream_error(bad, 1, E.STREAM_CLOSED)
    assert 1 not in r.core.streams
    r.request_ok(3)


def test_frames_on_half_closed_remote_stream_client_role() -> None:
    r2 = client_with_streams(1)
    r2.core.send_headers(3, REQ)  # still sending the request body: half-closed (local) is not this case
    r2.out()
    r2.feed(r2.headers(3, RESP, end=True))  # half-closed (remote) for us
    r2.stream_error(data(3, b"late"), 3, E.STREAM_CLOSED)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("kind", ["data", "headers"])
def test_frames_on_stream_closed_normally_are_connection_errors(role: str, kind: str) -> None:
    r = Raw(role)
    if role == "server":
        r.request_ok(1, end=True)
        r.respond(1)
    else:
        r.core.send_headers(1, REQ, end_stream=True)
        r.out()
        r.feed(r.headers(1, RESP, end=True))
    assert 1 not in r.core.streams
    bad = data(1, b"x") if kind == "data" else r.headers(1, REQ if role == "server" else RESP, end=True)
    r.conn_error(bad, E.STREAM_CLOSED)


@pytest.mark.parametrize("role", ROLES)
def test_frames_on_a_stream_we_reset_are_ignored_but_credited(role: str) -> None:
    r = Raw(role, options(role, initial_window_size=65535, connection_window_size=65535))
    open_stream(r, 1)
    r.core.reset_stream(1, E.CANCEL)
    assert [(f.type, f.sid) for f in r.out()] == [(RST_STREAM, 1)]
    # 96,000 bytes > the 65,535-byte connection window: only accepted if the ignored bytes are credited back
    updates: list[tuple[int, int]] = []
    for _i in range(6):
        events = r.feed(data(1, b"x" * 15800, pad=199))  # 16,000 flow-controlled bytes each
        assert events == []
        out = r.out()
        assert not [f for f in out if f.type != WINDOW_UPDATE], out  # no RST_STREAM, no GOAWAY
        updates += wu(out)
    events = r.feed(r.headers(1, [(b"x-trailer", b"1")], end=True), window_update(1, 100), rst(1, E.CANCEL))
    assert events == [] and r.out() == []
    assert all(sid == 0 for sid, _ in updates)
    assert sum(inc for _, inc in updates) == 6 * 16000


@pytest.mark.parametrize("role", ROLES)
def test_frames_on_a_stream_the_peer_reset(role: str) -> None:
    r = Raw(role)
    open_stream(r, 1)
    events = r.feed(rst(1, E.CANCEL))
    assert [(e.stream_id, e.error_code, e.remote_reset) for e in of(events, ev.StreamReset)] == [(1, E.CANCEL, True)]
    assert r.out() == []
    events = r.feed(data(1, b"x"))
    assert events == []
    out = r.out()
    assert [(f.sid, code_of(f)) for f in out if f.type == RST_STREAM] == [(1, E.STREAM_CLOSED)]
    assert not [f for f in out if f.type == GOAWAY]
    r.feed(window_update(1, 5))  # WINDOW_UPDATE on a closed stream: ignored (§6.9)
    assert r.out() == []
    assert not r.core.closed


def test_stream_id_reuse_is_connection_error() -> None:
    r = Raw("server")
    r.request_ok(1, end=True)
    r.respond(1)
    r.conn_error(r.headers(1, REQ, end=True), E.STREAM_CLOSED)


def test_stream_id_decrease_is_protocol_error() -> None:
    r = Raw("server")
    r.request_ok(5, end=False)
    r.conn_error(r.headers(3, REQ, end=True), E.PROTOCOL_ERROR)


def test_even_stream_from_the_client_is_protocol_error() -> None:
    r = Raw("server")
    r.conn_error(r.headers(2, REQ, end=True), E.PROTOCOL_ERROR)


@pytest.mark.parametrize("sid", [2, 3])
def test_worker_may_not_open_streams_in_client_role(sid: int) -> None:
    r = client_with_streams(1)
    r.conn_error(r.headers(sid, RESP, end=True), E.PROTOCOL_ERROR)


@pytest.mark.parametrize("role", ROLES)
def test_push_promise_is_refused(role: str) -> None:
    r = Raw(role)
    open_stream(r, 1)
    block = r.block(REQ)
    r.conn_error(frame(PUSH_PROMISE, END_HEADERS, 1, struct.pack(">L", 2) + block), E.PROTOCOL_ERROR)


def test_max_concurrent_streams_refusal_keeps_hpack_in_sync() -> None:
    r = Raw("server", options("server", max_concurrent_streams=1))
    r.request_ok(1, end=True)
    # stream 3 is beyond the limit; its block adds entries to the peer's encoder table
    fields = [(b"x-only-in-refused", b"value-1"), (b"x-second", b"value-2")]
    events = r.feed(r.headers(3, REQ + fields, end=True))
    [refused] = of(events, StreamRefused)
    assert (refused.stream_id, refused.error_code, refused.abusive) == (3, E.REFUSED_STREAM, True)
    assert not of(events, ev.RequestReceived)
    assert [(f.sid, code_of(f)) for f in r.out() if f.type == RST_STREAM] == [(3, E.REFUSED_STREAM)]
    r.respond(1)
    block = r.block(REQ + fields)  # now only references to the dynamic table
    assert len(block) < 10
    events = r.feed(frame(HEADERS, END_HEADERS | END_STREAM, 5, block))
    [req] = of(events, ev.RequestReceived)
    assert req.headers == REQ + fields
    # late frames on the refused stream: ignored, like any stream we reset
    assert r.feed(data(3, b"abc")) == []
    assert not [f for f in r.out() if f.type != WINDOW_UPDATE]


@pytest.mark.parametrize("role", ROLES)
def test_rst_stream_from_peer_then_rst_again_is_answered_once(role: str) -> None:
    r = Raw(role)
    open_stream(r, 1)
    r.feed(rst(1, E.CANCEL))
    r.out()
    assert r.feed(rst(1, E.CANCEL)) == []  # RST_STREAM on a closed stream: never answered with RST_STREAM
    assert r.out() == []


# -- closed streams beyond the memory of how they closed (bounded state) ------------------------------


def _close_many(r: Raw, first: int, n: int) -> int:
    """Open and close ``n`` streams normally (both sides END_STREAM) from ``first``; returns the next id."""
    sid = first
    for _ in range(0, n, 50):
        batch = list(range(sid, sid + 100, 2))
        if r.role == "server":
            events = r.feed(*(r.headers(s, REQ, end=True) for s in batch))
            assert len(of(events, ev.RequestReceived)) == len(batch), events[-3:]
            for s in batch:
                r.core.send_headers(s, RESP, end_stream=True)
        else:
            for s in batch:
                r.core.send_headers(s, REQ, end_stream=True)
            events = r.feed(*(r.headers(s, RESP, end=True) for s in batch))
            assert len(of(events, ev.ResponseReceived)) == len(batch)
        r.out()
        sid += 100
    assert not r.core.streams
    return sid


@pytest.mark.parametrize("role", ROLES)
def test_frames_on_a_stream_we_reset_are_ignored_however_many_streams_closed_since(role: str) -> None:
    """RFC 9113 §5.1: after our RST_STREAM (an early answer to an upload, a cancelled download) the
    peer's frames in flight are ignored -- also when they arrive after more closures than the core
    remembers (5,100 > CLOSED_STREAM_MEMORY): the connection window is credited, the tunnel lives."""
    assert CLOSED_STREAM_MEMORY < 5000
    r = Raw(role, options(role, initial_window_size=65535, connection_window_size=65535))
    open_stream(r, 1)
    r.proto.reset_stream(1, E.NO_ERROR)
    assert [(f.type, f.sid) for f in r.out()] == [(RST_STREAM, 1)]
    nxt = _close_many(r, 3, 5100)
    updates: list[tuple[int, int]] = []
    for _i in range(6):  # 96,000 bytes > the 65,535-byte connection window: accepted only if credited
        assert r.feed(data(1, b"x" * 15800, pad=199)) == []
        out = r.out()
        assert not [f for f in out if f.type != WINDOW_UPDATE], out
        updates += wu(out)
    assert all(sid == 0 for sid, _ in updates)
    assert sum(inc for _, inc in updates) == 6 * 16000
    block = r.headers(1, [(b"x-trailer", b"1")], end=True)
    assert r.feed(block, window_update(1, 100), rst(1, E.CANCEL)) == [] and r.out() == []
    assert not r.core.closed
    open_stream(r, nxt)  # HPACK in sync (the ignored trailers were decoded), the tunnel serves


@pytest.mark.parametrize("role", ROLES)
def test_late_frames_on_streams_closed_normally(role: str) -> None:
    """A stream closed normally keeps the RFC's verdict while remembered (DATA after END_STREAM both
    ways: connection error STREAM_CLOSED, §5.1); one closed CLOSED_STREAM_MEMORY closures ago is
    indistinguishable from one we reset, and is ignored (credited), as nghttp2 does."""
    r = Raw(role, options(role, connection_window_size=65535))
    nxt = _close_many(r, 1, 5000)
    assert r.feed(data(1, b"x" * 16000), data(1, b"x" * 16000), data(1, b"x" * 16000, end=True)) == []
    assert wu(r.out()) == [(0, 48000)]  # forgotten: ignored, and credited
    assert r.feed(r.headers(3, REQ if role == "server" else RESP, end=True)) == [] and r.out() == []
    r.conn_error(data(nxt - 2, b"recent"), E.STREAM_CLOSED)


def test_a_skipped_stream_id_is_still_a_protocol_error_after_many_closures() -> None:
    """Ids above every forgotten one keep their verdict: a lower id the peer skipped (§5.1.1)."""
    r = Raw("server")
    nxt = _close_many(r, 1, 5000)
    r.request_ok(nxt + 2, end=False)  # skips nxt
    r.conn_error(data(nxt, b"x"), E.PROTOCOL_ERROR)
