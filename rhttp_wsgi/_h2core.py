"""The HTTP/2 connection state machine of a tunnel end (RFC 9113), for both roles.

Why not ``h2.connection.H2Connection``?  Speed, and the fixes a tunnel needs.
h2 costs 110-160 µs of CPU per request in memory (a generic state machine per
stream with a transition table, a frame object and a ``repr`` per frame, a
generator pipeline per header validation step, debug-log calls everywhere);
the worker's budget is 100 µs for *everything* (benchmarks/RESULTS.md).  This
module implements the subset a reverse tunnel uses -- no server push, no
priority tree -- with every check RFC 9113 requires on what the peer sends,
in straight-line code: one loop over the received bytes, a handful of
integers per stream, and a small cache of header fields already validated.

Interface.  :class:`H2Core` is built from one frozen :class:`H2Config` (as h2
has ``H2Configuration``) and nothing outside changes it afterwards.  It is fed
bytes together with the time (:meth:`H2Core.receive_data`), returns events and
queues the bytes to send (:meth:`H2Core.data_to_send`).  Its vocabulary is
h2's: the ``h2.events`` classes (plus :class:`StreamRefused` and
:class:`HeadersOverLimit`), the ``h2.exceptions`` raised by the send methods,
``h2.errors.ErrorCodes`` and ``h2.settings.SettingCodes``; h2's state machine
is not used.  The caller is ``_protocol.TunnelProtocol``, which adds the
preface, liveness and the output backlog bound.

Thread model: none.  Not thread-safe; the owner serialises every call (the
tunnel lock).  Sans-I/O: fed bytes and ``now``, it queues bytes to send.

Errors:

* a **connection error** queues GOAWAY (with the RFC's code) and raises a
  ``h2.exceptions.ProtocolError`` whose ``error_code`` is that code; the
  connection is then dead (``closed``);
* a **stream error** queues RST_STREAM and returns an ``h2.events.StreamReset``
  with ``remote_reset=False``; every other stream goes on.

Protocol, not policy: the core enforces RFC 9113 and the protocol-level abuse
bounds (flood and reset budgets, header block and HPACK expansion sizes).  What
is answered with an HTTP status is the stream owner's decision: a request above
the soft header limits is *reported* (:class:`HeadersOverLimit`), not answered.

Leniency where the RFC allows a connection error but interoperability needs
less (each bounded, so no peer can use it to grow our state or work for free):

* RST_STREAM on an idle stream is ignored, as h2 does, and charged to the
  flood budget: HAProxy sends it on stream ids it never opened (up to six per
  public request asking for a WebSocket when we did not advertise
  SETTINGS_ENABLE_CONNECT_PROTOCOL, from its retries);
* closed streams: any id at or below the highest stream id seen (per parity)
  that is not open is closed.  How it closed is remembered for the most recent
  :data:`CLOSED_STREAM_MEMORY` closures, which gives late frames the RFC's
  verdict (§5.1: ignored after our RST_STREAM; STREAM_CLOSED after the peer's
  RST_STREAM or after END_STREAM both ways).  For an older stream the way it
  closed is forgotten, and a late DATA or HEADERS is ignored (DATA credited
  back to the connection window): frames in flight on a stream we reset must
  be ignored however many streams closed since (§5.1), and telling that stream
  from one closed normally would need memory for every stream ever closed.
  nghttp2 does the same ("we are very conservative here").
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any

import h2.events as ev
import h2.exceptions as h2x
from h2.errors import ErrorCodes
from h2.settings import ChangedSetting, SettingCodes
from hpack import NeverIndexedHeaderTuple
from hpack.exceptions import HPACKError, OversizedHeaderListError

from ._hpack import Decoder, Encoder
from ._http import BAD_VALUE, CONNECTION_SPECIFIC, H2_BAD_NAME, PER_REQUEST, content_length, join_cookies

__all__ = ["CLOSED_STREAM_MEMORY", "H2Config", "H2Core", "HeadersOverLimit", "RateLimiter", "Settings",
           "StreamRefused"]

# Frame types (RFC 9113 §6) and flags.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
F_END_STREAM = 0x1
F_ACK = 0x1
F_END_HEADERS = 0x4
F_PADDED = 0x8
F_PRIORITY = 0x20

MAX_WINDOW = 2**31 - 1
#: h2's cap on CONTINUATION frames per header block (kept: an empty-CONTINUATION
#: flood grows no byte count, so the frame count is what stops it).
MAX_CONTINUATIONS = 64
#: How many closed streams keep the way they closed (see the module docstring):
#: seconds of history at thousands of streams per second.
CLOSED_STREAM_MEMORY = 4096

_HEAD = struct.Struct(">BHBBL")  # length (24 bits as 8+16), type, flags, stream id
_U32 = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")

# How a stream ended, remembered for late frames (RFC 9113 §5.1 "closed").
_ENDED = 0        # both sides sent END_STREAM: late frames are a connection error
_RESET_SENT = 1   # we sent RST_STREAM: late frames are ignored
_RESET_RECV = 2   # the peer sent RST_STREAM: late frames are a stream error

_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path", b":protocol"))
#: Names whose meaning is checked beyond the generic rules: never cached as "plain".
_SPECIAL = CONNECTION_SPECIFIC | {b"te", b"host", b"content-length", b"cookie"}
#: "No limit" for the soft header limits (an integer compare stays one compare).
_UNLIMITED = 1 << 62


def _setting_code(code: int) -> SettingCodes | int:
    try:
        return SettingCodes(code)
    except ValueError:
        return code


def _error_code(code: int) -> ErrorCodes | int:
    try:
        return ErrorCodes(code)
    except ValueError:
        return code


class WindowBudget:
    """Bytes the connection receive windows of a whole process may grow beyond their start.

    Shared by every tunnel of a process (each calls it under its own tunnel lock; this lock is a
    leaf): with it, what all tunnels together can leave unread is bounded per process --
    tunnels x ``connection_window_size`` plus this -- rather than tunnels x the cap.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> int:
        """Reserve up to ``n`` bytes; returns what was granted (0 when spent)."""
        with self._lock:
            granted = max(0, min(n, self.limit - self.used))
            self.used += granted
            return granted

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


@dataclass(frozen=True)
class H2Config:
    """Everything an :class:`H2Core` is told, once, at construction (like h2's ``H2Configuration``).

    What we advertise in our SETTINGS, and the limits enforced on what the peer sends.
    ``_protocol.TunnelProtocol`` derives one from the tunnel's options.
    """

    #: True: we open the (odd) streams, as the proxy does.  False: the peer opens them (the worker).
    client_side: bool
    #: Normalise and check the header lists we send (lowercase names, connection-specific fields
    #: dropped, surrounding whitespace stripped, a well-formed request), as h2's outbound
    #: normalisation and validation did.  Off where every list we send is built and checked above.
    validate_outbound: bool = True
    # -- advertised in our SETTINGS ----------------------------------------------------------------
    max_concurrent_streams: int = 100
    initial_window_size: int = 65535
    max_frame_size: int = 16384
    #: SETTINGS_MAX_HEADER_LIST_SIZE; None: not advertised.
    max_header_list_size: int | None = None
    #: Advertise SETTINGS_ENABLE_CONNECT_PROTOCOL=1 and accept extended CONNECT requests (RFC 8441).
    #: Off: a request with ``:protocol`` is malformed.
    enable_connect_protocol: bool = False
    # -- limits on what the peer sends ---------------------------------------------------------------
    #: Largest header block (HEADERS + CONTINUATION payload bytes) before ENHANCE_YOUR_CALM
    #: (CONTINUATION flood).
    max_header_block: int = 1 << 20
    #: The HPACK decoder's hard limit on a decoded header list (RFC 9113 accounting): beyond it
    #: decoding stops, a connection error (ENHANCE_YOUR_CALM) since the HPACK state is then unusable.
    hard_max_header_list_size: int = 1 << 31
    #: Server role, soft limits (0 = off): a request with more fields (pseudo-headers not
    #: counted) or a larger list is reported as :class:`HeadersOverLimit` instead of a request.
    #: Trailers above them are malformed (RFC 9113 §10.5.1).
    soft_max_header_count: int = 0
    soft_max_header_list_size: int = 0
    #: Flood guard (CVE-2019-9512/9515/9518): frames that force a reply or make no progress, at
    #: most ``control_frame_burst`` at once and ``control_frame_rate`` per second sustained,
    #: beyond which ENHANCE_YOUR_CALM.  A rate of 0 turns the guard off.
    control_frame_rate: float = 0.0
    control_frame_burst: int = 1000
    #: Reset budget (Rapid Reset CVE-2023-44487, MadeYouReset CVE-2025-8671), server role:
    #: ``max_resets`` stream resets per ``reset_window`` seconds (0 = off), beyond which
    #: ENHANCE_YOUR_CALM.
    max_resets: int = 0
    reset_window: float = 10.0
    #: Largest HPACK dynamic table our encoder keeps, whatever the peer's
    #: SETTINGS_HEADER_TABLE_SIZE allows (RFC 7541 §4.2 lets the encoder use less; nghttp2
    #: and Go cap it at 4,096 too): a peer's 2^32-1 would have us keep every distinct field.
    max_encoder_table_size: int = 4096
    # -- receive-window auto-tuning (see H2Core.acknowledge_received_data) -------------------------
    #: The most a stream's receive window grows to from ``initial_window_size``; at or below
    #: it (the default 0 included) stream windows stay fixed.
    max_stream_window: int = 0
    #: The most the connection's receive window grows to; at or below its current size, fixed.
    max_connection_window: int = 0


class RateLimiter:
    """A token bucket fed the time: ``burst`` events at once, refilled at ``rate`` per second.

    The one rate-limiter type of the core: the control-frame flood guard and the
    stream-reset budget are both one of these.  The bucket starts full.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._stamp = 0.0

    def take(self, now: float) -> bool:
        """Spend one token at time ``now``; False (and nothing spent) when the bucket is empty."""
        tokens = self._tokens
        elapsed = now - self._stamp
        self._stamp = now
        if elapsed > 0:
            tokens += elapsed * self.rate
            if tokens > self.burst:
                tokens = self.burst
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True


class StreamRefused(ev.Event):
    """A peer-initiated stream was refused (beyond MAX_CONCURRENT_STREAMS or while draining)."""

    def __init__(self, stream_id: int, error_code: ErrorCodes, abusive: bool = False) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        #: The peer ignored our advertised limit (charged to the reset budget);
        #: False for refusals that are our doing (draining, busy).
        self.abusive = abusive

    def __repr__(self) -> str:
        return f"<StreamRefused stream_id:{self.stream_id}, error_code:{self.error_code!r}>"


class HeadersOverLimit(ev.Event):
    """Server role: a request whose header list is above the soft limits (count or size).

    Reported *instead of* ``RequestReceived``.  The block was decoded (HPACK is in
    sync) and the stream is left open -- half-closed (remote) when ``stream_ended``
    -- for its owner to answer: 431 (RFC 9113 §10.5.1, RFC 6585 §5) and, while the
    request body is still coming (``stream_ended`` False), RST_STREAM(NO_ERROR)
    after the answer (RFC 9113 §8.1).  DATA still arriving on it is reported as usual.
    """

    def __init__(self, stream_id: int, reason: str, stream_ended: bool) -> None:
        self.stream_id = stream_id
        self.reason = reason
        self.stream_ended = stream_ended

    def __repr__(self) -> str:
        return (f"<HeadersOverLimit stream_id:{self.stream_id}, reason:{self.reason!r}, "
                f"stream_ended:{self.stream_ended}>")


class _ConnectionError(h2x.ProtocolError):
    """A connection error (GOAWAY already queued); ``error_code`` says which."""

    def __init__(self, message: str, code: ErrorCodes) -> None:
        super().__init__(message)
        self.error_code = code


class Malformed(Exception):
    """A header block that makes its message malformed (a stream error, RFC 9113 §8.1.1)."""


class Settings:
    """The peer's settings (RFC 9113 §6.5.2, RFC 8441 §3), with h2's attribute names."""

    __slots__ = ("enable_connect_protocol", "enable_push", "header_table_size", "initial_window_size",
                 "max_concurrent_streams", "max_frame_size", "max_header_list_size")

    def __init__(self) -> None:
        self.header_table_size = 4096
        self.enable_push = 1
        self.max_concurrent_streams = 2**32 + 1  # "unlimited" (h2's sentinel)
        self.initial_window_size = 65535
        self.max_frame_size = 16384
        self.max_header_list_size: int | None = None
        self.enable_connect_protocol = 0


class Stream:
    """Per-stream state: a few integers instead of a state-machine object."""

    __slots__ = ("expected_length", "got_headers", "in_max", "in_measured", "in_processed", "in_updated", "in_window",
                 "inbound", "no_content", "out_window", "received_length", "recv_open", "send_open", "sent_headers",
                 "stream_id")

    def __init__(self, stream_id: int, inbound: bool, in_window: int, out_window: int) -> None:
        self.stream_id = stream_id
        self.inbound = inbound            # opened by the peer
        self.recv_open = True             # the peer may still send HEADERS/DATA
        self.send_open = True             # we may still send
        self.got_headers = False          # request, or final response, received
        self.sent_headers = False
        self.in_window = in_window        # what the peer may still send us
        self.in_max = in_window
        self.in_processed = 0             # consumed by the app, not yet returned
        self.in_updated = 0.0             # window tuning: when growth was last considered (0: no DATA yet)
        self.in_measured = 0              # window tuning: bytes credited back since then
        self.out_window = out_window      # what we may still send
        self.expected_length: int | None = None  # the message's content-length
        self.received_length = 0          # DATA bytes received (checked against it)
        self.no_content = False           # client role: we sent a HEAD request (its response has no content)


#: Window tuning: a window doubles when half of it is consumed within this many round trips
#: (QUIC's rule, Chromium's QuicFlowController), or any larger share at the same rate.
TUNE_RTT_FACTOR = 2.0
#: Window tuning: the shortest gap between two round-trip probes (PINGs), so that a
#: low-latency link costs the peer at most 10 PINGs a second (its flood budget is 100/s).
RTT_PROBE_GAP = 0.1
#: First four bytes of a round-trip probe's PING payload (the last four count).
_PROBE_TAG = b"rtt\x00"


def _window_increment(current: int, maximum: int, processed: int) -> int:
    """h2's WindowManager rule: return credit once half the window is consumed (or it hit 0)."""
    if processed >= maximum // 2 or (current == 0 and processed > min(1024, maximum // 4)):
        return min(processed, maximum - current)
    return 0


class H2Core:
    """One HTTP/2 connection, configured once by an :class:`H2Config`.

    Public state, read-only from outside: ``streams`` (open streams by id),
    ``remote_settings``, ``closed`` (after a connection error or :meth:`terminate`),
    ``highest_inbound_stream_id`` / ``highest_outbound_stream_id``,
    ``open_inbound_streams`` / ``open_outbound_streams``, the connection windows
    ``outbound_flow_control_window`` (what we may send) and ``inbound_window``
    (what the peer may send), and :attr:`lingering_handlers`.
    """

    def __init__(self, config: H2Config, budget: WindowBudget | None = None) -> None:
        self.config = config
        #: Where the connection window's growth comes from (None: only the cap limits it).
        self._budget = budget
        #: What the connection window grew beyond its start (taken from the budget when there is one,
        #: given back by release_window_growth); once it grew, its credit goes back at each quarter.
        self._conn_extra = 0
        self.client_side = config.client_side
        self.remote_settings = Settings()
        self.encoder = Encoder()
        self.decoder = Decoder(config.hard_max_header_list_size)
        self.streams: dict[int, Stream] = {}
        #: How recently closed streams ended (see the module docstring), oldest first.
        self._closed: dict[int, int] = {}
        #: Per parity (index sid & 1): the highest stream id whose closure was forgotten.
        self._forgotten = [0, 0]
        self.highest_inbound_stream_id = 0
        self.highest_outbound_stream_id = 0
        self.open_inbound_streams = 0
        self.open_outbound_streams = 0
        self.outbound_flow_control_window = 65535
        self.inbound_window = 65535
        self.inbound_max = 65535
        self.inbound_processed = 0
        # Receive-window tuning (acknowledge_received_data): on when a cap lies above a window.
        self._stream_cap = max(config.max_stream_window, config.initial_window_size)
        self._conn_cap = config.max_connection_window
        self._tune = config.max_stream_window > config.initial_window_size or config.max_connection_window > 65535
        #: Smoothed round-trip time from our probe PINGs (None until the first ACK).
        self.srtt: float | None = None
        #: The largest window a stream has grown to: where a later stream that is window-limited
        #: too jumps at once (same path, same peer).
        self.stream_window_learned = config.initial_window_size
        self._conn_updated = 0.0  # when connection credit last went back (0: no DATA yet)
        self._settings_sent: float | None = None  # when our first SETTINGS went out (initiate_connection)
        self._probe: bytes | None = None  # the probe PING in flight
        self._probe_sent = 0.0
        self._probe_next = 0.0
        self._probe_seq = 0
        #: Queued output: frame headers and payloads as given (DATA payloads are views of the
        #: app's bytes), joined once by data_to_send -- appending them to one growing buffer
        #: cost a copy plus reallocations per byte.
        self._out: list[bytes | bytearray | memoryview] = []
        self._out_len = 0
        self._inbuf = bytearray()
        # An unfinished header block: (stream id, flags of its HEADERS, fragments, size, frames)
        self._block_sid = 0
        self._block_flags = 0
        self._block: list[bytes] = []
        self._block_size = 0
        self._block_frames = 0
        self.closed = False
        # Configuration read on hot paths, as plain attributes.
        self._validate = config.validate_outbound
        self._max_streams = config.max_concurrent_streams
        self._init_window = config.initial_window_size
        self._max_frame = config.max_frame_size
        self._max_block = config.max_header_block
        self._connect = config.enable_connect_protocol
        self._soft_limits = bool(config.soft_max_header_count or config.soft_max_header_list_size)
        self._soft_count = config.soft_max_header_count or _UNLIMITED
        self._soft_size = config.soft_max_header_list_size or _UNLIMITED
        # A field decodes to at most 32 + one dynamic-table entry + 8/5 of its literal
        # octets (Huffman's shortest code is 5 bits): the cheap bound of _new_request.
        self._field_bound = 32 + self.decoder.max_allowed_table_size
        self._flood = RateLimiter(config.control_frame_rate, config.control_frame_burst) \
            if config.control_frame_rate > 0 else None
        self._resets = RateLimiter(config.max_resets / config.reset_window, config.max_resets) \
            if config.max_resets and not config.client_side else None
        #: The time of the bytes being parsed (the rate limiters' clock).
        self._now = 0.0
        self._draining = False
        self._lingering = 0
        #: Streams reset during the current receive_data call (see _new_request).
        self._resets_this_read = 0
        # Header fields that passed validation (plain names only, short ones
        # only): a repeated field costs one set lookup.  Bounded: at most 2048
        # fields of <= 256 bytes (cleared when full), so a peer sending unique
        # large values cannot grow it.
        self._valid_fields: set[tuple[bytes, bytes]] = set()
        # Request pseudo-header fields whose name and value passed the character checks (the
        # order, duplicate and allowed-name checks still run per request); same bounds.
        self._valid_pseudo: set[tuple[bytes, bytes]] = set()
        # Client role: request fields we sent that were already normalised and valid -> whether
        # the field is a pseudo-header (see _outbound_request); same bounds.
        self._valid_outbound: dict[tuple[bytes, bytes], bool] = {}

    # -- settings and start --------------------------------------------------------------

    def initiate_connection(self, preamble: bytes = b"", now: float | None = None) -> None:
        """Queue ``preamble`` (raw bytes: the worker, which dials, writes the client preface
        although it plays the server), then our SETTINGS: every value we differ from the
        default on (ENABLE_PUSH=0 as a client).  With ``now``, the peer's SETTINGS ACK gives
        window tuning its first round trip (the peer acknowledges on reading them)."""
        if now is not None and self._tune:
            self._settings_sent = now
        if preamble:
            self._out.append(preamble)
            self._out_len += len(preamble)
        c = self.config
        payload = b""
        if self.client_side:
            payload += _SETTING.pack(SettingCodes.ENABLE_PUSH, 0)
        payload += _SETTING.pack(SettingCodes.MAX_CONCURRENT_STREAMS, c.max_concurrent_streams)
        payload += _SETTING.pack(SettingCodes.INITIAL_WINDOW_SIZE, c.initial_window_size)
        payload += _SETTING.pack(SettingCodes.MAX_FRAME_SIZE, c.max_frame_size)
        if c.max_header_list_size is not None:
            payload += _SETTING.pack(SettingCodes.MAX_HEADER_LIST_SIZE, c.max_header_list_size)
        if c.enable_connect_protocol:
            payload += _SETTING.pack(SettingCodes.ENABLE_CONNECT_PROTOCOL, 1)
        self._frame(SETTINGS, 0, 0, payload)

    def increment_flow_control_window(self, increment: int) -> None:
        """Open the connection's receive window by ``increment`` (WINDOW_UPDATE on stream 0)."""
        if not 1 <= increment <= MAX_WINDOW - self.inbound_window:
            raise ValueError(f"window increment {increment} out of range")
        self.inbound_window += increment
        self.inbound_max += increment
        self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(increment))

    # -- output ---------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Take every queued byte."""
        out = self._out
        if not out:
            return b""
        self._out = []
        self._out_len = 0
        return b"".join(out)

    def has_output(self) -> bool:
        """Are bytes queued?"""
        return self._out_len > 0

    def pending_output(self) -> int:
        """How many bytes are queued (not yet taken by :meth:`data_to_send`)."""
        return self._out_len

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes | bytearray | memoryview) -> None:
        n = len(payload)
        out = self._out
        out.append(_HEAD.pack(n >> 16, n & 0xFFFF, ftype, flags, sid))
        if n:
            out.append(payload)
        self._out_len += 9 + n

    def _rst(self, sid: int, code: int) -> None:
        self._frame(RST_STREAM, 0, sid, _U32.pack(code))

    def ping(self, opaque_data: bytes) -> None:
        """Queue a PING with these 8 bytes."""
        if len(opaque_data) != 8:
            raise ValueError("PING payload must be 8 bytes")
        self._frame(PING, 0, 0, opaque_data)

    def send_goaway(self, last_stream_id: int, code: int = ErrorCodes.NO_ERROR) -> None:
        """Queue GOAWAY without closing: streams up to ``last_stream_id`` may still complete (§6.8)."""
        self._frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream_id, code))

    def terminate(self, code: int) -> None:
        """Connection error: queue GOAWAY(``code``) with the last stream we processed; then ``closed``."""
        if self.closed:
            return
        self.closed = True
        self._frame(GOAWAY, 0, 0, _GOAWAY.pack(self.highest_inbound_stream_id, code))

    def _fail(self, code: ErrorCodes, message: str) -> _ConnectionError:
        self.terminate(code)
        return _ConnectionError(message, code)

    # -- streams we serve or open -----------------------------------------------------------

    def stop_new_streams(self) -> None:
        """Refuse (REFUSED_STREAM) every stream the peer opens from now on (after our GOAWAY)."""
        self._draining = True

    @property
    def lingering_handlers(self) -> int:
        """Handlers still running for streams that already ended (see :meth:`handler_lingered`)."""
        return self._lingering

    def handler_lingered(self) -> None:
        """A stream ended while its handler (app call) still runs: it holds a stream slot.

        At MAX_CONCURRENT_STREAMS such handlers new streams get REFUSED_STREAM, so
        resets cannot pile up handlers (or a queue) behind the limit we advertised.
        """
        self._lingering += 1

    def handler_returned(self) -> None:
        """A handler counted by :meth:`handler_lingered` returned: its slot is free."""
        self._lingering -= 1

    def expected_content_length(self, stream_id: int) -> int | None:
        """The content-length of the message received on an open stream (None: absent or no stream)."""
        st = self.streams.get(stream_id)
        return None if st is None else st.expected_length

    def get_next_available_stream_id(self) -> int:
        """Client role: the id of the next stream we may open (NoAvailableStreamIDError past 2^31-1)."""
        nxt = self.highest_outbound_stream_id + 2 if self.highest_outbound_stream_id else (1 if self.client_side else 2)
        if nxt > MAX_WINDOW:
            raise h2x.NoAvailableStreamIDError("no stream id left on this connection")
        return nxt

    def local_flow_control_window(self, stream_id: int) -> int:
        """What we may send on ``stream_id`` now: the smaller of its window and the connection's."""
        st = self.streams.get(stream_id)
        if st is None:
            raise h2x.StreamClosedError(stream_id)
        w = self.outbound_flow_control_window
        return st.out_window if st.out_window < w else w

    def send_headers(self, stream_id: int, headers: list[Any], end_stream: bool = False) -> None:
        """Queue a header block: a request (client role: opens the stream), a response, or trailers."""
        if self.closed:
            raise h2x.ProtocolError("connection closed")
        st = self.streams.get(stream_id)
        grant = False
        if st is None:
            if not self.client_side or stream_id % 2 == 0 or stream_id <= self.highest_outbound_stream_id:
                raise h2x.StreamClosedError(stream_id)
            if stream_id > MAX_WINDOW:
                # RFC 9113 §4.1/§5.1.1: stream ids are 31 bits; the reserved bit MUST stay unset.
                raise h2x.NoAvailableStreamIDError(f"stream id {stream_id} above 2^31-1")
            if self.open_outbound_streams >= self.remote_settings.max_concurrent_streams:
                raise h2x.TooManyStreamsError("peer's SETTINGS_MAX_CONCURRENT_STREAMS reached")
            if self._validate:
                headers = self._outbound_request(headers)
            st = Stream(stream_id, False, self._init_window, self.remote_settings.initial_window_size)
            # RFC 9113 §8.1.1: the response to HEAD has no content (see _header_block).
            st.no_content = (b":method", b"HEAD") in headers or (":method", "HEAD") in headers
            self.streams[stream_id] = st
            self.highest_outbound_stream_id = stream_id
            self.open_outbound_streams += 1
            # Window tuning: the response may use the window this connection learned at once
            # (granted right after the HEADERS), instead of one round trip at the initial one.
            grant = self.stream_window_learned > self._init_window and not st.no_content
        elif not st.send_open:
            raise h2x.StreamClosedError(stream_id)
        elif st.sent_headers:
            if not end_stream:
                raise h2x.ProtocolError("trailers must end the stream")
            if self._validate:
                headers = _normalize_outbound(headers)
        elif self._validate:
            headers = _normalize_outbound(headers)
        st.sent_headers = True
        block = self.encoder.encode(headers)
        flags = F_END_STREAM if end_stream else 0
        size = self.remote_settings.max_frame_size
        if len(block) <= size:
            self._frame(HEADERS, flags | F_END_HEADERS, stream_id, block)
        else:
            self._frame(HEADERS, flags, stream_id, block[:size])
            for i in range(size, len(block), size):
                last = i + size >= len(block)
                self._frame(CONTINUATION, F_END_HEADERS if last else 0, stream_id, block[i:i + size])
        if grant:
            self._grant_learned(st)
        if end_stream:
            self._end_send(st)

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        """Queue one DATA frame (within both windows and the peer's MAX_FRAME_SIZE)."""
        st = self.streams.get(stream_id)
        if st is None or not st.send_open or self.closed:
            raise h2x.StreamClosedError(stream_id)
        n = len(data)
        if n > st.out_window or n > self.outbound_flow_control_window:
            raise h2x.FlowControlError(f"{n} bytes exceed the flow-control window")
        if n > self.remote_settings.max_frame_size:
            raise h2x.FrameTooLargeError(f"{n} bytes exceed the peer's MAX_FRAME_SIZE")
        st.out_window -= n
        self.outbound_flow_control_window -= n
        out = self._out
        out.append(_HEAD.pack(n >> 16, n & 0xFFFF, DATA, F_END_STREAM if end_stream else 0, stream_id))
        if n:
            out.append(data)
        self._out_len += 9 + n
        if end_stream:
            self._end_send(st)

    def end_stream(self, stream_id: int) -> None:
        """End our side of the stream (an empty DATA frame with END_STREAM)."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Queue RST_STREAM and close the stream; late frames on it are then ignored (§5.1).

        Raises ``StreamClosedError`` for a stream already closed and ``NoSuchStreamError``
        for one never opened.
        """
        st = self.streams.get(stream_id)
        if st is None:
            if stream_id in self._closed or stream_id <= max(self.highest_inbound_stream_id,
                                                             self.highest_outbound_stream_id):
                raise h2x.StreamClosedError(stream_id)
            raise h2x.NoSuchStreamError(stream_id)
        self._rst(stream_id, error_code)
        self._close(st, _RESET_SENT)

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int, now: float | None = None) -> None:
        """The app consumed ``acknowledged_size`` bytes (at ``now``; default: the time of the
        last bytes received): return credit when worth a WINDOW_UPDATE.

        When credit goes back (h2's rule: half the window consumed, or an exhausted window),
        a tuned window may grow first (to twice its size or more, see :meth:`_grown`), up to
        its cap (``H2Config.max_stream_window`` / ``max_connection_window``), when the reader
        consumed at least a quarter of it at a rate above a quarter of the window per round
        trip -- e.g. half the window within :data:`TUNE_RTT_FACTOR` (2) round trips, QUIC's
        rule (Chromium's QuicFlowController).  At a window of W the peer can send at most W
        per round trip, so a reader that keeps up with that is held back by the window, not
        by the link or itself; a link or a reader slower than W/4 per round trip never grows
        it (windows settle within 4x the bandwidth-delay product).  A slow reader returns
        credit late and its window never grows; a reader that stops returns none, so what it
        leaves unread stays within its window.  The round trip comes from our probe PINGs,
        as gRPC's BDP estimator measures it.  A stream that grows jumps at once to the
        largest window another stream of the connection needed
        (:attr:`stream_window_learned`), and once a connection learned one, a new stream
        starts with it: granted with the request (client role; not for HEAD) or at the
        request body's first DATA (server role), so a bulk transfer on a warm tunnel does
        not spend a round trip at the initial window; its unread bytes stay within that
        window, at most the cap.  A window that has grown gets its credit back sooner than
        h2's half: a stream's at each eighth consumed, the connection's at each quarter, so the
        peer always holds at least 7/8 and 3/4 of them and a window near the bandwidth-delay
        product is not idle for most of a round trip (a few more 13-byte frames per many MiB;
        measured in benchmarks/RESULTS.md).  Growth is still judged over a quarter of the window
        (``Stream.in_measured``), whatever the credit steps.
        """
        if acknowledged_size < 0:
            raise ValueError("negative acknowledged size")
        self.inbound_processed += acknowledged_size
        processed = self.inbound_processed
        if self._conn_extra and processed >= self.inbound_max >> 2:  # grown: credit at each quarter
            inc = min(processed, self.inbound_max - self.inbound_window)
        else:
            inc = _window_increment(self.inbound_window, self.inbound_max, processed)
        if inc:
            if self._tune and processed >= self.inbound_max >> 2:
                t = self._now if now is None else now
                grown = self._grown(self.inbound_max, self._conn_cap, self._conn_updated, t, 0, processed)
                self._conn_updated = t
                if grown:
                    extra = grown - self.inbound_max
                    if self._budget is not None:
                        extra = self._budget.take(extra)
                    if extra > 0:
                        inc += extra
                        self.inbound_max += extra
                        self._conn_extra += extra
            self.inbound_processed = 0
            self.inbound_window += inc
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(inc))
        st = self.streams.get(stream_id)
        if st is not None and st.recv_open:
            st.in_processed += acknowledged_size
            processed = st.in_processed
            window = st.in_max
            if window > self._init_window and processed >= window >> 3:  # grown: credit at each eighth
                inc = min(processed, window - st.in_window)
            else:
                inc = _window_increment(st.in_window, window, processed)
            if inc:
                if self._tune:
                    # growth is judged over a quarter of the window (or more), whatever the credit steps
                    measured = st.in_measured = st.in_measured + processed
                    if measured >= window >> 2:
                        t = self._now if now is None else now
                        # (never more than half the connection window: one stalled stream must
                        # not hold every byte the tunnel may receive)
                        cap = min(self._stream_cap, self.inbound_max >> 1)
                        grown = self._grown(window, cap, st.in_updated, t, self.stream_window_learned, measured)
                        st.in_updated = t
                        st.in_measured = 0
                        if grown:
                            inc += grown - window
                            st.in_max = grown
                            if grown > self.stream_window_learned:
                                self.stream_window_learned = grown
                st.in_processed = 0
                st.in_window += inc
                self._frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(inc))

    def release_window_growth(self) -> None:
        """Give back what the connection window took from the process's budget (the tunnel is
        gone; idempotent)."""
        if self._budget is not None and self._conn_extra:
            self._budget.give(self._conn_extra)
            self._conn_extra = 0

    def _grant_learned(self, st: Stream) -> None:
        """Open a new stream's window to :attr:`stream_window_learned` (window tuning)."""
        delta = self.stream_window_learned - st.in_max
        st.in_max += delta
        st.in_window += delta
        self._frame(WINDOW_UPDATE, 0, st.stream_id, _U32.pack(delta))

    def _grown(self, window: int, cap: int, last: float, now: float, learned: int, consumed: int) -> int:
        """The window's new size if it should grow now (see acknowledge_received_data), else 0.

        ``consumed`` bytes were read since ``last``: grow when that is faster than
        ``window / (2 * TUNE_RTT_FACTOR)`` per round trip.  The new size is twice the
        window, or twice the bandwidth-delay product at that rate (gRPC's target: bytes
        per round trip, doubled) when larger: data is read no faster than it arrives, so
        the rate is what the path delivers (the reader keeping up), and a tunnel's first
        transfer reaches its window in a round trip or two instead of doubling from 1 MiB.
        """
        srtt = self.srtt
        elapsed = now - last
        if window >= cap or srtt is None or not last or elapsed * window >= consumed * 2 * TUNE_RTT_FACTOR * srtt:
            return 0
        grown = 2 * window
        if elapsed > 0:
            bdp2 = int(2 * consumed * srtt / elapsed)
            if bdp2 > grown:
                grown = bdp2
        if learned > grown:
            grown = learned
        return grown if grown < cap else cap

    def _probe_rtt(self, now: float) -> None:
        """Window tuning: send a round-trip probe (PING) unless one is in flight or one was recent."""
        self._probe_seq = seq = (self._probe_seq + 1) & 0xFFFFFFFF
        self._probe = payload = _PROBE_TAG + _U32.pack(seq)
        self._probe_sent = now
        self._probe_next = now + RTT_PROBE_GAP
        self._frame(PING, 0, 0, payload)

    def _probe_acked(self, now: float) -> None:
        sample = now - self._probe_sent
        self._probe = None
        if sample <= 0:  # (a clock that did not move: no information)
            return
        srtt = self.srtt
        # RFC 6298's smoothing (1/8 of each new sample), as TCP and QUIC keep it.
        self.srtt = sample if srtt is None else srtt + (sample - srtt) / 8

    # -- stream bookkeeping ---------------------------------------------------------------

    def _end_send(self, st: Stream) -> None:
        st.send_open = False
        if not st.recv_open:
            self._close(st, _ENDED)

    def _end_recv(self, st: Stream) -> None:
        st.recv_open = False
        if not st.send_open:
            self._close(st, _ENDED)

    def _close(self, st: Stream, how: int) -> None:
        st.recv_open = st.send_open = False
        sid = st.stream_id
        if self.streams.pop(sid, None) is not None:
            if st.inbound:
                self.open_inbound_streams -= 1
            else:
                self.open_outbound_streams -= 1
        self._remember(sid, how)

    def _remember(self, sid: int, how: int) -> None:
        """Keep how ``sid`` closed, for the most recent CLOSED_STREAM_MEMORY closures."""
        closed = self._closed
        closed[sid] = how
        if len(closed) > CLOSED_STREAM_MEMORY:
            old = next(iter(closed))
            del closed[old]
            if old > self._forgotten[old & 1]:
                self._forgotten[old & 1] = old

    def _stream_error(self, st: Stream, code: ErrorCodes) -> ev.StreamReset:
        self._rst(st.stream_id, code)
        self._close(st, _RESET_SENT)
        self._charge_reset()
        return ev.StreamReset(stream_id=st.stream_id, error_code=code, remote_reset=False)

    def _charge_reset(self) -> None:
        """Server role: every stream reset the peer causes draws on the reset budget (Rapid Reset, MadeYouReset)."""
        self._resets_this_read += 1
        if self._resets is not None and not self._resets.take(self._now):
            c = self.config
            raise self._fail(ErrorCodes.ENHANCE_YOUR_CALM,
                             f"more than {c.max_resets} stream resets in {c.reset_window:g}s")

    def _control_frame(self, kind: str) -> None:
        """Charge one reply-forcing or no-progress frame to the flood budget (CVE-2019-9512/9515/9518)."""
        if self._flood is not None and not self._flood.take(self._now):
            c = self.config
            raise self._fail(ErrorCodes.ENHANCE_YOUR_CALM, f"{kind} flood: more than {c.control_frame_burst} "
                                                           f"at once or {c.control_frame_rate:g}/s")

    def _idle(self, sid: int) -> bool:
        """A stream id not used yet (RFC 9113 §5.1 "idle"), as seen from a frame on it."""
        if sid % 2 == (0 if self.client_side else 1):  # peer-initiated parity
            return sid > self.highest_inbound_stream_id
        return sid > self.highest_outbound_stream_id

    def _forgotten_closed(self, sid: int) -> bool:
        """A closed stream whose way of closing is no longer remembered (see the module docstring)."""
        return sid <= self._forgotten[sid & 1] and sid not in self._closed

    # -- input ----------------------------------------------------------------------------

    def pending_header_block_size(self) -> int:
        """Bytes of an unfinished header block (HEADERS without END_HEADERS yet)."""
        return self._block_size

    def receive_data(self, data: bytes | memoryview, now: float) -> list[ev.Event]:
        """Parse every complete frame in ``data`` (plus what was buffered), received at ``now``.

        Returns the events.  Raises ``h2.exceptions.ProtocolError`` (``error_code`` set,
        GOAWAY queued) on a connection error.
        """
        if self.closed:
            return []
        self._now = now
        self._resets_this_read = 0
        events: list[ev.Event] = []
        pos = 0
        if self._inbuf:
            # Finish the frame the last read left partial with only the bytes it still
            # needs, then parse ``data`` in place: in a bulk transfer nearly every read
            # ends inside a frame, and appending whole reads to the buffer copied every
            # byte once more.
            pos = self._complete_partial(data, events)
            if pos < 0:
                return events
        end = self._frames(data, pos, events)
        if end < len(data):
            self._inbuf = bytearray(memoryview(data)[end:])
        return events

    def _complete_partial(self, data: bytes | memoryview, events: list[ev.Event]) -> int:
        """Top up the buffered partial frame from ``data`` and parse it once complete.

        Returns how many bytes of ``data`` it took, or -1 when all of ``data`` went
        into the still partial frame.
        """
        buf = self._inbuf
        view = memoryview(data)
        pos = 0
        if len(buf) < 9:
            pos = min(9 - len(buf), len(data))
            buf += view[:pos]
        if len(buf) >= 9:
            length = buf[0] << 16 | buf[1] << 8 | buf[2]
            if length <= self._max_frame:  # (else _frames raises on the header)
                take = min(9 + length - len(buf), len(data) - pos)
                buf += view[pos:pos + take]
                pos += take
        end = self._frames(buf, 0, events)
        if end < len(buf):
            return -1  # (pos == len(data): the frame needs more than this read)
        self._inbuf = bytearray()
        return pos

    def _frames(self, buf: bytes | bytearray | memoryview, pos: int, events: list[ev.Event]) -> int:
        """Handle each complete frame in ``buf`` from ``pos``; returns where the first incomplete one starts.

        Every payload handed on is a ``bytes`` of its own (one copy): ``buf`` may be a buffer
        its owner reuses (``TLSSession.decrypt_view``).
        """
        end = len(buf)
        max_frame = self._max_frame
        unpack = _HEAD.unpack_from
        whole = b""
        view: memoryview | None = None
        if isinstance(buf, bytes):
            whole = buf  # (a bytes slice is already a copy)
        else:
            view = memoryview(buf)
        while end - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(buf, pos)
            length = hi << 16 | lo
            if length > max_frame:
                raise self._fail(ErrorCodes.FRAME_SIZE_ERROR,
                                 f"a {length}-byte frame announced (MAX_FRAME_SIZE {max_frame})")
            if end - pos - 9 < length:
                break
            payload = whole[pos + 9:pos + 9 + length] if view is None else bytes(view[pos + 9:pos + 9 + length])
            pos += 9 + length
            sid &= 0x7FFFFFFF
            if self._block_sid:
                self._continuation(ftype, flags, sid, payload, events)
            elif ftype == DATA:
                self._on_data(flags, sid, payload, events)
            elif ftype == HEADERS:
                self._on_headers(flags, sid, payload, events)
            elif ftype == WINDOW_UPDATE:
                self._on_window_update(sid, payload, events)
            else:
                self._on_other(ftype, flags, sid, payload, events)
        return pos

    # -- DATA ------------------------------------------------------------------------------

    def _on_data(self, flags: int, sid: int, payload: bytes | bytearray, events: list[ev.Event]) -> None:
        if not sid:
            raise self._fail(ErrorCodes.PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        end_stream = flags & F_END_STREAM
        if not flow and not end_stream:
            # An empty DATA frame carries nothing (CVE-2019-9518 empty-frames flood).
            self._control_frame("empty DATA")
        if flags & F_PADDED:
            payload = self._unpad(payload, "DATA")
        # Every DATA frame counts against the connection window, whatever its stream (§6.9).
        if flow > self.inbound_window:
            raise self._fail(ErrorCodes.FLOW_CONTROL_ERROR, "DATA beyond the connection flow-control window")
        self.inbound_window -= flow
        st = self.streams.get(sid)
        if st is None or not st.recv_open:
            # Not deliverable: give its bytes back to the connection window now.
            if flow:
                self.acknowledge_received_data(flow, 0)
            if st is not None:
                # half-closed (remote): a stream error (§5.1)
                events.append(self._stream_error(st, ErrorCodes.STREAM_CLOSED))
                return
            self._on_closed_stream_frame(sid, "DATA")
            return
        if not st.got_headers:
            # DATA before the message's HEADERS (client role: before the response)
            events.append(self._stream_error(st, ErrorCodes.PROTOCOL_ERROR))
            if flow:
                self.acknowledge_received_data(flow, 0)
            return
        if flow > st.in_window:
            self.acknowledge_received_data(flow, 0)
            events.append(self._stream_error(st, ErrorCodes.FLOW_CONTROL_ERROR))
            return
        st.in_window -= flow
        if self._tune:
            # Window tuning: the clocks start at the first DATA, and round trips are
            # measured while a stream has a quarter of its window outstanding (a bulk
            # transfer: small bodies cost no PING), one probe at a time, RTT_PROBE_GAP apart.
            now = self._now
            if not st.in_updated:
                st.in_updated = now
                if not self._conn_updated:
                    self._conn_updated = now
                if self.stream_window_learned > st.in_max:
                    # a request body: the window this connection learned, from its first DATA
                    self._grant_learned(st)
            if self._probe is None and now >= self._probe_next and st.in_max - st.in_window >= st.in_max >> 2:
                self._probe_rtt(now)
        data = bytes(payload)
        expected = st.expected_length
        if expected is not None:
            st.received_length += len(data)
            if st.received_length > expected or (end_stream and st.received_length != expected):
                # Malformed (§8.1.1): a stream error; the bytes go back to the connection.
                self.acknowledge_received_data(flow, 0)
                events.append(self._stream_error(st, ErrorCodes.PROTOCOL_ERROR))
                return
        if end_stream:
            ended = ev.StreamEnded(stream_id=sid)
            events.append(ev.DataReceived(stream_id=sid, data=data, flow_controlled_length=flow, stream_ended=ended))
            events.append(ended)
            self._end_recv(st)
        else:
            events.append(ev.DataReceived(stream_id=sid, data=data, flow_controlled_length=flow))

    def _unpad(self, payload: bytes | bytearray, what: str) -> bytes | bytearray:
        if not payload:
            raise self._fail(ErrorCodes.FRAME_SIZE_ERROR, f"padded {what} frame without a pad length")
        pad = payload[0]
        if pad >= len(payload):
            raise self._fail(ErrorCodes.PROTOCOL_ERROR, f"{what} padding beyond the payload")
        return payload[1:len(payload) - pad]

    def _on_closed_stream_frame(self, sid: int, what: str) -> None:
        """A frame that needs an open stream (DATA, HEADERS) arrived on a stream that is not open."""
        how = self._closed.get(sid)
        if how == _RESET_SENT:
            return  # frames in flight when our RST_STREAM left: ignore (§5.1)
        if how == _RESET_RECV:
            self._rst(sid, ErrorCodes.STREAM_CLOSED)
            self._charge_reset()
            return
        if how is None:
            if self._idle(sid):
                raise self._fail(ErrorCodes.PROTOCOL_ERROR, f"{what} on idle stream {sid}")
            if sid <= self._forgotten[sid & 1]:
                return  # closed long ago, how is forgotten: ignore (see the module docstring)
            if sid % 2 == (0 if self.client_side else 1):
                # A lower id the peer skipped: implicitly closed, never opened (§5.1.1).
                raise self._fail(ErrorCodes.PROTOCOL_ERROR, f"{what} on closed stream {sid}")
        raise self._fail(ErrorCodes.STREAM_CLOSED, f"{what} on closed stream {sid}")

    # -- HEADERS / CONTINUATION ----------------------------------------------------------------

    def _on_headers(self, flags: int, sid: int, payload: bytes | bytearray, events: list[ev.Event]) -> None:
        if not sid:
            raise self._fail(ErrorCodes.PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & F_PADDED:
            payload = self._unpad(payload, "HEADERS")
        if flags & F_PRIORITY:
            if len(payload) < 5:
                raise self._fail(ErrorCodes.FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
            if _U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid:
                raise self._fail(ErrorCodes.PROTOCOL_ERROR, f"stream {sid} depends on itself")
            payload = payload[5:]
        if flags & F_END_HEADERS:
            self._header_block(sid, flags, bytes(payload), events)
            return
        self._block_sid = sid
        self._block_flags = flags
        self._block = [bytes(payload)]
        self._block_size = len(payload)
        self._block_frames = 0
        self._check_block()

    def _check_block(self) -> None:
        if self._block_size > self._max_block:
            raise self._fail(ErrorCodes.ENHANCE_YOUR_CALM,
                             f"a header block beyond {self._block_size} bytes without END_HEADERS "
                             "(CONTINUATION flood)")
        if self._block_frames > MAX_CONTINUATIONS:
            raise self._fail(ErrorCodes.PROTOCOL_ERROR, f"more than {MAX_CONTINUATIONS} CONTINUATION frames")

    def _continuation(self, ftype: int, flags: int, sid: int, payload: bytes | bytearray,
                      events: list[ev.Event]) -> None:
        if ftype != CONTINUATION or sid != self._block_sid:
            raise self._fail(ErrorCodes.PROTOCOL_ERROR, "a frame other than CONTINUATION inside a header block")
        self._block.append(bytes(payload))
        self._block_size += len(payload)
        self._block_frames += 1
        self._check_block()
        if flags & F_END_HEADERS:
            block = b"".join(self._block)
            first = self._block_flags
            self._block_sid = 0
            self._block = []
            self._block_size = 0
            self._header_block(sid, first, block, events)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        try:
            return self.decoder.decode(block)
        except OversizedHeaderListError as e:
            raise self._fail(ErrorCodes.ENHANCE_YOUR_CALM, f"header list too large: {e}") from e
        except HPACKError as e:  # the only errors _hpack.Decoder raises
            raise self._fail(ErrorCodes.COMPRESSION_ERROR, f"HPACK: {e}") from e

    def _header_block(self, sid: int, flags: int, block: bytes, events: list[ev.Event]) -> None:
        """A complete header block on ``sid``.  It is decoded whatever happens next (HPACK sync)."""
        end_stream = flags & F_END_STREAM
        st = self.streams.get(sid)
        if st is None:
            peer_opens = not self.client_side and sid % 2 == 1
            if peer_opens and sid > self.highest_inbound_stream_id:
                self._new_request(sid, end_stream, block, events)
                return
            self._decode(block)
            if not peer_opens and sid not in self._closed and not self._forgotten_closed(sid):
                # The worker may open no stream (no push); a client never receives a request.
                raise self._fail(ErrorCodes.PROTOCOL_ERROR, f"HEADERS on stream {sid} the peer may not open")
            self._on_closed_stream_frame(sid, "HEADERS")
            return
        headers = self._decode(block)
        if not st.recv_open:
            events.append(self._stream_error(st, ErrorCodes.STREAM_CLOSED))
            return
        if st.got_headers:
            self._trailers(st, end_stream, headers, events)
            return
        # Client role: the response (or an informational one) to our request.
        try:
            headers = _check_response(headers)
        except Malformed:
            events.append(self._stream_error(st, ErrorCodes.PROTOCOL_ERROR))
            return
        status = headers[0][1]
        if status[0] == 0x31:  # 1xx
            if end_stream:
                events.append(self._stream_error(st, ErrorCodes.PROTOCOL_ERROR))
                return
            # Any number may precede the response (RFC 9110 §15.2), each costing the
            # stream's owner work: charged like any frame that makes no progress.
            self._control_frame("1xx response")
            events.append(ev.InformationalResponseReceived(stream_id=sid, headers=headers))
            return
        st.got_headers = True
        try:
            cl = content_length(headers)
        except ValueError:
            events.append(self._stream_error(st, ErrorCodes.PROTOCOL_ERROR))
            return
        if st.no_content or status == b"204" or status == b"304":
            # RFC 9113 §8.1.1: a response defined to have no content (to HEAD; 204, 304) MAY carry a
            # non-zero content-length while its DATA frames carry nothing: hold the DATA to 0 bytes.
            cl = 0
        elif end_stream and cl:
            # §8.1.1: a content-length that the DATA (none: the stream ended) does not match.
            events.append(self._stream_error(st, ErrorCodes.PROTOCOL_ERROR))
            return
        st.expected_length = cl
        if end_stream:
            ended = ev.StreamEnded(stream_id=sid)
            events.append(ev.ResponseReceived(stream_id=sid, headers=headers, stream_ended=ended))
            events.append(ended)
            self._end_recv(st)
        else:
            events.append(ev.ResponseReceived(stream_id=sid, headers=headers))

    def _trailers(self, st: Stream, end_stream: int, headers: list[tuple[bytes, bytes]],
                  events: list[ev.Event]) -> None:
        sid = st.stream_id
        try:
            if not end_stream:
                raise Malformed("trailers without END_STREAM")
            headers = self._check_fields(headers, trailers=True)
            if self._soft_limits and self._over_header_limits(headers) is not None:
                # RFC 9113 §10.5.1: beyond the advertised limits a message may be treated as malformed.
                raise Malformed("trailers above the header limits")
            expected = st.expected_length
            if expected is not None and expected != st.received_length:
                raise Malformed("body shorter than its content-length")
        except Malformed:
            events.append(self._stream_error(st, ErrorCodes.PROTOCOL_ERROR))
            return
        ended = ev.StreamEnded(stream_id=sid)
        events.append(ev.TrailersReceived(stream_id=sid, headers=headers, stream_ended=ended))
        events.append(ended)
        self._end_recv(st)

    def _refuse(self, sid: int, code: ErrorCodes, abusive: bool, events: list[ev.Event]) -> None:
        self.highest_inbound_stream_id = sid
        self._rst(sid, code)
        self._remember(sid, _RESET_SENT)
        events.append(StreamRefused(sid, code, abusive))
        if abusive:
            self._charge_reset()

    def _new_request(self, sid: int, end_stream: int, block: bytes, events: list[ev.Event]) -> None:
        """Server role: HEADERS opening a new stream."""
        limit = self._max_streams
        if self._draining:
            self._decode(block)
            self._refuse(sid, ErrorCodes.REFUSED_STREAM, False, events)
            return
        if self.open_inbound_streams >= limit:
            # The peer ignores the limit we advertised: abusive (Rapid Reset's cousin).
            self._decode(block)
            self._refuse(sid, ErrorCodes.REFUSED_STREAM, True, events)
            return
        if self._lingering + self._resets_this_read >= limit:
            # Handlers of ended streams still hold their slots (streams reset in this
            # read will linger too once dispatched): no room for another.
            self._decode(block)
            self._refuse(sid, ErrorCodes.REFUSED_STREAM, False, events)
            return
        headers = self._decode(block)
        self.highest_inbound_stream_id = sid
        st = Stream(sid, True, self._init_window, self.remote_settings.initial_window_size)
        self.streams[sid] = st
        self.open_inbound_streams += 1
        st.got_headers = True
        try:
            headers = self._check_fields(headers, trailers=False)
            try:
                cl = content_length(headers)
            except ValueError:
                raise Malformed("invalid content-length") from None
        except Malformed:
            events.append(self._stream_error(st, ErrorCodes.PROTOCOL_ERROR))
            return
        st.expected_length = cl
        if end_stream and cl:
            # announced a body and ended without it (§8.1.1)
            events.append(self._stream_error(st, ErrorCodes.PROTOCOL_ERROR))
            return
        if self._soft_limits:
            n = len(headers)
            # Cheap bound first, so a typical request does no per-field work.
            if n > self._soft_count or n * self._field_bound + 2 * len(block) > self._soft_size:
                why = self._over_header_limits(headers)
                if why is not None:
                    if end_stream:
                        st.recv_open = False  # half-closed (remote); the owner's answer closes it
                    events.append(HeadersOverLimit(sid, why, bool(end_stream)))
                    return
        if end_stream:
            ended = ev.StreamEnded(stream_id=sid)
            events.append(ev.RequestReceived(stream_id=sid, headers=headers, stream_ended=ended))
            events.append(ended)
            st.recv_open = False  # half-closed (remote); the response closes it
        else:
            events.append(ev.RequestReceived(stream_id=sid, headers=headers))

    def _over_header_limits(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """Why ``headers`` is above the soft limits, or None."""
        n = len(headers)
        limit = self._soft_count
        if n > limit:
            pseudo = 0
            for name, _ in headers:
                if name[:1] != b":":
                    break
                pseudo += 1
            if n - pseudo > limit:
                return f"{n - pseudo} header fields (max_header_count {limit})"
        size = 32 * n
        for name, value in headers:
            size += len(name) + len(value)
        if size > self._soft_size:
            return f"a {size}-byte header list (max_header_list_size {self._soft_size})"
        return None

    def _outbound_request(self, headers: list[Any]) -> list[Any]:
        """Client role: a request we are about to send, normalised as :func:`_normalize_outbound`
        does, then validated (ProtocolError).  An ordinary field that arrived already normalised
        and passed (what the forwarder sends) is remembered: next time it costs one set lookup."""
        valid = self._valid_outbound
        out: list[Any] = []
        append = out.append
        pseudo: dict[bytes, bytes] = {}
        regular = False
        host = None
        for h in headers:
            is_pseudo = valid.get(h)
            if is_pseudo is not None:
                if is_pseudo:
                    name = h[0]
                    if regular or name in pseudo:
                        raise h2x.ProtocolError(f"invalid pseudo-header {name!r} in a request")
                    pseudo[name] = h[1]
                else:
                    regular = True
                append(h)
                continue
            field = _normalize_field(h)
            if field is None:
                continue
            name, value = field
            if name[:1] == b":":
                if regular or name not in _REQUEST_PSEUDO or name in pseudo:
                    raise h2x.ProtocolError(f"invalid pseudo-header {name!r} in a request")
                pseudo[name] = value
                append(field)
                if field == h and len(name) + len(value) <= 256:
                    if len(valid) >= 2048:
                        valid.clear()
                    valid[field] = True
                continue
            regular = True
            if not name or H2_BAD_NAME.search(name) or (value and BAD_VALUE.search(value)):
                raise h2x.ProtocolError(f"invalid header field {name!r}")
            append(field)
            if name == b"te":
                if value.lower() != b"trailers":
                    raise h2x.ProtocolError("te other than trailers")
            elif name == b"host":
                if host is not None:
                    raise h2x.ProtocolError("several host fields")
                host = value
            elif field == h and len(name) + len(value) <= 256 and name not in PER_REQUEST:
                # (bounded as _valid_fields; a request id would only churn it)
                if len(valid) >= 2048:
                    valid.clear()
                valid[field] = False
        try:
            _check_request_pseudo(pseudo, host, bool(self.remote_settings.enable_connect_protocol))
        except Malformed as e:
            raise h2x.ProtocolError(str(e)) from e
        return out

    def _check_fields(self, headers: list[tuple[bytes, bytes]], trailers: bool) -> list[tuple[bytes, bytes]]:
        """Validate a request's or trailers' fields (RFC 9113 §8.2, §8.3); join cookies (§8.2.3)."""
        valid = self._valid_fields
        valid_pseudo = self._valid_pseudo
        cookies: list[bytes] | None = None
        pseudo: dict[bytes, bytes] = {}
        regular = False
        host: bytes | None = None
        for field in headers:
            if field in valid:
                regular = True
                continue
            name, value = field
            if name[:1] == b":":
                if regular or trailers:
                    raise Malformed(f"pseudo-header {name!r} after regular fields or in trailers")
                if name not in _REQUEST_PSEUDO:
                    raise Malformed(f"pseudo-header {name!r} not allowed in a request")
                if name in pseudo:
                    raise Malformed(f"duplicate {name!r}")
                if field not in valid_pseudo:
                    if H2_BAD_NAME.search(name, 1) or BAD_VALUE.search(value):
                        raise Malformed(f"invalid {name!r}")
                    if len(name) + len(value) <= 256:
                        if len(valid_pseudo) >= 2048:
                            valid_pseudo.clear()
                        valid_pseudo.add(field)
                pseudo[name] = value
                continue
            regular = True
            if not name or H2_BAD_NAME.search(name):
                raise Malformed(f"invalid field name {name!r}")
            if value and BAD_VALUE.search(value):
                raise Malformed(f"invalid value for {name!r}")
            if name in _SPECIAL:
                if name in CONNECTION_SPECIFIC:
                    raise Malformed(f"connection-specific field {name!r}")
                if name == b"te":
                    if value.lower() != b"trailers":
                        raise Malformed("te other than trailers")
                elif name == b"host":
                    if host is not None:
                        raise Malformed("several host fields")
                    host = value
                elif name == b"cookie" and not trailers:
                    if cookies is None:
                        cookies = []
                    cookies.append(value)
                continue
            # Bounded: <= 2048 x 256 B per connection; a request id would only churn the set.
            if len(name) + len(value) <= 256 and name not in PER_REQUEST:
                if len(valid) >= 2048:
                    valid.clear()
                valid.add(field)
        if not trailers:
            _check_request_pseudo(pseudo, host, self._connect)
        if cookies is not None:
            # RFC 9113 §8.2.3: split cookie fields are joined with "; " (h2 puts the result last).
            headers = [f for f in headers if f[0] != b"cookie"]
            headers.append(NeverIndexedHeaderTuple(b"cookie", join_cookies(cookies)))
        return headers

    # -- the other frames ----------------------------------------------------------------------

    def _on_window_update(self, sid: int, payload: bytes | bytearray, events: list[ev.Event]) -> None:
        if len(payload) != 4:
            raise self._fail(ErrorCodes.FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong length")
        inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not sid:
            if not inc:
                raise self._fail(ErrorCodes.PROTOCOL_ERROR, "zero WINDOW_UPDATE on the connection")
            w = self.outbound_flow_control_window + inc
            if w > MAX_WINDOW:
                raise self._fail(ErrorCodes.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self.outbound_flow_control_window = w
            events.append(ev.WindowUpdated(stream_id=0, delta=inc))
            return
        st = self.streams.get(sid)
        if st is None:
            if self._idle(sid):
                raise self._fail(ErrorCodes.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return  # closed: ignored (§6.9)
        if not inc:
            # §6.9: a zero increment on a stream is a *stream* error
            events.append(self._stream_error(st, ErrorCodes.PROTOCOL_ERROR))
            return
        w = st.out_window + inc
        if w > MAX_WINDOW:
            events.append(self._stream_error(st, ErrorCodes.FLOW_CONTROL_ERROR))
            return
        st.out_window = w
        events.append(ev.WindowUpdated(stream_id=sid, delta=inc))

    def _on_other(self, ftype: int, flags: int, sid: int, payload: bytes | bytearray,
                  events: list[ev.Event]) -> None:
        if ftype == RST_STREAM:
            if not sid:
                raise self._fail(ErrorCodes.PROTOCOL_ERROR, "RST_STREAM on stream 0")
            if len(payload) != 4:
                raise self._fail(ErrorCodes.FRAME_SIZE_ERROR, "RST_STREAM of the wrong length")
            st = self.streams.get(sid)
            if st is None:
                if self._idle(sid):
                    # §6.4 allows a connection error; h2 ignores it, and so do we (see the
                    # module docstring: HAProxy sends these), but not for free.
                    self._control_frame("RST_STREAM on idle streams")
                return  # closed: never answered with RST_STREAM (§5.4.2)
            code = _error_code(_U32.unpack(payload)[0])
            self._close(st, _RESET_RECV)
            events.append(ev.StreamReset(stream_id=sid, error_code=code, remote_reset=True))
            if not self.client_side:
                self._charge_reset()
        elif ftype == SETTINGS:
            self._on_settings(flags, sid, payload, events)
        elif ftype == PING:
            if sid:
                raise self._fail(ErrorCodes.PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise self._fail(ErrorCodes.FRAME_SIZE_ERROR, "PING of the wrong length")
            if flags & F_ACK:
                if self._probe is not None and payload == self._probe:
                    self._probe_acked(self._now)
                events.append(ev.PingAckReceived(ping_data=bytes(payload)))
            else:
                self._control_frame("PING")
                self._frame(PING, F_ACK, 0, payload)
                events.append(ev.PingReceived(ping_data=bytes(payload)))
        elif ftype == GOAWAY:
            if sid:
                raise self._fail(ErrorCodes.PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise self._fail(ErrorCodes.FRAME_SIZE_ERROR, "GOAWAY too short")
            last, code = _GOAWAY.unpack_from(payload)
            # Reported without closing: streams up to last-stream-id still complete (§6.8).
            term = ev.ConnectionTerminated()
            term.error_code = _error_code(code)
            term.last_stream_id = last & 0x7FFFFFFF
            term.additional_data = bytes(payload[8:]) or None
            events.append(term)
        elif ftype == PRIORITY:
            if not sid:
                raise self._fail(ErrorCodes.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise self._fail(ErrorCodes.FRAME_SIZE_ERROR, "PRIORITY of the wrong length")
            if _U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid:
                raise self._fail(ErrorCodes.PROTOCOL_ERROR, f"stream {sid} depends on itself")
            self._control_frame("PRIORITY")
        elif ftype == PUSH_PROMISE:
            # Push is disabled by the client, and a server may never receive one (§8.4).
            raise self._fail(ErrorCodes.PROTOCOL_ERROR, "PUSH_PROMISE received")
        elif ftype == CONTINUATION:
            raise self._fail(ErrorCodes.PROTOCOL_ERROR, "CONTINUATION without a header block")
        else:
            self._control_frame("unknown-type frame")  # ignored (§5.5), but not for free

    def _on_settings(self, flags: int, sid: int, payload: bytes | bytearray, events: list[ev.Event]) -> None:
        if sid:
            raise self._fail(ErrorCodes.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & F_ACK:
            if payload:
                raise self._fail(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if self._settings_sent is not None:
                # (the first ACK only: the tuning's first round trip, before any DATA)
                sample = self._now - self._settings_sent
                self._settings_sent = None
                if sample > 0 and self.srtt is None:
                    self.srtt = sample
            return
        if len(payload) % 6:
            raise self._fail(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        self._control_frame("SETTINGS")
        rs = self.remote_settings
        changed = ev.RemoteSettingsChanged()
        for i in range(0, len(payload), 6):
            code, value = _SETTING.unpack_from(payload, i)
            if code == SettingCodes.HEADER_TABLE_SIZE:
                old = rs.header_table_size
                rs.header_table_size = value
                # The encoder may use any size up to the peer's (RFC 7541 §4.2); a change is
                # signalled at the start of the next block.
                self.encoder.header_table_size = min(value, self.config.max_encoder_table_size)
            elif code == SettingCodes.ENABLE_PUSH:
                if value > 1 or (self.client_side and value):
                    raise self._fail(ErrorCodes.PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value}")
                old, rs.enable_push = rs.enable_push, value
            elif code == SettingCodes.MAX_CONCURRENT_STREAMS:
                old, rs.max_concurrent_streams = rs.max_concurrent_streams, value
            elif code == SettingCodes.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise self._fail(ErrorCodes.FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value}")
                old = rs.initial_window_size
                delta = value - old
                if delta:
                    for st in self.streams.values():
                        st.out_window += delta
                        if st.out_window > MAX_WINDOW:
                            raise self._fail(ErrorCodes.FLOW_CONTROL_ERROR,
                                             f"stream {st.stream_id} window above 2^31-1 after SETTINGS")
                rs.initial_window_size = value
            elif code == SettingCodes.MAX_FRAME_SIZE:
                if not 16384 <= value <= 16777215:
                    raise self._fail(ErrorCodes.PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
                old, rs.max_frame_size = rs.max_frame_size, value
            elif code == SettingCodes.MAX_HEADER_LIST_SIZE:
                old, rs.max_header_list_size = rs.max_header_list_size, value  # type: ignore[assignment]
            elif code == SettingCodes.ENABLE_CONNECT_PROTOCOL:
                if value > 1:  # RFC 8441 §3: 0 or 1
                    raise self._fail(ErrorCodes.PROTOCOL_ERROR, f"SETTINGS_ENABLE_CONNECT_PROTOCOL {value}")
                old, rs.enable_connect_protocol = rs.enable_connect_protocol, value
            else:
                continue  # unknown settings are ignored (§6.5.2)
            key = _setting_code(code)
            prev = changed.changed_settings.get(key)
            changed.changed_settings[key] = ChangedSetting(key, prev.original_value if prev else old, value)
        self._frame(SETTINGS, F_ACK, 0, b"")
        events.append(changed)


# -- header checks (module level: no per-connection state) ---------------------------------------


def _check_request_pseudo(pseudo: dict[bytes, bytes], host: bytes | None, extended_connect: bool) -> None:
    """The pseudo-header fields of a request (RFC 9113 §8.3.1, §8.5; RFC 8441 §4)."""
    method = pseudo.get(b":method")
    if not method:
        raise Malformed("no :method" if method is None else "empty :method")  # a method is a token
    if b":protocol" in pseudo:
        if not extended_connect:
            # RFC 8441 §3: only once the server advertised SETTINGS_ENABLE_CONNECT_PROTOCOL.
            raise Malformed(":protocol without SETTINGS_ENABLE_CONNECT_PROTOCOL")
        if method != b"CONNECT":
            raise Malformed(":protocol outside CONNECT")
    if method == b"CONNECT" and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:
            raise Malformed("CONNECT with :scheme or :path")
    else:
        if b":scheme" not in pseudo or b":path" not in pseudo:
            raise Malformed("no :scheme or :path")
        if not pseudo[b":path"]:
            raise Malformed("empty :path")
    authority = pseudo.get(b":authority")
    if authority is None and host is None:
        raise Malformed("neither :authority nor host")
    if authority is not None and host is not None and authority != host:
        raise Malformed(":authority and host disagree")


def _check_response(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Validate a response's fields: one valid :status first, nothing else pseudo (§8.3.2)."""
    status: bytes | None = None
    regular = False
    cookies: list[bytes] | None = None
    for name, value in headers:
        if name[:1] == b":":
            if regular or name != b":status" or status is not None:
                raise Malformed(f"pseudo-header {name!r} not allowed here")
            status = value
            continue
        regular = True
        if not name or H2_BAD_NAME.search(name):
            raise Malformed(f"invalid field name {name!r}")
        if value and BAD_VALUE.search(value):
            raise Malformed(f"invalid value for {name!r}")
        if name in CONNECTION_SPECIFIC:
            raise Malformed(f"connection-specific field {name!r}")
        if name == b"te" and value.lower() != b"trailers":
            raise Malformed("te other than trailers")
        if name == b"cookie":
            cookies = [*(cookies or []), value]
    # RFC 9110 §15, RFC 9113 §8.6: three digits in 100-599, and never 101.
    if status is None or len(status) != 3 or not status.isdigit() or not b"100" <= status <= b"599" \
            or status == b"101":
        raise Malformed(f"invalid :status {status!r}")
    if cookies is not None:
        headers = [f for f in headers if f[0] != b"cookie"]
        headers.append(NeverIndexedHeaderTuple(b"cookie", join_cookies(cookies)))
    return headers


def _normalize_outbound(headers: list[Any]) -> list[Any]:
    """Client role (what h2 did with outbound normalisation on): lowercase names, strip
    surrounding whitespace from values, drop connection-specific fields.  (Credentials are
    never indexed by the HPACK encoder itself, for every list.)"""
    return [field for h in headers if (field := _normalize_field(h)) is not None]


def _normalize_field(h: Any) -> Any:
    """One outbound field as :func:`_normalize_outbound` makes it (bytes, lowercase name, a
    regular field's value stripped), or None for a connection-specific field (dropped)."""
    name, value = h[0], h[1]
    if isinstance(name, str):
        name = name.encode("utf-8")
    if isinstance(value, str):
        value = value.encode("utf-8")
    name = name.lower()
    if name in CONNECTION_SPECIFIC:
        return None
    if name[:1] != b":":
        value = value.strip(b" \t")
    return NeverIndexedHeaderTuple(name, value) if isinstance(h, NeverIndexedHeaderTuple) else (name, value)

