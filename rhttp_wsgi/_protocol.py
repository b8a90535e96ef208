"""Sans-I/O core of a reverse-HTTP/2 tunnel, for both roles.

This module never touches a socket, a thread or the clock: it is fed bytes and
``now`` and returns ``h2.events`` (plus :class:`StreamRefused` and
:class:`RequestRejected`).  All I/O lives in ``_tunnel.py``.

Reverse HTTP flips who speaks first.  The *worker* dials the connection, so it
writes the HTTP/2 **client** preface, yet it plays the HTTP/2 **server**: the
proxy opens odd-numbered streams and the worker answers them:

* role ``"server"`` (worker): we write the preface ourselves, ahead of our
  SETTINGS; the proxy never sends one.
* role ``"client"`` (proxy): we consume the worker's preface from the input
  before the HTTP/2 core sees the bytes, and send none.

The HTTP/2 state machine is :mod:`rhttp_wsgi._h2core` (the h2 package's
``H2Connection`` cost more than the worker's whole CPU budget per request; see
benchmarks/RESULTS.md).  Where it departs from what h2 4.x did, it is on
purpose, for a tunnel:

* a HEADERS frame beyond SETTINGS_MAX_CONCURRENT_STREAMS is still HPACK-decoded
  (the dynamic table must see every block) and only that stream gets
  RST_STREAM(REFUSED_STREAM); h2 raised before decoding, killing the connection;
* receiving GOAWAY is reported as an event without closing the connection:
  GOAWAY only stops *new* streams (RFC 9113 §6.8) and the streams in flight finish;
* the first frame from the peer must be SETTINGS (RFC 9113 §3.4);
* a malformed request (invalid header fields, DATA disagreeing with
  content-length) is a stream error (RFC 9113 §8.1.1), not a connection error
  that would kill every stream of the tunnel.  The same holds for a malformed
  *response* in the client (proxy) role, where an invalid ``:status`` (not
  three digits in 100-599, or 101) counts as malformed too:
  RST_STREAM(PROTOCOL_ERROR) for that stream, the tunnel's other streams go on;
* frames that arrive on a stream *we* reset are ignored (§5.1), not answered
  with one more RST_STREAM each.

Both roles also rate-limit the control frames that force a reply (PING and
SETTINGS without ACK): beyond ``control_frame_burst`` at once or
``control_frame_rate`` per second sustained, the peer is flooding
(CVE-2019-9512 / CVE-2019-9515) and gets GOAWAY(ENHANCE_YOUR_CALM).  Frames that
cost work without progress (empty DATA without END_STREAM, PRIORITY, unknown
types: CVE-2019-9518) are charged to the same bucket.

Abuse limits ("hard to break", issue 6), all cheap on the hot path:

* an oversized frame is refused (FRAME_SIZE_ERROR) as soon as its 9-byte
  header is in, not after buffering up to 16 MiB of payload;
* a header block (HEADERS + CONTINUATION) may grow to 4x
  ``max_header_list_size`` bytes before it is ENHANCE_YOUR_CALM (CONTINUATION
  flood, CVE-2024-27316 class), and to 64 CONTINUATION frames (PROTOCOL_ERROR:
  empty ones grow no byte count);
* worker role: a request above ``max_header_count`` fields or
  ``max_header_list_size`` bytes is answered 431 without reaching the app (a
  *stream* error: HPACK stayed in sync); HPACK only aborts (connection error,
  ENHANCE_YOUR_CALM: its state is then unusable) at four times the limit, so
  an HPACK bomb never expands past that, while a merely large request (say
  5,000 one-letter fields from an HTTP/1.1 client, ~170 KB in RFC accounting)
  still costs only its own stream;
* worker role: stream resets -- RST_STREAM from the peer, and the resets the
  peer's own frames force on us (malformed request, DATA after END_STREAM,
  window overflow, zero WINDOW_UPDATE, streams beyond MAX_CONCURRENT_STREAMS:
  "Rapid Reset" CVE-2023-44487 and "MadeYouReset" CVE-2025-8671) -- are a token
  bucket of ``max_resets`` per ``reset_window`` seconds; beyond it GOAWAY
  (ENHANCE_YOUR_CALM);
* a WINDOW_UPDATE of 0 on a stream is a stream error (RFC 9113 §6.9); a
  SETTINGS ACK with a payload is FRAME_SIZE_ERROR (§6.5);
* worker role: app calls still running for streams that already ended
  (``lingering_handlers``, kept by the tunnel) hold the stream budget: at
  MAX_CONCURRENT_STREAMS of them new streams get REFUSED_STREAM;
* more than ``max_output_backlog`` bytes queued for a peer that does not read
  (its PINGs, SETTINGS and RST-eliciting frames keep adding replies) closes the
  tunnel with ENHANCE_YOUR_CALM instead of growing memory.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from ._h2core import _GOAWAY, GOAWAY, H2Core, RequestRejected, Settings, StreamRefused
from .errors import ProtocolViolation

__all__ = ["PREFACE", "ProtocolSettings", "RequestRejected", "StreamRefused", "TunnelDead", "TunnelProtocol"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SETTINGS_FRAME_TYPE = 0x4
Role = Literal["server", "client"]


@dataclass(frozen=True)
class ProtocolSettings:
    """What this side advertises and how it watches liveness."""

    max_concurrent_streams: int = 100
    initial_window_size: int = 1 << 20
    connection_window_size: int = 1 << 26
    max_header_list_size: int = 65536
    max_frame_size: int = 16384
    ping_interval: float = 30.0
    ping_timeout: float = 15.0
    #: Flood guard: PING/SETTINGS (non-ACK) frames the peer may send per second
    #: sustained (token bucket refill; 0 = unlimited) and at once (bucket size).
    control_frame_rate: float = 100.0
    control_frame_burst: int = 1000
    #: Worker role: most header fields in a request (pseudo-headers not
    #: counted); more, or a list above max_header_list_size, gets 431.
    max_header_count: int = 100
    #: Worker role: stream resets allowed per ``reset_window`` seconds (token
    #: bucket; 0 = unlimited) before GOAWAY(ENHANCE_YOUR_CALM).
    max_resets: int = 500
    reset_window: float = 10.0
    #: Bytes queued for a peer that is not reading before the tunnel is dropped.
    max_output_backlog: int = 1 << 20

    @classmethod
    def from_options(cls, options: object) -> ProtocolSettings:
        """Take every field that a WorkerOptions/ProxyOptions declares under the same name."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{n: getattr(options, n) for n in names if hasattr(options, n)})


class _TokenBucket:
    """``capacity`` events at once, refilled at ``capacity / window`` per second (time is fed in)."""

    __slots__ = ("capacity", "rate", "stamp", "tokens", "window")

    def __init__(self, capacity: int, window: float) -> None:
        self.capacity = float(capacity)
        self.window = window
        self.rate = capacity / window if window > 0 else 0.0
        self.tokens = float(capacity)
        self.stamp = 0.0

    def take(self, now: float) -> bool:
        tokens = min(self.capacity, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


class TunnelDead(ProtocolViolation):
    """The peer did not answer a PING in time."""


class TunnelProtocol:
    """One HTTP/2 connection of a reverse tunnel, without I/O.

    Thread model: not thread-safe.  The owner (``_tunnel.Tunnel``) calls every
    method, and touches :attr:`h2`, only while holding its tunnel lock.
    """

    def __init__(self, role: Role, settings: ProtocolSettings | None = None) -> None:
        self.role: Role = role
        self.settings = s = settings or ProtocolSettings()
        # Outbound header normalization/validation is off in the worker (server)
        # role, for speed: everything the worker sends is either a constant of
        # ours or built by wsgi._encode_headers, which already lowercases names,
        # refuses non-token names and CR/LF/NUL in values, strips surrounding
        # whitespace, drops connection-specific fields and non-"trailers" TE,
        # puts exactly one :status first, and never-indexes credentials
        # (tests/unit/test_outbound_headers.py proves it).  Inbound checks are
        # all on, in both roles; the proxy (client) role keeps every outbound check.
        local = Settings()
        local.max_concurrent_streams = s.max_concurrent_streams
        local.initial_window_size = s.initial_window_size
        local.max_header_list_size = s.max_header_list_size
        local.max_frame_size = s.max_frame_size
        self.h2 = H2Core(client_side=(role == "client"), local=local, validate_outbound=(role == "client"))
        # Enforce the header list limit while decoding, not after.  The worker
        # answers a list above the limit with 431 (a stream error, HPACK kept in
        # sync), so its decoder only gives up -- a connection error that ends
        # every stream of the tunnel -- at four times the limit: an HPACK bomb
        # never expands further (256 KiB of list by default: a few MB and ms).
        self.h2.decoder.max_header_list_size = s.max_header_list_size * (4 if role == "server" else 1)
        if role == "server":
            self.h2.max_header_count = s.max_header_count
            self.h2.max_header_list = s.max_header_list_size
        # A compressed block is no longer than its list except for Huffman-bloated
        # binary values (up to 30 bits per octet): 4x leaves room for those.
        self.h2.max_header_block = 4 * s.max_header_list_size
        if role == "server" and s.max_resets:
            self.h2.reset_bucket = _TokenBucket(s.max_resets, s.reset_window)
        self.h2.flood_rate = float(s.control_frame_rate)
        self.h2.flood_burst = float(s.control_frame_burst)
        self.h2._flood_tokens = float(s.control_frame_burst)
        self._preface_pending = PREFACE if role == "client" else b""
        self._first_frame_checked = False
        self._head = b""
        self.settings_received = False
        self.goaway_received: h2.events.ConnectionTerminated | None = None
        self.goaway_sent = False
        # liveness
        self._last_recv = 0.0
        self._ping_payload: bytes | None = None
        self._ping_deadline = 0.0

    @property
    def validate_outbound(self) -> bool:
        """Whether outbound headers are normalised and checked (the proxy role only)."""
        return self.h2.validate_outbound

    # -- start -----------------------------------------------------------

    def initiate(self, now: float) -> None:
        """Queue our preface (worker) and SETTINGS, and open the connection window."""
        self._last_recv = now
        self.h2.now = self.h2._flood_at = now
        if self.h2.reset_bucket is not None:
            self.h2.reset_bucket.stamp = now
        if self.role == "server":
            # We dialled, so our preface goes first, whatever our HTTP/2 role.
            self.h2._data_to_send += PREFACE
        self.h2.initiate_connection()
        delta = self.settings.connection_window_size - 65535
        if delta > 0:
            self.h2.increment_flow_control_window(delta)

    # -- input -----------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[h2.events.Event]:
        """Feed bytes from the peer; returns events.

        Raises :class:`ProtocolViolation` (GOAWAY already queued) on a
        connection error.
        """
        if not data:
            return []
        self._last_recv = now
        self.h2.now = now  # for the flood guard's token bucket
        self.h2.resets_this_read = 0
        if self._preface_pending:
            take = min(len(self._preface_pending), len(data))
            if data[:take] != self._preface_pending[:take]:
                self._fail(ErrorCodes.PROTOCOL_ERROR)
                raise ProtocolViolation("peer did not send the HTTP/2 client preface")
            self._preface_pending = self._preface_pending[take:]
            data = data[take:]
            if not data:
                return []
        if not self._first_frame_checked:
            self._head += data[: 9 - len(self._head)]
            # Type (byte 4) and flags (byte 5): a first SETTINGS *ACK* is as wrong as any other frame,
            # however the bytes are split across reads.
            if len(self._head) >= 5:
                self._first_frame_checked = True
                if self._head[3] != _SETTINGS_FRAME_TYPE or self._head[4] & 1:
                    self._fail(ErrorCodes.PROTOCOL_ERROR)
                    raise ProtocolViolation("the peer's first frame was not SETTINGS (RFC 9113 §3.4)")
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            code = getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR)
            # h2 queued GOAWAY already (it calls _terminate_connection)
            self.goaway_sent = True
            raise ProtocolViolation(f"{type(e).__name__}: {e}", code) from e
        self._check_input_limits()
        ev: Any
        for ev in events:
            t = type(ev)
            if t is h2.events.RemoteSettingsChanged:
                self.settings_received = True
            elif t is h2.events.PingAckReceived:
                if self._ping_payload is not None and ev.ping_data == self._ping_payload:
                    self._ping_payload = None
                elif self._drain_ping is not None and ev.ping_data == self._drain_ping:
                    self._drain_ping = None
                    self.drain_acked = True
            elif t is h2.events.ConnectionTerminated:
                self.goaway_received = ev
        return events

    def _check_input_limits(self) -> None:
        """Limits checked once per read; O(1) on the hot path."""
        # Replies (PING/SETTINGS ACKs, RST_STREAMs, WINDOW_UPDATEs) pile up here
        # while the writer is blocked on a peer that does not read.
        backlog = len(self.h2._data_to_send)
        if backlog > self.settings.max_output_backlog:
            self._violation(ErrorCodes.ENHANCE_YOUR_CALM,
                            f"{backlog} bytes queued for a peer that is not reading them")

    def _violation(self, code: ErrorCodes, message: str) -> NoReturn:
        self._fail(code)
        raise ProtocolViolation(message, code)

    def _fail(self, code: ErrorCodes) -> None:
        if not self.goaway_sent:
            self.goaway_sent = True
            self.h2._terminate_connection(code)

    # -- output ----------------------------------------------------------

    def has_output(self) -> bool:
        return bool(self.h2._data_to_send)

    def data_to_send(self) -> bytes:
        return self.h2.data_to_send()

    def goaway(self, code: ErrorCodes = ErrorCodes.NO_ERROR, *, last_stream_id: int | None = None) -> None:
        """Send GOAWAY; with NO_ERROR the connection keeps serving in-flight streams."""
        self.h2.draining = True
        if self.goaway_sent and code == ErrorCodes.NO_ERROR:
            return
        self.goaway_sent = True
        last = self.h2.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        # Queued directly: the connection stays open to finish the in-flight streams.
        self.h2._frame(GOAWAY, 0, 0, _GOAWAY.pack(last, code))

    def goaway_announce(self) -> None:
        """First half of a graceful shutdown (RFC 9113 §6.8): GOAWAY(2^31-1) and a PING.

        Streams the peer opened before it saw this GOAWAY are still served.
        Once the PING is acknowledged (``drain_acked``) every such stream has
        arrived, and :meth:`goaway` sends the real last-stream-id.
        """
        self.h2._frame(GOAWAY, 0, 0, _GOAWAY.pack(2**31 - 1, ErrorCodes.NO_ERROR))
        self._drain_ping = os.urandom(8)
        self.h2.ping(self._drain_ping)

    #: Payload of the PING that ends the first half of a graceful GOAWAY.
    _drain_ping: bytes | None = None
    drain_acked = False

    # -- time ------------------------------------------------------------

    def poll_timers(self, now: float) -> float:
        """Send a PING after idleness; raise :class:`TunnelDead` when an ACK is overdue.

        Returns the next time this should be called.
        """
        s = self.settings
        if self._ping_payload is not None:
            if now >= self._ping_deadline:
                raise TunnelDead(
                    f"no PING ACK within {s.ping_timeout:g}s", ErrorCodes.NO_ERROR
                )
            return self._ping_deadline
        idle_until = self._last_recv + s.ping_interval
        if now >= idle_until:
            self._ping_payload = os.urandom(8)
            self._ping_deadline = now + s.ping_timeout
            self.h2.ping(self._ping_payload)
            return self._ping_deadline
        return idle_until

    @property
    def ping_outstanding(self) -> bool:
        return self._ping_payload is not None

    # -- helpers ---------------------------------------------------------

    def open_inbound_streams(self) -> int:
        return int(self.h2.open_inbound_streams)

    def open_outbound_streams(self) -> int:
        return int(self.h2.open_outbound_streams)

    def peer_max_concurrent_streams(self) -> int:
        return int(self.h2.remote_settings.max_concurrent_streams)

