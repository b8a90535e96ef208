"""One tunnel: a socket, a TLS session, a protocol core, a reader and a writer thread.

Ownership — who touches what, under which lock:

=============================  ===============================  ==================
state                          threads                          guard
=============================  ===============================  ==================
socket ``recv``                reader only                      none (one reader)
socket ``sendall``/shutdown    writer only (reader: ``close``)  none (one writer)
``TLSSession`` (OpenSSL)       reader (decrypt), writer         ``Tunnel.lock``
                               (encrypt)
``TunnelProtocol`` / H2Core    reader (events), writer          ``Tunnel.lock``
                               (flush), app threads (headers,
                               credit, reset), owner (drain)
``_channels``/``_ready``/      any of the above                 ``Tunnel.lock``
``_blocked``, flags
``Channel`` buffers and flags  reader (inbound), app thread,    ``Tunnel.lock``
                               writer (outbound)                (``Channel._cond``
                                                                is bound to it)
``Channel.cancelled`` (Event)  any                              itself
``_deadlines``, stall marks,   reader (arm), writer (expire),   ``Tunnel.lock``
lingering-handler count        app thread (``handler_done``)
=============================  ===============================  ==================

Rules that keep it safe:

* OpenSSL and the HTTP/2 core are touched only with ``Tunnel.lock`` held, so one
  connection object never sees two threads (OpenSSL corrupts records when
  ``SSL_read`` and ``SSL_write`` overlap; H2Core is not thread-safe).
* No lock is ever held across socket I/O or application code: the reader
  ``recv()``s, then locks to decrypt and parse; the writer locks to drain the core
  and encrypt, then unlocks and ``sendall()``s.  App threads lock only to move
  bytes in or out of their channel.
* Per-stream deadlines (``request_timeout``, the send stall of
  ``stream_send_timeout``) are checked by the writer's existing timer loop: no
  per-request timer or thread.
* App threads block on their own channel condition (backpressure, waiting for
  body bytes); the writer waits on ``_wake``.  All conditions share the one
  lock, so a notify never races a state change.
"""

from __future__ import annotations

import collections
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from ._protocol import RequestRejected, StreamRefused, TunnelProtocol
from .errors import ProtocolViolation, StreamReset, StreamTimeout, TLSSetupError, TunnelClosed
from .tls import TLSSession

__all__ = ["Channel", "Tunnel"]

log = logging.getLogger("rhttp_wsgi.tunnel")

RECV_SIZE = 256 * 1024
#: An app's ``write`` blocks while more than this is queued on its stream.
HIGH_WATER = 512 * 1024
LOW_WATER = 128 * 1024
#: Most plaintext moved into TLS per writer pass (keeps lock holds short, and
#: buffers small: 1 MiB passes cost ~30% more CPU per byte, see benchmarks/RESULTS.md).
WRITE_BATCH = 256 * 1024
#: After the reader stops, how long the writer may still flush (e.g. GOAWAY)
#: before the socket is cut under a ``sendall`` blocked on a peer that does not read.
FLUSH_GRACE = 1.0
#: Longest wait for the PING ACK between the two GOAWAYs of a graceful drain.
DRAIN_ANNOUNCE_MAX = 1.0


class Channel:
    """One stream as seen by the thread that serves it (app thread or forwarder).

    Every method takes the tunnel lock briefly; none does socket I/O.
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
        "_stall_at",
        "bytes_in",
        "bytes_out",
        "cancelled",
        "error",
        "headers",
        "headers_sent",
        "in_ended",
        "informational",
        "out_done",
        "response",
        "stream_id",
        "trailers",
        "tunnel",
    )

    def __init__(self, tunnel: Tunnel, stream_id: int, headers: list[tuple[bytes, bytes]] | None) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id
        self.headers = headers
        #: Created by the first wait (most streams never wait): see _waiter_locked.
        self._cond: threading.Condition | None = None
        self._in: collections.deque[bytes] = collections.deque()
        self._in_size = 0
        self.in_ended = False
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self._out: collections.deque[memoryview] = collections.deque()
        self._out_size = 0
        self._out_end = False
        self._out_trailers: list[tuple[bytes, bytes]] | None = None
        self.out_done = False
        self.headers_sent = False
        self.error: BaseException | None = None
        self.cancelled = threading.Event()
        self.response: list[tuple[bytes, bytes]] | None = None
        self.informational: list[list[tuple[bytes, bytes]]] = []
        self.bytes_in = 0
        self.bytes_out = 0
        self._retired = False
        #: When the send stall (blocked on flow control, no progress) times out; 0 = not stalled.
        self._stall_at = 0.0
        #: Dispatched to a handler (app thread) that has not returned yet.
        self._handler = False

    def _waiter_locked(self) -> threading.Condition:
        """This stream's condition (bound to the tunnel lock), created on first use."""
        cond = self._cond
        if cond is None:
            cond = self._cond = threading.Condition(self.tunnel.lock)
        return cond

    def _notify_locked(self) -> None:
        if self._cond is not None:
            self._cond.notify_all()

    def handler_done(self) -> None:
        """The handler (app thread) serving this stream returned; ``run_wsgi`` calls it last.

        A stream can end (reset, timed out, or simply answered) while its
        handler still runs; until then it counts as *lingering* against the
        tunnel's MAX_CONCURRENT_STREAMS (see ``H2Core.lingering_handlers``).
        """
        if not self._handler:  # not dispatched by a tunnel (e.g. driven directly)
            return
        t = self.tunnel
        with t.lock:
            if self._handler:
                self._handler = False
                if self._retired:
                    t.proto.h2.lingering_handlers -= 1

    # -- inbound (body) ------------------------------------------------------

    def read(self, size: int = -1, timeout: float | None = None) -> bytes:
        """Return up to ``size`` body bytes (all buffered bytes if < 0); b'' at the end.

        Blocks until bytes arrive.  Consumed bytes are credited back to the
        peer's flow-control window here, so a slow reader slows the sender.
        """
        t = self.tunnel
        with t.lock:
            if not self._in and not self.in_ended and self.error is None:
                deadline = None if timeout is None else time.monotonic() + timeout
                while not self._in and not self.in_ended and self.error is None:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise StreamTimeout(f"stream {self.stream_id}: no body data within {timeout:g}s")
                    self._waiter_locked().wait(remaining)
            if self.error is not None:
                raise self.error
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

    # -- outbound ---------------------------------------------------------------

    def send_headers(self, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> None:
        t = self.tunnel
        with t.lock:
            self._check_locked()
            t.proto.h2.send_headers(self.stream_id, headers, end_stream=end_stream)
            self.headers_sent = True
            if end_stream:
                self._out_end = True
                self.out_done = True
                t._after_out_done_locked(self)
            t._kick_locked()

    def respond(self, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """``send_headers(headers)`` then ``write(body, end=True)``, in one lock hold.

        Performance (benchmarks/RESULTS.md): the writer is woken once for the
        pair, so HEADERS, DATA and END_STREAM leave in one writer pass (one TLS
        encrypt, one ``sendall``) instead of the writer possibly waking between
        the two calls.  Never blocks (``end`` skips the watermark, as in ``write``).
        """
        t = self.tunnel
        with t.lock:
            self._check_locked()
            t.proto.h2.send_headers(self.stream_id, headers, end_stream=False)
            self.headers_sent = True
            if body:
                self._out.append(memoryview(body))
                self._out_size += len(body)
            self._out_end = True
            t._ready.add(self)
            t._kick_locked()

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
            t._ready.add(self)
            t._kick_locked()
            if self._out_size > HIGH_WATER and not end:
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._out_size > LOW_WATER and self.error is None:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise StreamTimeout(f"stream {self.stream_id}: peer accepted no data for {timeout:g}s")
                    self._waiter_locked().wait(remaining)
                self._check_locked()

    def end(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        t = self.tunnel
        with t.lock:
            if self.error is not None or self._out_end:
                return
            self._out_end = True
            self._out_trailers = trailers
            t._ready.add(self)
            t._kick_locked()

    def reset(self, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """Reset the stream (no-op if it is already finished)."""
        t = self.tunnel
        with t.lock:
            if self._retired or self.error is not None:
                return
            try:
                t.proto.h2.reset_stream(self.stream_id, code)
            except h2.exceptions.StreamClosedError:
                pass
            except h2.exceptions.ProtocolError:
                pass
            self._fail_locked(StreamReset(self.stream_id, code, by_peer=False))
            t._kick_locked()

    def wait_response(self, timeout: float | None) -> list[tuple[bytes, bytes]]:
        """Client role: wait for the final response headers."""
        t = self.tunnel
        with t.lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.response is None and self.error is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise StreamTimeout(f"stream {self.stream_id}: no response within {timeout:g}s")
                self._waiter_locked().wait(remaining)
            if self.response is None:
                assert self.error is not None
                raise self.error
            return self.response

    @property
    def finished(self) -> bool:
        return self._retired

    # -- tunnel side (lock held) -------------------------------------------------

    def _check_locked(self) -> None:
        if self.error is not None:
            raise self.error
        if self.out_done:
            raise StreamReset(self.stream_id, ErrorCodes.STREAM_CLOSED, by_peer=False)

    def _deliver_locked(self, data: bytes, flow_len: int) -> None:
        t = self.tunnel
        pad = flow_len - len(data)
        if self.error is not None or self._retired:
            t._credit_locked(self.stream_id, flow_len)
            return
        if pad:
            t._credit_locked(self.stream_id, pad)
        if data:
            if t._max_body and self.bytes_in + len(data) > t._max_body:
                t._credit_locked(self.stream_id, len(data))
                t._body_too_large_locked(self)
                return
            self._in.append(data)
            self._in_size += len(data)
            self.bytes_in += len(data)
            self._notify_locked()

    def _fail_locked(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        unread = self._in_size
        self._in.clear()
        self._in_size = 0
        if unread:
            self.tunnel._credit_locked(self.stream_id, unread)
        self._out.clear()
        self._out_size = 0
        self.cancelled.set()
        self._notify_locked()
        self.tunnel._retire_locked(self)

    def _flush_locked(self, budget: int) -> tuple[int, bool]:
        """Move queued bytes into the HTTP/2 core within the peer's windows.

        Returns (bytes moved, blocked on flow control).
        """
        t = self.tunnel
        conn = t.proto.h2
        sid = self.stream_id
        moved = 0
        out = self._out
        while out and moved < budget:
            window = conn.local_flow_control_window(sid)
            if window <= 0:
                return moved, True
            frame_max = conn.max_outbound_frame_size
            chunk = out[0]
            n = min(len(chunk), window, frame_max)
            last = n == len(chunk) and len(out) == 1 and self._out_end and self._out_trailers is None
            conn.send_data(sid, chunk[:n], end_stream=last)
            if n == len(chunk):
                out.popleft()
            else:
                out[0] = chunk[n:]
            self._out_size -= n
            self.bytes_out += n
            moved += n
            if last:
                self.out_done = True
        if self._out_size <= LOW_WATER:
            self._notify_locked()
        if out:
            return moved, False
        if self._out_end and not self.out_done:
            if self._out_trailers is not None:
                conn.send_headers(sid, self._out_trailers, end_stream=True)
            else:
                conn.end_stream(sid)
            self.out_done = True
        if self.out_done:
            t._after_out_done_locked(self)
        return moved, False


class Tunnel:
    """A live tunnel.  ``run()`` is the reader loop; it starts the writer thread."""

    def __init__(
        self,
        sock: socket.socket,
        tls: TLSSession | None,
        proto: TunnelProtocol,
        *,
        name: str = "tunnel",
        on_stream: Callable[[Channel], None] | None = None,
        on_ready: Callable[[Tunnel], None] | None = None,
        on_goaway: Callable[[Tunnel, h2.events.ConnectionTerminated], None] | None = None,
        on_event: Callable[[Tunnel, str], None] | None = None,
        settings_timeout: float = 10.0,
        send_timeout: float = 30.0,
        stream_send_timeout: float = 0.0,
        request_timeout: float = 0.0,
        max_body_size: int = 0,
        clock: Callable[[], float] = time.monotonic,
        peer: Any = None,
    ) -> None:
        self.sock = sock
        self.tls = tls
        self.proto = proto
        self.name = name
        self.peer = peer
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._idle = threading.Condition(self.lock)
        self._on_stream = on_stream
        self._on_ready = on_ready
        self._on_goaway = on_goaway
        self._on_event = on_event
        self._clock = clock
        self._settings_deadline = 0.0
        self._settings_timeout = settings_timeout
        self._send_timeout = send_timeout
        # Worker-role stream limits (0 = off).  stream_send_timeout: a stream
        # blocked on flow control that makes no progress this long is reset;
        # request_timeout: a stream still open this long after its HEADERS is
        # reset; max_body_size: a longer request body is refused with 413.
        self._stall_timeout = stream_send_timeout
        self._stall_next = math.inf
        self._request_timeout = request_timeout
        #: stream -> deadline, in arrival order (= deadline order: one timeout for all)
        self._deadlines: collections.OrderedDict[Channel, float] = collections.OrderedDict()
        self._max_body = max_body_size
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
        self.peer_goaway: h2.events.ConnectionTerminated | None = None
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
            self.closed.set()
        return self.close_reason or reason

    def _reader_loop(self) -> str:
        sock = self.sock
        lock = self.lock
        tls = self.tls
        proto = self.proto
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except OSError as e:
                return f"read error: {e}"
            if not data:
                return "peer closed the connection"
            new: list[Channel] = []
            with lock:
                if self._closing:
                    return self.close_reason or "closed"
                try:
                    plain = tls.decrypt(data) if tls is not None else data
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
                        # A stream reset (or refused) within the same read is
                        # never handed to the app: Rapid Reset costs no app call.
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
        if self._on_stream is None:
            ch.reset(ErrorCodes.REFUSED_STREAM)
            ch.handler_done()
            return
        try:
            self._on_stream(ch)
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
                        if self._deadlines or self._blocked:
                            next_t = min(next_t, self._stream_timers_locked(now))
                        if self._drain_phase == 1:
                            if proto.drain_acked or now >= self._drain_deadline:
                                self._finish_drain_locked()
                            else:
                                next_t = min(next_t, self._drain_deadline)
                    except ProtocolViolation as e:
                        log.warning("%s: %s; dropping the tunnel", self.name, e)
                        if e.error_code != ErrorCodes.NO_ERROR:
                            proto._fail(e.error_code)
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
                    budget = WRITE_BATCH
                    for ch in list(self._ready):
                        moved, blocked = ch._flush_locked(budget)
                        budget -= moved
                        if blocked:
                            self._ready.discard(ch)
                            self._blocked.add(ch)
                            if self._stall_timeout and (moved or not ch._stall_at):
                                # progress restarts the clock (nginx send_timeout semantics)
                                ch._stall_at = now + self._stall_timeout
                                if ch._stall_at < self._stall_next:
                                    self._stall_next = ch._stall_at
                        elif not ch._out or ch.error is not None:
                            self._ready.discard(ch)
                        if moved and ch._stall_at and not blocked:
                            ch._stall_at = 0.0
                        if budget <= 0:
                            self._dirty = True
                            break
                plain = proto.data_to_send()
                if tls is not None:
                    try:
                        if final:
                            cipher = tls.encrypt(plain) + tls.close_notify()
                        else:
                            cipher = tls.encrypt(plain) if plain else tls.pending_output()
                    except TLSSetupError as e:
                        self._close_locked(str(e))
                        final = True
                        cipher = b""
                else:
                    cipher = plain
            if cipher:
                try:
                    sock.sendall(cipher)
                except OSError as e:
                    if not final:
                        self.close(f"write error: {e}")
                    final = True
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- events (lock held) --------------------------------------------------------

    def _handle_events_locked(self, events: list[h2.events.Event], new: list[Channel]) -> None:
        channels = self._channels
        # Dispatch on the exact type (cheaper than an isinstance ladder on the hot path);
        # Any because mypy cannot narrow on `type(ev) is X`.
        ev: Any
        for ev in events:
            t = type(ev)
            if t is h2.events.DataReceived:
                ch = channels.get(ev.stream_id)
                if ch is None:
                    self._credit_locked(ev.stream_id, ev.flow_controlled_length)
                else:
                    ch._deliver_locked(ev.data, ev.flow_controlled_length)
            elif t is h2.events.RequestReceived:
                self.streams_total += 1
                ch = Channel(self, ev.stream_id, ev.headers)
                channels[ev.stream_id] = ch
                if ev.stream_ended is not None:
                    ch.in_ended = True
                new.append(ch)
                if self._request_timeout:
                    self._deadlines[ch] = self._clock() + self._request_timeout
                    if len(self._deadlines) == 1:
                        # The writer sleeps until its next timer; with one
                        # timeout for all, only a first deadline can be earlier.
                        self._wake.notify()
                if self._max_body:
                    # Content-Length above the limit: 413 before the app runs.
                    # (h2 already holds the parsed value, and checks the body against it.)
                    cl = getattr(self.proto.h2.streams.get(ev.stream_id), "_expected_content_length", None)
                    if cl is not None and cl > self._max_body:
                        self._body_too_large_locked(ch)
            elif t is h2.events.StreamEnded:
                ch = channels.get(ev.stream_id)
                if ch is not None:
                    ch.in_ended = True
                    ch._notify_locked()
                    if ch.out_done:
                        self._retire_locked(ch)
            elif t is h2.events.ResponseReceived:
                ch = channels.get(ev.stream_id)
                if ch is not None:
                    ch.response = ev.headers
                    ch._notify_locked()
            elif t is h2.events.InformationalResponseReceived:
                ch = channels.get(ev.stream_id)
                if ch is not None:
                    ch.informational.append(ev.headers)
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
                    # RFC 9113 §8.1: a complete response, then RST_STREAM(NO_ERROR)
                    # to stop the request body.  Keep the response; only the
                    # upload ends (write() then raises, not by_peer).
                    ch._out.clear()
                    ch._out_size = 0
                    ch._out_end = True
                    ch.out_done = True
                    ch._notify_locked()
                    self._retire_locked(ch)
                else:
                    # remote_reset is False when our core reset a malformed
                    # message (RST_STREAM PROTOCOL_ERROR that *we* sent).
                    ch._fail_locked(StreamReset(ev.stream_id, ev.error_code,
                                                by_peer=bool(getattr(ev, "remote_reset", True))))
            elif t is h2.events.WindowUpdated:
                if ev.stream_id == 0:
                    self._unblock_all_locked()
                else:
                    ch = channels.get(ev.stream_id)
                    if ch is not None and ch in self._blocked:
                        self._blocked.discard(ch)
                        self._ready.add(ch)
                        # Wake the writer: receiving WINDOW_UPDATE queues no
                        # output, so nothing else would (it would sleep until
                        # the next PING timer with sendable data queued).
                        self._kick_locked()
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
            elif t is RequestRejected:
                self.streams_refused += 1
                log.info("%s: stream %d answered %d: %s", self.name, ev.stream_id, ev.status, ev.reason)

    def _unblock_all_locked(self) -> None:
        if self._blocked:
            self._ready |= self._blocked
            self._blocked.clear()
            self._kick_locked()  # notify, not just flag: see WindowUpdated above

    def _peer_goaway_locked(self, ev: h2.events.ConnectionTerminated) -> None:
        self.peer_goaway = ev
        self.proto.h2.draining = True
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

    def _credit_locked(self, stream_id: int, n: int) -> None:
        if n <= 0 or self._closing:
            return
        self.proto.h2.acknowledge_received_data(n, stream_id)
        if self.proto.has_output():
            self._kick_locked()

    def _after_out_done_locked(self, ch: Channel) -> None:
        if ch.in_ended:
            self._retire_locked(ch)
        elif self.proto.role == "server":
            # A complete response before the whole request body: ask the
            # client to stop sending, without error (RFC 9113 §8.1).
            try:
                self.proto.h2.reset_stream(ch.stream_id, ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass
            ch.in_ended = True
            unread = ch._in_size
            ch._in.clear()
            ch._in_size = 0
            if unread:
                self._credit_locked(ch.stream_id, unread)
            ch._notify_locked()
            self._retire_locked(ch)

    def _retire_locked(self, ch: Channel) -> None:
        if ch._retired:
            return
        ch._retired = True
        if ch._handler:
            self.proto.h2.lingering_handlers += 1
        if self._deadlines:
            self._deadlines.pop(ch, None)
        self._channels.pop(ch.stream_id, None)
        self._ready.discard(ch)
        self._blocked.discard(ch)
        if not self._channels:
            self._idle.notify_all()
            if self._draining and not self._closing:
                self._close_locked("drained")

    def _stream_timers_locked(self, now: float) -> float:
        """Expire streams past ``request_timeout`` or stalled past ``stream_send_timeout``.

        Writer thread.  O(1) unless something is due.  Returns the next due time.
        """
        nxt = math.inf
        deadlines = self._deadlines
        while deadlines:
            ch, due = next(iter(deadlines.items()))
            if due > now:
                nxt = due
                break
            del deadlines[ch]
            self._expire_locked(ch, f"request_timeout ({self._request_timeout:g}s) reached")
        if self._blocked and self._stall_timeout:
            if now >= self._stall_next:
                self._stall_next = math.inf
                for ch in list(self._blocked):
                    if not ch._stall_at:
                        continue
                    if ch._stall_at <= now:
                        self._expire_locked(ch, f"no flow-control credit for {self._stall_timeout:g}s")
                    elif ch._stall_at < self._stall_next:
                        self._stall_next = ch._stall_at
            nxt = min(nxt, self._stall_next)
        return nxt

    def _expire_locked(self, ch: Channel, why: str) -> None:
        """Reset a stream that ran out of time (CANCEL) and cancel its app call."""
        self.streams_timed_out += 1
        try:
            self.proto.h2.reset_stream(ch.stream_id, ErrorCodes.CANCEL)
        except h2.exceptions.ProtocolError:
            pass
        ch._fail_locked(StreamTimeout(f"stream {ch.stream_id}: {why}"))
        lingering = self.proto.h2.lingering_handlers
        # The app cannot be interrupted: its thread stays busy until it returns.
        log.warning("%s: stream %d: %s; reset (CANCEL)%s", self.name, ch.stream_id, why,
                    f"; {lingering} app call(s) still running on ended streams" if ch._handler else "")

    def _body_too_large_locked(self, ch: Channel) -> None:
        """413 (or RST_STREAM(CANCEL) once the response started) for a body above ``max_body_size``."""
        conn = self.proto.h2
        sid = ch.stream_id
        code = ErrorCodes.CANCEL
        try:
            if not ch.headers_sent:
                conn.send_headers(sid, [(b":status", b"413"), (b"content-length", b"0")], end_stream=True)
                ch.headers_sent = ch.out_done = True
                code = ErrorCodes.NO_ERROR  # a complete answer; stop the upload (RFC 9113 §8.1)
            conn.reset_stream(sid, code)
        except h2.exceptions.ProtocolError:
            pass
        log.info("%s: stream %d: request body above max_body_size (%d bytes); %s", self.name, sid,
                 self._max_body, "413" if code == ErrorCodes.NO_ERROR else "reset (CANCEL)")
        ch._fail_locked(StreamReset(sid, code, by_peer=False))
        self._kick_locked()

    def _close_locked(self, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self.close_reason = reason
        err = TunnelClosed(f"{self.name}: {reason}")
        for ch in list(self._channels.values()):
            ch._fail_locked(err)
        self._channels.clear()
        self._idle.notify_all()
        self._wake.notify()

    # -- public, any thread ---------------------------------------------------------------

    def open_stream(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> Channel:
        """Client role: open a stream and send its request headers."""
        with self.lock:
            if self._closing or self._draining:
                raise TunnelClosed(f"{self.name}: not accepting new streams")
            conn = self.proto.h2
            try:
                sid = conn.get_next_available_stream_id()
            except h2.exceptions.NoAvailableStreamIDError as e:
                # 2^30 streams on one tunnel: retire it gracefully; the worker
                # redials at once (a GOAWAY without error is a healthy close).
                self._finish_drain_locked()
                raise TunnelClosed(f"{self.name}: stream ids exhausted; tunnel retired") from e
            ch = Channel(self, sid, None)
            try:
                conn.send_headers(sid, headers, end_stream=end_stream)
            except h2.exceptions.TooManyStreamsError as e:
                # The peer lowered MAX_CONCURRENT_STREAMS under us: not opened.
                raise StreamReset(sid, ErrorCodes.REFUSED_STREAM, by_peer=False) from e
            self._channels[sid] = ch
            self.streams_total += 1
            ch.headers_sent = True
            if end_stream:
                ch._out_end = True
                ch.out_done = True
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

    def wait_idle(self, timeout: float | None) -> bool:
        with self.lock:
            return self._idle.wait_for(lambda: not self._channels or self._closing, timeout)

    @property
    def in_flight(self) -> int:
        return len(self._channels)

    @property
    def lingering(self) -> int:
        """App calls still running although their stream ended (reset, timed out, answered)."""
        return int(self.proto.h2.lingering_handlers)

    @property
    def accepting(self) -> bool:
        return self.ready.is_set() and not self._closing and not self._draining and not self._drain_phase

    @property
    def closing(self) -> bool:
        return self._closing

    def can_open_stream(self) -> bool:
        """Client role: below the peer's MAX_CONCURRENT_STREAMS?"""
        with self.lock:
            if self._closing or self._draining or not self.ready.is_set():
                return False
            return len(self._channels) < self.proto.peer_max_concurrent_streams()


def _timeval(seconds: float) -> bytes:
    import struct

    sec = int(seconds)
    usec = int((seconds - sec) * 1_000_000)
    return struct.pack("ll", sec, usec)
