"""The proxy side of WebSockets: a public HTTP/1.1 upgrade relayed as an RFC 8441 extended CONNECT.

The forwarder (:mod:`rhttp_wsgi.forwarder`) calls into this module when a request asks for
a WebSocket (``Upgrade: websocket`` with ``Connection: upgrade``, :func:`wants_websocket`):

1. The handshake is checked as RFC 6455 §4.2.1 asks (:func:`handshake_key`): a GET over
   HTTP/1.1, ``Sec-WebSocket-Version: 13`` (else 426 with that header) and a
   ``Sec-WebSocket-Key`` that is the base64 of 16 bytes (else 400).
2. The request goes to a worker that advertised SETTINGS_ENABLE_CONNECT_PROTOCOL as
   ``:method CONNECT``, ``:protocol websocket``, ``:scheme``, ``:authority``, ``:path`` and
   the end-to-end fields (:func:`connect_headers`: ``Sec-WebSocket-Key`` stays behind, RFC 8441
   §5 has no use for it; ``-Version``, ``-Protocol``, ``-Extensions``, ``Origin`` go).
3. A 2xx answer becomes ``101 Switching Protocols`` with the ``Sec-WebSocket-Accept`` computed
   from the client's key (:func:`accept_token`) and the worker's negotiated
   ``Sec-WebSocket-Protocol``/``-Extensions``; any other answer passes through as an ordinary
   response.
4. The bytes are relayed both ways (:class:`Relay`) until both sides ended, one side failed,
   or nothing moved for ``websocket_idle_timeout``.

**Taking over the client socket.**  WSGI has no portable way to do it, so the WSGI server
must offer the socket (:func:`client_offer`): the turnkey server (:mod:`rhttp_wsgi.public`)
puts a :class:`ClientOffer` under ``environ["rhttp.upgrade"]``; under werkzeug's
development server and gunicorn (sync, gthread) the raw socket is in
``environ["werkzeug.socket"]`` / ``environ["gunicorn.socket"]``, which this module writes
the 101 to itself and, once the relay ended, tells that server to close the connection
without writing a response (werkzeug: ``ConnectionError``; gunicorn: ``StopIteration``, the
same signals flask-sock uses).  Any other server (waitress...) offers nothing: the forwarder
answers 501.

**The relay** runs on the WSGI server's thread (worker → client) plus one thread of its own
(client → worker).  Memory is bounded both ways: the client's bytes go into the stream with
:meth:`Channel.write`, which blocks above the tunnel's high-water mark until the worker
credits them, and nothing more is read from the client meanwhile; the worker's bytes are
read from the stream (crediting the worker) only once the previous chunk was written to the
client.  The client socket is switched to non-blocking mode and every ``recv``/``send`` is
one non-blocking call under a lock, waits happen in ``poll`` outside it: over TLS (an
``ssl.SSLSocket``) the two threads then never run OpenSSL at the same time, which corrupts
records (see docs/design.md, *Threads*).

Closing: the worker ending its side (END_STREAM) half-closes the client connection (FIN, as
RFC 6455 §7.1.1 wants the server to close TCP first) and the relay waits up to
:data:`CLOSE_GRACE` for the client to close too; the client closing its side ends the stream
(END_STREAM: the worker's app reads EOF) and the worker gets as long to end its side; the
client going away with an error, or the idle timeout, resets the stream (CANCEL: the worker
sets ``rhttp.cancelled``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from h2.errors import ErrorCodes

from ._tunnel import Channel
from .errors import StreamReset, StreamTimeout, TunnelClosed

__all__ = [
    "CLOSE_GRACE",
    "UPGRADE_KEY",
    "ClientOffer",
    "HandshakeError",
    "Relay",
    "WebSocketStats",
    "accept_token",
    "client_offer",
    "connect_headers",
    "handshake_key",
    "wants_websocket",
]

log = logging.getLogger("rhttp_wsgi.proxy.websocket")

#: The environ key under which the turnkey server offers its client socket.
UPGRADE_KEY = "rhttp.upgrade"
#: RFC 6455 §1.3: appended to the client's key before hashing.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Bytes moved per read in either direction.
CHUNK = 64 * 1024
#: While the client does not read, how often a blocked write looks whether the relay was stopped.
TICK = 0.5
#: After one side ended cleanly, how long the other may take to end too.
CLOSE_GRACE = 5.0
#: End-to-end fields that mean nothing in an extended CONNECT (RFC 8441 §5).
_NOT_FORWARDED = frozenset({b"sec-websocket-key", b"content-length", b"transfer-encoding"})
#: Fields of the worker's 2xx that the 101 does not repeat (we set Upgrade/Connection and the accept).
_NOT_ANSWERED = frozenset({b"content-length", b"transfer-encoding", b"sec-websocket-accept", b"upgrade",
                           b"connection"})


class HandshakeError(ValueError):
    """The upgrade request is not a valid WebSocket handshake: answer ``status`` (with ``headers``)."""

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []


def _tokens(value: Any) -> set[str]:
    return {t.strip().lower() for t in str(value).split(",")} if value else set()


def wants_websocket(environ: Mapping[str, Any]) -> bool:
    """The request asks to switch to WebSocket: ``Upgrade: websocket`` and ``Connection: upgrade``."""
    return "websocket" in _tokens(environ.get("HTTP_UPGRADE")) and "upgrade" in _tokens(environ.get("HTTP_CONNECTION"))


def handshake_key(environ: Mapping[str, Any]) -> str:
    """The client's ``Sec-WebSocket-Key`` once the handshake is valid (RFC 6455 §4.2.1), else
    :class:`HandshakeError`."""
    if environ.get("REQUEST_METHOD") != "GET":
        raise HandshakeError(400, "a WebSocket upgrade must be a GET (RFC 6455 §4.1)")
    if str(environ.get("SERVER_PROTOCOL", "HTTP/1.1")) in ("HTTP/1.0", "HTTP/0.9"):
        raise HandshakeError(400, "a WebSocket upgrade needs HTTP/1.1 (RFC 6455 §4.1)")
    versions = _tokens(environ.get("HTTP_SEC_WEBSOCKET_VERSION"))
    if "13" not in versions:
        raise HandshakeError(426, "unsupported Sec-WebSocket-Version (13 is supported, RFC 6455 §4.4)",
                             [("Sec-WebSocket-Version", "13")])
    key = str(environ.get("HTTP_SEC_WEBSOCKET_KEY", "")).strip()
    try:
        valid = len(key) == 24 and len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise HandshakeError(400, "Sec-WebSocket-Key must be the base64 of 16 bytes (RFC 6455 §4.1)")
    return key


def accept_token(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def connect_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The forwarder's request headers for the GET turned into an extended CONNECT (RFC 8441 §4).

    ``headers`` come from ``forwarder.build_request`` (pseudo-headers first, hop-by-hop fields,
    ``Upgrade`` and ``Connection`` already dropped).
    """
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name == b":method":
            out.append((b":method", b"CONNECT"))
            out.append((b":protocol", b"websocket"))
        elif name not in _NOT_FORWARDED:
            out.append((name, value))
    return out


def response_head(key: str, fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The fields of our 101 for the worker's 2xx ``fields`` (hop-by-hop ones already dropped)."""
    head = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", accept_token(key).encode("ascii"))]
    head += [f for f in fields if f[0] not in _NOT_ANSWERED]
    return head


# -- taking over the client socket --------------------------------------------------------------


class ClientOffer(Protocol):
    """A WSGI server's offer of the client connection for a protocol switch."""

    def accept(self, head: bytes) -> tuple[socket.socket, bytes]:
        """Write ``head`` (the whole 101 response head) and hand over the socket, with the bytes
        the client already sent after its request (a client may send before it sees the 101).
        OSError when the head could not be written (the client went away)."""

    def finish(self) -> Iterable[bytes]:
        """What the WSGI app returns (or raises) once the relay is over and the socket was used."""


class _ServerSocketOffer:
    """werkzeug's or gunicorn's raw socket (``werkzeug.socket`` / ``gunicorn.socket``)."""

    def __init__(self, sock: socket.socket, server: str) -> None:
        self._sock = sock
        self._server = server

    def accept(self, head: bytes) -> tuple[socket.socket, bytes]:
        self._sock.sendall(head)
        return self._sock, b""

    def finish(self) -> Iterable[bytes]:
        # Neither server may write a response on a connection that carried a WebSocket: each has
        # one signal that closes it silently (flask-sock relies on the same two).
        if self._server == "gunicorn":
            raise StopIteration
        raise ConnectionError("WebSocket relayed; the server closes the connection")


def client_offer(environ: Mapping[str, Any]) -> ClientOffer | None:
    """The client connection the WSGI server offers for an upgrade (None: it offers none)."""
    offer = environ.get(UPGRADE_KEY)
    if offer is not None:
        return offer  # type: ignore[no-any-return]
    for key, server in (("werkzeug.socket", "werkzeug"), ("gunicorn.socket", "gunicorn")):
        sock = environ.get(key)
        if isinstance(sock, socket.socket):
            return _ServerSocketOffer(sock, server)
    return None


# -- counters -----------------------------------------------------------------------------------


class WebSocketStats:
    """The proxy's WebSocket counters (relayed now, in total, bytes each way); any thread.

    ``reserved`` counts the upgrades past the limit check, from then until they end (being set
    up or relayed): ``max_websockets`` bounds it.  ``open`` and ``total`` count the sockets from
    the moment their 101 is written.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reserved = 0
        self.open = 0
        self.total = 0
        self.bytes_up = 0
        self.bytes_down = 0

    def reserve(self, limit: int) -> bool:
        """One more upgrade, unless ``limit`` are under way (0: no limit)."""
        with self._lock:
            if limit and self.reserved >= limit:
                return False
            self.reserved += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.reserved -= 1

    def opened(self) -> None:
        with self._lock:
            self.open += 1
            self.total += 1

    def closed(self) -> None:
        with self._lock:
            self.open -= 1

    def moved(self, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self.bytes_up += up
            self.bytes_down += down

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"open": self.open, "total": self.total, "bytes_up": self.bytes_up,
                    "bytes_down": self.bytes_down}


# -- the relay ----------------------------------------------------------------------------------


class _Pipe:
    """The client socket, non-blocking; each call one non-blocking ``recv``/``send`` under a lock."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self._was_timeout = sock.gettimeout()
        sock.setblocking(False)

    def _wait(self, events: int, timeout: float | None) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))

    def recv(self, n: int, timeout: float | None) -> bytes | None:
        """Up to ``n`` bytes; b'' at the client's EOF; None when nothing came within ``timeout``
        (None: wait until something comes, or the socket is shut down)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.lock:
                try:
                    return self.sock.recv(n)
                except (BlockingIOError, ssl.SSLWantReadError):
                    want = select.POLLIN
                except ssl.SSLWantWriteError:  # TLS renegotiation data must go out first
                    want = select.POLLOUT
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self._wait(want, remaining)

    def sendall(self, data: bytes, stop: threading.Event) -> None:
        """Write all of ``data``; waits while the client does not read; OSError when it failed or
        ``stop`` was set meanwhile."""
        view = memoryview(data)
        while view:
            with self.lock:
                try:
                    # (after SSLWantWrite the retry repeats the same slice, as OpenSSL requires)
                    sent = self.sock.send(view[:CHUNK])
                    view = view[sent:]
                    continue
                except (BlockingIOError, ssl.SSLWantWriteError):
                    want = select.POLLOUT
                except ssl.SSLWantReadError:
                    want = select.POLLIN
            if stop.is_set():
                raise ConnectionAbortedError("the relay was stopped")
            self._wait(want, TICK)

    def half_close(self) -> None:
        """FIN to the client (the descriptor's shutdown: an SSLSocket's would drop its TLS state)."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
        except OSError:
            pass

    def abort(self) -> None:
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def restore(self) -> None:
        try:
            self.sock.settimeout(self._was_timeout)
        except OSError:
            pass


class Relay:
    """Bytes both ways between a client socket and a worker's stream (see the module doc).

    :meth:`run` blocks (on the calling thread) until the socket is over and returns how it ended;
    ``bytes_up`` (client → worker) and ``bytes_down`` (worker → client) are what went through.
    """

    def __init__(self, ch: Channel, sock: socket.socket, early: bytes, *, idle_timeout: float,
                 stats: WebSocketStats | None = None, name: str = "websocket") -> None:
        self.ch = ch
        self.pipe = _Pipe(sock)
        self.early = early
        self.idle_timeout = idle_timeout
        self.stats = stats
        self.name = name
        self.bytes_up = 0
        self.bytes_down = 0
        self.outcome = ""
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._client_ended = 0.0
        self._worker_ended = 0.0
        self._worker_done = threading.Event()

    def _idle(self, now: float) -> bool:
        return bool(self.idle_timeout) and now - self._last >= self.idle_timeout

    def _until_idle(self, now: float) -> float | None:
        """How long a wait may last before the idle clock must be read again (None: no idle timeout).

        No periodic wake-ups: an idle socket costs nothing until its deadline, and whatever ends
        a relay early (the other direction's abort, the worker's reset) wakes the waits itself.
        """
        if not self.idle_timeout:
            return None
        return max(0.0, self._last + self.idle_timeout - now) + 0.01

    def _abort(self, outcome: str) -> None:
        """Stop both directions: reset the stream (CANCEL, no-op when finished) and cut the socket."""
        if not self.outcome:
            self.outcome = outcome
        self._stop.set()
        self._worker_done.set()  # (a wake-up for the upward thread's wait after the client's EOF)
        self.ch.reset(ErrorCodes.CANCEL)
        self.pipe.abort()

    def run(self) -> str:
        up = threading.Thread(target=self._client_to_worker, name=f"{self.name}-up", daemon=True)
        up.start()
        try:
            self._worker_to_client()
        except BaseException:
            self._abort("relay failed")
            raise
        finally:
            # The upward thread ends by itself within CLOSE_GRACE of the worker's end (or at once on
            # abort); past that bound it is cut.
            up.join(CLOSE_GRACE + 2 * TICK)
            if up.is_alive():
                self._abort("the client did not close")
                up.join()
            # Both sides ended cleanly: our END_STREAM may still be queued (the stream retires once
            # the tunnel's writer sent it), so it must not be overtaken by a reset.
            clean = self._client_ended and self._worker_ended and not self._stop.is_set()
            if not clean and not self.ch.finished:
                self.ch.reset(ErrorCodes.CANCEL)
            self.pipe.restore()
        return self.outcome or "closed"

    def _worker_to_client(self) -> None:
        ch = self.ch
        pipe = self.pipe
        stop = self._stop
        while not stop.is_set():
            try:
                data = ch.read(-1, timeout=self._until_idle(time.monotonic()))
            except StreamTimeout:
                if self._idle(time.monotonic()):
                    log.info("%s: no traffic for %gs; closing", self.name, self.idle_timeout)
                    self._abort(f"idle for {self.idle_timeout:g}s")
                continue
            except (StreamReset, TunnelClosed) as e:
                if not stop.is_set():
                    log.info("%s: the worker's stream failed: %s; closing the client connection", self.name, e)
                    self._abort(f"worker stream failed: {e}")
                return
            if not data:
                self._worker_ended = time.monotonic()
                self._worker_done.set()
                if not self.outcome:
                    self.outcome = "closed by the worker" if not self._client_ended else "closed by the client"
                pipe.half_close()
                return
            try:
                pipe.sendall(data, stop)
            except OSError as e:
                if not stop.is_set():
                    log.debug("%s: writing to the client failed: %s", self.name, e)
                    self._abort("the client went away")
                return
            self._last = time.monotonic()
            self.bytes_down += len(data)
            if self.stats is not None:
                self.stats.moved(down=len(data))

    def _client_to_worker(self) -> None:
        ch = self.ch
        pipe = self.pipe
        stop = self._stop
        pending = self.early
        while not stop.is_set():
            if pending:
                data: bytes | None = pending
                pending = b""
            else:
                try:
                    data = pipe.recv(CHUNK, self._until_idle(time.monotonic()))
                except OSError as e:
                    if not stop.is_set():
                        log.debug("%s: reading from the client failed: %s", self.name, e)
                        self._abort("the client went away")
                    return
            now = time.monotonic()
            if data is None:
                if self._idle(now):
                    log.info("%s: no traffic for %gs; closing", self.name, self.idle_timeout)
                    self._abort(f"idle for {self.idle_timeout:g}s")
                continue
            if not data:
                self._client_ended = now
                try:
                    ch.end()  # END_STREAM: the app reads EOF
                except (StreamReset, TunnelClosed):
                    pass
                if not self._worker_done.wait(CLOSE_GRACE) and not stop.is_set():
                    self._abort("the worker did not close after the client")
                return
            self._last = now
            if self._worker_ended:
                continue  # nobody left to read it: the worker ended (and maybe reset) its stream
            try:
                # Blocks above the tunnel's high-water mark until the worker credits: backpressure.
                ch.write(data, timeout=self.idle_timeout or None)
            except StreamTimeout:
                log.info("%s: the worker took nothing for %gs; closing", self.name, self.idle_timeout)
                self._abort(f"worker stalled for {self.idle_timeout:g}s")
                return
            except (StreamReset, TunnelClosed) as e:
                if not stop.is_set() and not self._worker_ended:
                    log.info("%s: the worker's stream failed: %s; closing the client connection", self.name, e)
                    self._abort(f"worker stream failed: {e}")
                return
            self.bytes_up += len(data)
            if self.stats is not None:
                self.stats.moved(up=len(data))
