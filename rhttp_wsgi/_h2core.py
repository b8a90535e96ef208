"""A lean HTTP/2 connection state machine (RFC 9113) for both tunnel roles.

Why not ``h2.connection.H2Connection``?  Speed, and the fixes a tunnel needs.
h2 costs 110-160 µs of CPU per request in memory (a generic state machine per
stream with a transition table, a frame object and a ``repr`` per frame, a
generator pipeline per header validation step, debug-log calls everywhere);
the worker's budget is 100 µs for *everything* (benchmarks/RESULTS.md).  This
module implements the subset a reverse tunnel uses -- no server push, no
priority tree -- with every check RFC 9113 requires on what the peer sends,
in straight-line code: one loop over the received bytes, a handful of
integers per stream, and a small cache of header fields already validated.

It keeps h2's *interface* where the tunnel uses it (method names, the
``h2.events`` classes it returns, the ``h2.exceptions`` it raises, the
``h2.errors.ErrorCodes``), so ``_tunnel.py`` and the tests read the same; the
protocol-level fixes that ``_protocol.py`` used to patch into h2 are native
here (see that module's docstring for the list and the CVEs behind them).

Thread model: none.  Not thread-safe; the owner serialises every call (the
tunnel lock).  Sans-I/O: fed bytes and ``now``, it queues bytes to send.

Errors:

* a **connection error** queues GOAWAY (with the RFC's code) and raises a
  ``h2.exceptions.ProtocolError`` whose ``error_code`` is that code; the
  connection is then dead (``closed``);
* a **stream error** queues RST_STREAM and returns an ``h2.events.StreamReset``
  with ``remote_reset=False``; every other stream goes on.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import h2.events as ev
import h2.exceptions as h2x
from h2.errors import ErrorCodes
from h2.settings import ChangedSetting, SettingCodes
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKError, OversizedHeaderListError

from ._hpack import Decoder, Encoder

__all__ = ["H2Core", "RequestRejected", "Settings", "StreamRefused"]

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

_HEAD = struct.Struct(">BHBBL")  # length (24 bits as 8+16), type, flags, stream id
_U32 = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")

# How a stream ended, remembered for late frames (RFC 9113 §5.1 "closed").
_ENDED = 0        # both sides sent END_STREAM: late frames are a connection error
_RESET_SENT = 1   # we sent RST_STREAM: late frames are ignored
_RESET_RECV = 2   # the peer sent RST_STREAM: late frames are a stream error

_CONNECTION_SPECIFIC = frozenset((b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding",
                                  b"upgrade"))
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path", b":protocol"))
# Field names: RFC 9113 §8.2.1 forbids 0x00-0x20, 0x41-0x5a (uppercase), 0x7f-0xff and ':'.
_BAD_NAME = re.compile(rb"[\x00-\x20A-Z:\x7f-\xff]")
# Field values: no NUL, CR, LF anywhere; no SP/HTAB at either end.
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
#: Names whose meaning is checked beyond the generic rules: never cached as "plain".
_SPECIAL = _CONNECTION_SPECIFIC | {b"te", b"host", b"content-length", b"cookie"}


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


class StreamRefused(ev.Event):
    """A peer-initiated stream was refused (beyond MAX_CONCURRENT_STREAMS or while draining)."""

    def __init__(self, stream_id: int, error_code: ErrorCodes, abusive: bool = False) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        #: The peer ignored our advertised limit (counts toward ``max_resets``);
        #: False for refusals that are our doing (draining, busy).
        self.abusive = abusive

    def __repr__(self) -> str:
        return f"<StreamRefused stream_id:{self.stream_id}, error_code:{self.error_code!r}>"


class RequestRejected(ev.Event):
    """Server role: a request answered by the core itself (431); it never becomes a stream event."""

    def __init__(self, stream_id: int, status: int, reason: str) -> None:
        self.stream_id = stream_id
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"<RequestRejected stream_id:{self.stream_id}, status:{self.status}, reason:{self.reason!r}>"


class _ConnectionError(h2x.ProtocolError):
    """A connection error (GOAWAY already queued); ``error_code`` says which."""

    def __init__(self, message: str, code: ErrorCodes) -> None:
        super().__init__(message)
        self.error_code = code


class Malformed(Exception):
    """A header block that makes its message malformed (a stream error, RFC 9113 §8.1.1)."""


class Settings:
    """One side's settings (RFC 9113 §6.5.2), with h2's attribute names."""

    __slots__ = ("enable_push", "header_table_size", "initial_window_size", "max_concurrent_streams",
                 "max_frame_size", "max_header_list_size")

    def __init__(self) -> None:
        self.header_table_size = 4096
        self.enable_push = 1
        self.max_concurrent_streams = 2**32 + 1  # "unlimited" (h2's sentinel)
        self.initial_window_size = 65535
        self.max_frame_size = 16384
        self.max_header_list_size: int | None = None


class Stream:
    """Per-stream state: a few integers instead of a state-machine object."""

    __slots__ = ("_actual_content_length", "_expected_content_length", "closed", "got_headers", "in_max",
                 "in_processed", "in_window", "inbound", "no_content", "out_window", "recv_open", "send_open",
                 "sent_headers", "stream_id")

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
        self.out_window = out_window      # what we may still send
        self._expected_content_length: int | None = None
        self._actual_content_length = 0
        self.closed = False
        self.no_content = False           # client role: we sent a HEAD request (its response has no content)


def _window_increment(current: int, maximum: int, processed: int) -> int:
    """h2's WindowManager rule: return credit once half the window is consumed (or it hit 0)."""
    if processed >= maximum // 2 or (current == 0 and processed > min(1024, maximum // 4)):
        return min(processed, maximum - current)
    return 0


class H2Core:
    """One HTTP/2 connection.  ``client_side``: we open the (odd) streams; else the peer does."""

    #: How many closed streams are remembered, to tell a late frame on a stream
    #: we reset (ignored) from one on a stream closed normally (an error).
    #: 4096 covers seconds of history at thousands of streams per second.
    MAX_CLOSED_STREAMS = 4096

    def __init__(self, client_side: bool, local: Settings, *, validate_outbound: bool) -> None:
        self.client_side = client_side
        self.local_settings = local
        self.remote_settings = Settings()
        self.validate_outbound = validate_outbound
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.decoder.max_header_list_size = local.max_header_list_size or 2**31
        self.streams: dict[int, Stream] = {}
        self._closed: dict[int, int] = {}
        self.highest_inbound_stream_id = 0
        self.highest_outbound_stream_id = 0
        self.open_inbound_streams = 0
        self.open_outbound_streams = 0
        self.outbound_flow_control_window = 65535
        self.inbound_window = 65535
        self.inbound_max = 65535
        self.inbound_processed = 0
        self._data_to_send = bytearray()
        self._inbuf = bytearray()
        # An unfinished header block: (stream id, flags of its HEADERS, fragments, size, frames)
        self._block_sid = 0
        self._block_flags = 0
        self._block: list[bytes] = []
        self._block_size = 0
        self._block_frames = 0
        self.closed = False
        # -- limits set by the owner (TunnelProtocol) ---------------------------------------
        #: Largest header block (HEADERS + CONTINUATION) before ENHANCE_YOUR_CALM.
        self.max_header_block = 1 << 20
        #: Server role: a request above these gets 431 (0 = off).
        self.max_header_count = 0
        self.max_header_list = 0
        #: Set by the owner once it sent GOAWAY: new peer streams are refused.
        self.draining = False
        #: App calls still running for ended streams (kept by the tunnel; see _protocol).
        self.lingering_handlers = 0
        #: Streams reset during the current read (the tunnel counts them as lingering after it).
        self.resets_this_read = 0
        #: Server role: a token bucket over stream resets (None = unlimited).
        self.reset_bucket: Any = None
        #: Flood guard over reply-forcing / no-progress frames.
        self.flood_rate = 0.0
        self.flood_burst = 0.0
        self._flood_tokens = 0.0
        self._flood_at = 0.0
        #: The time of the bytes being fed (sans-I/O clock for the buckets).
        self.now = 0.0
        # Header fields that passed validation (plain names only, short ones
        # only): a repeated field costs one set lookup.  Bounded: at most 2048
        # fields of <= 256 bytes (cleared when full), so a peer sending unique
        # large values cannot grow it.
        self._valid_fields: set[tuple[bytes, bytes]] = set()

    # -- settings and start --------------------------------------------------------------

    @property
    def max_outbound_frame_size(self) -> int:
        return self.remote_settings.max_frame_size

    def initiate_connection(self) -> None:
        """Queue our SETTINGS (every value we differ from the default on, plus ENABLE_PUSH=0 as a client)."""
        s = self.local_settings
        payload = b""
        if self.client_side:
            payload += _SETTING.pack(SettingCodes.ENABLE_PUSH, 0)
        payload += _SETTING.pack(SettingCodes.MAX_CONCURRENT_STREAMS, s.max_concurrent_streams)
        payload += _SETTING.pack(SettingCodes.INITIAL_WINDOW_SIZE, s.initial_window_size)
        payload += _SETTING.pack(SettingCodes.MAX_FRAME_SIZE, s.max_frame_size)
        if s.max_header_list_size is not None:
            payload += _SETTING.pack(SettingCodes.MAX_HEADER_LIST_SIZE, s.max_header_list_size)
        self._frame(SETTINGS, 0, 0, payload)

    def increment_flow_control_window(self, increment: int, stream_id: int | None = None) -> None:
        """Open the connection's receive window by ``increment`` (WINDOW_UPDATE on stream 0)."""
        if stream_id:
            raise NotImplementedError("stream windows follow SETTINGS_INITIAL_WINDOW_SIZE")
        if not 1 <= increment <= MAX_WINDOW - self.inbound_window:
            raise ValueError(f"window increment {increment} out of range")
        self.inbound_window += increment
        self.inbound_max += increment
        self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(increment))

    # -- output ---------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._data_to_send)
        self._data_to_send.clear()
        return out

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes | bytearray | memoryview) -> None:
        n = len(payload)
        out = self._data_to_send
        out += _HEAD.pack(n >> 16, n & 0xFFFF, ftype, flags, sid)
        if n:
            out += payload

    def _rst(self, sid: int, code: int) -> None:
        self._frame(RST_STREAM, 0, sid, _U32.pack(code))

    def ping(self, opaque_data: bytes) -> None:
        if len(opaque_data) != 8:
            raise ValueError("PING payload must be 8 bytes")
        self._frame(PING, 0, 0, opaque_data)

    def get_next_available_stream_id(self) -> int:
        nxt = self.highest_outbound_stream_id + 2 if self.highest_outbound_stream_id else (1 if self.client_side else 2)
        if nxt > MAX_WINDOW:
            raise h2x.NoAvailableStreamIDError("no stream id left on this connection")
        return nxt

    def local_flow_control_window(self, stream_id: int) -> int:
        st = self.streams.get(stream_id)
        if st is None:
            raise h2x.StreamClosedError(stream_id)
        w = self.outbound_flow_control_window
        return st.out_window if st.out_window < w else w

    def send_headers(self, stream_id: int, headers: list[Any], end_stream: bool = False) -> None:
        if self.closed:
            raise h2x.ProtocolError("connection closed")
        st = self.streams.get(stream_id)
        if st is None:
            if not self.client_side or stream_id % 2 == 0 or stream_id <= self.highest_outbound_stream_id:
                raise h2x.StreamClosedError(stream_id)
            if stream_id > MAX_WINDOW:
                # RFC 9113 §4.1/§5.1.1: stream ids are 31 bits; the reserved bit MUST stay unset.
                raise h2x.NoAvailableStreamIDError(f"stream id {stream_id} above 2^31-1")
            if self.open_outbound_streams >= self.remote_settings.max_concurrent_streams:
                raise h2x.TooManyStreamsError("peer's SETTINGS_MAX_CONCURRENT_STREAMS reached")
            if self.validate_outbound:
                headers = _normalize_outbound(headers)
                _check_request(headers)
            st = Stream(stream_id, False, self.local_settings.initial_window_size,
                        self.remote_settings.initial_window_size)
            # RFC 9113 §8.1.1: the response to HEAD has no content (see _header_block).
            st.no_content = (b":method", b"HEAD") in headers or (":method", "HEAD") in headers
            self.streams[stream_id] = st
            self.highest_outbound_stream_id = stream_id
            self.open_outbound_streams += 1
        elif not st.send_open:
            raise h2x.StreamClosedError(stream_id)
        elif st.sent_headers:
            if not end_stream:
                raise h2x.ProtocolError("trailers must end the stream")
            if self.validate_outbound:
                headers = _normalize_outbound(headers)
        elif self.validate_outbound:
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
        if end_stream:
            self._end_send(st)

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> None:
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
        out = self._data_to_send
        out += _HEAD.pack(n >> 16, n & 0xFFFF, DATA, F_END_STREAM if end_stream else 0, stream_id)
        if n:
            out += data
        if end_stream:
            self._end_send(st)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.NO_ERROR) -> None:
        st = self.streams.get(stream_id)
        if st is None:
            if stream_id in self._closed or stream_id <= max(self.highest_inbound_stream_id,
                                                             self.highest_outbound_stream_id):
                raise h2x.StreamClosedError(stream_id)
            raise h2x.NoSuchStreamError(stream_id)
        self._rst(stream_id, error_code)
        self._close(st, _RESET_SENT)

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        """The app consumed ``acknowledged_size`` bytes: return credit when worth a WINDOW_UPDATE."""
        if acknowledged_size < 0:
            raise ValueError("negative acknowledged size")
        self.inbound_processed += acknowledged_size
        inc = _window_increment(self.inbound_window, self.inbound_max, self.inbound_processed)
        if inc:
            self.inbound_processed = 0
            self.inbound_window += inc
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(inc))
        st = self.streams.get(stream_id)
        if st is not None and st.recv_open:
            st.in_processed += acknowledged_size
            inc = _window_increment(st.in_window, st.in_max, st.in_processed)
            if inc:
                st.in_processed = 0
                st.in_window += inc
                self._frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(inc))

    def _terminate_connection(self, error_code: int) -> None:
        """Connection error: queue GOAWAY with the last stream we processed."""
        if self.closed:
            return
        self.closed = True
        self._frame(GOAWAY, 0, 0, _GOAWAY.pack(self.highest_inbound_stream_id, error_code))

    def _fail(self, code: ErrorCodes, message: str) -> _ConnectionError:
        self._terminate_connection(code)
        return _ConnectionError(message, code)

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
        st.closed = True
        st.recv_open = st.send_open = False
        sid = st.stream_id
        if self.streams.pop(sid, None) is not None:
            if st.inbound:
                self.open_inbound_streams -= 1
            else:
                self.open_outbound_streams -= 1
        closed = self._closed
        closed[sid] = how
        if len(closed) > self.MAX_CLOSED_STREAMS:
            del closed[next(iter(closed))]

    def _stream_error(self, st: Stream, code: ErrorCodes) -> ev.StreamReset:
        self._rst(st.stream_id, code)
        self._close(st, _RESET_SENT)
        self._charge_reset()
        return ev.StreamReset(stream_id=st.stream_id, error_code=code, remote_reset=False)

    def _charge_reset(self) -> None:
        """Server role: every stream reset the peer causes draws on the reset bucket (Rapid Reset, MadeYouReset)."""
        self.resets_this_read += 1
        bucket = self.reset_bucket
        if bucket is not None and not bucket.take(self.now):
            raise self._fail(ErrorCodes.ENHANCE_YOUR_CALM,
                             f"more than {bucket.capacity:g} stream resets in {bucket.window:g}s")

    def _control_frame(self, kind: str) -> None:
        """Charge one reply-forcing or no-progress frame to the flood bucket (CVE-2019-9512/9515/9518)."""
        if self.flood_rate <= 0:
            return
        elapsed = self.now - self._flood_at
        self._flood_at = self.now
        tokens = self._flood_tokens + (elapsed * self.flood_rate if elapsed > 0 else 0.0)
        if tokens > self.flood_burst:
            tokens = self.flood_burst
        if tokens < 1.0:
            raise self._fail(ErrorCodes.ENHANCE_YOUR_CALM,
                             f"{kind} flood: more than {self.flood_burst:g} at once or {self.flood_rate:g}/s")
        self._flood_tokens = tokens - 1.0

    def _idle(self, sid: int) -> bool:
        """A stream id the peer never used (RFC 9113 §5.1 "idle"), as seen from a frame on it."""
        if sid % 2 == (0 if self.client_side else 1):  # peer-initiated parity
            return sid > self.highest_inbound_stream_id
        return sid > self.highest_outbound_stream_id

    # -- input ----------------------------------------------------------------------------

    def pending_header_block_size(self) -> int:
        """Bytes of an unfinished header block (HEADERS without END_HEADERS yet)."""
        return self._block_size

    def receive_data(self, data: bytes) -> list[ev.Event]:
        """Parse every complete frame in ``data`` (plus what was buffered); return the events."""
        if self.closed:
            return []
        buf: bytes | bytearray
        if self._inbuf:
            self._inbuf += data
            buf = self._inbuf
        else:
            buf = data
        events: list[ev.Event] = []
        pos = 0
        end = len(buf)
        max_frame = self.local_settings.max_frame_size
        unpack = _HEAD.unpack_from
        while end - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(buf, pos)
            length = hi << 16 | lo
            if length > max_frame:
                raise self._fail(ErrorCodes.FRAME_SIZE_ERROR,
                                 f"a {length}-byte frame announced (MAX_FRAME_SIZE {max_frame})")
            if end - pos - 9 < length:
                break
            payload = buf[pos + 9:pos + 9 + length]
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
        if pos == end:
            if self._inbuf:
                self._inbuf = bytearray()
        elif buf is self._inbuf:
            del self._inbuf[:pos]
        else:
            self._inbuf = bytearray(buf[pos:])
        return events

    # -- DATA ------------------------------------------------------------------------------

    def _on_data(self, flags: int, sid: int, payload: bytes | bytearray, events: list[ev.Event]) -> None:
        if not sid:
            raise self._fail(ErrorCodes.PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
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
            self._on_closed_stream_frame(sid, "DATA", events)
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
        end_stream = flags & F_END_STREAM
        if not flow and not end_stream:
            # An empty DATA frame carries nothing (CVE-2019-9518 empty-frames flood).
            self._control_frame("empty DATA")
        data = bytes(payload)
        expected = st._expected_content_length
        if expected is not None:
            st._actual_content_length += len(data)
            if st._actual_content_length > expected or (end_stream and st._actual_content_length != expected):
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

    def _on_closed_stream_frame(self, sid: int, what: str, events: list[ev.Event]) -> None:
        """A frame that needs an open stream arrived on a stream that is not open."""
        how = self._closed.get(sid)
        if how == _RESET_SENT:
            return  # frames in flight when our RST_STREAM left: ignore (§5.1)
        if how == _RESET_RECV:
            self._rst(sid, ErrorCodes.STREAM_CLOSED)
            self._charge_reset()
            return
        if how is None and self._idle(sid):
            raise self._fail(ErrorCodes.PROTOCOL_ERROR, f"{what} on idle stream {sid}")
        if how is None and sid % 2 == (0 if self.client_side else 1):
            # A lower id the peer skipped (implicitly closed) or one forgotten.
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
        if self._block_size > self.max_header_block:
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
            return self.decoder.decode(block, raw=True)
        except OversizedHeaderListError as e:
            raise self._fail(ErrorCodes.ENHANCE_YOUR_CALM, f"header list too large: {e}") from e
        except (HPACKError, IndexError, TypeError, UnicodeDecodeError, ValueError) as e:
            raise self._fail(ErrorCodes.COMPRESSION_ERROR, f"HPACK: {e}") from e

    def _header_block(self, sid: int, flags: int, block: bytes, events: list[ev.Event]) -> None:
        """A complete header block on ``sid``.  It is decoded whatever happens next (HPACK sync)."""
        end_stream = flags & F_END_STREAM
        st = self.streams.get(sid)
        if st is None:
            if self.client_side or sid % 2 == 0 or not self._idle(sid):
                # Worker may open no stream (no push); a closed or lower id; an even id.
                self._decode(block)
                if self.client_side or sid % 2 == 0:
                    if self._closed.get(sid) is None:
                        raise self._fail(ErrorCodes.PROTOCOL_ERROR, f"HEADERS on stream {sid} the peer may not open")
                self._on_closed_stream_frame(sid, "HEADERS", events)
                return
            self._new_request(sid, end_stream, block, events)
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
            events.append(ev.InformationalResponseReceived(stream_id=sid, headers=headers))
            return
        st.got_headers = True
        cl = _content_length(headers)
        if cl == -1:
            events.append(self._stream_error(st, ErrorCodes.PROTOCOL_ERROR))
            return
        if st.no_content or status == b"204" or status == b"304":
            # RFC 9113 §8.1.1: a response defined to have no content (to HEAD; 204, 304) MAY carry a
            # non-zero content-length while its DATA frames carry nothing: hold the DATA to 0 bytes.
            cl = 0
        st._expected_content_length = cl
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
            if self.max_header_count and self._over_header_limits(headers) is not None:
                raise Malformed("trailers above the header limits")
            expected = st._expected_content_length
            if expected is not None and expected != st._actual_content_length:
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
        closed = self._closed
        closed[sid] = _RESET_SENT
        if len(closed) > self.MAX_CLOSED_STREAMS:
            del closed[next(iter(closed))]
        events.append(StreamRefused(sid, code, abusive))
        if abusive:
            self._charge_reset()

    def _new_request(self, sid: int, end_stream: int, block: bytes, events: list[ev.Event]) -> None:
        """Server role: HEADERS opening a new stream."""
        limit = self.local_settings.max_concurrent_streams
        if self.draining:
            self._decode(block)
            self._refuse(sid, ErrorCodes.REFUSED_STREAM, False, events)
            return
        if self.open_inbound_streams >= limit:
            # The peer ignores the limit we advertised: abusive (Rapid Reset's cousin).
            self._decode(block)
            self._refuse(sid, ErrorCodes.REFUSED_STREAM, True, events)
            return
        if self.lingering_handlers + self.resets_this_read >= limit:
            self._decode(block)
            self._refuse(sid, ErrorCodes.REFUSED_STREAM, False, events)
            return
        headers = self._decode(block)
        self.highest_inbound_stream_id = sid
        st = Stream(sid, True, self.local_settings.initial_window_size, self.remote_settings.initial_window_size)
        self.streams[sid] = st
        self.open_inbound_streams += 1
        st.got_headers = True
        try:
            headers = self._check_fields(headers, trailers=False)
            cl = _content_length(headers)
            if cl == -1:
                raise Malformed("invalid content-length")
        except Malformed:
            events.append(self._stream_error(st, ErrorCodes.PROTOCOL_ERROR))
            return
        st._expected_content_length = cl
        if end_stream and cl:
            # announced a body and ended without it (§8.1.1)
            events.append(self._stream_error(st, ErrorCodes.PROTOCOL_ERROR))
            return
        if self.max_header_count:
            n = len(headers)
            # Cheap bound first, so a typical request does no per-field work: a
            # field decodes to at most 32 + one dynamic-table entry + 8/5 of
            # its literal octets (Huffman's shortest code is 5 bits).
            if n > self.max_header_count or \
                    n * (32 + self.decoder.max_allowed_table_size) + 2 * len(block) > self.max_header_list:
                why = self._over_header_limits(headers)
                if why is not None:
                    self._reject_431(st, end_stream, why, events)
                    return
        if end_stream:
            ended = ev.StreamEnded(stream_id=sid)
            events.append(ev.RequestReceived(stream_id=sid, headers=headers, stream_ended=ended))
            events.append(ended)
            st.recv_open = False  # half-closed (remote); the response closes it
        else:
            events.append(ev.RequestReceived(stream_id=sid, headers=headers))

    def _reject_431(self, st: Stream, end_stream: int, why: str, events: list[ev.Event]) -> None:
        """RFC 9113 §10.5.1: "can send an HTTP 431".  HPACK is in sync: only this stream is answered."""
        if end_stream:
            st.recv_open = False
        self.send_headers(st.stream_id, [(b":status", b"431"), (b"content-length", b"0")], end_stream=True)
        if not st.closed:
            # The request body is not wanted (RFC 9113 §8.1).
            self.reset_stream(st.stream_id, ErrorCodes.NO_ERROR)
        events.append(RequestRejected(st.stream_id, 431, why))

    def _over_header_limits(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        n = len(headers)
        limit = self.max_header_count
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
        if size > self.max_header_list:
            return f"a {size}-byte header list (max_header_list_size {self.max_header_list})"
        return None

    def _check_fields(self, headers: list[tuple[bytes, bytes]], trailers: bool) -> list[tuple[bytes, bytes]]:
        """Validate a request's or trailers' fields (RFC 9113 §8.2, §8.3); join cookies (§8.2.3)."""
        valid = self._valid_fields
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
                if _BAD_NAME.search(name, 1) or _BAD_VALUE.search(value):
                    raise Malformed(f"invalid {name!r}")
                pseudo[name] = value
                continue
            regular = True
            if not name or _BAD_NAME.search(name):
                raise Malformed(f"invalid field name {name!r}")
            if value and _BAD_VALUE.search(value):
                raise Malformed(f"invalid value for {name!r}")
            if name in _SPECIAL:
                if name in _CONNECTION_SPECIFIC:
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
            if len(name) + len(value) <= 256:  # bounded: <= 2048 x 256 B per connection
                if len(valid) >= 2048:
                    valid.clear()
                valid.add(field)
        if not trailers:
            _check_request_pseudo(pseudo, host)
        if cookies is not None:
            # RFC 9113 §8.2.3: split cookie fields are joined with "; " (h2 puts the result last).
            headers = [f for f in headers if f[0] != b"cookie"]
            headers.append(NeverIndexedHeaderTuple(b"cookie", b"; ".join(cookies)))
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
                    raise self._fail(ErrorCodes.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
                return
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
                self.encoder.header_table_size = value
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
            else:
                continue  # unknown settings are ignored (§6.5.2)
            key = _setting_code(code)
            prev = changed.changed_settings.get(key)
            changed.changed_settings[key] = ChangedSetting(key, prev.original_value if prev else old, value)
        self._frame(SETTINGS, F_ACK, 0, b"")
        events.append(changed)


# -- header checks (module level: no per-connection state) ---------------------------------------


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The message's content-length: None if absent, -1 if invalid or conflicting."""
    found: bytes | None = None
    for name, value in headers:
        if name == b"content-length":
            if found is not None and value != found:
                return -1
            found = value
    if found is None:
        return None
    if not found.isdigit() or not found.isascii() or len(found) > 18:
        return -1
    return int(found)


def _check_request_pseudo(pseudo: dict[bytes, bytes], host: bytes | None) -> None:
    method = pseudo.get(b":method")
    if method is None:
        raise Malformed("no :method")
    if method == b"CONNECT" and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:
            raise Malformed("CONNECT with :scheme or :path")
    else:
        if b":scheme" not in pseudo or b":path" not in pseudo:
            raise Malformed("no :scheme or :path")
        if b":protocol" in pseudo and method != b"CONNECT":
            raise Malformed(":protocol outside CONNECT")
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
        if not name or _BAD_NAME.search(name):
            raise Malformed(f"invalid field name {name!r}")
        if value and _BAD_VALUE.search(value):
            raise Malformed(f"invalid value for {name!r}")
        if name in _CONNECTION_SPECIFIC:
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
        headers.append(NeverIndexedHeaderTuple(b"cookie", b"; ".join(cookies)))
    return headers


def _normalize_outbound(headers: list[Any]) -> list[Any]:
    """Client role (what h2 did with outbound normalisation on): lowercase names, strip
    surrounding whitespace from values, drop connection-specific fields, never-index
    credentials and short cookies."""
    out: list[Any] = []
    for h in headers:
        name, value = h[0], h[1]
        if isinstance(name, str):
            name = name.encode("utf-8")
        if isinstance(value, str):
            value = value.encode("utf-8")
        name = name.lower()
        if name in _CONNECTION_SPECIFIC:
            continue
        if name[:1] != b":":
            value = value.strip(b" \t")
        sensitive = isinstance(h, NeverIndexedHeaderTuple) or name in (b"authorization", b"proxy-authorization") \
            or (name == b"cookie" and len(value) < 20)
        out.append(NeverIndexedHeaderTuple(name, value) if sensitive else HeaderTuple(name, value))
    return out


def _check_request(headers: list[Any]) -> None:
    """Validate a request header list we are about to send (client role)."""
    pseudo: dict[bytes, bytes] = {}
    regular = False
    host = None
    for name, value in headers:
        if name[:1] == b":":
            if regular or name not in _REQUEST_PSEUDO or name in pseudo:
                raise h2x.ProtocolError(f"invalid pseudo-header {name!r} in a request")
            pseudo[name] = value
            continue
        regular = True
        if not name or _BAD_NAME.search(name) or (value and _BAD_VALUE.search(value)):
            raise h2x.ProtocolError(f"invalid header field {name!r}")
        if name == b"te" and value.lower() != b"trailers":
            raise h2x.ProtocolError("te other than trailers")
        if name == b"host":
            if host is not None:
                raise h2x.ProtocolError("several host fields")
            host = value
    try:
        _check_request_pseudo(pseudo, host)
    except Malformed as e:
        raise h2x.ProtocolError(str(e)) from e
