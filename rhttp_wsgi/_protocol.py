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
  error, which would kill every stream of the tunnel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
from h2.errors import ErrorCodes
from hyperframe.frame import RstStreamFrame, WindowUpdateFrame

from .errors import ProtocolViolation

__all__ = ["PREFACE", "TunnelProtocol", "ProtocolSettings", "StreamRefused", "TunnelDead"]

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


def _error_code_from_int(code: int) -> ErrorCodes | int:
    try:
        return ErrorCodes(code)
    except ValueError:
        return code


class StreamRefused(h2.events.Event):
    """A peer-initiated stream was refused (beyond MAX_CONCURRENT_STREAMS or while draining)."""

    def __init__(self, stream_id: int, error_code: ErrorCodes) -> None:
        self.stream_id = stream_id
        self.error_code = error_code

    def __repr__(self) -> str:
        return f"<StreamRefused stream_id:{self.stream_id}, error_code:{self.error_code!r}>"


class TunnelDead(ProtocolViolation):
    """The peer did not answer a PING in time."""


class _H2Connection(h2.connection.H2Connection):
    """h2's connection with the reverse-tunnel fixes described in the module doc."""

    #: Set by the owner once it sent GOAWAY: new peer streams are refused.
    draining = False

    def _refuse(self, frame: Any, code: ErrorCodes) -> tuple[list[Any], list[h2.events.Event]]:
        # Decode anyway: the HPACK dynamic table must see every header block.
        h2.connection._decode_headers(self.decoder, frame.data)
        self.highest_inbound_stream_id = frame.stream_id
        self._closed_streams[frame.stream_id] = h2.stream.StreamClosedBy.SEND_RST_STREAM
        rst = RstStreamFrame(frame.stream_id)
        rst.error_code = code
        return [rst], [StreamRefused(frame.stream_id, code)]

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
                return self._refuse(frame, ErrorCodes.REFUSED_STREAM)
        # (h2 re-reads content-length from trailers, i.e. forgets it: keep it)
        expected = getattr(self.streams.get(sid), "_expected_content_length", None)
        try:
            frames, events = super()._receive_headers_frame(frame)
        except h2.exceptions.ProtocolError as e:
            stream = self.streams.get(sid)
            # h2 raises a plain ProtocolError (no __cause__) when a decoded
            # request fails header validation: uppercase or invalid names, CR/LF/NUL
            # in values, connection-specific fields, bad pseudo-headers, trailers
            # without END_STREAM.  RFC 9113 §8.1.1 makes that a *stream* error;
            # unhandled it killed the whole tunnel.  The block was decoded, so
            # HPACK is in sync: reset just this stream.  Subclasses (flow
            # control, closed stream, DoS) and HPACK/state failures (which carry
            # a __cause__) stay connection errors.  Worker (server) role only.
            if (type(e) is not h2.exceptions.ProtocolError or e.__cause__ is not None
                    or stream is None or self.config.client_side):
                raise
            return self._malformed(stream, [])
        if "END_STREAM" in frame.flags and not self.config.client_side:
            # h2 checks content-length only when DATA arrives: a request that
            # announced a body and ended on its HEADERS (or trailers) without
            # it is malformed too (RFC 9113 §8.1.1).
            stream = self.streams.get(sid)
            if expected is None:  # the request's own HEADERS
                expected = getattr(stream, "_expected_content_length", None)
            if stream is not None and expected is not None \
                    and expected != getattr(stream, "_actual_content_length", expected):
                return self._malformed(stream, frames)
        return frames, events

    def _malformed(self, stream: Any, frames: list[Any]) -> tuple[list[Any], list[h2.events.Event]]:
        """Reset a peer's malformed request with PROTOCOL_ERROR (a stream error)."""
        self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_RST_STREAM)
        frames = [*frames, *stream.reset_stream(ErrorCodes.PROTOCOL_ERROR)]
        return frames, [h2.events.StreamReset(stream_id=stream.stream_id, error_code=ErrorCodes.PROTOCOL_ERROR,
                                              remote_reset=False)]

    def _receive_data_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        try:
            return super()._receive_data_frame(frame)
        except h2.exceptions.InvalidBodyLengthError:
            # DATA disagreeing with the request's content-length is a malformed
            # request: a stream error (RFC 9113 §8.1.1), not a reason to kill
            # every other stream of the tunnel.  Worker (server) role only.
            stream = self.streams.get(frame.stream_id)
            if stream is None or self.config.client_side:
                raise
            frames: list[Any] = []
            # This frame is never delivered: give its bytes back to the connection window.
            inc = self._inbound_flow_control_window_manager.process_bytes(frame.flow_controlled_length)
            if inc:
                wu = WindowUpdateFrame(0)
                wu.window_increment = inc
                frames.append(wu)
            return self._malformed(stream, frames)

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
        config = h2.config.H2Configuration(
            client_side=(role == "client"),
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            validate_outbound_headers=True,
            normalize_outbound_headers=True,
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
        # Enforce the header list limit while decoding, not after.
        self.h2.decoder.max_header_list_size = s.max_header_list_size
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
        for ev in events:
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                self.settings_received = True
            elif isinstance(ev, h2.events.PingAckReceived):
                if self._ping_payload is not None and ev.ping_data == self._ping_payload:
                    self._ping_payload = None
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway_received = ev
        return events

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

