"""Sans-I/O core of a reverse-HTTP/2 tunnel, for both roles.

This module never touches a socket, a thread or the clock: it is fed bytes and
``now`` and returns h2 events (plus :class:`StreamRefused`).  All I/O lives in
``_tunnel.py``.

Reverse HTTP flips who speaks first.  The *worker* dials the connection, so it
writes the HTTP/2 **client** preface, yet it plays the HTTP/2 **server**: the
proxy opens odd-numbered streams and the worker answers them.  ``h2`` ties the
preface direction to the role, so each role needs one adjustment:

* role ``"server"`` (worker): ``H2Connection(client_side=False)`` expects to
  *receive* the preface.  We write the preface ourselves, ahead of h2's
  SETTINGS, and feed h2 a copy of it so its frame buffer is satisfied; the
  proxy never sends one.
* role ``"client"`` (proxy): ``H2Connection(client_side=True)`` emits the
  preface in ``initiate_connection()``.  We strip it from the output and
  consume the worker's preface from the input before h2 sees the bytes.

It also fixes four behaviours of h2 4.x that a tunnel cannot live with:

* a HEADERS frame beyond SETTINGS_MAX_CONCURRENT_STREAMS raises
  ``TooManyStreamsError`` *before* HPACK decoding, which, unhandled, kills the
  connection (and, caught naively, desynchronises the HPACK decoder).  Here
  the block is still decoded and only that stream gets RST_STREAM(REFUSED_STREAM);
* after *receiving* GOAWAY h2 refuses to send on streams still in flight.
  GOAWAY only stops *new* streams (RFC 9113 §6.8), so here it is reported as
  an event without closing the connection state machine;
* the first frame from the peer must be SETTINGS (RFC 9113 §3.4), which h2
  does not check;
* a malformed request (invalid header fields, DATA disagreeing with
  content-length) is a stream error (RFC 9113 §8.1.1); h2 raises a connection
  error, which would kill every stream of the tunnel.  The same holds for a
  malformed *response* in the client (proxy) role, where an invalid
  ``:status`` (not three digits in 100-599, or 101) counts as malformed too:
  RST_STREAM(PROTOCOL_ERROR) for that stream, the tunnel's other streams go on.

Both roles also rate-limit the control frames that force a reply (PING and
SETTINGS without ACK): beyond ``control_frame_burst`` at once or
``control_frame_rate`` per second sustained, the peer is flooding
(CVE-2019-9512 / CVE-2019-9515) and gets GOAWAY(ENHANCE_YOUR_CALM).  Frames that
cost work without progress (empty DATA without END_STREAM, PRIORITY, unknown
types: CVE-2019-9518) are charged to the same bucket.

Abuse limits ("hard to break", issue 6), all cheap on the hot path:

* an oversized frame is refused (FRAME_SIZE_ERROR) as soon as its 9-byte
  header is in, not after h2 buffered up to 16 MiB of payload;
* a header block (HEADERS + CONTINUATION) may grow to 4x
  ``max_header_list_size`` bytes before it is ENHANCE_YOUR_CALM (CONTINUATION
  flood, CVE-2024-27316 class); h2 itself stops at 64 frames (PROTOCOL_ERROR);
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
* a WINDOW_UPDATE of 0 on a stream is a stream error (RFC 9113 §6.9), not the
  connection error h2 makes of it; a SETTINGS ACK with a payload is
  FRAME_SIZE_ERROR (§6.5), not PROTOCOL_ERROR;
* worker role: app calls still running for streams that already ended
  (``lingering_handlers``, kept by the tunnel) hold the stream budget: at
  MAX_CONCURRENT_STREAMS of them new streams get REFUSED_STREAM;
* more than ``max_output_backlog`` bytes queued for a peer that does not read
  (its PINGs, SETTINGS and RST-eliciting frames keep adding replies) closes the
  tunnel with ENHANCE_YOUR_CALM instead of growing memory.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import hyperframe.exceptions
from h2.errors import ErrorCodes
from hyperframe.frame import PriorityFrame, RstStreamFrame, WindowUpdateFrame

from .errors import ProtocolViolation

__all__ = ["PREFACE", "ProtocolSettings", "RequestRejected", "StreamRefused", "TunnelDead", "TunnelProtocol"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SETTINGS_FRAME_TYPE = 0x4
Role = Literal["server", "client"]


def _install_cheap_raw_data_repr() -> bool:
    """Performance: make hyperframe's DATA-frame repr hexlify only the bytes it shows.

    h2 4.x evaluates ``repr(frame)`` for every frame it receives, for a trace
    log call that does nothing (``H2Connection._receive_frame``).  hyperframe's
    repr of a DATA frame hexlifies the *whole* payload and then keeps 20 hex
    digits: ~14 µs per 16 KiB frame, about a third of the worker's CPU on an
    upload and of the proxy's on a download (benchmarks/RESULTS.md).  This
    replacement hexlifies the first 11 bytes only, which yields the very same
    string; it is installed only if it matches the original on sample inputs
    (so a hyperframe with a different repr is left alone).  Returns True if installed.
    """
    import binascii

    import hyperframe.frame as hf

    original = getattr(hf, "_raw_data_repr", None)
    if original is None or getattr(original, "_rhttp_cheap", False):
        return original is not None

    def _raw_data_repr(data: Any) -> str:
        if not data:
            return "None"
        r = binascii.hexlify(data[:11]).decode("ascii")  # 22 hex digits: more than the 20 shown
        if len(r) > 20:
            r = r[:20] + "..."
        return "<hex:" + r + ">"

    _raw_data_repr._rhttp_cheap = True  # type: ignore[attr-defined]
    samples = (None, b"", b"\x01", bytes(range(10)), bytes(range(11)), bytes(range(12)), bytes(range(256)) * 64,
               memoryview(bytes(range(40))))
    try:
        if all(original(x) == _raw_data_repr(x) for x in samples):
            hf._raw_data_repr = _raw_data_repr
            return True
    except Exception:  # pragma: no cover - an unexpected hyperframe: leave it alone
        pass
    return False


_install_cheap_raw_data_repr()


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


def _error_code_from_int(code: int) -> ErrorCodes | int:
    try:
        return ErrorCodes(code)
    except ValueError:
        return code


def _valid_status(headers: list[tuple[bytes, bytes]]) -> bool:
    """A response's :status is three digits in 100-599 and not 101 (RFC 9110 §15, RFC 9113 §8.6)."""
    for name, value in headers:
        if name == b":status":
            return len(value) == 3 and value.isdigit() and 100 <= int(value) <= 599 and value != b"101"
    return False  # (h2 already rejects a response without :status)


class StreamRefused(h2.events.Event):
    """A peer-initiated stream was refused (beyond MAX_CONCURRENT_STREAMS or while draining)."""

    def __init__(self, stream_id: int, error_code: ErrorCodes, abusive: bool = False) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        #: The peer ignored our advertised limit (counts toward ``max_resets``);
        #: False for refusals that are our doing (draining, busy).
        self.abusive = abusive

    def __repr__(self) -> str:
        return f"<StreamRefused stream_id:{self.stream_id}, error_code:{self.error_code!r}>"


class RequestRejected(h2.events.Event):
    """Worker role: a request was answered by the core itself (431) and never becomes a stream event."""

    def __init__(self, stream_id: int, status: int, reason: str) -> None:
        self.stream_id = stream_id
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"<RequestRejected stream_id:{self.stream_id}, status:{self.status}, reason:{self.reason!r}>"


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


class _ZeroWindowUpdate:
    """Stand-in for a WINDOW_UPDATE of 0 on a stream, which hyperframe refuses to parse."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id

    def __repr__(self) -> str:
        return f"_ZeroWindowUpdate(stream_id={self.stream_id})"


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, with the RFC's error for two frames hyperframe refuses to parse.

    * A zero WINDOW_UPDATE on a stream is a *stream* error (RFC 9113 §6.9; only
      stream 0's is a connection error); h2 made it a connection error.  The
      frame is still in ``_data`` when the parse fails (h2 consumes a frame
      only once parsed), so it is taken off here and handed on as a stand-in.
    * A SETTINGS ACK with a payload is FRAME_SIZE_ERROR (§6.5), not PROTOCOL_ERROR.

    Only the (rare) failure path costs anything.
    """

    def __next__(self) -> Any:
        try:
            return _h2_frame_buffer_next(self)
        except h2.exceptions.ProtocolError as e:
            data = self._data
            if not isinstance(e.__cause__, hyperframe.exceptions.InvalidDataError) or len(data) < 9:
                raise
            ftype, length = data[3], data[0] << 16 | data[1] << 8 | data[2]
            if ftype == 0x8 and length == 4 and len(data) >= 13 and not self._headers_buffer:
                sid = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
                if sid and not int.from_bytes(data[9:13], "big") & 0x7FFFFFFF:
                    del data[:13]
                    return _ZeroWindowUpdate(sid)
            elif ftype == 0x4 and data[4] & 0x1 and length:
                raise h2.exceptions.FrameDataMissingError("SETTINGS ACK with a payload") from e
            raise


class TunnelDead(ProtocolViolation):
    """The peer did not answer a PING in time."""


# Called directly (not through super()) on the per-frame path.
_h2_frame_buffer_next = h2.frame_buffer.FrameBuffer.__next__
_h2_receive_frame = h2.connection.H2Connection._receive_frame


class _H2Connection(h2.connection.H2Connection):
    """h2's connection with the reverse-tunnel fixes described in the module doc."""

    #: Set by the owner once it sent GOAWAY: new peer streams are refused.
    draining = False
    #: How many closed streams h2 remembers (to tell a late frame on a stream
    #: it reset -- a stream error -- from one on a stream closed normally).
    #: h2's 65536 cost ~7-9 MiB per tunnel once a tunnel had served 65k
    #: streams (an OrderedDict, ~120 B per entry): the soak benchmark's RSS grew
    #: +15-17 % over 6 minutes with it, +2 % with 1024.  4096 still covers
    #: seconds of history at thousands of streams per second, far beyond the
    #: round trip in which frames sent before our RST_STREAM can arrive.
    MAX_CLOSED_STREAMS = 4096
    #: Flood guard (token bucket over non-ACK PING and SETTINGS frames); set
    #: by TunnelProtocol.  ``now`` is the time of the bytes being fed (sans-I/O).
    flood_rate = 0.0
    flood_burst = 0.0
    _flood_tokens = 0.0
    _flood_at = 0.0
    now = 0.0
    #: Worker role, set by TunnelProtocol: header limits answered with 431 (0 = off).
    max_header_count = 0
    max_header_list = 0
    #: App calls still running for streams that already ended (maintained by
    #: the tunnel): a Python thread cannot be killed, so a stream reset or timed
    #: out under a stuck app frees its h2 slot but not its thread.  At
    #: MAX_CONCURRENT_STREAMS of them new streams are refused, which bounds the
    #: app pool's queue per tunnel whatever the peer resets.
    lingering_handlers = 0
    #: Streams reset during the current read: the tunnel counts a reset stream
    #: as lingering only after the read, so the refusal check adds these.
    resets_this_read = 0
    #: Worker role: token bucket over stream resets (set by TunnelProtocol; None = unlimited).
    reset_bucket: _TokenBucket | None = None

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)
        table: dict[Any, Any] = self._frame_dispatch_table
        table[_ZeroWindowUpdate] = self._receive_zero_window_update

    def _receive_frame(self, frame: Any) -> list[h2.events.Event]:
        events: list[h2.events.Event] = _h2_receive_frame(self, frame)
        if events and not self.config.client_side:
            # Every stream reset the peer causes -- its RST_STREAM (Rapid Reset) or
            # one its frames force on us (MadeYouReset: h2's stream errors, ours,
            # refusals past MAX_CONCURRENT_STREAMS) -- is charged here, per frame,
            # so a single read cannot buy more resets than the bucket holds.
            bucket = self.reset_bucket
            ev: Any
            for ev in events:
                t = type(ev)
                if t is h2.events.StreamReset or (t is StreamRefused and ev.abusive):
                    if t is h2.events.StreamReset:
                        self.resets_this_read += 1
                    if bucket is not None and not bucket.take(self.now):
                        raise h2.exceptions.DenialOfServiceError(
                            f"more than {bucket.capacity:g} stream resets in {bucket.window:g}s")
        return events

    def _refuse(self, frame: Any, code: ErrorCodes, abusive: bool = False) -> tuple[list[Any], list[h2.events.Event]]:
        # Decode anyway: the HPACK dynamic table must see every header block.
        h2.connection._decode_headers(self.decoder, frame.data)
        self.highest_inbound_stream_id = frame.stream_id
        self._closed_streams[frame.stream_id] = h2.stream.StreamClosedBy.SEND_RST_STREAM
        rst = RstStreamFrame(frame.stream_id)
        rst.error_code = code
        return [rst], [StreamRefused(frame.stream_id, code, abusive)]

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        sid = frame.stream_id
        if (
            sid not in self.streams
            and sid % 2 == (1 if not self.config.client_side else 0)
            and sid > self.highest_inbound_stream_id
        ):
            if self.draining:
                return self._refuse(frame, ErrorCodes.REFUSED_STREAM)
            if self.open_inbound_streams >= self.local_settings.max_concurrent_streams:
                # The peer ignores the limit we advertised: abusive (Rapid Reset's cousin).
                return self._refuse(frame, ErrorCodes.REFUSED_STREAM, abusive=True)
            if self.lingering_handlers + self.resets_this_read >= self.local_settings.max_concurrent_streams:
                return self._refuse(frame, ErrorCodes.REFUSED_STREAM)
        # Client (proxy) role: only a response on a stream *we* opened can be a
        # stream error; HEADERS opening a stream the worker may not open (it
        # never may: push is disabled) stays a connection error (RFC 9113 §5.1.1).
        ours = self.config.client_side and sid % 2 == 1 and sid in self.streams
        # (h2 re-reads content-length from trailers, i.e. forgets it: keep it)
        expected = getattr(self.streams.get(sid), "_expected_content_length", None)
        try:
            frames, events = super()._receive_headers_frame(frame)
        except h2.exceptions.ProtocolError as e:
            stream = self.streams.get(sid)
            # h2 raises a plain ProtocolError (no __cause__) when a decoded
            # message fails header validation: uppercase or invalid names, CR/LF/NUL
            # in values, connection-specific fields, bad or missing pseudo-headers,
            # trailers without END_STREAM, END_STREAM on a 1xx.  RFC 9113 §8.1.1
            # makes that a *stream* error; unhandled it killed the whole tunnel.
            # The block was decoded, so HPACK is in sync: reset just this stream.
            # Subclasses (flow control, closed stream, DoS) and HPACK/state
            # failures (which carry a __cause__) stay connection errors.  Worker
            # role: a malformed request; proxy role: a malformed response.
            if (type(e) is not h2.exceptions.ProtocolError or e.__cause__ is not None
                    or stream is None or (self.config.client_side and not ours)):
                raise
            return self._malformed(stream, [])
        if self.max_header_count:
            rejected = self._check_header_limits(sid, frame, frames, events)
            if rejected is not None:
                return rejected
        if ours:
            # h2 does not check the :status value: "abc", "99", "1000" or 101
            # (which HTTP/2 removed, RFC 9113 §8.6) make the response malformed.
            for ev in events:
                if isinstance(ev, (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)):
                    if not _valid_status(ev.headers):
                        return self._malformed(self.streams[sid], frames)
        if "END_STREAM" in frame.flags and (not self.config.client_side or ours):
            # h2 checks content-length only when DATA arrives: a request that
            # announced a body and ended on its HEADERS (or trailers) without
            # it is malformed too (RFC 9113 §8.1.1).  For a response only
            # trailers count: a HEAD or 304 response may announce a length
            # and carry no body.
            stream = self.streams.get(sid)
            if expected is None and not self.config.client_side:  # the request's own HEADERS
                expected = getattr(stream, "_expected_content_length", None)
            if stream is not None and expected is not None \
                    and expected != getattr(stream, "_actual_content_length", expected):
                return self._malformed(stream, frames)
        return frames, events

    def _check_header_limits(self, sid: int, frame: Any, frames: list[Any], events: list[h2.events.Event]
                             ) -> tuple[list[Any], list[h2.events.Event]] | None:
        """Worker role: 431 for a request above the header limits; a stream error for such trailers."""
        ev: Any
        for ev in events:
            t = type(ev)
            if t is h2.events.RequestReceived or t is h2.events.TrailersReceived:
                headers = ev.headers
                n = len(headers)
                # Cheap bound first, so a typical request does no per-field work: a
                # field decodes to at most 32 + one dynamic-table entry + 8/5 of its
                # literal octets (Huffman's shortest code is 5 bits).
                if n <= self.max_header_count and \
                        n * (32 + self.decoder.max_allowed_table_size) + 2 * len(frame.data) <= self.max_header_list:
                    return None
                why = self._over_header_limits(headers)
                if why is None:
                    return None
                stream = self.streams[sid]
                if t is h2.events.TrailersReceived:
                    # Beyond the advertised SETTINGS_MAX_HEADER_LIST_SIZE a
                    # message may be "treated as malformed" (RFC 9113 §10.5.1).
                    return self._malformed(stream, frames)
                # RFC 9113 §10.5.1: "can send an HTTP 431".  The block was
                # decoded, HPACK is in sync: only this stream is answered.
                self.send_headers(sid, [(b":status", b"431"), (b"content-length", b"0")], end_stream=True)
                if not stream.closed:
                    # The request body is not wanted (RFC 9113 §8.1).
                    self.reset_stream(sid, ErrorCodes.NO_ERROR)
                rest = [e for e in events if e is not ev]
                return frames, [*rest, RequestRejected(sid, 431, why)]
        return None

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
        size = 32 * n + sum(map(len, itertools.chain.from_iterable(headers)))
        if size > self.max_header_list:
            return f"a {size}-byte header list (max_header_list_size {self.max_header_list})"
        return None

    def _receive_zero_window_update(self, frame: _ZeroWindowUpdate) -> tuple[list[Any], list[h2.events.Event]]:
        # RFC 9113 §6.9: a zero increment on a stream is a *stream* error
        # (PROTOCOL_ERROR).  On an idle stream it stays a connection error, on
        # a closed one it is ignored, as for any WINDOW_UPDATE.
        events = self.state_machine.process_input(h2.connection.ConnectionInputs.RECV_WINDOW_UPDATE)
        try:
            stream = self._get_stream_by_id(frame.stream_id)
        except h2.exceptions.StreamClosedError:
            return [], events
        if stream.closed:
            return [], events
        return self._stream_error(stream, ErrorCodes.PROTOCOL_ERROR, [])

    def _stream_error(self, stream: Any, code: ErrorCodes,
                      frames: list[Any]) -> tuple[list[Any], list[h2.events.Event]]:
        self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_RST_STREAM)
        frames = [*frames, *stream.reset_stream(code)]
        return frames, [h2.events.StreamReset(stream_id=stream.stream_id, error_code=code, remote_reset=False)]

    def _malformed(self, stream: Any, frames: list[Any]) -> tuple[list[Any], list[h2.events.Event]]:
        """Reset a peer's malformed message with PROTOCOL_ERROR (a stream error)."""
        self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_RST_STREAM)
        if stream.closed:
            # Client role: a malformed response that carried END_STREAM closed
            # the stream before h2 validated it.  Still tell the peer (RST_STREAM
            # is allowed shortly after END_STREAM, RFC 9113 §5.1) and make any
            # late frame on it a stream error, not a connection error.
            rst = RstStreamFrame(stream.stream_id)
            rst.error_code = ErrorCodes.PROTOCOL_ERROR
            stream.state_machine.stream_closed_by = h2.stream.StreamClosedBy.SEND_RST_STREAM
            frames = [*frames, rst]
        else:
            frames = [*frames, *stream.reset_stream(ErrorCodes.PROTOCOL_ERROR)]
        return frames, [h2.events.StreamReset(stream_id=stream.stream_id, error_code=ErrorCodes.PROTOCOL_ERROR,
                                              remote_reset=False)]

    def _receive_data_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        if not frame.flow_controlled_length and "END_STREAM" not in frame.flags:
            # An empty DATA frame carries nothing and costs a state-machine pass
            # (CVE-2019-9518 empty-frames flood): charged like a control frame.
            self._control_frame("empty DATA")
        try:
            return super()._receive_data_frame(frame)
        except h2.exceptions.InvalidBodyLengthError:
            # DATA disagreeing with the content-length is a malformed message: a
            # stream error (RFC 9113 §8.1.1), not a reason to kill every other
            # stream of the tunnel.  Both roles (request or response body).
            stream = self.streams.get(frame.stream_id)
            if stream is None:
                raise
            frames: list[Any] = []
            # This frame is never delivered: give its bytes back to the connection window.
            inc = self._inbound_flow_control_window_manager.process_bytes(frame.flow_controlled_length)
            if inc:
                wu = WindowUpdateFrame(0)
                wu.window_increment = inc
                frames.append(wu)
            return self._malformed(stream, frames)

    # -- flood guard (CVE-2019-9512 PING flood, CVE-2019-9515 SETTINGS flood) --

    def _control_frame(self, kind: str) -> None:
        """Charge one reply-forcing frame to the peer's token bucket."""
        if self.flood_rate <= 0:
            return
        elapsed = max(0.0, self.now - self._flood_at)
        self._flood_at = self.now
        tokens = min(self.flood_burst, self._flood_tokens + elapsed * self.flood_rate)
        if tokens < 1.0:
            # A ProtocolError subclass with ENHANCE_YOUR_CALM: h2 queues the GOAWAY.
            raise h2.exceptions.DenialOfServiceError(
                f"{kind} flood: more than {self.flood_burst:g} at once or {self.flood_rate:g}/s")
        self._flood_tokens = tokens - 1.0

    def _receive_ping_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        if "ACK" not in frame.flags:
            self._control_frame("PING")
        return super()._receive_ping_frame(frame)

    def _receive_settings_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        if "ACK" not in frame.flags:
            self._control_frame("SETTINGS")
        return super()._receive_settings_frame(frame)

    def _receive_priority_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        if type(frame) is PriorityFrame:  # (h2 also calls this for HEADERS carrying PRIORITY)
            self._control_frame("PRIORITY")
        return super()._receive_priority_frame(frame)

    def _receive_unknown_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        self._control_frame("unknown-type frame")
        return super()._receive_unknown_frame(frame)

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        # Report GOAWAY without moving to CLOSED: streams at or below the
        # peer's last-stream-id still complete (RFC 9113 §6.8).
        event = h2.events.ConnectionTerminated()
        event.error_code = _error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class TunnelProtocol:
    """One HTTP/2 connection of a reverse tunnel, without I/O.

    Thread model: not thread-safe.  The owner (``_tunnel.Tunnel``) calls every
    method, and touches :attr:`h2`, only while holding its tunnel lock.
    """

    def __init__(self, role: Role, settings: ProtocolSettings | None = None) -> None:
        self.role: Role = role
        self.settings = settings or ProtocolSettings()
        # Outbound header normalization/validation is off in the worker (server)
        # role, for speed (benchmarks/RESULTS.md): everything the worker sends is
        # either a constant of ours or built by wsgi._encode_headers, which
        # already lowercases names, refuses non-token names and CR/LF/NUL in
        # values, strips surrounding whitespace, drops connection-specific
        # fields and non-"trailers" TE, puts exactly one :status first, and
        # never-indexes credentials: h2's pass would be the identity
        # (tests/unit/test_outbound_headers.py proves it).  Inbound checks are
        # all kept, and the proxy (client) role keeps every outbound check.
        outbound_checks = role == "client"
        config = h2.config.H2Configuration(
            client_side=(role == "client"),
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            validate_outbound_headers=outbound_checks,
            normalize_outbound_headers=outbound_checks,
        )
        self.h2 = _H2Connection(config=config)
        s = self.settings
        local: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.initial_window_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: s.max_frame_size,
        }
        if role == "client":
            local[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self.h2.local_settings = h2.settings.Settings(client=(role == "client"), initial_values=local)
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
        self._max_header_block = 4 * s.max_header_list_size
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

    # -- start -----------------------------------------------------------

    def initiate(self, now: float) -> None:
        """Queue our preface (worker) and SETTINGS, and open the connection window."""
        self._last_recv = now
        self.h2.now = self.h2._flood_at = now
        if self.h2.reset_bucket is not None:
            self.h2.reset_bucket.stamp = now
        self.h2.initiate_connection()
        if self.role == "server":
            # h2's server frame buffer waits for a preface we will never
            # receive (the proxy does not send one); satisfy it locally.
            self.h2.receive_data(PREFACE)
            out = self.h2.data_to_send()
            self.h2._data_to_send = bytearray(PREFACE + out)
        else:
            out = self.h2.data_to_send()
            if not out.startswith(PREFACE):  # pragma: no cover - h2 contract
                raise AssertionError("h2 did not start with the client preface")
            self.h2._data_to_send = bytearray(out[len(PREFACE):])
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
            if len(self._head) >= 4:
                self._first_frame_checked = True
                if self._head[3] != _SETTINGS_FRAME_TYPE or (len(self._head) >= 5 and self._head[4] & 1):
                    self._fail(ErrorCodes.PROTOCOL_ERROR)
                    raise ProtocolViolation("the peer's first frame was not SETTINGS (RFC 9113 §3.4)")
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            code = getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR)
            # h2 queued GOAWAY already (it calls _terminate_connection)
            self.goaway_sent = True
            raise ProtocolViolation(f"{type(e).__name__}: {e}", code) from e
        except Exception as e:  # hpack / hyperframe errors that h2 does not wrap
            code = _error_code_for(e)
            self._fail(code)
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
        """Limits h2 does not enforce early enough; O(1) per read on the hot path."""
        buf = self.h2.incoming_buffer
        pending = buf._data
        # h2 checks a frame's length only once the whole payload is buffered
        # (up to 16 MiB); the 9-byte header is enough to refuse it.
        if len(pending) >= 9:
            length = pending[0] << 16 | pending[1] << 8 | pending[2]
            if length > buf.max_frame_size:
                self._violation(ErrorCodes.FRAME_SIZE_ERROR,
                                f"a {length}-byte frame announced (MAX_FRAME_SIZE {buf.max_frame_size})")
        # An unfinished header block (HEADERS + CONTINUATION without
        # END_HEADERS) is buffered whole by h2 before HPACK sees it.
        if buf._headers_buffer:
            size = sum(len(f.data) for f in buf._headers_buffer)
            if size > self._max_header_block:
                self._violation(ErrorCodes.ENHANCE_YOUR_CALM,
                                f"a header block beyond {size} bytes without END_HEADERS (CONTINUATION flood)")
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
            try:
                self.h2._terminate_connection(code)
            except h2.exceptions.ProtocolError:  # pragma: no cover - already closed
                pass

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
        from hyperframe.frame import GoAwayFrame

        f = GoAwayFrame(0)
        f.last_stream_id = self.h2.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        f.error_code = code
        # Queued directly: h2.close_connection() would close its state machine
        # and forbid finishing the in-flight streams.
        self.h2._data_to_send += f.serialize()

    def goaway_announce(self) -> None:
        """First half of a graceful shutdown (RFC 9113 §6.8): GOAWAY(2^31-1) and a PING.

        Streams the peer opened before it saw this GOAWAY are still served.
        Once the PING is acknowledged (``drain_acked``) every such stream has
        arrived, and :meth:`goaway` sends the real last-stream-id.
        """
        from hyperframe.frame import GoAwayFrame

        f = GoAwayFrame(0)
        f.last_stream_id = 2**31 - 1
        f.error_code = ErrorCodes.NO_ERROR
        self.h2._data_to_send += f.serialize()
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


def _error_code_for(exc: BaseException) -> ErrorCodes:
    import hpack.exceptions
    import hyperframe.exceptions

    if isinstance(exc, hpack.exceptions.HPACKError):
        return ErrorCodes.COMPRESSION_ERROR
    if isinstance(exc, hyperframe.exceptions.InvalidFrameError):
        return ErrorCodes.FRAME_SIZE_ERROR
    return ErrorCodes.PROTOCOL_ERROR

