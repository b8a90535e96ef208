"""One tunnel: a socket, a TLS session, a protocol core, a reader and a writer thread.

The tunnel is the I/O shell around :class:`~rhttp_wsgi._protocol.TunnelProtocol`
(the sans-I/O HTTP/2 core) and calls only that class's documented API.  It does
not decide what a peer-opened stream becomes: in the server (worker) role it
reports each new stream to its :class:`InboundStreams` (the worker's is
``rhttp_wsgi.streams.StreamPolicy``), which sets the stream's limits, answers it
with a status, or starts a handler for it.

Ownership — who touches what, under which lock:

=============================  ===============================  ==================
state                          threads                          guard
=============================  ===============================  ==================
socket ``recv``                reader only                      none (one reader)
socket ``sendall``/shutdown    writer only (reader: ``close``)  none (one writer)
``TLSSession`` (OpenSSL)       reader (decrypt), writer         ``Tunnel.lock``
                               (encrypt)
``TunnelProtocol`` (H2Core)    reader (events), writer          ``Tunnel.lock``
                               (flush), app threads (headers,
                               credit, reset), owner (drain)
``_channels``/``_ready``/      any of the above                 ``Tunnel.lock``
``_blocked``, flags
``Channel`` buffers and flags  reader (inbound), app thread,    ``Tunnel.lock``
                               writer (outbound)                (``Channel._cond``
                                                                is bound to it)
``Channel.cancelled`` (Event)  any                              itself
stream limits (``Channel``     reader (the stream policy sets   ``Tunnel.lock``
``body_limit``,                them when the stream opens)
``send_stall_limit``,
``set_deadline_locked``)
``_deadlines``, ``_stalls``    reader (arm), writer (expire,    ``Tunnel.lock``
(timer state, the tunnel's)    progress), any (retire)
lingering-handler count        reader (hand-off), app thread    ``Tunnel.lock``
(in the protocol core)         (``handler_done``), retire
=============================  ===============================  ==================

Rules that keep it safe:

* OpenSSL and the HTTP/2 core are touched only with ``Tunnel.lock`` held, so one
  connection object never sees two threads (OpenSSL corrupts records when
  ``SSL_read`` and ``SSL_write`` overlap; H2Core is not thread-safe).
* No lock is ever held across socket I/O or application code: the reader
  ``recv()``s, then locks to decrypt and parse; the writer locks to drain the core
  and encrypt, then unlocks and ``sendall()``s.  App threads lock only to move
  bytes in or out of their channel.  The stream policy's ``*_locked`` hooks run
  under the lock and do neither I/O nor application code; its ``start`` runs
  after the lock is released.
* ``Channel.on_input`` (set by a handler that needs a pollable descriptor: the
  WebSocket's ``fileno()``) runs with the lock held whenever input may have become
  readable; it takes only its own leaf lock and at most writes one byte to a local,
  non-blocking socketpair (it never blocks and never touches the network).
* Per-stream deadlines and the send stall are checked by the writer's existing
  timer loop: no per-request timer or thread.  Their values are per stream, set
  by the stream policy; the tunnel only keeps the clocks.
* App threads block on their own channel condition (backpressure, waiting for
  body bytes); the writer waits on ``_wake``.  All conditions share the one
  lock, so a notify never races a state change.
* Object access goes through methods: a ``Channel`` changes the tunnel's state
  by calling ``Tunnel`` methods (``_credit_locked``, ``_schedule_locked``,
  ``_kick_locked``, ``_retire_locked``, ``_set_deadline_locked``), and the
  tunnel changes a channel's buffers by calling ``Channel`` methods.  The
  tunnel owns the channels' lifecycle flags (``_retired``, ``_handler``)
  because it keeps the registry they describe.
"""

from __future__ import annotations

import collections
import logging
import math
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from ._protocol import HeadersOverLimit, StreamRefused, TunnelProtocol
from .errors import ProtocolViolation, StreamReset, StreamTimeout, TLSSetupError, TunnelClosed
from .options import TunnelOptions
from .tls import TLSSession

__all__ = ["Channel", "InboundStreams", "Tunnel"]

log = logging.getLogger("rhttp_wsgi.tunnel")

#: Most ciphertext one reader pass takes (a bulk transfer: fewer passes, wake-ups and calls per byte).
RECV_SIZE = 1024 * 1024
#: What a pass asks for first, and again after a short read: ``recv(n)`` allocates n bytes first,
#: and above glibc's mmap threshold (128 KiB) that can be an mmap + munmap per call, ~15 µs for
#: a 300-byte request.  A full read means more is waiting: the next asks for RECV_SIZE.
SMALL_RECV = 64 * 1024
#: An app's ``write`` blocks while more than this is queued on its stream.
HIGH_WATER = 512 * 1024
LOW_WATER = 128 * 1024
#: ``Channel.read_chunk`` joins queued chunks smaller than this (a large one goes as it is).
COALESCE = 64 * 1024
#: Most plaintext moved into TLS per writer pass (keeps lock holds short, and
#: buffers small: 1 MiB passes cost ~30% more CPU per byte, see benchmarks/RESULTS.md).
WRITE_BATCH = 256 * 1024
#: After the reader stops, how long the writer may still flush (e.g. GOAWAY)
#: before the socket is cut under a ``sendall`` blocked on a peer that does not read.
FLUSH_GRACE = 1.0
#: Longest wait for the PING ACK between the two GOAWAYs of a graceful drain.
DRAIN_ANNOUNCE_MAX = 1.0
#: Fields of a body-less answer (the stream policy's 413 and 431).
_EMPTY_BODY = (b"content-length", b"0")

Headers = list[tuple[bytes, bytes]]


class InboundStreams(Protocol):
    """What a server-role tunnel asks about the streams its peer opens.

    The worker's implementation is :class:`rhttp_wsgi.streams.StreamPolicy`:
    the one place that decides what a new stream becomes and which limits
    answer it with a status.  The ``*_locked`` hooks run on the reader thread
    with the tunnel lock held (no I/O, no application code); a hook that
    answers a stream (``Channel.answer_locked``/``reset_locked``) ends it, and
    the tunnel then never hands it to :meth:`start`.
    """

    def opened_locked(self, ch: Channel) -> None:
        """A request's HEADERS arrived: set the stream's limits, or answer it now."""

    def over_header_limits_locked(self, ch: Channel, reason: str) -> None:
        """The core decoded a request above the header limits (``reason`` says which).

        ``ch.headers`` is None.  The hook must end the stream (answer or reset):
        the core keeps it open for it.
        """

    def body_over_limit_locked(self, ch: Channel) -> None:
        """The request body grew past ``ch.body_limit``: end the stream."""

    def start(self, ch: Channel) -> None:
        """Hand the stream to its handler (reader thread, no lock held).

        Whoever runs the handler calls ``ch.handler_done()`` when it returns.
        """


class Channel:
    """One stream as seen by the thread that serves it (app thread or forwarder).

    Every public method without ``_locked`` takes the tunnel lock briefly;
    none does socket I/O.  The ``*_locked`` ones are for the stream policy,
    which calls them with the lock held.
    """

    __slots__ = (
        "_cond",
        "_handler",
        "_in",
        "_in_size",
        "_out",
        "_out_end",
        "_out_size",
        "_out_trailers",
        "_retired",
        "_waiting",
        "body_limit",
        "bytes_in",
        "cancelled",
        "early_hints",
        "error",
        "handler",
        "headers",
        "headers_sent",
        "in_ended",
        "input_stopped",
        "on_input",
        "out_done",
        "response",
        "send_stall_limit",
        "stream_id",
        "trailers",
        "tunnel",
    )

    def __init__(self, tunnel: Tunnel, stream_id: int, headers: Headers | None) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id
        self.headers = headers
        #: Created by the first wait (most streams never wait): see _wait_locked.
        self._cond: threading.Condition | None = None
        #: Threads blocked in ``_wait_locked`` (a notify with none is skipped: the
        #: reader would otherwise pay a Condition.notify_all per DATA frame).
        self._waiting = 0
        self._in: collections.deque[bytes] = collections.deque()
        self._in_size = 0
        self.in_ended = False
        self.trailers: Headers | None = None
        self._out: collections.deque[memoryview] = collections.deque()
        self._out_size = 0
        self._out_end = False
        self._out_trailers: Headers | None = None
        self.out_done = False
        self.headers_sent = False
        self.error: BaseException | None = None
        self.cancelled = threading.Event()
        #: Client role: the final response's fields, once they arrived.
        self.response: Headers | None = None
        #: Client role: the fields of the latest 103 (Early Hints) response not
        #: yet taken (see :meth:`wait_response`); other 1xx are dropped.  One
        #: header list at most, whatever the peer sends (the core charges every
        #: 1xx to its flood budget).
        self.early_hints: Headers | None = None
        self.bytes_in = 0
        #: Limits set by the stream policy (0 = none): the most request-body
        #: bytes, and the most seconds the response may wait for flow-control
        #: credit without progress.
        self.body_limit = 0
        self.send_stall_limit = 0.0
        #: What will serve the stream, as the stream policy chose when it opened
        #: (opaque to the tunnel).
        self.handler: Any = None
        self._retired = False
        #: Handed to a handler (app thread) that has not returned yet.
        self._handler = False
        #: The handler will read no more (:meth:`stop_input`): ``read`` returns b''.
        self.input_stopped = False
        #: Called, with ``Tunnel.lock`` held, each time :meth:`input_pending_locked`
        #: may have become true: body bytes arrived, the input ended or was stopped, or
        #: the stream failed (on the reader thread, or whichever thread reset it, timed
        #: it out or closed the tunnel).  It must be quick and never block; any lock it
        #: takes must never be held while acquiring ``Tunnel.lock``.  The WebSocket's
        #: socket (``rhttp_wsgi.websocket``) uses it to keep a descriptor readable.
        self.on_input: Callable[[], None] | None = None

    def _wait_locked(self, timeout: float | None) -> None:
        """Block on this stream's condition (bound to the tunnel lock, created on first use)."""
        cond = self._cond
        if cond is None:
            cond = self._cond = threading.Condition(self.tunnel.lock)
        self._waiting += 1
        try:
            cond.wait(timeout)
        finally:
            self._waiting -= 1

    def _notify_locked(self) -> None:
        if self._waiting:
            assert self._cond is not None
            self._cond.notify_all()

    def handler_done(self) -> None:
        """The handler (app thread) serving this stream returned; whoever runs it calls this last.

        A stream can end (reset, timed out, or simply answered) while its
        handler still runs; until then it counts as *lingering* against the
        tunnel's MAX_CONCURRENT_STREAMS (``TunnelProtocol.lingering_handlers``).
        """
        if not self._handler:  # not handed off by a tunnel (e.g. driven directly)
            return
        t = self.tunnel
        with t.lock:
            if self._handler:
                self._handler = False
                if self._retired:
                    t.proto.handler_returned()

    # -- inbound (body) ------------------------------------------------------

    def read(self, size: int = -1, timeout: float | None = None) -> bytes:
        """Return up to ``size`` body bytes (all buffered bytes if < 0); b'' at the end.

        Blocks until bytes arrive.  Consumed bytes are credited back to the
        peer's flow-control window here, so a slow reader slows the sender.
        """
        t = self.tunnel
        with t.lock:
            self._wait_input_locked(timeout)
            if not self._in:
                return b""
            if size < 0 or size >= self._in_size:
                data = b"".join(self._in) if len(self._in) > 1 else self._in[0]
                self._in.clear()
            else:
                parts = []
                need = size
                while need:
                    chunk = self._in[0]
                    if len(chunk) <= need:
                        parts.append(self._in.popleft())
                        need -= len(chunk)
                    else:
                        parts.append(chunk[:need])
                        self._in[0] = chunk[need:]
                        need = 0
                data = b"".join(parts)
            self._in_size -= len(data)
            t._credit_locked(self.stream_id, len(data))
            return data

    def read_chunk(self, timeout: float | None = None) -> bytes:
        """Return the oldest queued body chunk (one DATA frame's bytes); b'' at the end.

        :meth:`read` without joining large chunks: for a consumer that writes each chunk out at
        once (the proxy's response body), one copy of every byte fewer.  Chunks under
        ``COALESCE`` are joined with the small ones queued after them, up to about that size, so
        small frames still leave in few writes; a large chunk is never copied.
        """
        t = self.tunnel
        with t.lock:
            self._wait_input_locked(timeout)
            queue = self._in
            if not queue:
                return b""
            data = queue.popleft()
            if len(data) < COALESCE and queue:
                parts = [data]
                n = len(data)
                while queue and n < COALESCE and len(queue[0]) < COALESCE:
                    parts.append(queue.popleft())
                    n += len(parts[-1])
                data = b"".join(parts)
            self._in_size -= len(data)
            t._credit_locked(self.stream_id, len(data))
            return data

    def _wait_input_locked(self, timeout: float | None) -> None:
        """Block until body bytes are queued, the input ended or stopped; raise the stream's error."""
        if not self._in and not self.in_ended and self.error is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._in and not self.in_ended and self.error is None and not self.input_stopped:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise StreamTimeout(f"stream {self.stream_id}: no body data within {timeout:g}s")
                self._wait_locked(remaining)
        if self.error is not None:
            raise self.error

    def input_pending_locked(self) -> bool:
        """``read`` would not block: bytes are buffered, or the input ended, was stopped or failed."""
        return bool(self._in) or self.in_ended or self.input_stopped or self.error is not None

    def stop_input(self) -> None:
        """The handler will read no more: ``read`` returns b'' from now on (waking a blocked reader).

        Buffered and later body bytes are credited back to the peer and dropped.
        The stream stays open otherwise: the handler may still write and end it.
        (The worker's drain ends its WebSockets this way.)
        """
        with self.tunnel.lock:
            if self.input_stopped:
                return
            self.input_stopped = True
            self._drop_input_locked()
            self._input_changed_locked()

    def _input_changed_locked(self) -> None:
        self._notify_locked()
        if self.on_input is not None:
            self.on_input()

    # -- outbound ---------------------------------------------------------------

    def send_headers(self, headers: Headers, end_stream: bool = False) -> None:
        t = self.tunnel
        with t.lock:
            self._check_locked()
            t.proto.send_headers(self.stream_id, headers, end_stream=end_stream)
            self._headers_sent_locked(end_stream)
            t._kick_locked()

    def respond(self, headers: Headers, body: bytes) -> None:
        """``send_headers(headers)`` then ``write(body, end=True)``, in one lock hold.

        Performance (benchmarks/RESULTS.md): the writer is woken once for the
        pair, so HEADERS, DATA and END_STREAM leave in one writer pass (one TLS
        encrypt, one ``sendall``) instead of the writer possibly waking between
        the two calls.  Never blocks (``end`` skips the watermark, as in ``write``).
        """
        t = self.tunnel
        with t.lock:
            self._check_locked()
            t.proto.send_headers(self.stream_id, headers, end_stream=False)
            self.headers_sent = True
            if body:
                self._out.append(memoryview(body))
                self._out_size += len(body)
            self._out_end = True
            t._schedule_locked(self)

    def write(self, data: bytes, timeout: float | None = None, end: bool = False) -> None:
        """Queue body bytes (and optionally end the stream); blocks while the peer is slow."""
        t = self.tunnel
        with t.lock:
            self._check_locked()
            if data:
                self._out.append(memoryview(data))
                self._out_size += len(data)
            if end:
                self._out_end = True
            t._schedule_locked(self)
            if self._out_size > HIGH_WATER and not end:
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._out_size > LOW_WATER and self.error is None:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise StreamTimeout(f"stream {self.stream_id}: peer accepted no data for {timeout:g}s")
                    self._wait_locked(remaining)
                self._check_locked()

    def end(self, trailers: Headers | None = None) -> None:
        t = self.tunnel
        with t.lock:
            if self.error is not None or self._out_end:
                return
            self._out_end = True
            self._out_trailers = trailers
            t._schedule_locked(self)

    def reset(self, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """Reset the stream (no-op if it is already finished)."""
        with self.tunnel.lock:
            self.reset_locked(code)

    def wait_response(self, timeout: float | None, *, early_hints: bool = False) -> Headers:
        """Client role: wait for the final response headers.

        With ``early_hints``, a 103 (Early Hints) response that arrives first is
        returned instead (and taken: each is returned once); the caller tells
        them apart by ``:status`` and calls again for the final response.
        """
        t = self.tunnel
        with t.lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.response is None and self.error is None:
                if early_hints and self.early_hints is not None:
                    hints, self.early_hints = self.early_hints, None
                    return hints
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise StreamTimeout(f"stream {self.stream_id}: no response within {timeout:g}s")
                self._wait_locked(remaining)
            if self.response is None:
                assert self.error is not None
                raise self.error
            return self.response

    @property
    def finished(self) -> bool:
        return self._retired

    # -- for the stream policy (lock held) ------------------------------------------

    def expected_length_locked(self) -> int | None:
        """The request's declared content-length (None without one)."""
        return self.tunnel.proto.expected_content_length(self.stream_id)

    def set_deadline_locked(self, seconds: float, what: str) -> None:
        """Reset the stream (CANCEL) if it is still open ``seconds`` from now (0: no deadline).

        ``what`` names the limit in the log line (e.g. ``"request_timeout"``).
        """
        self.tunnel._set_deadline_locked(self, seconds, what)

    def answer_locked(self, status: int) -> None:
        """Answer ``status`` with an empty body in place of a handler, and stop the request body.

        For statuses that refuse the request (413, 431): the stream counts as
        reset (NO_ERROR) for a handler already reading it, and the rest of the
        request body is not wanted (RST_STREAM(NO_ERROR), RFC 9113 §8.1).
        """
        t = self.tunnel
        proto = t.proto
        sid = self.stream_id
        try:
            proto.send_headers(sid, [(b":status", str(status).encode("ascii")), _EMPTY_BODY], end_stream=True)
        except h2.exceptions.StreamClosedError:
            pass  # the peer reset it in the same read (its StreamReset event comes after this one)
        else:
            self.headers_sent = self.out_done = True
            if not self.in_ended:
                proto.reset_stream(sid, ErrorCodes.NO_ERROR)
        self._fail_locked(StreamReset(sid, ErrorCodes.NO_ERROR, by_peer=False))
        t._kick_locked()

    def reset_locked(self, code: ErrorCodes) -> None:
        """Reset the stream with ``code`` (no-op if it is already finished)."""
        if self._retired or self.error is not None:
            return
        t = self.tunnel
        t.proto.reset_stream(self.stream_id, code)
        self._fail_locked(StreamReset(self.stream_id, code, by_peer=False))
        t._kick_locked()

    # -- tunnel side (lock held) -------------------------------------------------

    def _check_locked(self) -> None:
        if self.error is not None:
            raise self.error
        if self.out_done:
            raise StreamReset(self.stream_id, ErrorCodes.STREAM_CLOSED, by_peer=False)

    def _deliver_locked(self, data: bytes, flow_len: int) -> bool:
        """Queue a DATA frame's bytes; True when input grew (the caller then calls
        ``_input_changed_locked``, once per read rather than once per frame)."""
        t = self.tunnel
        pad = flow_len - len(data)
        if self.error is not None or self._retired or self.input_stopped:
            t._credit_locked(self.stream_id, flow_len)
            return False
        if pad:
            t._credit_locked(self.stream_id, pad)
        if not data:
            return False
        limit = self.body_limit
        if limit and self.bytes_in + len(data) > limit:
            t._credit_locked(self.stream_id, len(data))
            streams = t.streams
            if streams is not None:  # (a limit is only ever set by the stream policy)
                streams.body_over_limit_locked(self)
            return False
        self._in.append(data)
        self._in_size += len(data)
        self.bytes_in += len(data)
        return True

    def _ended_locked(self) -> None:
        """The peer ended its side (END_STREAM)."""
        self.in_ended = True
        self._input_changed_locked()
        if self.out_done:
            self.tunnel._retire_locked(self)

    def _informational_locked(self, headers: Headers) -> None:
        """Client role: a 1xx response.  Only the latest 103 is kept (see ``early_hints``)."""
        for name, value in headers:
            if name == b":status":
                if value == b"103":
                    self.early_hints = headers
                    self._notify_locked()
                return

    def _upload_stopped_locked(self) -> None:
        """Client role: the peer answered in full, then RST_STREAM(NO_ERROR) to stop our upload.

        RFC 9113 §8.1: keep the response; only the upload ends (``write()``
        then raises, not by_peer).
        """
        self._out.clear()
        self._out_size = 0
        self._out_end = True
        self.out_done = True
        self._notify_locked()
        self.tunnel._retire_locked(self)

    def _drop_input_locked(self) -> None:
        """Forget buffered body bytes, crediting them back to the peer."""
        unread = self._in_size
        self._in.clear()
        self._in_size = 0
        if unread:
            self.tunnel._credit_locked(self.stream_id, unread)

    def _fail_locked(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._drop_input_locked()
        self._out.clear()
        self._out_size = 0
        self.cancelled.set()
        self._input_changed_locked()
        self.tunnel._retire_locked(self)

    def _headers_sent_locked(self, end_stream: bool) -> None:
        """Our HEADERS went into the core; with END_STREAM our side is done."""
        self.headers_sent = True
        if end_stream:
            self._out_end = self.out_done = True
            self._output_done_locked()

    def _output_done_locked(self) -> None:
        """Our side ended (END_STREAM queued in the core)."""
        t = self.tunnel
        if self.in_ended:
            t._retire_locked(self)
        elif t.proto.role == "server":
            # A complete response before the whole request body: ask the
            # client to stop sending, without error (RFC 9113 §8.1).
            t.proto.reset_stream(self.stream_id, ErrorCodes.NO_ERROR)
            self.in_ended = True
            self._drop_input_locked()
            self._input_changed_locked()
            t._retire_locked(self)

    def _flush_locked(self, budget: int) -> tuple[int, bool]:
        """Move queued bytes into the HTTP/2 core within the peer's windows.

        Returns (bytes moved, blocked on flow control).
        """
        proto = self.tunnel.proto
        sid = self.stream_id
        moved = 0
        out = self._out
        while out and moved < budget:
            window = proto.outbound_window(sid)
            if window <= 0:
                return moved, True
            frame_max = proto.max_outbound_frame_size
            chunk = out[0]
            n = min(len(chunk), window, frame_max)
            last = n == len(chunk) and len(out) == 1 and self._out_end and self._out_trailers is None
            proto.send_data(sid, chunk[:n], end_stream=last)
            if n == len(chunk):
                out.popleft()
            else:
                out[0] = chunk[n:]
            self._out_size -= n
            moved += n
            if last:
                self.out_done = True
        if self._out_size <= LOW_WATER:
            self._notify_locked()
        if out:
            return moved, False
        if self._out_end and not self.out_done:
            if self._out_trailers is not None:
                proto.send_headers(sid, self._out_trailers, end_stream=True)
            else:
                proto.end_stream(sid)
            self.out_done = True
        if self.out_done:
            self._output_done_locked()
        return moved, False


class Tunnel:
    """A live tunnel.  ``run()`` is the reader loop; it starts the writer thread.

    ``options`` (a :class:`~rhttp_wsgi.options.TunnelOptions`, or the
    ``WorkerOptions``/``ProxyOptions`` that extend it) gives the peer's SETTINGS
    deadline (``handshake_timeout``) and the socket send timeout
    (``max(ping_timeout, 1 s)``: a peer that stops reading cannot park the
    writer for longer than it would take to notice it is dead).  ``streams``
    decides about peer-opened streams (server role); without it they are
    refused (REFUSED_STREAM).
    """

    def __init__(
        self,
        sock: socket.socket,
        tls: TLSSession | None,
        proto: TunnelProtocol,
        options: TunnelOptions,
        *,
        name: str = "tunnel",
        streams: InboundStreams | None = None,
        on_ready: Callable[[Tunnel], None] | None = None,
        on_goaway: Callable[[Tunnel, h2.events.ConnectionTerminated], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sock = sock
        self.tls = tls
        self.proto = proto
        self.name = name
        self.streams = streams
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._on_ready = on_ready
        self._on_goaway = on_goaway
        self._clock = clock
        self._settings_deadline = 0.0
        self._settings_timeout = options.handshake_timeout
        self._send_timeout = max(options.ping_timeout, 1.0)
        #: Per-stream deadlines: one queue per (limit name, seconds), each in
        #: arrival order, which is deadline order within a queue (one clock).
        self._deadlines: dict[tuple[str, float], collections.OrderedDict[Channel, float]] = {}
        #: Blocked streams with a send-stall limit -> when their stall times
        #: out; kept across unblock/re-block until the stream makes progress.
        self._stalls: dict[Channel, float] = {}
        self._stall_next = math.inf
        self.streams_timed_out = 0
        self._channels: dict[int, Channel] = {}
        self._ready: set[Channel] = set()
        self._blocked: set[Channel] = set()
        self._dirty = False
        self._closing = False
        self._draining = False
        self._drain_phase = 0  # 1: GOAWAY(2^31-1) + PING sent; 2: final GOAWAY sent
        self._drain_deadline = 0.0
        self.close_reason: str | None = None
        self.closed = threading.Event()
        self.ready = threading.Event()
        self._writer: threading.Thread | None = None
        self.streams_total = 0
        self.streams_refused = 0
        self.created = clock()

    # -- lifecycle -------------------------------------------------------------

    def run(self) -> str:
        """Run the reader loop in the calling thread until the tunnel closes.

        Returns the close reason.
        """
        with self.lock:
            now = self._clock()
            self.proto.initiate(now)
            self._settings_deadline = now + self._settings_timeout
            self._dirty = True
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                 _timeval(self._send_timeout))
        except OSError:  # pragma: no cover - platform without SO_SNDTIMEO
            pass
        self.sock.settimeout(None)
        self._writer = threading.Thread(target=self._writer_loop, name=f"{self.name}-writer", daemon=True)
        self._writer.start()
        reason = "closed"
        try:
            reason = self._reader_loop()
        finally:
            self.close(reason)
            # A writer blocked in sendall() on a peer that stopped reading
            # would hold us here until SO_SNDTIMEO: let it flush briefly (the
            # GOAWAY), then cut the socket under it.
            self._writer.join(FLUSH_GRACE)
            if self._writer.is_alive():
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._writer.join()
            try:
                self.sock.close()
            except OSError:  # pragma: no cover
                pass
            with self.lock:
                self.proto.release_window_growth()
            self.closed.set()
        return self.close_reason or reason

    def _reader_loop(self) -> str:
        sock = self.sock
        lock = self.lock
        tls = self.tls
        proto = self.proto
        size = SMALL_RECV
        while True:
            try:
                data = sock.recv(size)
            except OSError as e:
                return f"read error: {e}"
            if not data:
                return "peer closed the connection"
            size = RECV_SIZE if len(data) == size else SMALL_RECV
            new: list[Channel] = []
            with lock:
                if self._closing:
                    return self.close_reason or "closed"
                try:
                    plain = tls.decrypt_view(data) if tls is not None else data
                    events = proto.receive(plain, self._clock())
                except ProtocolViolation as e:
                    log.warning("%s: protocol error from peer: %s (%s)", self.name, e,
                                getattr(e.error_code, "name", e.error_code))
                    self._kick_locked()
                    return f"protocol error: {e}"
                except TLSSetupError as e:
                    return str(e)
                if events:
                    self._handle_events_locked(events, new)
                    if new:
                        # A stream reset (or answered) within the same read is
                        # never handed to a handler: Rapid Reset costs no app call.
                        new = [ch for ch in new if ch.error is None]
                        for ch in new:
                            ch._handler = True
                if self._drain_phase == 1 and proto.drain_acked:
                    self._finish_drain_locked()
                if proto.has_output():
                    self._kick_locked()
                if tls is not None and tls.closed:
                    return "peer sent TLS close_notify"
            for ch in new:
                self._dispatch(ch)

    def _dispatch(self, ch: Channel) -> None:
        streams = self.streams
        if streams is None:
            ch.reset(ErrorCodes.REFUSED_STREAM)
            ch.handler_done()
            return
        try:
            streams.start(ch)
        except Exception:
            log.exception("%s: stream %d could not be dispatched", self.name, ch.stream_id)
            ch.reset(ErrorCodes.INTERNAL_ERROR)
            ch.handler_done()

    def _writer_loop(self) -> None:
        lock = self.lock
        tls = self.tls
        proto = self.proto
        sock = self.sock
        final = False
        while not final:
            with lock:
                while True:
                    if self._closing:
                        final = True
                        break
                    now = self._clock()
                    try:
                        next_t = proto.poll_timers(now)
                        if not proto.settings_received:
                            if now >= self._settings_deadline:
                                raise ProtocolViolation(
                                    f"peer sent no SETTINGS within {self._settings_timeout:g}s",
                                    ErrorCodes.SETTINGS_TIMEOUT)
                            next_t = min(next_t, self._settings_deadline)
                        if self._deadlines or self._stalls:
                            next_t = min(next_t, self._stream_timers_locked(now))
                        if self._drain_phase == 1:
                            if proto.drain_acked or now >= self._drain_deadline:
                                self._finish_drain_locked()
                            else:
                                next_t = min(next_t, self._drain_deadline)
                    except ProtocolViolation as e:
                        log.warning("%s: %s; dropping the tunnel", self.name, e)
                        if e.error_code != ErrorCodes.NO_ERROR:
                            proto.fail(e.error_code)
                        self._close_locked(str(e))
                        final = True
                        break
                    # poll_timers() may have queued a PING: flush it now, not
                    # at the next wake-up (which is its ACK deadline).
                    if self._dirty or self._ready or proto.has_output():
                        break
                    self._wake.wait(max(0.0, next_t - now))
                self._dirty = False
                if self._ready and not final:
                    self._flush_ready_locked(now)
                plain = proto.data_to_send()
                cipher: list[bytes]
                if tls is not None:
                    try:
                        if final:
                            cipher = [*tls.encrypt_parts(plain), tls.close_notify()]
                        else:
                            cipher = tls.encrypt_parts(plain) if plain else [tls.pending_output()]
                    except TLSSetupError as e:
                        self._close_locked(str(e))
                        final = True
                        cipher = []
                else:
                    cipher = [plain]
            try:
                _send_parts(sock, cipher)
            except OSError as e:
                if not final:
                    self.close(f"write error: {e}")
                final = True
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _flush_ready_locked(self, now: float) -> None:
        """One writer pass: move the ready streams' bytes into the core, at most WRITE_BATCH."""
        budget = WRITE_BATCH
        stalls = self._stalls
        for ch in list(self._ready):
            moved, blocked = ch._flush_locked(budget)
            budget -= moved
            if blocked:
                self._ready.discard(ch)
                self._blocked.add(ch)
                limit = ch.send_stall_limit
                if limit and (moved or ch not in stalls):
                    # progress restarts the clock (nginx send_timeout semantics)
                    due = stalls[ch] = now + limit
                    if due < self._stall_next:
                        self._stall_next = due
            else:
                if not ch._out:
                    self._ready.discard(ch)
                if stalls:  # not waiting for credit (any more): no stall
                    stalls.pop(ch, None)
            if budget <= 0:
                self._dirty = True
                break

    # -- events (lock held) --------------------------------------------------------

    def _handle_events_locked(self, events: list[h2.events.Event], new: list[Channel]) -> None:
        channels = self._channels
        #: Streams whose input grew in this read: woken once each, after all their frames.
        fed: dict[Channel, None] = {}
        # Dispatch on the exact type (cheaper than an isinstance ladder on the hot path);
        # Any because mypy cannot narrow on `type(ev) is X`.
        ev: Any
        for ev in events:
            t = type(ev)
            if t is h2.events.DataReceived:
                ch = channels.get(ev.stream_id)
                if ch is None:
                    self._credit_locked(ev.stream_id, ev.flow_controlled_length)
                elif ch._deliver_locked(ev.data, ev.flow_controlled_length):
                    fed[ch] = None
            elif t is h2.events.RequestReceived:
                self.streams_total += 1
                ch = Channel(self, ev.stream_id, ev.headers)
                channels[ev.stream_id] = ch
                if ev.stream_ended is not None:
                    ch.in_ended = True
                new.append(ch)
                if self.streams is not None:
                    self.streams.opened_locked(ch)
            elif t is h2.events.StreamEnded:
                ch = channels.get(ev.stream_id)
                if ch is not None:
                    ch._ended_locked()
            elif t is h2.events.ResponseReceived:
                ch = channels.get(ev.stream_id)
                if ch is not None:
                    ch.response = ev.headers
                    ch._notify_locked()
            elif t is h2.events.InformationalResponseReceived:
                ch = channels.get(ev.stream_id)
                if ch is not None:
                    ch._informational_locked(ev.headers)
            elif t is h2.events.TrailersReceived:
                ch = channels.get(ev.stream_id)
                if ch is not None:
                    ch.trailers = ev.headers
            elif t is h2.events.StreamReset:
                ch = channels.get(ev.stream_id)
                if ch is None:
                    pass
                elif (self.proto.role == "client" and ev.error_code == ErrorCodes.NO_ERROR
                        and ch.response is not None and ch.in_ended):
                    ch._upload_stopped_locked()
                else:
                    # remote_reset is False when our core reset a malformed
                    # message (RST_STREAM PROTOCOL_ERROR that *we* sent).
                    ch._fail_locked(StreamReset(ev.stream_id, ev.error_code, by_peer=ev.remote_reset))
            elif t is h2.events.WindowUpdated:
                if ev.stream_id == 0:
                    self._unblock_all_locked()
                else:
                    ch = channels.get(ev.stream_id)
                    if ch is not None and ch in self._blocked:
                        self._blocked.discard(ch)
                        # Wake the writer: receiving WINDOW_UPDATE queues no
                        # output, so nothing else would (it would sleep until
                        # the next PING timer with sendable data queued).
                        self._schedule_locked(ch)
            elif t is h2.events.RemoteSettingsChanged:
                if SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                    self._unblock_all_locked()
                if not self.ready.is_set():
                    self.ready.set()
                    if self._on_ready is not None:
                        self._on_ready(self)
            elif t is h2.events.ConnectionTerminated:
                self._peer_goaway_locked(ev)
            elif t is StreamRefused:
                self.streams_refused += 1
            elif t is HeadersOverLimit:
                self.streams_refused += 1
                # Not registered: nothing more is delivered to it (late DATA is
                # credited and dropped); the policy ends it now.
                ch = Channel(self, ev.stream_id, None)
                ch.in_ended = bool(ev.stream_ended)
                if self.streams is not None:
                    self.streams.over_header_limits_locked(ch, ev.reason)
                else:
                    ch.reset_locked(ErrorCodes.REFUSED_STREAM)
        for ch in fed:
            ch._input_changed_locked()

    def _unblock_all_locked(self) -> None:
        if self._blocked:
            self._ready |= self._blocked
            self._blocked.clear()
            self._kick_locked()  # notify, not just flag: see WindowUpdated above

    def _peer_goaway_locked(self, ev: h2.events.ConnectionTerminated) -> None:
        self.proto.stop_new_streams()
        self._draining = True
        log.info("%s: peer sent GOAWAY (last stream %s, %s)", self.name, ev.last_stream_id,
                 getattr(ev.error_code, "name", ev.error_code))
        if self.proto.role == "client" and ev.last_stream_id is not None:
            for ch in list(self._channels.values()):
                if ch.stream_id > ev.last_stream_id:
                    ch._fail_locked(StreamReset(ch.stream_id, ErrorCodes.REFUSED_STREAM, by_peer=True))
        if self._on_goaway is not None:
            self._on_goaway(self, ev)
        if not self._channels:
            self._close_locked("peer sent GOAWAY and no stream is in flight")

    # -- helpers (lock held) ---------------------------------------------------------

    def _kick_locked(self) -> None:
        self._dirty = True
        self._wake.notify()

    def _schedule_locked(self, ch: Channel) -> None:
        """``ch`` has output to move into the core: wake the writer."""
        self._ready.add(ch)
        self._dirty = True
        self._wake.notify()

    def _credit_locked(self, stream_id: int, n: int) -> None:
        if n <= 0 or self._closing:
            return
        # The time of the read, not of the last bytes received: a reader that comes back
        # late must not look like one that keeps up (window tuning).
        self.proto.acknowledge_received_data(n, stream_id, self._clock())
        if self.proto.has_output():
            self._kick_locked()

    def _retire_locked(self, ch: Channel) -> None:
        if ch._retired:
            return
        ch._retired = True
        if ch._handler:
            self.proto.handler_lingered()
        if self._deadlines:
            for queue in self._deadlines.values():
                queue.pop(ch, None)
        if self._stalls:
            self._stalls.pop(ch, None)
        self._channels.pop(ch.stream_id, None)
        self._ready.discard(ch)
        self._blocked.discard(ch)
        if not self._channels and self._draining and not self._closing:
            self._close_locked("drained")

    def _set_deadline_locked(self, ch: Channel, seconds: float, what: str) -> None:
        for queue in self._deadlines.values():
            queue.pop(ch, None)
        if seconds <= 0 or ch._retired:
            return
        key = (what, seconds)
        if key not in self._deadlines:
            self._deadlines[key] = collections.OrderedDict()
        queue = self._deadlines[key]
        queue[ch] = self._clock() + seconds
        if len(queue) == 1:
            # The writer sleeps until its next timer; within a queue only a
            # first deadline can be earlier than what it already knows.
            self._wake.notify()

    def _stream_timers_locked(self, now: float) -> float:
        """Expire streams past their deadline or stalled past their send-stall limit.

        Writer thread.  O(1) unless something is due.  Returns the next due time.
        """
        nxt = math.inf
        for (what, seconds), queue in self._deadlines.items():
            while queue:
                ch, due = next(iter(queue.items()))
                if due > now:
                    nxt = min(nxt, due)
                    break
                self._expire_locked(ch, f"{what} ({seconds:g}s) reached")  # (retiring dequeues it)
        stalls = self._stalls
        if stalls:
            if now >= self._stall_next:
                self._stall_next = math.inf
                for ch, due in list(stalls.items()):
                    # (a stream unblocked but not flushed yet is settled by this
                    # writer pass: blocked again, its clock still runs)
                    if due <= now and ch in self._blocked:
                        self._expire_locked(ch, f"no flow-control credit for {ch.send_stall_limit:g}s")
                    elif due < self._stall_next:
                        self._stall_next = due
            nxt = min(nxt, self._stall_next)
        return nxt

    def _expire_locked(self, ch: Channel, why: str) -> None:
        """Reset a stream that ran out of time (CANCEL) and cancel its app call."""
        self.streams_timed_out += 1
        self.proto.reset_stream(ch.stream_id, ErrorCodes.CANCEL)
        ch._fail_locked(StreamTimeout(f"stream {ch.stream_id}: {why}"))
        # The app cannot be interrupted: its thread stays busy until it returns.
        log.warning("%s: stream %d: %s; reset (CANCEL)%s", self.name, ch.stream_id, why,
                    f"; {self.proto.lingering_handlers} app call(s) still running on ended streams"
                    if ch._handler else "")

    def _close_locked(self, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self.close_reason = reason
        err = TunnelClosed(f"{self.name}: {reason}")
        for ch in list(self._channels.values()):
            ch._fail_locked(err)
        self._channels.clear()
        self._wake.notify()

    # -- public, any thread ---------------------------------------------------------------

    def open_stream(self, headers: Headers, end_stream: bool) -> Channel:
        """Client role: open a stream and send its request headers."""
        with self.lock:
            if self._closing or self._draining:
                raise TunnelClosed(f"{self.name}: not accepting new streams")
            try:
                sid = self.proto.open_stream(headers, end_stream)
            except h2.exceptions.NoAvailableStreamIDError as e:
                # 2^30 streams on one tunnel: retire it gracefully; the worker
                # redials at once (a GOAWAY without error is a healthy close).
                self._finish_drain_locked()
                raise TunnelClosed(f"{self.name}: stream ids exhausted; tunnel retired") from e
            except h2.exceptions.TooManyStreamsError as e:
                # The peer lowered MAX_CONCURRENT_STREAMS under us: not opened
                # (no stream id was used, hence 0).
                raise StreamReset(0, ErrorCodes.REFUSED_STREAM, by_peer=False) from e
            ch = Channel(self, sid, None)
            self._channels[sid] = ch
            self.streams_total += 1
            ch._headers_sent_locked(end_stream)
            self._kick_locked()
            return ch

    def drain(self) -> None:
        """Graceful close: GOAWAY now, close once every in-flight stream is done.

        Server role (worker): two-phase GOAWAY (RFC 9113 §6.8).  The first,
        with last-stream-id 2^31-1 and a PING, tells the proxy to stop opening
        streams while still serving those already on the wire; the real
        last-stream-id follows the PING ACK (or ``DRAIN_ANNOUNCE_MAX``), so a
        request racing the shutdown is served instead of refused.
        """
        with self.lock:
            if self._closing or self._drain_phase:
                return
            if self.proto.role == "server" and not self.proto.goaway_sent:
                self._drain_phase = 1
                self._drain_deadline = self._clock() + DRAIN_ANNOUNCE_MAX
                self.proto.goaway_announce()
                self._kick_locked()
                return
            self._finish_drain_locked()

    def _finish_drain_locked(self) -> None:
        self._drain_phase = 2
        self._draining = True
        self.proto.goaway(ErrorCodes.NO_ERROR)
        self._kick_locked()
        if not self._channels:
            self._close_locked("drained")

    def close(self, reason: str = "closed", code: ErrorCodes | None = None) -> None:
        """Close now: in-flight streams fail with :class:`TunnelClosed`."""
        with self.lock:
            if self._closing:
                return
            if code is not None:
                self.proto.goaway(code)
            elif not self.proto.goaway_sent:
                self.proto.goaway(ErrorCodes.NO_ERROR)
            self._close_locked(reason)

    @property
    def peer_goaway(self) -> h2.events.ConnectionTerminated | None:
        """The peer's GOAWAY, once received (the protocol's ``goaway_received``)."""
        return self.proto.goaway_received

    @property
    def in_flight(self) -> int:
        return len(self._channels)

    @property
    def lingering(self) -> int:
        """App calls still running although their stream ended (reset, timed out, answered)."""
        return self.proto.lingering_handlers

    @property
    def accepting(self) -> bool:
        return self.ready.is_set() and not self._closing and not self._draining and not self._drain_phase

    @property
    def closing(self) -> bool:
        return self._closing


def _send_parts(sock: socket.socket, parts: list[bytes]) -> None:
    """Send every part, in order: a batch's TLS records in one ``sendmsg`` (not joined first)."""
    if len(parts) > 1:
        parts = [p for p in parts if p]
    if len(parts) <= 1:
        if parts and parts[0]:
            sock.sendall(parts[0])
        return
    views = [memoryview(p) for p in parts]
    while views:
        sent = sock.sendmsg(views)
        if not sent:  # (a blocking socket blocks or raises; never loop on nothing)
            raise OSError("sendmsg sent nothing")
        while sent:
            first = len(views[0])
            if sent < first:
                views[0] = views[0][sent:]
                break
            sent -= first
            del views[0]


def _timeval(seconds: float) -> bytes:
    sec = int(seconds)
    usec = int((seconds - sec) * 1_000_000)
    return struct.pack("ll", sec, usec)
