"""Shared harness of the ``test_h2core_*`` files: frame-by-frame RFC 9113 conformance of ``_h2core.H2Core``.

Our side is the real ``TunnelProtocol`` (role "server" = the worker, which
answers streams; role "client" = the proxy, which opens them) wrapping
``H2Core``; where a configuration no tunnel option expresses is needed (a larger
MAX_FRAME_SIZE, extended CONNECT) it is a bare ``H2Core`` built from an
``H2Config`` (:class:`CoreDriver`).  The other side is independent of our code:
frames built by hand with ``struct`` (``frame()``), header blocks encoded by the
``hpack`` package, and, where a whole conversation or a verdict is compared, the
``h2`` package's ``H2Connection``.  No sockets, no threads, no clock: every test
is a few ``receive()`` calls and a look at the bytes that come back.

Connection errors surface as ``ProtocolViolation`` (``error_code``) with a
GOAWAY queued; stream errors as an ``h2.events.StreamReset`` with
``remote_reset=False`` and one RST_STREAM, the connection living on.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, NamedTuple

import h2.events as ev
import h2.exceptions as h2x
import hpack
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection

from rhttp_wsgi._h2core import H2Config, H2Core, WindowBudget
from rhttp_wsgi._protocol import PREFACE, TunnelProtocol, core_config
from rhttp_wsgi.errors import ProtocolViolation
from rhttp_wsgi.options import ProxyOptions, TunnelOptions, WorkerOptions

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
MAX_WINDOW = 2**31 - 1
ROLES = ("server", "client")

REQ = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"example.com")]
RESP = [(b":status", b"200")]


# -- raw frames -------------------------------------------------------------------------------------


class F(NamedTuple):
    type: int
    flags: int
    sid: int
    payload: bytes


def frame(ftype: int, flags: int = 0, sid: int = 0, payload: bytes = b"", length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">L", n)[1:] + bytes((ftype, flags)) + struct.pack(">L", sid) + payload


def parse(data: bytes) -> list[F]:
    out: list[F] = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 9, "truncated frame header in our output"
        n = int.from_bytes(data[pos:pos + 3], "big")
        ftype, flags = data[pos + 3], data[pos + 4]
        sid = int.from_bytes(data[pos + 5:pos + 9], "big")
        assert len(data) - pos - 9 >= n, "truncated frame in our output"
        out.append(F(ftype, flags, sid, data[pos + 9:pos + 9 + n]))
        pos += 9 + n
    return out


def settings(values: dict[int, int] | None = None, *, raw: list[tuple[int, int]] | None = None) -> bytes:
    pairs = list((values or {}).items()) + list(raw or [])
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in pairs))


def settings_ack() -> bytes:
    return frame(SETTINGS, ACK)


def data(sid: int, payload: bytes, end: bool = False, pad: int | None = None) -> bytes:
    flags = END_STREAM if end else 0
    if pad is not None:
        return frame(DATA, flags | PADDED, sid, bytes((pad,)) + payload + b"\0" * pad)
    return frame(DATA, flags, sid, payload)


def window_update(sid: int, inc: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, struct.pack(">L", inc))


def rst(sid: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, sid, struct.pack(">L", code))


def ping(payload: bytes = b"12345678", ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, payload)


def goaway(last: int, code: int, extra: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">LL", last, code) + extra)


def priority(sid: int, dep: int, weight: int = 15) -> bytes:
    return frame(PRIORITY, 0, sid, struct.pack(">LB", dep, weight))


def code_of(f: F) -> int:
    """The error code of a RST_STREAM or GOAWAY frame."""
    return struct.unpack(">L", f.payload[:4] if f.type == RST_STREAM else f.payload[4:8])[0]


def wu(frames: list[F]) -> list[tuple[int, int]]:
    return [(f.sid, struct.unpack(">L", f.payload)[0]) for f in frames if f.type == WINDOW_UPDATE]


def of(events: list[Any], cls: type) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


# -- options of our end ----------------------------------------------------------------------------


def options(role: str, **kw: Any) -> TunnelOptions:
    """The options our end runs with in production: WorkerOptions for the worker (its limits --
    max_header_count, max_resets -- on), ProxyOptions for the proxy.  Files are not opened."""
    if role == "server":
        return WorkerOptions(proxy="127.0.0.1:1", cert="c", key="k", **kw)
    return ProxyOptions(cert="c", key="k", workers_ca="ca", **kw)


def config(role: str, **changes: Any) -> H2Config:
    """The core configuration of ``role`` in production, with ``changes`` (for a :class:`CoreDriver`:
    values no option allows, such as windows below 65,535 bytes or a larger MAX_FRAME_SIZE)."""
    return dataclasses.replace(core_config(role, options(role)), **changes)  # type: ignore[arg-type]


class CoreDriver:
    """A bare H2Core driven like TunnelProtocol (preface handled, errors as ProtocolViolation):
    for configurations that no tunnel option expresses."""

    def __init__(self, role: str, cfg: H2Config) -> None:
        self.role = role
        self.core = H2Core(cfg)
        self._preface = role == "client"
        self.settings_received = False

    def initiate(self, now: float) -> None:
        self.core.initiate_connection(preamble=PREFACE if self.role == "server" else b"")

    def receive(self, data: bytes, now: float) -> list[Any]:
        if self._preface:
            assert data.startswith(PREFACE)
            data = data[len(PREFACE):]
            self._preface = False
        try:
            events = self.core.receive_data(data, now)
        except h2x.ProtocolError as e:
            raise ProtocolViolation(str(e), e.error_code) from e  # type: ignore[attr-defined]
        self.settings_received |= any(isinstance(e, ev.RemoteSettingsChanged) for e in events)
        return events

    def data_to_send(self) -> bytes:
        return self.core.data_to_send()

    def has_output(self) -> bool:
        return self.core.has_output()


# -- our side, driven by hand-built frames --------------------------------------------------------------


class Raw:
    """Our TunnelProtocol in ``role`` (or a bare core with ``cfg``); the test plays the peer with
    raw frames and an hpack codec."""

    def __init__(self, role: str = "server", opts: TunnelOptions | None = None,
                 peer_settings: dict[int, int] | None = None, handshake: bool = True,
                 cfg: H2Config | None = None, budget: WindowBudget | None = None) -> None:
        self.role = role
        self.proto: Any = CoreDriver(role, cfg) if cfg is not None else \
            TunnelProtocol(role, opts or options(role), budget)  # type: ignore[arg-type]
        self.core: H2Core = self.proto.core
        self.enc = hpack.Encoder()   # what the peer sends
        self.dec = hpack.Decoder()   # what we send
        self.dec.max_header_list_size = 1 << 20
        self.now = 100.0
        self.proto.initiate(self.now)
        self.initial = self.proto.data_to_send()
        if handshake:
            self.handshake(peer_settings or {})

    def handshake(self, peer_settings: dict[int, int]) -> list[Any]:
        first = settings(peer_settings)
        events = self.feed((PREFACE if self.role == "client" else b"") + first + settings_ack())
        assert self.out() == [F(SETTINGS, ACK, 0, b"")]
        return events

    def feed(self, *chunks: bytes) -> list[Any]:
        return self.proto.receive(b"".join(chunks), self.now)

    def out(self) -> list[F]:
        return parse(self.proto.data_to_send())

    def block(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        return self.enc.encode(headers)

    def headers(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool = False, flags: int = 0) -> bytes:
        return frame(HEADERS, END_HEADERS | (END_STREAM if end else 0) | flags, sid, self.block(headers))

    def decode(self, frames: list[F], sid: int) -> list[tuple[bytes, bytes]]:
        """Decode the header block(s) we sent on ``sid`` (HEADERS + CONTINUATIONs)."""
        blocks: list[list[tuple[bytes, bytes]]] = []
        parts: list[bytes] = []
        for f in frames:
            if f.sid == sid and f.type in (HEADERS, CONTINUATION):
                parts.append(f.payload)
                if f.flags & END_HEADERS:
                    blocks.append(self.dec.decode(b"".join(parts), raw=True))  # type: ignore[arg-type]
                    parts = []
        assert not parts, "unfinished header block"
        assert len(blocks) == 1
        return blocks[0]

    # -- verdicts --

    def conn_error(self, data_: bytes, code: int) -> ProtocolViolation:
        with pytest.raises(ProtocolViolation) as ei:
            self.feed(data_)
        assert ei.value.error_code == code, ei.value
        gw = [f for f in self.out() if f.type == GOAWAY]
        assert [code_of(f) for f in gw] == [code]
        assert self.core.closed
        return ei.value

    def stream_error(self, data_: bytes, sid: int, code: int) -> list[Any]:
        events = self.feed(data_)
        resets = [(e.stream_id, e.error_code, e.remote_reset) for e in of(events, ev.StreamReset)]
        assert resets == [(sid, code, False)], events
        out = self.out()
        assert [(f.sid, code_of(f)) for f in out if f.type == RST_STREAM] == [(sid, code)]
        assert not [f for f in out if f.type == GOAWAY]
        assert not self.core.closed
        return events

    def request_ok(self, sid: int, headers: list[tuple[bytes, bytes]] = REQ, end: bool = True) -> ev.RequestReceived:
        """The connection still works: a request on ``sid`` arrives."""
        events = self.feed(self.headers(sid, headers, end=end))
        reqs = of(events, ev.RequestReceived)
        assert len(reqs) == 1 and reqs[0].stream_id == sid, events
        assert not of(events, ev.StreamReset)
        return reqs[0]

    def respond(self, sid: int, end: bool = True) -> None:
        self.core.send_headers(sid, RESP, end_stream=end)
        self.out()


def client_with_streams(n: int = 2, **kw: Any) -> Raw:
    """Client (proxy) role with ``n`` requests sent (END_STREAM), streams 1, 3, ..."""
    r = Raw("client", **kw)
    for i in range(n):
        r.core.send_headers(2 * i + 1, REQ, end_stream=True)
    r.out()
    return r


def open_stream(r: Raw, sid: int) -> None:
    """Make ``sid`` open in both directions (request without END_STREAM / request sent by us)."""
    if r.role == "server":
        r.request_ok(sid, end=False)
    else:
        r.core.send_headers(sid, REQ)
        r.out()
        r.feed(r.headers(sid, RESP))


# -- our side against h2's H2Connection --------------------------------------------------------------------


class Pair:
    """Our TunnelProtocol in ``role`` against h2's H2Connection in the opposite HTTP/2 role."""

    def __init__(self, role: str, opts: TunnelOptions | None = None) -> None:
        self.role = role
        self.proto = TunnelProtocol(role, opts or options(role))  # type: ignore[arg-type]
        self.core: H2Core = self.proto.core
        self.peer = H2Connection(H2Configuration(client_side=(role == "server"), header_encoding=None,
                                                 validate_inbound_headers=True))
        self._first_up = self._first_down = True
        self.proto.initiate(1.0)
        self.peer.initiate_connection()

    def to_peer(self) -> list[Any]:
        out = self.proto.data_to_send()
        if self._first_up:
            self._first_up = False
            if self.role == "server":
                assert out.startswith(PREFACE)
                out = out[len(PREFACE):]
            else:
                out = PREFACE + out  # h2's server wants the client preface the proxy never sends
        return self.peer.receive_data(out) if out else []

    def to_us(self) -> list[Any]:
        out = self.peer.data_to_send()
        if self._first_down:
            self._first_down = False
            if self.role == "server":
                assert out.startswith(PREFACE)
                out = out[len(PREFACE):]  # the proxy never sends one to the worker
            else:
                out = PREFACE + out  # the worker (h2's server here) dialled, so it writes it
        return self.proto.receive(out, 2.0) if out else []

    def pump(self) -> tuple[list[Any], list[Any]]:
        ours: list[Any] = []
        theirs: list[Any] = []
        for _ in range(20):
            a = self.to_peer()
            b = self.to_us()
            theirs += a
            ours += b
            if not self.proto.has_output() and not self.peer.data_to_send(0) and not a and not b:
                break
        return ours, theirs
