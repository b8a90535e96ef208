"""Sans-I/O protocol of a reverse-HTTP/2 tunnel end, for both roles: the API the tunnel calls.

This module never touches a socket, a thread or the clock: it is fed bytes and
``now`` and returns events.  All I/O lives in ``_tunnel.py``, which calls only
the methods of :class:`TunnelProtocol` (with its tunnel lock held).

Reverse HTTP flips who speaks first.  The *worker* dials the connection, so it
writes the HTTP/2 **client** preface, yet it plays the HTTP/2 **server**: the
proxy opens odd-numbered streams and the worker answers them:

* role ``"server"`` (worker): we write the preface ourselves, ahead of our
  SETTINGS; the proxy never sends one.
* role ``"client"`` (proxy): we consume the worker's preface from the input
  before the HTTP/2 core sees the bytes, and send none.

The HTTP/2 state machine is :class:`rhttp_wsgi._h2core.H2Core`, configured
here from the tunnel's options (:func:`core_config`).  This layer adds what is
not HTTP/2 framing: the preface, "the first frame must be SETTINGS" (RFC 9113
§3.4), liveness (PING after idleness, a deadline for its ACK), the two-phase
graceful GOAWAY, and a bound on output queued for a peer that does not read.

Events are the ``h2.events`` classes, plus :class:`StreamRefused` and
:class:`HeadersOverLimit` (a request above ``max_header_count`` or
``max_header_list_size``: the stream's owner answers it, with 431).

How this tunnel departs from h2 4.x, on purpose (details in ``_h2core``):

* a HEADERS frame beyond SETTINGS_MAX_CONCURRENT_STREAMS is still HPACK-decoded
  (the dynamic table must see every block) and only that stream gets
  RST_STREAM(REFUSED_STREAM); h2 raised before decoding, killing the connection;
* receiving GOAWAY is reported as an event without closing the connection:
  GOAWAY only stops *new* streams (RFC 9113 §6.8) and the streams in flight finish;
* a malformed request (invalid header fields, DATA disagreeing with
  content-length) is a stream error (RFC 9113 §8.1.1), not a connection error
  that would kill every stream of the tunnel.  The same holds for a malformed
  *response* in the client (proxy) role, where an invalid ``:status`` (not
  three digits in 100-599, or 101) counts as malformed too:
  RST_STREAM(PROTOCOL_ERROR) for that stream, the tunnel's other streams go on;
* frames that arrive on a stream *we* reset are ignored (§5.1), however many
  streams closed since, not answered with one more RST_STREAM each;
* RST_STREAM on an idle stream is ignored (HAProxy sends it), not a
  connection error; it is charged to the flood budget.

Both roles rate-limit the frames that force a reply or make no progress (PING
and SETTINGS without ACK, empty DATA, PRIORITY, unknown types, RST_STREAM on
idle streams, 1xx responses): beyond ``control_frame_burst`` at once or
``control_frame_rate`` per second sustained, the peer is flooding
(CVE-2019-9512 / CVE-2019-9515 / CVE-2019-9518) and gets GOAWAY(ENHANCE_YOUR_CALM).

Abuse limits, all cheap on the hot path:

* an oversized frame is refused (FRAME_SIZE_ERROR) as soon as its 9-byte
  header is in, not after buffering up to 16 MiB of payload;
* a header block (HEADERS + CONTINUATION) may grow to 4x
  ``max_header_list_size`` bytes before it is ENHANCE_YOUR_CALM (CONTINUATION
  flood, CVE-2024-27316 class), and to 64 CONTINUATION frames (PROTOCOL_ERROR:
  empty ones grow no byte count);
* worker role: a request above ``max_header_count`` fields or
  ``max_header_list_size`` bytes is reported (:class:`HeadersOverLimit`, a
  stream matter: HPACK stayed in sync) and never becomes a request; HPACK only
  aborts (connection error, ENHANCE_YOUR_CALM: its state is then unusable) at
  four times the limit, so an HPACK bomb never expands past that, while a
  merely large request (say 5,000 one-letter fields from an HTTP/1.1 client,
  ~170 KB in RFC accounting) still costs only its own stream;
* worker role: stream resets -- RST_STREAM from the peer, and the resets the
  peer's own frames force on us (malformed request, DATA after END_STREAM,
  window overflow, zero WINDOW_UPDATE, streams beyond MAX_CONCURRENT_STREAMS:
  "Rapid Reset" CVE-2023-44487 and "MadeYouReset" CVE-2025-8671) -- are a token
  bucket of ``max_resets`` per :data:`RESET_WINDOW` seconds; beyond it GOAWAY
  (ENHANCE_YOUR_CALM);
* the peer's SETTINGS_HEADER_TABLE_SIZE is honoured up to 4,096 bytes only, so
  our HPACK encoder never keeps more than that (a peer's 2^32-1 would have it
  keep every distinct field ever sent);
* worker role: app calls still running for streams that already ended
  (:attr:`TunnelProtocol.lingering_handlers`, kept by the tunnel) hold the
  stream budget: at MAX_CONCURRENT_STREAMS of them new streams get REFUSED_STREAM;
* more than ``max_output_backlog`` bytes queued for a peer that does not read
  (its PINGs, SETTINGS and RST-eliciting frames keep adding replies) closes the
  tunnel with ENHANCE_YOUR_CALM instead of growing memory.
"""

from __future__ import annotations

import os
from typing import Any, Literal, NoReturn

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from ._h2core import H2Config, H2Core, HeadersOverLimit, StreamRefused, WindowBudget
from .errors import ProtocolViolation
from .options import TunnelOptions, WorkerOptions

__all__ = ["PREFACE", "HeadersOverLimit", "StreamRefused", "TunnelDead", "TunnelProtocol", "WindowBudget",
           "core_config"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SETTINGS_FRAME_TYPE = 0x4
Role = Literal["server", "client"]

#: The reset budget's window: ``max_resets`` per this many seconds.
RESET_WINDOW = 10.0
#: Largest HPACK dynamic table our encoder keeps (see the module docstring).
MAX_ENCODER_TABLE_SIZE = 4096


def core_config(role: Role, options: TunnelOptions) -> H2Config:
    """The :class:`H2Config` of one tunnel end, from its options.

    Worker-role limits (``max_header_count``, ``max_resets``) come from a
    :class:`~rhttp_wsgi.options.WorkerOptions`; with any other options object they are off.
    """
    worker = options if role == "server" and isinstance(options, WorkerOptions) else None
    return H2Config(
        client_side=role == "client",
        # Outbound header normalisation/validation is off in the worker (server)
        # role, for speed: everything the worker sends is either a constant of
        # ours or built by wsgi._encode_headers, which already lowercases names,
        # refuses non-token names and CR/LF/NUL in values, strips surrounding
        # whitespace, drops connection-specific fields and non-"trailers" TE, and
        # puts exactly one :status first (tests/unit/test_outbound_headers.py
        # proves it).  Inbound checks are all on, in both roles; the proxy
        # (client) role keeps every outbound check.
        validate_outbound=role == "client",
        max_concurrent_streams=options.max_concurrent_streams,
        initial_window_size=options.initial_window_size,
        max_frame_size=options.max_frame_size,
        max_header_list_size=options.max_header_list_size,
        # A compressed block is no longer than its list except for Huffman-bloated
        # binary values (up to 30 bits per octet): 4x leaves room for those.
        max_header_block=4 * options.max_header_list_size,
        # Enforced while decoding, not after.  The worker's stream owner answers a
        # list above the limit with 431 (HPACK kept in sync), so its decoder only
        # gives up -- a connection error that ends every stream of the tunnel -- at
        # four times the limit: an HPACK bomb never expands further (256 KiB of
        # list by default: a few MB and ms).
        hard_max_header_list_size=options.max_header_list_size * (4 if role == "server" else 1),
        soft_max_header_count=worker.max_header_count if worker is not None else 0,
        soft_max_header_list_size=options.max_header_list_size if worker is not None else 0,
        control_frame_rate=options.control_frame_rate,
        control_frame_burst=options.control_frame_burst,
        max_resets=worker.max_resets if worker is not None else 0,
        # RFC 8441: the worker accepts WebSockets (rhttp_wsgi.websocket) when this is advertised.
        enable_connect_protocol=worker.websockets if worker is not None else False,
        reset_window=RESET_WINDOW,
        max_encoder_table_size=MAX_ENCODER_TABLE_SIZE,
        # Receive windows follow the bandwidth-delay product up to these caps (H2Core.acknowledge_received_data).
        max_stream_window=options.max_window_size,
        # (the connection window starts at connection_window_size: initiate())
        max_connection_window=options.max_connection_window_size
        if options.max_connection_window_size > options.connection_window_size else 0,
    )


class TunnelDead(ProtocolViolation):
    """The peer did not answer a PING in time."""


class TunnelProtocol:
    """One HTTP/2 connection of a reverse tunnel, without I/O: the protocol API the tunnel calls.

    Thread model: not thread-safe.  The owner (``_tunnel.Tunnel``) calls every
    method only while holding its tunnel lock.  ``now`` is always fed in.

    Connection: :meth:`initiate`, :meth:`receive`, :meth:`poll_timers`,
    :meth:`data_to_send` / :meth:`has_output`, :meth:`fail`, :meth:`goaway`,
    :meth:`goaway_announce`, :meth:`stop_new_streams`; state read from
    :attr:`settings_received`, :attr:`goaway_received`, :attr:`goaway_sent`,
    :attr:`drain_acked`.

    Streams: :meth:`open_stream` (client role), :meth:`reset_stream`,
    :attr:`max_outbound_frame_size`, :attr:`lingering_handlers`,
    :meth:`open_inbound_streams`, :meth:`peer_max_concurrent_streams`,
    :meth:`peer_max_header_list_size`, and these, bound straight to the core's
    methods (the per-frame calls cost no extra layer):

    * ``send_headers(stream_id, headers, end_stream=False)``: a response, trailers
      (``end_stream`` required), or more of a request opened by :meth:`open_stream`;
    * ``send_data(stream_id, data, end_stream=False)``: one DATA frame, within
      ``outbound_window(stream_id)`` and :attr:`max_outbound_frame_size`;
    * ``end_stream(stream_id)``: END_STREAM on an empty DATA frame;
    * ``acknowledge_received_data(n, stream_id, now=None)``: the consumer took ``n`` bytes
      (at ``now``); flow-control credit goes back when worth a WINDOW_UPDATE, and the
      windows grow toward the bandwidth-delay product (see :meth:`receive_windows`);
    * ``outbound_window(stream_id) -> int``: what may be sent on the stream now;
    * ``expected_content_length(stream_id) -> int | None``: the received message's
      content-length (None: absent, or the stream is not open);
    * ``data_to_send() -> bytes`` and ``has_output() -> bool``: the queued output;
    * ``handler_lingered()`` / ``handler_returned()``: a stream ended while its
      handler still runs (+1) / that handler returned (-1), see :attr:`lingering_handlers`;
    * ``stop_new_streams()``: refuse every stream the peer opens from now on;
    * ``release_window_growth()``: the tunnel is gone: give the connection window's growth back to
      the process's :class:`~rhttp_wsgi._h2core.WindowBudget`.

    Send methods raise ``h2.exceptions`` (``StreamClosedError``, ``FlowControlError``,
    ``FrameTooLargeError``, ``ProtocolError``) on misuse, as h2 does.
    """

    def __init__(self, role: Role, options: TunnelOptions, budget: WindowBudget | None = None) -> None:
        self.role: Role = role
        #: The options this tunnel end was built from (read-only).
        self.options = options
        #: The HTTP/2 state machine.  For tests and diagnostics: the tunnel calls the methods here.
        #: ``budget``: the process's allowance for connection-window growth (shared by its tunnels).
        self.core = core = H2Core(core_config(role, options), budget)
        self._ping_interval = options.ping_interval
        self._ping_timeout = options.ping_timeout
        self._max_backlog = options.max_output_backlog
        self._connection_window = options.connection_window_size
        self._preface_pending = PREFACE if role == "client" else b""
        self._first_frame_checked = False
        self._head = b""
        #: The peer's first SETTINGS arrived.
        self.settings_received = False
        #: The peer's GOAWAY, once received.
        self.goaway_received: h2.events.ConnectionTerminated | None = None
        #: We sent a GOAWAY (graceful or not).
        self.goaway_sent = False
        #: The PING that follows :meth:`goaway_announce` was acknowledged.
        self.drain_acked = False
        # liveness
        self._last_recv = 0.0
        self._ping_payload: bytes | None = None
        self._ping_deadline = 0.0
        #: Payload of the PING that ends the first half of a graceful GOAWAY.
        self._drain_ping: bytes | None = None
        # The per-stream calls go straight to the core: the API costs no extra call.
        self.send_headers = core.send_headers
        self.send_data = core.send_data
        self.end_stream = core.end_stream
        self.acknowledge_received_data = core.acknowledge_received_data
        self.outbound_window = core.local_flow_control_window
        self.expected_content_length = core.expected_content_length
        self.data_to_send = core.data_to_send
        self.has_output = core.has_output
        self.handler_lingered = core.handler_lingered
        self.release_window_growth = core.release_window_growth
        self.handler_returned = core.handler_returned
        self.stop_new_streams = core.stop_new_streams
        self._receive_data = core.receive_data
        self._pending_output = core.pending_output

    # -- start -----------------------------------------------------------

    def initiate(self, now: float) -> None:
        """Queue our preface (worker) and SETTINGS, and open the connection window."""
        self._last_recv = now
        # The worker dialled, so its preface goes first, whatever its HTTP/2 role.
        self.core.initiate_connection(preamble=PREFACE if self.role == "server" else b"", now=now)
        delta = self._connection_window - 65535
        if delta > 0:
            self.core.increment_flow_control_window(delta)

    # -- input -----------------------------------------------------------

    def receive(self, data: bytes | memoryview, now: float) -> list[h2.events.Event]:
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
                self._violation(ErrorCodes.PROTOCOL_ERROR, "peer did not send the HTTP/2 client preface")
            self._preface_pending = self._preface_pending[take:]
            data = data[take:]
            if not data:
                return []
        if not self._first_frame_checked:
            self._head += bytes(data[: 9 - len(self._head)])
            # Type (byte 4) and flags (byte 5): a first SETTINGS *ACK* is as wrong as any other frame,
            # however the bytes are split across reads.
            if len(self._head) >= 5:
                self._first_frame_checked = True
                if self._head[3] != _SETTINGS_FRAME_TYPE or self._head[4] & 1:
                    self._violation(ErrorCodes.PROTOCOL_ERROR,
                                    "the peer's first frame was not SETTINGS (RFC 9113 §3.4)")
        try:
            events = self._receive_data(data, now)
        except h2.exceptions.ProtocolError as e:
            # The core queued GOAWAY already.
            self.goaway_sent = True
            raise ProtocolViolation(f"{type(e).__name__}: {e}",
                                    getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR)) from e
        # Replies (PING/SETTINGS ACKs, RST_STREAMs, WINDOW_UPDATEs) pile up in the
        # core while the writer is blocked on a peer that does not read: checked
        # once per read, O(1).
        backlog = self._pending_output()
        if backlog > self._max_backlog:
            self._violation(ErrorCodes.ENHANCE_YOUR_CALM, f"{backlog} bytes queued for a peer that is not reading them")
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

    def _violation(self, code: ErrorCodes, message: str) -> NoReturn:
        self.fail(code)
        raise ProtocolViolation(message, code)

    # -- connection ------------------------------------------------------

    def fail(self, code: ErrorCodes) -> None:
        """Connection error: queue GOAWAY(``code``) once; the connection is then dead."""
        if not self.goaway_sent:
            self.goaway_sent = True
            self.core.terminate(code)

    def goaway(self, code: ErrorCodes = ErrorCodes.NO_ERROR, *, last_stream_id: int | None = None) -> None:
        """Send GOAWAY and refuse new streams; with NO_ERROR the in-flight streams are still served."""
        self.core.stop_new_streams()
        if self.goaway_sent and code == ErrorCodes.NO_ERROR:
            return
        self.goaway_sent = True
        self.core.send_goaway(self.core.highest_inbound_stream_id if last_stream_id is None else last_stream_id,
                              code)

    def goaway_announce(self) -> None:
        """First half of a graceful shutdown (RFC 9113 §6.8): GOAWAY(2^31-1) and a PING.

        Streams the peer opened before it saw this GOAWAY are still served.
        Once the PING is acknowledged (:attr:`drain_acked`) every such stream has
        arrived, and :meth:`goaway` sends the real last-stream-id.
        """
        self.core.send_goaway(2**31 - 1, ErrorCodes.NO_ERROR)
        self._drain_ping = os.urandom(8)
        self.core.ping(self._drain_ping)

    # -- time ------------------------------------------------------------

    def poll_timers(self, now: float) -> float:
        """Send a PING after idleness; raise :class:`TunnelDead` when an ACK is overdue.

        Returns the next time this should be called.
        """
        if self._ping_payload is not None:
            if now >= self._ping_deadline:
                raise TunnelDead(f"no PING ACK within {self._ping_timeout:g}s", ErrorCodes.NO_ERROR)
            return self._ping_deadline
        idle_until = self._last_recv + self._ping_interval
        if now >= idle_until:
            self._ping_payload = os.urandom(8)
            self._ping_deadline = now + self._ping_timeout
            self.core.ping(self._ping_payload)
            return self._ping_deadline
        return idle_until

    # -- streams ---------------------------------------------------------

    def open_stream(self, headers: list[Any], end_stream: bool) -> int:
        """Client role: open the next stream with this request's HEADERS; returns its id.

        Raises ``h2.exceptions.NoAvailableStreamIDError`` once the ids are used up and
        ``TooManyStreamsError`` at the peer's SETTINGS_MAX_CONCURRENT_STREAMS (the stream
        is then not opened, and its id not used).
        """
        core = self.core
        sid = core.get_next_available_stream_id()
        core.send_headers(sid, headers, end_stream=end_stream)
        return sid

    def reset_stream(self, stream_id: int, code: ErrorCodes) -> None:
        """RST_STREAM(``code``) on an open stream; nothing for a stream already closed."""
        try:
            self.core.reset_stream(stream_id, code)
        except h2.exceptions.StreamClosedError:
            pass

    def receive_windows(self) -> tuple[float | None, int, int]:
        """Window tuning, for logs and tests: (smoothed PING round trip in seconds or None,
        the connection's receive window, the largest window a stream has grown to)."""
        core = self.core
        return core.srtt, core.inbound_max, core.stream_window_learned

    @property
    def max_outbound_frame_size(self) -> int:
        """The largest DATA payload the peer accepts (its SETTINGS_MAX_FRAME_SIZE)."""
        return self.core.remote_settings.max_frame_size

    @property
    def lingering_handlers(self) -> int:
        """Handlers still running for ended streams: they hold MAX_CONCURRENT_STREAMS slots (worker)."""
        return self.core.lingering_handlers

    def open_inbound_streams(self) -> int:
        """Streams the peer opened that are not closed yet."""
        return self.core.open_inbound_streams

    def peer_max_concurrent_streams(self) -> int:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS (2^32+1 until it sends one)."""
        return self.core.remote_settings.max_concurrent_streams

    def peer_max_header_list_size(self) -> int | None:
        """The peer's SETTINGS_MAX_HEADER_LIST_SIZE (None: not advertised)."""
        return self.core.remote_settings.max_header_list_size

    def peer_enable_connect_protocol(self) -> bool:
        """The peer advertised SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 (extended CONNECT, RFC 8441)."""
        return bool(self.core.remote_settings.enable_connect_protocol)
