"""WebSockets on the worker: an RFC 8441 extended CONNECT becomes the HTTP/1.1 upgrade a WSGI app expects.

The proxy (ours, or HAProxy) turns a public ``GET`` + ``Upgrade: websocket`` into an
extended CONNECT on the tunnel (``:method CONNECT``, ``:protocol websocket``,
``:scheme``, ``:authority``, ``:path``).  The worker advertises
SETTINGS_ENABLE_CONNECT_PROTOCOL (option ``websockets``), and
:class:`~rhttp_wsgi.streams.StreamPolicy` hands such a stream to
:meth:`WebSocketService.serve` on a thread pool of its own (``max_websockets``
threads: a WebSocket holds its thread for its lifetime, so sockets must not
starve plain requests; one more socket gets 503).

Threaded WSGI WebSocket libraries (simple-websocket under flask-sock and
Flask-SocketIO's ``threading`` mode, or wsproto used directly) take the raw
client socket from the environ keys werkzeug's and gunicorn's servers set, parse
the request from the ``HTTP_*`` keys, write the ``101 Switching Protocols`` head
to the socket themselves, then speak RFC 6455 frames over it.  So the app gets:

* the request as that HTTP/1.1 upgrade: ``REQUEST_METHOD`` ``GET``,
  ``SERVER_PROTOCOL`` ``HTTP/1.1``, ``HTTP_UPGRADE`` ``websocket``,
  ``HTTP_CONNECTION`` ``Upgrade``, ``HTTP_SEC_WEBSOCKET_KEY`` (the proxy's, or a
  random one: RFC 8441 has no key), ``HTTP_SEC_WEBSOCKET_VERSION`` (``13`` when
  absent), ``HTTP_SEC_WEBSOCKET_PROTOCOL`` / ``_EXTENSIONS`` / ``HTTP_ORIGIN``
  as sent, ``HTTP_HOST`` from ``:authority``; an empty ``wsgi.input``; the
  usual ``rhttp.*`` keys (``rhttp.cancelled`` is set when the stream is reset or
  the tunnel drops);
* a :class:`TunnelSocket` under ``werkzeug.socket``, ``gunicorn.socket`` and
  ``rhttp.websocket``: ``recv``/``send``/``sendall``/``close``/``shutdown``/
  ``settimeout``/``fileno`` over the stream.  The first bytes written (the 101
  head, possibly in pieces) become the HTTP/2 response ``:status 200`` with the
  negotiated ``sec-websocket-protocol`` / ``sec-websocket-extensions`` (and any
  other end-to-end field of the head); later writes are DATA.  Reads return the
  client's bytes, b'' once the client is gone.  Flow control and backpressure are
  the channel's (``Channel.read`` credits as the app reads; ``Channel.write``
  blocks while the proxy is slow).

Answers that are not an upgrade: an app that writes a non-101 head to the socket,
or answers through ``start_response`` without touching the socket, gets that
response relayed when it is not 2xx (a 400/403/426 reaches the client); a 2xx
becomes a **502** (logged), never a 200: a proxy (HAProxy included) treats a 200
to an extended CONNECT as "WebSocket accepted" and would relay the body as
WebSocket bytes.  ``start_response("101 ...")`` is an upgrade too (the body
chunks are then the WebSocket's bytes).

When the app returns -- flask-sock's gunicorn-mode ``StopIteration``, engineio's
werkzeug-mode ``ConnectionError``, or a normal return whose response is then
ignored -- the stream is ended (END_STREAM) as gunicorn and werkzeug close the
connection; so does the app's ``close()``.  ``websocket_idle_timeout`` (no bytes
either way) resets an idle WebSocket (CANCEL): the app's reads return b''.
``request_timeout`` does not apply to WebSockets; the send stall
(``send_timeout``) does.

``fileno()`` (simple-websocket polls it when ``ping_interval`` is set) is a
descriptor with a real socket's level-triggered readiness: readable exactly while
bytes wait (here or in the stream) or the stream ended; once the socket is closed
or the handler returned it stays readable, so a library thread parked in its
selector wakes at once and finds the socket closed.

Shutdown: when the worker drains (SIGTERM to ``rhttp-wsgi worker`` or to a
gunicorn worker, ``WorkerPool.shutdown``), its open WebSockets end promptly
instead of holding the drain until ``shutdown_timeout``: their reads return b''
and ``rhttp.cancelled`` is set, so the app's library closes and the app returns
(END_STREAM); a stream still open :data:`DRAIN_GRACE` seconds later is reset.
Clients see the connection close (typically code 1006) and reconnect.
"""

from __future__ import annotations

import base64
import errno
import io
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import h11
from h2.errors import ErrorCodes

from ._http import HOP_BY_HOP, BadRequest
from ._pool import AppThreadPool
from ._tunnel import Channel
from .errors import RHTTPError, StreamTimeout
from .options import WorkerOptions
from .wsgi import WSGIContext, build_environ, close_response, encode_response_fields

__all__ = ["TunnelSocket", "WebSocketService", "serve_websocket", "upgrade_fields"]

log = logging.getLogger("rhttp_wsgi.websocket")

#: Most bytes a ``recv`` takes from the stream at once (it keeps the rest for the next
#: ``recv``): simple-websocket reads 4 KiB at a time, the channel's DATA comes in 16 KiB frames.
RECV_CHUNK = 65536
#: The idle deadline is re-armed at most this often (seconds; and at most every tenth of the
#: timeout): a WebSocket is cut after between ``timeout - REARM_EVERY`` and ``timeout`` of silence.
REARM_EVERY = 1.0
#: After :meth:`WebSocketService.drain` (the worker shutting down), seconds a WebSocket's app has to
#: end it before its stream is reset.
DRAIN_GRACE = 2.0
#: The status line and fields a 101 may carry into the HTTP/2 200, besides these it never does.
_UPGRADE_DROP = HOP_BY_HOP | {b"sec-websocket-accept", b"content-length"}
_RELAY_DROP = HOP_BY_HOP | {b"content-length"}

Headers = list[tuple[bytes, bytes]]


# -- the request -----------------------------------------------------------------------------------


def upgrade_fields(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """An extended CONNECT's fields, as the HTTP/1.1 WebSocket upgrade request they stand for.

    ``:method CONNECT`` becomes ``GET``, ``:protocol`` goes; ``upgrade: websocket`` and
    ``connection: Upgrade`` are added; ``sec-websocket-key`` is kept or, when absent
    (RFC 8441 §5 has none), a random one is made; ``sec-websocket-version`` defaults
    to 13; ``content-length`` goes (the stream's bytes are the WebSocket's).
    """
    out: Headers = []
    key = version = False
    for name, value in headers:
        if name == b":method":
            out.append((name, b"GET"))
        elif name == b":protocol" or name == b"content-length" or name in HOP_BY_HOP:
            continue
        else:
            if name == b"sec-websocket-key":
                key = True
            elif name == b"sec-websocket-version":
                version = True
            out.append((name, value))
    out.append((b"upgrade", b"websocket"))
    out.append((b"connection", b"Upgrade"))
    if not key:
        out.append((b"sec-websocket-key", base64.b64encode(os.urandom(16))))
    if not version:
        out.append((b"sec-websocket-version", b"13"))
    return out


# -- the socket ------------------------------------------------------------------------------------

_HEAD, _UPGRADED, _RELAY, _DONE = range(4)


class TunnelSocket:
    """A socket-like object over one WebSocket stream (see the module doc).

    Thread-safe the way a socket is: one thread may read while others write
    (simple-websocket reads on its own thread).  ``send``/``sendall`` block while
    the proxy grants no flow-control credit; ``recv`` blocks until bytes arrive.
    ``settimeout``/``setblocking`` bound both waits (``socket.timeout`` /
    ``BlockingIOError``).  Once the stream is gone, reads return b'' and writes
    raise ``BrokenPipeError``; after ``close()`` both raise ``OSError(EBADF)``.
    """

    def __init__(self, ch: Channel, *, idle_timeout: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.channel = ch
        self._timeout: float | None = None
        self._lock = threading.Lock()  # the head phase (the first writes) and close()
        self._rlock = threading.Lock()  # one reader at a time: _rbuf, _rpos
        #: Bytes taken from the stream, handed out from _rpos on (slicing only what is asked for).
        self._rbuf = b""
        self._rpos = 0
        self._state = _HEAD
        self._parser: h11.Connection | None = None
        self._closed = False
        #: The descriptor behind fileno(), made on first use.
        self._ready: _Readiness | None = None
        #: The worker is shutting down (hang_up): the idle deadline is no longer re-armed.
        self._hung_up = False
        self._idle = idle_timeout
        self._clock = clock
        self._rearm = min(REARM_EVERY, idle_timeout / 10)
        self._armed = 0.0
        #: The HTTP/2 status sent for the app (200 once upgraded), 0 before any.
        self.status = 0
        #: The fields of that response.
        self.response_headers: Headers | None = None
        #: The app accepted the WebSocket (its 101 went out as ``:status 200``).
        self.accepted = False
        #: WebSocket bytes sent to / received from the client (after the upgrade).
        self.bytes_sent = 0
        self.bytes_received = 0
        if idle_timeout:
            self._arm(clock())

    # -- state -----------------------------------------------------------------------

    @property
    def upgraded(self) -> bool:
        """The app accepted: the stream carries WebSocket bytes (``:status 200`` sent)."""
        return self._state == _UPGRADED

    @property
    def touched(self) -> bool:
        """The app wrote to the socket (or closed it): the socket, not ``start_response``, answers."""
        return self._state != _HEAD or self._parser is not None or self._closed

    def _arm(self, now: float) -> None:
        self._armed = now
        ch = self.channel
        with ch.tunnel.lock:
            if not self._hung_up:  # (the shutdown grace deadline stands)
                ch.set_deadline_locked(self._idle, "websocket_idle_timeout")

    def _touch(self) -> None:
        if self._idle:
            now = self._clock()
            if now - self._armed >= self._rearm:
                self._arm(now)

    # -- reading ---------------------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "recv flags are not supported on a tunnelled WebSocket")
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        with self._rlock:
            if self._closed:
                raise OSError(errno.EBADF, "Bad file descriptor")
            if not bufsize:
                return b""
            buf, pos = self._rbuf, self._rpos
            if pos >= len(buf):
                buf, pos = self._fetch(), 0
                if not buf:
                    self._rbuf, self._rpos = b"", 0
                    return b""
            end = min(pos + bufsize, len(buf))
            data = buf if pos == 0 and end == len(buf) else buf[pos:end]
            self._rbuf, self._rpos = buf, end
            ready = self._ready
            if ready is not None and end >= len(buf):
                # Our bytes are all handed out: the descriptor stays readable only while
                # the stream has more (or its end) for the next recv.  Checked and cleared
                # under the tunnel lock, as Channel.on_input sets it: no arrival is missed.
                ch = self.channel
                with ch.tunnel.lock:
                    if not ch.input_pending_locked():
                        ready.clear()
        self.bytes_received += len(data)
        self._touch()
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        data = self.recv(nbytes or len(view), flags)
        view[:len(data)] = data
        return len(data)

    def _fetch(self) -> bytes:
        """The next bytes from the client (b'': the client is gone); raises on our own timeout."""
        timeout = self._timeout
        ch = self.channel
        try:
            data = ch.read(RECV_CHUNK, timeout)
        except RHTTPError:
            if ch.error is None:  # (the wait timed out, not the stream)
                raise _timed_out(timeout) from None
            data = b""  # reset, timed out (idle), the tunnel dropped
        if not data:
            # The client ended its side (a WebSocket has no half-close worth keeping: RFC 6455's
            # own Close came before, or the connection was lost): the app is cancelled, as for a reset.
            ch.cancelled.set()
        return data

    # -- writing ---------------------------------------------------------------------

    def send(self, data: Any, flags: int = 0) -> int:
        """Send all of ``data`` (a tunnelled stream takes whole writes) and return its length."""
        self.sendall(data, flags)
        return memoryview(data).nbytes

    def sendall(self, data: Any, flags: int = 0) -> None:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "send flags are not supported on a tunnelled WebSocket")
        chunk = bytes(data)  # (the channel keeps a view until it is flushed: never a caller's buffer)
        if self._state == _UPGRADED and not self._closed:
            self._write(chunk)
            return
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "Bad file descriptor")
            if self._state == _HEAD:
                self._head_locked(chunk)
            elif self._state == _UPGRADED:
                self._write(chunk)
            elif self._state == _RELAY:
                self._relay_locked(chunk)
            elif self.accepted:  # _DONE after shutdown(SHUT_WR)
                raise BrokenPipeError(errno.EPIPE, "Broken pipe")
            # else _DONE: the answer is complete (or was replaced by a 502); the rest is dropped

    def _write(self, chunk: bytes) -> None:
        if not chunk:
            return
        try:
            self.channel.write(chunk, self._timeout)
        except StreamTimeout as e:
            if self.channel.error is None:  # (our own timeout, not the stream's send stall)
                raise _timed_out(self._timeout) from None
            raise BrokenPipeError(errno.EPIPE, f"the WebSocket's stream ended: {e}") from None
        except RHTTPError as e:  # reset, ended (closed by another thread), or the tunnel dropped
            raise BrokenPipeError(errno.EPIPE, f"the WebSocket's stream ended: {e}") from None
        self.bytes_sent += len(chunk)
        self._touch()

    def _head_locked(self, chunk: bytes) -> None:
        """The app's first writes: its HTTP/1.1 response head, parsed by h11 as it comes."""
        parser = self._parser
        if parser is None:
            parser = self._parser = h11.Connection(h11.CLIENT)
            # h11 must have "sent" the upgrade request to recognise the 101 that switches protocols.
            parser.send(h11.Request(method="GET", target="/", headers=[
                ("Host", "tunnel"), ("Upgrade", "websocket"), ("Connection", "Upgrade")]))
            parser.send(h11.EndOfMessage())
        try:
            parser.receive_data(chunk)
            self._events_locked(parser)
        except h11.RemoteProtocolError as e:
            self._fail_answer_locked(f"the application wrote an invalid HTTP/1.1 response head ({e})")

    def _relay_locked(self, chunk: bytes) -> None:
        parser = self._parser
        assert parser is not None
        try:
            parser.receive_data(chunk)
            self._events_locked(parser)
        except h11.RemoteProtocolError as e:
            log.error("%s: the application's response body is not valid HTTP/1.1 (%s); resetting the stream",
                      _name(self.channel), e)
            self._state = _DONE
            self.channel.reset(ErrorCodes.INTERNAL_ERROR)

    def _events_locked(self, parser: h11.Connection) -> None:
        while True:
            ev = parser.next_event()
            if ev is h11.NEED_DATA:
                return
            if ev is h11.PAUSED:  # the 101 switched protocols: the rest is WebSocket bytes
                rest = parser.trailing_data[0]
                self._parser = None
                self._write(rest)
                return
            if isinstance(ev, h11.InformationalResponse):
                if ev.status_code == 101:
                    self._accept_locked(list(ev.headers))
                continue  # (another 1xx: nothing for the client)
            if isinstance(ev, h11.Response):
                self._answer_locked(ev.status_code, list(ev.headers), ev.reason.decode("latin-1"))
                if self._state == _DONE:
                    return
            elif isinstance(ev, h11.Data):
                self._write(bytes(ev.data))
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                self._state = _DONE
                self.channel.end()
                return

    def _accept_locked(self, fields: Iterable[tuple[bytes, bytes]]) -> None:
        """The app switched protocols: ``:status 200`` with the negotiated fields (RFC 8441 §5)."""
        out: Headers = [(b":status", b"200")]
        out += [(n, v) for n, v in fields if n not in _UPGRADE_DROP]
        self._send_headers(out)
        self._state = _UPGRADED
        self.accepted = True
        log.debug("%s: WebSocket accepted", _name(self.channel))

    def _answer_locked(self, status: int, fields: Iterable[tuple[bytes, bytes]], reason: str) -> None:
        """The app wrote a response that is not an upgrade: relay it, unless it says 2xx."""
        if 200 <= status < 300:
            self._fail_answer_locked(f"the application answered the WebSocket upgrade with {status} {reason},"
                                     " not 101 Switching Protocols")
            return
        out: Headers = [(b":status", str(status).encode("ascii"))]
        out += [(n, v) for n, v in fields if n not in _RELAY_DROP]
        self._send_headers(out)
        self._state = _RELAY
        log.info("%s: the application refused the WebSocket upgrade with %d %s", _name(self.channel), status,
                 reason)

    def _fail_answer_locked(self, why: str) -> None:
        self._state = _DONE
        self._parser = None
        ch = self.channel
        if ch.headers_sent or ch.error is not None:
            return
        log.error("%s: %s; answering 502", _name(ch), why)
        self.status = 502
        _respond(ch, 502, "Bad Gateway: the application did not accept the WebSocket upgrade")

    def _send_headers(self, out: Headers) -> None:
        self.status = int(out[0][1])
        self.response_headers = out
        try:
            self.channel.send_headers(out)
        except RHTTPError as e:
            raise BrokenPipeError(errno.EPIPE, f"the WebSocket's stream ended: {e}") from None

    # -- the answer through start_response (the socket untouched) ------------------------------------

    def answer_wsgi(self, status: str, headers: list[tuple[str, str]], body: Iterable[bytes]) -> None:
        """Send what the app answered through ``start_response``: an upgrade (101), a relayed
        non-2xx response, or a 502 for a 2xx (see the module doc)."""
        code_text = status[:3] if isinstance(status, str) else ""
        if not code_text.isdigit() or (len(status) > 3 and status[3] != " "):
            raise ValueError(f"invalid status line {status!r}")
        code = int(code_text)
        fields, _ = encode_response_fields(headers)
        with self._lock:
            if self.touched:
                return
            if code == 101:
                self._accept_locked(fields)
            elif not 300 <= code <= 599:
                self._fail_answer_locked(f"the application answered the WebSocket upgrade with {status!r},"
                                         " not 101 Switching Protocols")
                return
            else:
                out: Headers = [(b":status", code_text.encode("ascii"))]
                out += [(n, v) for n, v in fields if n not in _RELAY_DROP]
                self._send_headers(out)
                self._state = _RELAY
                log.info("%s: the application refused the WebSocket upgrade with %s", _name(self.channel), status)
        for chunk in body:
            if chunk:
                if not isinstance(chunk, (bytes, bytearray, memoryview)):
                    raise TypeError(f"body chunks must be bytes, got {type(chunk).__name__}")
                self._write(bytes(chunk))
        if self._state == _RELAY:
            self._state = _DONE
            self.channel.end()

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket: an accepted WebSocket's stream ends (END_STREAM)."""
        with self._lock:
            closed, self._closed = self._closed, True
            if not closed and self._state in (_UPGRADED, _RELAY):
                self._state = _DONE
                self.channel.end()
        self._end_readiness()

    def shutdown(self, how: int) -> None:
        """``SHUT_WR``/``SHUT_RDWR`` end our side of the stream (END_STREAM); reads still see the client's bytes."""
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            with self._lock:
                if self._state in (_UPGRADED, _RELAY):
                    self._state = _DONE
                    self.channel.end()

    def finish(self) -> None:
        """The handler is done: end the stream whatever the app left it in (see :func:`serve_websocket`)."""
        ch = self.channel
        with self._lock:
            self._closed = True
            if self._state in (_UPGRADED, _RELAY):
                self._state = _DONE
                ch.end()
            elif self._state == _HEAD and self._parser is not None:
                self._fail_answer_locked("the application's response head is incomplete")
        self._end_readiness()

    def _end_readiness(self) -> None:
        """Closed: the descriptor polls readable for good, waking a library thread in its selector.

        Only its write end is closed here: closing the end a selector waits on would
        not wake it (epoll forgets a closed descriptor, select() keeps sleeping), and
        a wake-up racing the close could be lost.  The read end is closed when this
        object is collected, i.e. once the library let go of it.
        """
        ready = self._ready
        if ready is not None:
            ready.end()

    def hang_up(self, grace: float) -> None:
        """The worker is shutting down: end this WebSocket soon (see :meth:`WebSocketService.drain`).

        Reads return b'' (after bytes already taken) and ``rhttp.cancelled`` is set, so
        the app's library sees the connection end and returns; writes still work
        meanwhile, and the handler's return ends the stream (END_STREAM).  A stream
        still open ``grace`` seconds from now is reset (CANCEL).
        """
        ch = self.channel
        self._hung_up = True
        ch.cancelled.set()
        ch.stop_input()
        with ch.tunnel.lock:
            if not ch.finished:
                ch.set_deadline_locked(grace, "worker shutdown")

    # -- socket odds and ends ----------------------------------------------------------------

    def fileno(self) -> int:
        """A descriptor that polls readable exactly when ``recv`` would not block (for selectors).

        Made on first use (simple-websocket asks for it with ``ping_interval``): one
        end of a socketpair, level-triggered like a real socket's: readable while
        bytes are buffered here or in the channel, or once the stream ended, failed
        or this socket closed; not readable otherwise.  ``Channel.on_input`` sets it
        as input arrives (tunnel reader thread, under the tunnel lock); ``recv``
        clears it when it took the last byte (under the same lock, so no arrival is
        missed).  No thread of its own: bytes still move only as the app reads, so
        flow control follows the app.  While a ``recv`` blocks, this waits for it.
        """
        with self._lock:
            if self._closed:
                return -1
            ready = self._ready
            if ready is None:
                with self._rlock:
                    ready = _Readiness()
                    ch = self.channel
                    with ch.tunnel.lock:
                        ch.on_input = ready.set
                        if ch.input_pending_locked() or self._rpos < len(self._rbuf):
                            ready.set()
                    self._ready = ready
                    weakref.finalize(self, ready.release)
            return ready.fileno()

    def settimeout(self, timeout: float | None) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def setsockopt(self, *args: Any) -> None:
        """Accepted and ignored (TCP options belong to the tunnel)."""

    def getpeername(self) -> tuple[str, int]:
        return ("0.0.0.0", 0)

    def getsockname(self) -> tuple[str, int]:
        return ("0.0.0.0", 0)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> TunnelSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TunnelSocket {_name(self.channel)} state={('head', 'upgraded', 'relay', 'done')[self._state]}>"


def _timed_out(timeout: float | None) -> OSError:
    if timeout == 0.0:
        return BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
    return TimeoutError("timed out")  # (socket.timeout is TimeoutError)


class _Readiness:
    """A descriptor whose readability a :class:`TunnelSocket` sets and clears (see ``fileno``).

    A socketpair holding one byte while "readable".  ``set``/``clear`` are cheap
    when nothing changes and never block (both ends are non-blocking; at most one
    byte is ever queued); ``end`` makes it readable for good.  Its lock is a leaf:
    ``set`` runs under the tunnel lock, nothing is acquired under this one.
    """

    __slots__ = ("_ended", "_lock", "_r", "_w", "on")

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._lock = threading.Lock()
        self.on = False
        self._ended = False

    def fileno(self) -> int:
        return self._r.fileno()

    def set(self) -> None:
        if self.on:  # (the common case; a stale False only costs the lock)
            return
        with self._lock:
            if self.on or self._ended:
                return
            self.on = True
            try:
                self._w.send(b"\0")
            except OSError:
                pass

    def clear(self) -> None:
        with self._lock:
            if not self.on or self._ended:
                return
            self.on = False
            try:
                self._r.recv(1)
            except OSError:
                pass

    def end(self) -> None:
        """Readable from now on (the peer end is closed: EOF), waking any selector."""
        with self._lock:
            if self._ended:
                return
            self._ended = self.on = True
            self._w.close()

    def release(self) -> None:
        """Close the descriptor (the owning socket was collected)."""
        self.end()
        self._r.close()


# -- the handler -----------------------------------------------------------------------------------


class _StartResponse:
    """``start_response`` for a WebSocket request: records the app's answer for :meth:`TunnelSocket.answer_wsgi`."""

    __slots__ = ("headers", "pending", "sock", "status")

    def __init__(self, sock: TunnelSocket) -> None:
        self.sock = sock
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.pending: list[bytes] = []

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.sock.channel.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called twice without exc_info")
        if not isinstance(status, str):
            raise TypeError(f"status must be str, got {type(status).__name__}")
        self.status = status
        self.headers = list(headers)
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy ``write()`` callable: kept until the app returns (the answer is sent then)."""
        if data:
            self.pending.append(bytes(data))


def serve_websocket(ch: Channel, ctx: WSGIContext, *, idle_timeout: float = 0.0,
                    clock: Callable[[], float] = time.monotonic, service: WebSocketService | None = None) -> None:
    """The stream handler of ``:protocol websocket`` (app thread; see the module doc).

    ``service`` keeps track of the socket while the app runs (for its :meth:`~WebSocketService.drain`).
    """
    assert ch.headers is not None
    ch.headers = upgrade_fields(ch.headers)  # (the environ is built from the upgrade the app expects)
    try:
        environ = build_environ(ch, ctx)
    except BadRequest as e:
        log.info("%s: %d %s", _name(ch), e.status, e)
        _respond(ch, e.status, str(e))
        return
    environ["SERVER_PROTOCOL"] = "HTTP/1.1"
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input"] = io.BytesIO(b"")
    sock = TunnelSocket(ch, idle_timeout=idle_timeout, clock=clock)
    environ["werkzeug.socket"] = environ["gunicorn.socket"] = environ["rhttp.websocket"] = sock
    if service is not None:
        service._opened(sock)
    access = ctx.access_log
    rec = access.start(environ, ctx.identity) if access is not None else None
    answer = _StartResponse(sock)
    result: Iterable[bytes] | None = None
    where = f"{_name(ch)}: {environ['REQUEST_METHOD']} {environ.get('RAW_URI', '')}"

    def internal_error() -> None:
        _respond(ch, 500, "Internal Server Error")
        sock.status = 500

    try:
        result = ctx.app(environ, answer)
        body: Iterator[bytes] = iter(result)
        if not sock.touched and answer.status is None:
            # A generator app calls start_response (or runs its WebSocket) at its first step.
            first = next(body, None)
            body = _chain([first] if first else [], body)
        if sock.touched:
            # The socket answered; what the app returns is not sent (werkzeug-mode flask-sock
            # returns an empty Response), but its code runs to the end (a generator may be the
            # WebSocket loop itself).
            for _ in body:
                pass
        else:
            if answer.status is None:
                log.error("%s: the application neither accepted the WebSocket nor called start_response();"
                          " answering 500", where)
                internal_error()
            else:
                sock.answer_wsgi(answer.status, answer.headers, _chain(answer.pending, body))
    except RHTTPError as e:  # the stream or the tunnel ended under the app
        log.debug("%s: gave up, %s", where, e)
    except (StopIteration, OSError) as e:
        # flask-sock (gunicorn mode) raises StopIteration and engineio (werkzeug mode) ConnectionError
        # once the WebSocket is over: both servers then close the connection, as finish() does.
        if not sock.touched and ch.error is None:
            log.error("%s: application error before any answer; answering 500", where, exc_info=True)
            internal_error()
        else:
            log.debug("%s: the WebSocket handler ended with %r", where, e)
    except Exception:
        if ch.error is not None:
            log.debug("%s: the app failed after the stream ended", where, exc_info=True)
        elif not ch.headers_sent and not sock.touched:
            log.error("%s: application error before any answer; answering 500", where, exc_info=True)
            internal_error()
        else:
            log.error("%s: application error on an open WebSocket; resetting the stream", where, exc_info=True)
            ch.reset(ErrorCodes.INTERNAL_ERROR)
    finally:
        close_response(result, where)
        try:
            sock.finish()
        except RHTTPError:
            pass
        if service is not None:
            service._closed(sock)
        if rec is not None:
            # (the client saw 101 Switching Protocols for an accepted WebSocket)
            rec.status = None if not ch.headers_sent else 101 if sock.accepted else (sock.status or None)
            rec.sent = sock.bytes_sent
            rec.response_headers = sock.response_headers
            rec.finish()


def _chain(first: Iterable[bytes], rest: Iterable[bytes] | None) -> Iterator[bytes]:
    yield from first
    if rest is not None:
        yield from rest




def _respond(ch: Channel, status: int, message: str, extra: Headers | None = None) -> None:
    body = f"{message}\n".encode()
    fields: Headers = [(b":status", str(status).encode("ascii")), (b"content-type", b"text/plain; charset=utf-8"),
                       (b"content-length", str(len(body)).encode("ascii"))]
    try:
        ch.respond(fields + (extra or []), body)
    except RHTTPError:
        pass


def _name(ch: Channel) -> str:
    return f"{ch.tunnel.name} stream {ch.stream_id}"


# -- the service: the handler, its pool and its limit -----------------------------------------------


class WebSocketService:
    """The worker's WebSockets: their handler, their own thread pool and the limit on open sockets.

    One per :class:`~rhttp_wsgi.worker.WorkerPool`, shared by its tunnels (their
    :class:`~rhttp_wsgi.streams.StreamPolicy` calls :meth:`admit` and
    :meth:`submit`).  ``max_sockets`` bounds the sockets open at once (each holds
    one of the pool's threads); ``idle_timeout`` (0: none) closes a socket without
    traffic either way.
    """

    def __init__(self, max_sockets: int, idle_timeout: float = 0.0, *, name: str = "rhttp-ws",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sockets = max_sockets
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.pool = AppThreadPool(max_sockets, name=name)
        self._lock = threading.Lock()
        #: The sockets whose app runs, and the grace once :meth:`drain` was called (None before).
        self._sockets: set[TunnelSocket] = set()
        self._drain_grace: float | None = None
        #: Sockets admitted whose handler has not returned yet.
        self.open = 0
        #: Sockets admitted since the start, and refused (503) for the limit.
        self.total = 0
        self.refused = 0

    @classmethod
    def from_options(cls, options: WorkerOptions) -> WebSocketService | None:
        """The service ``options`` ask for; None when WebSockets are off."""
        if not options.websockets:
            return None
        return cls(options.max_websockets, options.websocket_idle_timeout)

    def admit(self) -> bool:
        """Count one more socket if the limit allows (the caller then :meth:`submit`s it)."""
        with self._lock:
            if self.open >= self.max_sockets:
                self.refused += 1
                return False
            self.open += 1
            self.total += 1
            return True

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the WebSocket pool for an admitted socket; it stops counting when ``fn`` returns."""
        try:
            self.pool.submit(self._run, fn, args)
        except BaseException:
            self._release()
            raise

    def _run(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self.open -= 1

    def serve(self, ch: Channel, ctx: WSGIContext) -> None:
        """The stream handler (app thread of this pool)."""
        serve_websocket(ch, ctx, idle_timeout=self.idle_timeout, clock=self.clock, service=self)

    def _opened(self, sock: TunnelSocket) -> None:
        with self._lock:
            self._sockets.add(sock)
            grace = self._drain_grace
        if grace is not None:  # (started while the worker drains: ends at once)
            sock.hang_up(grace)

    def _closed(self, sock: TunnelSocket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def drain(self, grace: float = DRAIN_GRACE) -> int:
        """End every open WebSocket, and those still starting, promptly; return how many were open.

        A WebSocket has no natural end, so without this a worker's graceful
        shutdown would wait for each client to leave, up to ``shutdown_timeout``.
        Each socket's reads return b'' (EOF) and ``rhttp.cancelled`` is set: the
        app's library (simple-websocket, wsproto loops) takes it as the connection
        closing, the app returns and the stream ends (END_STREAM); the app may still
        write (e.g. a Close frame) meanwhile.  A stream still open ``grace``
        seconds later is reset (CANCEL).  The client sees its connection close and
        reconnects (to another worker).  :class:`~rhttp_wsgi.worker.WorkerPool`
        calls this when it starts draining (SIGTERM, ``shutdown()``).
        """
        with self._lock:
            self._drain_grace = grace
            sockets = list(self._sockets)
        for sock in sockets:
            sock.hang_up(grace)
        if sockets:
            log.info("ending %d open WebSocket(s) for the shutdown (reset after %gs)", len(sockets), grace)
        return len(sockets)

    def refuse(self, ch: Channel, ctx: WSGIContext) -> None:
        """503 for a socket over ``max_sockets`` (never blocks: it may run on the tunnel's reader)."""
        log.warning("%s: 503, %d WebSockets already open (max_websockets)", _name(ch), self.max_sockets)
        _respond(ch, 503, f"Service Unavailable: this worker already has {self.max_sockets} WebSockets open"
                          " (max_websockets)", [(b"retry-after", b"1")])

    def shutdown(self, timeout: float | None) -> bool:
        """Stop the pool's threads once their sockets ended; True if they all exited in time."""
        return self.pool.shutdown(timeout)
