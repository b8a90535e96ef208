"""Turnkey public HTTP/1.1 server: a small threaded WSGI server on h11.

The proxy's forwarder (:mod:`rhttp_wsgi.forwarder`) is a plain WSGI app and can
be mounted on any WSGI server; this module is the batteries-included one that
``Proxy.start_public()`` runs.  It is a general WSGI server, but it was written
for the forwarder's needs:

* **h11 does all HTTP/1.1 parsing and framing.**  Request smuggling, chunked
  encoding, ``Content-Length`` / ``Transfer-Encoding`` conflicts, keep-alive
  rules and pipelining are easy to get subtly wrong by hand; h11 is a small,
  strict, well-tested sans-I/O implementation, so this module only moves bytes
  and builds the environ (with :func:`rhttp_wsgi._http.request_environ`, the
  builder the worker uses too).
* **A response known whole goes out in one write, without h11**: a one-item
  list or tuple, and the forwarder's :class:`~rhttp_wsgi._http.CompleteResponse`
  (whose header block was validated when it was built), even through
  middleware, as long as the status and headers that reached
  ``start_response`` are the ones it carries.  h11's state machine is then
  restarted for the next request.
* **Every body chunk the app yields is written at once** (one ``sendall`` per
  chunk, chunked encoding when the app set no ``Content-Length``), so server-sent
  events stream through.
* **An exception from the app's iterable after the headers went out closes the
  connection without the terminating zero-length chunk** (or short of the
  ``Content-Length``): the client sees a truncated response instead of a clean
  one that silently lacks data.
* Timeouts (from :class:`~rhttp_wsgi.options.ProxyOptions`): ``header_timeout``
  bounds how long a client may take to send a request head (slowloris),
  ``idle_timeout`` how long a kept-alive connection may sit between requests and
  how long a write may stall, ``body_timeout`` how long a request body read may
  stall (0: forever) and ``body_min_rate`` the slowest average body rate (then
  408, connection closed).
* ``Expect: 100-continue`` is answered when the app first reads
  ``wsgi.input``; malformed requests get h11's suggested status (400, or 431
  for an oversized head); ``max_request_body`` gives 413.
* Request smuggling: on top of h11's checks (conflicting Content-Length,
  bad chunk sizes, unknown transfer codings, bare CR, whitespace before the
  colon), ambiguous framing is refused with 400 and the connection closed:
  Content-Length together with Transfer-Encoding, any repeated or list-valued
  Content-Length (h11 would merge equal ones), Transfer-Encoding in an
  HTTP/1.0 request, and obsolete line folding (h11 would unfold it), so that no
  front-end can ever frame a request differently from this server (RFC 9112
  §5.2, §6.1, §6.3).  Bare LF line endings are accepted, as h11 (and RFC 9112
  §2.2) allow, and parsed consistently.
* A body-less request that carries ``Upgrade`` gets ``environ["rhttp.upgrade"]``
  (:class:`_UpgradeOffer`): the app may take the connection over (the
  forwarder relays WebSockets over it, :mod:`rhttp_wsgi.upgrade`); it then
  writes its own ``101`` head, and this server writes no response and closes
  the connection when the app returns.
* Access lines for the requests this server refuses itself (``access_log``, the
  proxy's :class:`~rhttp_wsgi.accesslog.AccessLog`; None: none): a malformed or
  oversized head (400, 431), a head that stalled after its first bytes (408), a
  ``Content-Length`` over ``max_request_body`` (413), CONNECT (405) and a
  target the environ cannot carry (400) never reach the app, so this server
  writes their line (what was parsed, else ``-``; a fresh request id; no
  worker).  A request that reached the app is the app's to log (the forwarder
  logs its own answers, the body errors it reads included); a connection that
  closes without a request (an idle keep-alive one) is not a request.

Threads: one listener thread and one thread per connection
(:class:`~rhttp_wsgi.server.ThreadedTCPServer`).  Nothing is shared between
connections except the servers' bookkeeping sets, each under its lock.
"""

from __future__ import annotations

import io
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import h11

from ._http import (
    CONNECTION_SPECIFIC,
    NO_BODY_STATUS,
    BadRequest,
    CompleteResponse,
    content_length,
    h1_block,
    reason_phrase,
    request_environ,
    valid_name,
)
from ._io import body_wait, peer_closed
from .accesslog import AccessLog, new_request_id, request_id
from .errors import RHTTPError, UpstreamError
from .options import ProxyOptions
from .server import ThreadedTCPServer

__all__ = ["PublicServer", "RequestBodyError", "WSGIApp"]

log = logging.getLogger("rhttp_wsgi.public")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

RECV_SIZE = 65536
#: After an early response, read (and discard) at most this much of the unread
#: request body so the client sees the response instead of a connection reset.
DRAIN_LIMIT = 4 << 20
DRAIN_TIME = 2.0
#: Response headers a WSGI app must not set on an HTTP/1.1 connection: framing
#: is h11's job (PEP 3333 forbids hop-by-hop headers from apps, too).
_APP_FRAMING = CONNECTION_SPECIFIC | frozenset({b"te", b"trailer"})
#: The blank line that ends a head (h11 accepts bare LF too).
_END_OF_HEAD = re.compile(rb"\n\r?\n")
#: A header line that starts with SP/HTAB: obs-fold (RFC 9112 §5.2).
_OBS_FOLD = re.compile(rb"\n[ \t]")
#: Content-Length lines of a raw head: h11 merges equal repeats, this server refuses them.
_CONTENT_LENGTH_LINE = re.compile(rb"(?im)^content-length[ \t]*:([^\r\n]*)")
#: reason-phrase = *( HTAB / SP / VCHAR / obs-text ) (RFC 9112 §4)
_REASON = re.compile(rb"[\t \x21-\x7e\x80-\xff]*")
#: A request line as sent, for the access line of a head h11 refused: method, target, protocol.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) (HTTP/\d\.\d)\r?\n")
#: Response header names (as apps spell them) known to be tokens, mapped to their
#: lowercase bytes; never a framing header.  Bounded (apps could generate names).
_TOKEN_NAMES: dict[str, bytes] = {}
_TOKEN_NAMES_MAX = 512


class RequestBodyError(ValueError):
    """Reading the request body failed; ``status`` is the answer (400, 408, 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _Closed(Exception):
    """The client went away (or the server is stopping)."""


class PublicServer:
    """A threaded HTTP/1.1 (keep-alive) WSGI server on h11, optionally over TLS.

    ``PublicServer(app, ("0.0.0.0", 8080), options=proxy_options).start()``
    returns the bound address; :meth:`shutdown` stops accepting, lets in-flight
    requests finish within the timeout, then closes every connection.  The
    limits come from ``options`` (``header_timeout``, ``idle_timeout``,
    ``body_timeout``, ``body_min_rate``, ``max_request_head``,
    ``max_request_body``, ``max_connections``).  ``access_log`` (None: off)
    gets a line for each request this server refuses before the app (see the
    module doc).
    """

    def __init__(
        self,
        app: WSGIApp,
        address: tuple[str, int] | None = None,
        *,
        options: ProxyOptions,
        sock: socket.socket | None = None,
        ssl_context: ssl.SSLContext | None = None,
        name: str = "rhttp-public",
        access_log: AccessLog | None = None,
    ) -> None:
        self.app = app
        self.access_log = access_log
        self.trust_request_id = options.trust_request_id
        self.ssl_context = ssl_context
        self.header_timeout = options.header_timeout
        self.idle_timeout = options.idle_timeout
        #: None: a body read waits forever (``body_timeout`` 0).
        self.body_timeout: float | None = options.body_timeout or None
        self.body_min_rate = options.body_min_rate
        self.max_head = options.max_request_head
        self.max_body = options.max_request_body
        self.name = name
        self.url_scheme = "https" if ssl_context is not None else "http"
        self.stopping = threading.Event()
        self._conns: set[_Connection] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._server = ThreadedTCPServer(address, self._handle, name=name, sock=sock,
                                         max_connections=options.max_connections, on_overload=_send_overloaded)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.bound

    def start(self) -> tuple[str, int]:
        """Serve in a background thread; returns the bound (host, port)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.serve_forever, name=f"{self.name}-listener",
                                            daemon=True)
            self._thread.start()
        return self.address

    def serve_forever(self) -> None:
        log.info("%s: serving HTTP/1.1%s on %s:%d", self.name, " over TLS" if self.ssl_context else "",
                 *self.address)
        self._server.serve()

    def stop_accepting(self) -> None:
        """Stop the listener and close kept-alive connections that are between requests."""
        self.stopping.set()
        self._server.stop_accepting()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close_if_idle()

    def wait(self, timeout: float | None) -> bool:
        """Wait for every connection thread to finish; False on timeout."""
        return self._server.join_threads(timeout)

    def shutdown(self, timeout: float | None = 30.0) -> bool:
        """Stop accepting, let in-flight requests finish within ``timeout``, close the rest.

        Returns True if every connection finished in time.
        """
        self.stop_accepting()
        ok = self._server.join_threads(timeout)
        if not ok:
            log.warning("%s: closing %d connections still busy at the deadline", self.name,
                        len(self._server.threads()))
            self.close_all()
            self._server.join_threads(5.0)
        return ok

    def close_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.abort()

    # -- connection thread ------------------------------------------------------

    def _handle(self, sock: socket.socket, addr: Any) -> None:
        conn = _Connection(self, sock, addr)
        with self._lock:
            self._conns.add(conn)
        try:
            conn.run()
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()


def _send_overloaded(sock: socket.socket) -> None:
    body = b"Service Unavailable: too many connections\n"
    sock.settimeout(1.0)
    sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 1\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class _Connection:
    """One public HTTP/1.1 connection (its own thread)."""

    def __init__(self, server: PublicServer, sock: socket.socket, addr: Any) -> None:
        self.server = server
        self.raw = sock
        self.sock: socket.socket = sock
        self.addr = addr
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=server.max_head)
        self.idle = True
        self.closed = False
        #: Set when the request body's framing can no longer be trusted (a
        #: stalled or malformed body): the response says "Connection: close"
        #: and the connection ends after it.
        self.must_close = False
        self.requests = 0
        self._lock = threading.Lock()
        #: The socket timeout last set (``settimeout`` costs a syscall: only
        #: called when the wanted value differs, see ``_set_timeout``).
        self._timeout: float | None = None
        #: The per-connection part of every environ (built on first use).
        self._base_environ: dict[str, Any] | None = None
        #: The current request's headers as (lowercase name, value).
        self.request_headers: list[tuple[bytes, bytes]] = []
        #: The current request's Content-Length (None: absent).
        self.request_length: int | None = None
        #: h11's keep-alive verdict for the current request.
        self.keep_alive = True
        #: The current request has no body (no Content-Length, no Transfer-Encoding).
        self.bodyless = True
        #: The response went out without h11 (in one write): h11's side of the
        #: cycle is stale and the next cycle starts on a fresh h11.Connection.
        self.bypassed = False
        #: time.monotonic() when the current request's head began (its access line's start).
        self.head_start = 0.0
        #: The app took the connection over (a WebSocket, ``environ["rhttp.upgrade"]``): no
        #: response is written for the request, and the connection closes when the app returns.
        self.upgraded = False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover
            pass

    # -- lifecycle ---------------------------------------------------------------

    def run(self) -> None:
        s = self.server
        if s.ssl_context is not None:
            try:
                self.raw.settimeout(s.header_timeout)
                self._timeout = s.header_timeout
                tls = s.ssl_context.wrap_socket(self.raw, server_side=True, do_handshake_on_connect=False)
                # wrap_socket() detached the plain socket: from now on the
                # SSLSocket owns the descriptor.
                self.sock = self.raw = tls
                tls.do_handshake()
            except OSError as e:  # ssl.SSLError included
                log.debug("%s: TLS handshake with %s failed: %s", s.name, self.addr, e)
                return
        while not self.closed:
            try:
                req = self._next_request()
            except _Closed:
                return
            if req is None:
                return
            with self._lock:
                self.idle = False
            self.requests += 1
            try:
                keep = self._serve(req)
            except _Closed:
                return
            if not keep or s.stopping.is_set():
                return
            if self.bypassed:
                # Our response went out without h11: carry whatever the client
                # already sent (pipelining) over to a fresh state machine.
                self.bypassed = False
                their = self.h11.their_state
                if their is not h11.DONE and not (their is h11.SEND_BODY and self.bodyless):
                    return
                data, closed = self.h11.trailing_data
                self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=s.max_head)
                if data:
                    self.h11.receive_data(data)
                if closed:
                    self.h11.receive_data(b"")
            else:
                if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                    return
                try:
                    self.h11.start_next_cycle()
                except h11.LocalProtocolError:
                    return
            with self._lock:
                if s.stopping.is_set():
                    return
                self.idle = True

    def close_if_idle(self) -> None:
        with self._lock:
            if self.idle:
                self._shutdown_socket()

    def abort(self) -> None:
        self._shutdown_socket()

    def _shutdown_socket(self) -> None:
        # Called from other threads: shut the descriptor down without touching
        # an SSLSocket's TLS state (SSLSocket.shutdown() would drop it).
        try:
            socket.socket.shutdown(self.raw, socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass

    def client_gone(self) -> bool:
        """True when the client closed its side (checked without reading; Linux POLLRDHUP)."""
        return self.closed or peer_closed(self.raw)

    # -- I/O ------------------------------------------------------------------------

    def _set_timeout(self, timeout: float | None) -> bool:
        """Make the socket timeout at most ``timeout`` (and at least 98% of it; None: none).

        Returns True when the timeout in force is shorter than ``timeout``
        (the caller retries a recv that timed out early).  Performance: a
        kept-alive connection asks for ~the same value again and again, and
        each ``settimeout`` is an ``ioctl``.
        """
        cur = self._timeout
        if timeout is None:
            if cur is not None:
                self.sock.settimeout(None)
                self._timeout = None
            return False
        if cur is not None and timeout * 0.98 <= cur <= timeout:
            return cur != timeout
        self.sock.settimeout(timeout)
        self._timeout = timeout
        return False

    def _recv(self, timeout: float | None) -> bytes:
        """One recv, waiting at most ``timeout`` seconds (None: as long as it takes)."""
        if timeout is not None and timeout <= 0:
            raise TimeoutError("deadline passed")
        deadline = time.monotonic() + timeout if self._set_timeout(timeout) and timeout is not None else 0.0
        try:
            return self.sock.recv(RECV_SIZE)
        except ssl.SSLError as e:
            raise _Closed(str(e)) from e
        except TimeoutError:
            if not deadline:
                raise
        # The timeout in force was slightly shorter than asked: wait out the rest.
        return self._recv(deadline - time.monotonic())

    def _write(self, data: bytes) -> None:
        self._set_timeout(self.server.idle_timeout)
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise _Closed(f"write failed: {e}") from e

    def _send(self, *events: Any) -> None:
        data = b"".join([self.h11.send(ev) or b"" for ev in events])
        if data:
            self._write(data)

    def _next_event(self, timeout: float | None) -> Any:
        """Next h11 event for the current request body, each recv bounded by ``timeout``."""
        while True:
            ev = self.h11.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            data = self._recv(timeout)
            self.h11.receive_data(data)

    def _next_request(self) -> h11.Request | None:
        s = self.server
        # A fresh connection has header_timeout to send its head; a kept-alive
        # one may idle for idle_timeout, then has header_timeout from the first byte.
        first_byte = self.requests == 0
        start = time.monotonic()
        deadline = start + (s.header_timeout if first_byte else s.idle_timeout)
        # The raw bytes of this head (starting with what a pipelining client
        # already sent), for the framing checks h11 cannot do after it merged
        # or unfolded header lines.  h11 caps the head at max_head.
        pending, closed = self.h11.trailing_data
        head = bytearray(pending)
        # Nothing buffered: h11 could only say NEED_DATA, so go straight to recv.
        skip = not pending and not closed and self.h11.their_state is h11.IDLE
        while True:
            if skip:
                skip = False
                ev: Any = h11.NEED_DATA
            else:
                try:
                    ev = self.h11.next_event()
                except h11.RemoteProtocolError as e:
                    self.head_start = start
                    self._protocol_error(e, bytes(head))
                    return None
            if ev is h11.NEED_DATA:
                try:
                    data = self._recv(deadline - time.monotonic())
                except TimeoutError:
                    if self.h11.trailing_data[0]:
                        self.head_start = start
                        self._refused(408, "request head not received in time", head=bytes(head))
                    return None
                except OSError:
                    return None
                if data and not first_byte:
                    first_byte = True
                    start = time.monotonic()
                    deadline = start + s.header_timeout
                if len(head) <= s.max_head:
                    head += data
                self.h11.receive_data(data)
                continue
            if isinstance(ev, h11.Request):
                items = _header_items(ev.headers)
                self.request_headers = items
                self.head_start = start
                # h11 checks the size of an *incomplete* head only; a complete
                # one that arrived in one read is measured here.
                size = len(ev.method) + len(ev.target) + sum([len(k) + len(v) + 4 for k, v in items])
                if size > s.max_head:
                    self._refused(431, f"request head larger than {s.max_head} bytes", ev)
                    return None
                problem = _framing_problem(ev, items, bytes(head))
                length = None
                if problem is None:
                    try:
                        length = content_length(items)
                    except ValueError as e:  # h11 checked the digits; this is the size bound
                        problem = str(e)
                if problem is not None:
                    log.info("%s: refused request from %s: %s (400)", s.name, self.addr, problem)
                    self._refused(400, problem, ev)
                    return None
                self.keep_alive = _keep_alive(ev, items)
                self.request_length = length
                self.bodyless = (length == 0 if length is not None
                                 else all(k != b"transfer-encoding" for k, _ in items))
                return ev
            return None  # ConnectionClosed, or a client that sent something else

    def _protocol_error(self, e: h11.RemoteProtocolError, head: bytes) -> None:
        status = e.error_status_hint or 400
        log.info("%s: malformed request from %s: %s (%d)", self.server.name, self.addr, e, status)
        self._refused(status, str(e), head=head)

    def _refused(self, status: int, message: str, req: h11.Request | None = None, head: bytes = b"") -> None:
        """Answer ``status`` to a request the app never saw, and write its access line (if the log is
        on): what is known of the request (``req``, else the request line in ``head`` if it reads as
        one), since ``head_start``."""
        access = self.server.access_log
        if access is None:
            self._simple_error(status, message)
            return
        rec = access.start(self._refused_environ(req, head))
        sent = self._simple_error(status, message)
        if rec is not None:
            ago = time.monotonic() - self.head_start
            if 0.0 <= ago < 86400.0:
                rec.t0 -= ago
                rec.started -= ago
            rec.status = status
            rec.sent = sent
            rec.finish()

    def _refused_environ(self, req: h11.Request | None, head: bytes) -> dict[str, Any]:
        """The environ of a refused request's access line (the error path only)."""
        peer = self.addr if isinstance(self.addr, tuple) else None
        env: dict[str, Any] = {"REMOTE_ADDR": str(peer[0]) if peer else "", "RAW_URI": "-"}
        method = target = version = None
        if req is not None:
            method, target = req.method, req.target
            version = b"HTTP/" + req.http_version
            for name, value in self.request_headers:
                key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
                text = value.decode("latin-1")
                env[key] = env[key] + "," + text if key in env else text
        else:
            m = _REQUEST_LINE.match(head.lstrip(b"\r\n"))
            if m is not None:
                method, target, version = m.groups()
        if method is not None and target is not None and version is not None:
            env["REQUEST_METHOD"] = method.decode("latin-1")
            env["RAW_URI"] = target.decode("latin-1")
            env["SERVER_PROTOCOL"] = version.decode("latin-1")
        trusted = env.get("HTTP_X_REQUEST_ID") if self.server.trust_request_id else None
        env["rhttp.request_id"] = request_id(trusted) if trusted is not None else new_request_id()
        return env

    def _simple_error(self, status: int, message: str) -> int:
        """Answer ``status`` with a plain-text body and close; the body bytes written (0: failed)."""
        reason = reason_phrase(status)
        body = f"{status} {reason}: {message}\n".encode("utf-8", "replace")
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(body)),
                   (b"connection", b"close")]
        try:
            if self.h11.our_state is h11.SEND_RESPONSE or self.h11.our_state is h11.IDLE:
                self._send(h11.Response(status_code=status, headers=headers, reason=reason.encode()),
                           h11.Data(data=body), h11.EndOfMessage())
                return len(body)
        except (h11.LocalProtocolError, _Closed):
            pass
        # h11 will not write after a protocol error in some states; the
        # answer is fixed bytes, so write it directly (nothing is parsed here).
        raw = b"HTTP/1.1 %d %s\r\n" % (status, reason.encode()) + b"".join(
            k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body
        try:
            self.sock.settimeout(1.0)
            self._timeout = 1.0
            self.sock.sendall(raw)
        except OSError:
            return 0
        return len(body)

    # -- one request -------------------------------------------------------------------

    def _serve(self, req: h11.Request) -> bool:
        """Run the app for one request; True to keep the connection."""
        s = self.server
        if req.method == b"CONNECT":
            self._refused(405, "CONNECT is not supported", req)
            return False
        if s.max_body:
            length = self.request_length
            if length is not None and length > s.max_body:
                self._refused(413, f"request body larger than {s.max_body} bytes", req)
                return False
        try:
            environ = self._environ(req)
        except BadRequest as e:
            self._refused(e.status, str(e), req)
            return False
        resp = _Response(self, req.method == b"HEAD")
        result: Iterable[bytes] | None = None
        try:
            result = s.app(environ, resp.start_response)
            if self.upgraded:
                return False
            whole = _whole_body(result) if resp.app_status is not None and not resp.sent else None
            if whole is not None:
                if type(result) is not CompleteResponse or not resp.write_complete(result):
                    resp.single(whole)
            else:
                for chunk in result:
                    if chunk:
                        resp.write(chunk)
                resp.finish()
        except _Closed as e:
            log.debug("%s: client %s went away: %s", s.name, self.addr, e)
            return False
        except Exception as e:
            method, target = req.method.decode("latin-1"), req.target.decode("latin-1")
            if self.upgraded:
                log.debug("%s: %s %s: the app that took the connection over raised %r", s.name, method, target, e)
                return False
            if resp.sent:
                # Truncate visibly: no terminating chunk, connection closed.
                if self.client_gone():
                    # Nobody to tell: a client leaving mid-response (an SSE tab closed) is routine.
                    client = ":".join(map(str, self.addr[:2])) if isinstance(self.addr, tuple) else self.addr
                    log.info("%s: client %s left during the response to %s %s; closing the connection",
                             s.name, client, method, target)
                else:
                    # (an error of ours says what happened; another's name says where it came from)
                    what = str(e) if isinstance(e, RHTTPError) else f"{type(e).__name__}: {e}"
                    log.warning("%s: response to %s %s failed after its headers were sent (%s); the client gets"
                                " a truncated response, closing the connection", s.name, method, target, what)
                return False
            if isinstance(e, h11.LocalProtocolError):
                # h11 refused to write the response (a header value HTTP/1.1
                # cannot carry, a body shorter than its Content-Length...):
                # nothing went out, and h11 can no longer answer on this connection.
                log.warning("%s: the response to %s %s cannot be written as HTTP/1.1 (%s); nothing was"
                            " sent, closing the connection", s.name, method, target, e)
                return False
            status = getattr(e, "status", None)
            if isinstance(e, UpstreamError):
                # The forwarder's body iterable failed before its first chunk
                # (e.g. the worker's response was reset as malformed): nothing
                # went out, so the client still gets the proper 502/504.
                log.warning("%s: %s %s: %d %s", s.name, method, target, e.status, e)
                self._simple_error(e.status, str(e))
            elif isinstance(e, RequestBodyError) or (isinstance(status, int) and 400 <= status < 500):
                log.info("%s: bad request body from %s: %s", s.name, self.addr, e)
                self._simple_error(int(status or 400), str(e))
            else:
                log.exception("%s: application error for %s %s", s.name, method, target)
                self._simple_error(500, "Internal Server Error")
            return False
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("%s: the response iterable's close() failed", s.name)
        if resp.close_after or self.must_close:
            # e.g. a 408 for a stalled body: waiting to drain the rest of
            # that body would only hold the connection longer.
            return False
        if self.h11.their_state is h11.SEND_BODY and not (self.bypassed and self.bodyless):
            return self._drain_body()
        return True

    def _drain_body(self) -> bool:
        """Discard an unread request body (bounded) so the connection can be reused."""
        if self.h11.they_are_waiting_for_100_continue:
            return False  # they have not sent it: closing is cheaper than inviting it
        deadline = time.monotonic() + DRAIN_TIME
        seen = 0
        try:
            while seen <= DRAIN_LIMIT:
                ev = self._next_event(deadline - time.monotonic())
                if isinstance(ev, h11.Data):
                    seen += len(ev.data)
                elif isinstance(ev, h11.EndOfMessage):
                    return True
                else:
                    return False
        except (OSError, h11.RemoteProtocolError, _Closed):
            return False
        return False

    def _environ(self, req: h11.Request) -> dict[str, Any]:
        target = req.target
        authority = None
        if target[:1] != b"/" and target != b"*":
            low = target[:8].lower()
            if low[:7] == b"http://" or low == b"https://":
                # absolute-form (RFC 9112 §3.2.2): the authority replaces Host
                rest = target.split(b"//", 1)[1]
                cut = min(x for x in (rest.find(b"/"), rest.find(b"?"), len(rest)) if x >= 0)
                authority = rest[:cut].decode("latin-1")
                target = rest[cut:] or b"/"
                if not target.startswith(b"/"):
                    target = b"/" + target
            # (any other form is refused by request_environ)
        base = self._base_environ
        if base is None:
            base = self._base_environ = self._make_base_environ()
        environ = base.copy()
        request_environ(environ, self.request_headers, req.method, target, authority)
        environ["SERVER_PROTOCOL"] = "HTTP/1.1" if req.http_version == b"1.1" else (
            "HTTP/" + req.http_version.decode("latin-1"))
        environ["wsgi.input"] = _Input(self, self.bodyless)
        if "HTTP_UPGRADE" in environ and self.bodyless:
            environ["rhttp.upgrade"] = _UpgradeOffer(self)
        return environ

    def _make_base_environ(self) -> dict[str, Any]:
        """What every request on this connection shares (``getsockname`` once)."""
        local = self.raw.getsockname()
        peer = self.addr if isinstance(self.addr, tuple) else None
        return {
            "SCRIPT_NAME": "",
            "SERVER_NAME": str(local[0]),
            "SERVER_PORT": str(local[1]),
            "REMOTE_ADDR": str(peer[0]) if peer else "",
            "REMOTE_PORT": str(peer[1]) if peer else "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": self.server.url_scheme,
            "wsgi.errors": _LogStream(),
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "rhttp.client_disconnected": self.client_gone,
        }


class _UpgradeOffer:
    """``environ["rhttp.upgrade"]``: this connection, offered to the app for a protocol switch
    (the forwarder relays WebSockets over it, :mod:`rhttp_wsgi.upgrade`).

    ``accept(head)`` writes the app's whole ``101`` head and returns the socket (non-TLS or
    ``ssl.SSLSocket``) with the bytes the client already sent past its request; from then on
    the connection is the app's, and this server closes it when the app returns, writing
    nothing more.  Offered for body-less requests that carry ``Upgrade`` only.
    """

    __slots__ = ("_conn", "used")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.used = False

    def accept(self, head: bytes) -> tuple[socket.socket, bytes]:
        if self.used:
            raise RuntimeError("the connection was already taken over")
        self.used = True
        c = self._conn
        c.upgraded = True
        try:
            c._write(head)
        except _Closed as e:
            raise ConnectionError(str(e)) from e
        # h11 keeps whatever followed the request head (it was never asked for the next event).
        return c.sock, c.h11.trailing_data[0]

    def finish(self) -> list[bytes]:
        return []


def _whole_body(result: Iterable[bytes]) -> bytes | None:
    """The body of a response known whole (a one-item list or tuple, a CompleteResponse), else None."""
    if type(result) is CompleteResponse:
        return result.body
    if isinstance(result, (list, tuple)) and len(result) == 1:
        return bytes(result[0])
    return None


def _framing_problem(req: h11.Request, items: list[tuple[bytes, bytes]], head: bytes) -> str | None:
    """Why a request's framing is ambiguous (400 and close), or None.

    ``head`` holds the raw bytes received for this request (possibly followed
    by body bytes or, when truncated at max_head, missing its end).
    """
    names = {k for k, _ in items}
    if b"transfer-encoding" in names:
        if b"content-length" in names:
            return "both Content-Length and Transfer-Encoding (RFC 9112 §6.1)"
        if req.http_version == b"1.0":
            return "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 §6.1)"
    head = head.lstrip(b"\r\n")
    end = _END_OF_HEAD.search(head)
    block = head[: end.start()] if end else head
    if _OBS_FOLD.search(block):
        return "obsolete line folding in the request head (RFC 9112 §5.2)"
    lengths = _CONTENT_LENGTH_LINE.findall(block)
    if len(lengths) > 1 or any(b"," in v for v in lengths):
        return "repeated Content-Length (RFC 9112 §6.3)"
    return None


def _header_items(headers: Any) -> list[tuple[bytes, bytes]]:
    """h11's request headers as a list of (lowercase name, value).

    Iterating ``h11.Headers`` goes through ``Sequence.__getitem__`` per item;
    its ``_full_items`` (raw name, lowercase name, value) is read directly when
    present (h11 >= 0.10), else the public iteration is used.
    """
    full = getattr(headers, "_full_items", None)
    if full is not None:
        return [(name, value) for _, name, value in full]
    return list(headers)


def _keep_alive(req: h11.Request, items: list[tuple[bytes, bytes]]) -> bool:
    """h11's own keep-alive rule for a request (``h11._connection._keep_alive``)."""
    if req.http_version < b"1.1":
        return False
    for name, value in items:
        if name == b"connection" and b"close" in [t.strip().lower() for t in value.split(b",")]:
            return False
    return True


class _LogStream(io.TextIOBase):
    """``wsgi.errors``: lines go to the ``rhttp_wsgi.public`` logger."""

    def write(self, s: str) -> int:
        text = s.rstrip("\n")
        if text:
            log.error("%s", text)
        return len(s)

    def flush(self) -> None:
        pass


class _Input(io.RawIOBase):
    """``wsgi.input``: the request body, read from h11 on demand."""

    def __init__(self, conn: _Connection, bodyless: bool) -> None:
        self._conn = conn
        self._buf = bytearray()
        #: A request without a body needs no h11 event to say so (nor a 100 Continue).
        self._eof = bodyless
        self._seen = 0
        self._started: float | None = None

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        """Pull one more body event; False at the end."""
        if self._eof:
            return False
        c = self._conn
        h = c.h11
        if h.their_state is not h11.SEND_BODY:
            self._eof = True
            return False
        if h.they_are_waiting_for_100_continue:
            c._send(h11.InformationalResponse(status_code=100, headers=[]))
        s = c.server
        timeout = s.body_timeout
        if timeout is not None and s.body_min_rate:
            # Bytes h11 already holds are always returned (_next_event only
            # times out when it must recv): only waiting is limited.
            now = time.monotonic()
            if self._started is None:
                self._started = now
            timeout = body_wait(self._started, self._seen, timeout, s.body_min_rate, now)
        try:
            ev = c._next_event(timeout)
        except TimeoutError as e:
            c.must_close = True
            why = (f"no request body data for {s.body_timeout:g}s" if timeout == s.body_timeout
                   else f"request body slower than {s.body_min_rate} bytes/s")
            raise RequestBodyError(why, 408) from e
        except h11.RemoteProtocolError as e:
            c.must_close = True  # the body's framing is broken: nothing after it can be trusted
            raise RequestBodyError(f"malformed request body: {e}") from e
        except OSError as e:
            raise _Closed(f"read failed: {e}") from e
        if isinstance(ev, h11.Data):
            self._buf += ev.data
            self._seen += len(ev.data)
            limit = s.max_body
            if limit and self._seen > limit:
                raise RequestBodyError(f"request body larger than {limit} bytes", 413)
            return True
        if isinstance(ev, h11.EndOfMessage):
            self._eof = True
            return False
        if isinstance(ev, h11.ConnectionClosed):
            raise RequestBodyError("the client closed the connection mid-body")
        raise RequestBodyError(f"unexpected {type(ev).__name__} in the request body")

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes, fewer only at the end of the body (what most apps expect)."""
        if size is None or size < 0:
            while self._fill():
                pass
            out = bytes(self._buf)
            self._buf.clear()
            return out
        while len(self._buf) < size and self._fill():
            pass
        out = bytes(self._buf[:size])
        del self._buf[:size]
        return out

    def read1(self, size: int = -1) -> bytes:
        """Whatever is available (at least one byte unless at the end): for streaming forwards."""
        if size == 0:
            return b""
        while not self._buf and self._fill():
            pass
        if size < 0:
            size = len(self._buf)
        out = bytes(self._buf[:size])
        del self._buf[:size]
        return out

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        n = len(data)
        b[:n] = data
        return n

    def readline(self, size: int | None = -1) -> bytes:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0 or (size is not None and 0 <= size <= len(self._buf)):
                break
            if not self._fill():
                break
        end = nl + 1 if nl >= 0 else len(self._buf)
        if size is not None and 0 <= size < end:
            end = size
        out = bytes(self._buf[:end])
        del self._buf[:end]
        return out

    # readlines() and iteration come from io.IOBase, on top of readline().


class _Response:
    """Status and headers chosen by the app, and whether they went out.

    ``start_response`` checks the status and keeps the app's header list as it
    is; it is converted (``_prepare``) only when the response is not written
    from a :class:`CompleteResponse`, whose header block is ready.
    """

    __slots__ = ("app_headers", "app_status", "close_after", "conn", "has_length", "head", "headers",
                 "no_body", "plain", "reason", "sent", "status")

    def __init__(self, conn: _Connection, head: bool) -> None:
        self.conn = conn
        self.head = head
        #: What the app passed to start_response (None: not called yet).
        self.app_status: str | None = None
        self.app_headers: list[tuple[str, str]] = []
        self.status = 0
        self.reason = b""
        #: The app's headers as (lowercase name, value) bytes, framing headers left
        #: out; None until ``_prepare`` ran.
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.has_length = False
        #: Every name is a token (a block of them may be written without h11).
        self.plain = True
        #: Some of the response went out.
        self.sent = False
        self.no_body = head
        self.close_after = False

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: ExcInfo | None = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.app_status is not None:
            raise AssertionError("start_response() called twice without exc_info")
        code_text, _, reason = status.partition(" ")
        if len(code_text) != 3 or not code_text.isdigit() or int(code_text) < 200:
            raise ValueError(f"invalid WSGI status {status!r}")
        self.status = int(code_text)
        self.reason = reason.encode("latin-1")
        self.app_status = status
        self.app_headers = headers
        self.headers = None
        self.no_body = self.head or self.status in NO_BODY_STATUS
        return self.write

    def _prepare(self) -> list[tuple[bytes, bytes]]:
        """The app's headers as bytes (framing headers noted and left out)."""
        if self.app_status is None:
            raise AssertionError("the application returned without calling start_response()")
        out: list[tuple[bytes, bytes]] = []
        has_length = close_after = False
        plain = True
        names = _TOKEN_NAMES
        for name, value in self.app_headers:
            lname = names.get(name)
            if lname is None:
                lname = name.lower().encode("latin-1")
                if lname in _APP_FRAMING:
                    if lname == b"connection" and "close" in value.lower():
                        close_after = True
                    continue
                if not valid_name(name):
                    plain = False  # h11 refuses it, with its own error
                elif len(names) < _TOKEN_NAMES_MAX:
                    names[name] = lname
            if lname == b"content-length":
                has_length = True
            out.append((lname, value.encode("latin-1")))
        self.headers = out
        self.has_length = has_length
        self.close_after = close_after
        self.plain = plain
        return out

    def _response_event(self, extra: list[tuple[bytes, bytes]] | None = None) -> h11.Response:
        headers = list(self.headers if self.headers is not None else self._prepare())
        if extra:
            headers += extra
        if self.close_after or self.conn.must_close or self.conn.server.stopping.is_set():
            headers.append((b"connection", b"close"))
        return h11.Response(status_code=self.status, headers=headers, reason=self.reason)

    def write(self, data: bytes) -> None:
        if self.app_status is None:
            raise AssertionError("write() before start_response()")
        if not data:
            return
        if not self.sent:
            if self.no_body:
                self.conn._send(self._response_event())
            else:
                self.conn._send(self._response_event(), h11.Data(data=bytes(data)))
            self.sent = True
            return
        if not self.no_body:
            self.conn._send(h11.Data(data=bytes(data)))

    def write_complete(self, result: CompleteResponse) -> bool:
        """Send a :class:`CompleteResponse` in one write, without h11; False (nothing sent) when
        it cannot go this way: start_response got another status or other headers
        (middleware), or h11's state needs h11 (then the caller sends ``result.body`` as usual)."""
        if (self.sent or result.status != self.app_status or result.headers != tuple(self.app_headers)
                or not _REASON.fullmatch(self.reason)):
            return False
        block = result.block
        if (self.head and self.status not in NO_BODY_STATUS and not block.startswith(b"content-length: ")
                and b"\ncontent-length: " not in block):
            return False  # h11 would frame a length-less HEAD answer as chunked: let it
        return self._write_whole(block, result.body)

    def _write_whole(self, block: bytes, body: bytes) -> bool:
        """Status line + header block + body in one ``sendall``; h11 is left out of this cycle."""
        c = self.conn
        if c.h11.they_are_waiting_for_100_continue or c.h11.our_state is not h11.SEND_RESPONSE:
            return False
        if self.close_after or c.must_close or not c.keep_alive or c.server.stopping.is_set():
            block += b"connection: close\r\n"
            self.close_after = True
        c.bypassed = True
        c._write(b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (self.status, self.reason, block,
                                                     b"" if self.no_body else body))
        self.sent = True
        return True

    def _try_fast(self, body: bytes) -> bool:
        """``single()`` without h11: the app's headers validated once, as a block."""
        headers = self.headers if self.headers is not None else self._prepare()
        if not self.plain or not _REASON.fullmatch(self.reason):
            return False
        if self.has_length:
            lengths = [v for k, v in headers if k == b"content-length"]
            if len(lengths) != 1 or lengths[0] != b"%d" % len(body):
                return False  # h11 has the precise rules (and errors) for these
            length_line = b""
        elif self.no_body:
            if self.head and self.status not in NO_BODY_STATUS:
                return False  # h11 frames a length-less HEAD answer as chunked
            length_line = b""
        else:
            length_line = b"content-length: %d\r\n" % len(body)
        block = h1_block(headers)
        if block is None:
            return False
        return self._write_whole(block + length_line, body)

    def single(self, body: bytes) -> None:
        """The whole body is known: send it with a Content-Length in one write."""
        if self._try_fast(body):
            return
        extra = None
        if not self.has_length and not self.no_body:
            extra = [(b"content-length", b"%d" % len(body))]
        if self.no_body or not body:
            self.conn._send(self._response_event(extra), h11.EndOfMessage())
        else:
            self.conn._send(self._response_event(extra), h11.Data(data=body), h11.EndOfMessage())
        self.sent = True

    def finish(self) -> None:
        if not self.sent:
            self.single(b"")
            return
        try:
            self.conn._send(h11.EndOfMessage())
        except h11.LocalProtocolError as e:
            # e.g. fewer bytes than the Content-Length promised: truncated.
            raise ConnectionError(f"incomplete response: {e}") from e
