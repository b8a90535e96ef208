"""Worker side: what a new inbound stream becomes, and the limits that answer it with a status.

This is the one place where the worker decides about a stream the proxy
opened.  The tunnel (``_tunnel.Tunnel``, server role) reports each one to its
:class:`StreamPolicy` (the tunnel's ``InboundStreams``); the HTTP/2 core only
reports (``HeadersOverLimit``), it never answers with a status itself.

What a stream becomes (decided by :meth:`StreamPolicy.opened_locked`, started
by :meth:`StreamPolicy.start`):

* an ordinary request: a WSGI call (:func:`rhttp_wsgi.wsgi.run_wsgi`) on the
  app thread pool;
* ``:protocol websocket`` (RFC 8441), when the worker has a
  :class:`~rhttp_wsgi.websocket.WebSocketService`: the WebSocket handler, on
  that service's own thread pool and within its ``max_websockets`` (503 beyond,
  answered here);
* ``:method CONNECT`` -- plain, or extended (RFC 8441/9220: with another
  ``:protocol``): the handler registered for its ``:protocol`` in
  ``connect_handlers`` (key ``None`` for a plain CONNECT), else
  :func:`connect_not_supported` (501).

**Where a new kind of stream plugs in**: write a :data:`StreamHandler` --
``handler(ch, ctx)``, run on an app thread, that reads the request body with
``ch.read`` and answers with ``ch.send_headers``/``ch.write``/``ch.end`` -- and
register it: ``StreamPolicy(options, ctx, submit, connect_handlers={"websocket":
handler})`` (the worker passes :data:`CONNECT_HANDLERS`).  The policy runs it
with the same accounting as a WSGI call (skipped if the stream was reset while
queued; ``ch.handler_done()`` when it returns).  The request limits
(``request_timeout``, ``max_body_size``) apply to requests only: a CONNECT
stream gets just the send stall, and its handler sets any other limit itself
(``ch.set_deadline_locked``, ``ch.body_limit``, under ``ch.tunnel.lock``).
(A peer may send an extended CONNECT only once the worker advertised
SETTINGS_ENABLE_CONNECT_PROTOCOL, and the core treats ``:protocol`` as malformed
until then: that is ``H2Config.enable_connect_protocol``, which
``_protocol.core_config`` sets from the ``websockets`` option, on by default.)

The limits that answer with a status (the ``*_locked`` hooks, reader thread,
tunnel lock held):

* 431: the core decoded a request above ``max_header_count`` or
  ``max_header_list_size`` -- answered 431 (empty body), then
  RST_STREAM(NO_ERROR) if the request body is still coming;
* 413: a request whose Content-Length, or whose body as it arrives, exceeds
  ``max_body_size`` -- 413 before the app runs (or while it reads), or
  RST_STREAM(CANCEL) once the response started;
* ``request_timeout`` and the send stall (``send_timeout``): set per stream
  here; the tunnel's writer keeps the clocks and resets the stream (CANCEL)
  when one runs out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from h2.errors import ErrorCodes

from ._tunnel import Channel
from .errors import RHTTPError
from .options import WorkerOptions
from .websocket import WebSocketService
from .wsgi import WSGIContext, run_wsgi

__all__ = ["CONNECT_HANDLERS", "StreamHandler", "StreamPolicy", "connect_not_supported"]

log = logging.getLogger("rhttp_wsgi.streams")

#: Serves one stream on an app thread: ``handler(ch, ctx)``.  Exceptions are
#: logged and reset the stream (INTERNAL_ERROR); see the module doc.
StreamHandler = Callable[[Channel, WSGIContext], None]

_NOT_SUPPORTED = b"CONNECT is not supported\n"
_NOT_SUPPORTED_HEADERS = [(b":status", b"501"), (b"content-type", b"text/plain; charset=utf-8"),
                          (b"content-length", str(len(_NOT_SUPPORTED)).encode("ascii"))]


def connect_not_supported(ch: Channel, ctx: WSGIContext) -> None:
    """The answer to a CONNECT nobody handles: 501, and the stream ends."""
    protocol = _protocol(ch.headers or [])
    if protocol is None:
        log.info("%s stream %d: 501 CONNECT is not supported", ch.tunnel.name, ch.stream_id)
        ch.respond(list(_NOT_SUPPORTED_HEADERS), _NOT_SUPPORTED)
        return
    body = f"CONNECT with :protocol {protocol[:64]!r} is not supported\n".encode()
    log.info("%s stream %d: 501 extended CONNECT for :protocol %r is not supported", ch.tunnel.name,
             ch.stream_id, protocol[:64])
    ch.respond([(b":status", b"501"), (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode("ascii"))], body)


def _protocol(headers: list[tuple[bytes, bytes]]) -> str | None:
    """An extended CONNECT's ``:protocol`` (None: a plain CONNECT); the pseudo-headers come first."""
    for name, value in headers:
        if name == b":protocol":
            return value.decode("latin-1")
        if name[:1] != b":":
            break
    return None


#: ``:protocol`` of an extended CONNECT (None: a plain CONNECT) -> its handler.
#: Empty until a kind of tunnelled stream is implemented (WebSocket: ``"websocket"``).
CONNECT_HANDLERS: Mapping[str | None, StreamHandler] = {}


class StreamPolicy:
    """One tunnel's decisions about its inbound streams (see the module doc).

    ``options`` gives the limits (``max_body_size``, ``request_timeout``,
    ``send_timeout``); ``ctx`` is what the tunnel's handlers share (the app,
    the peer); ``submit(fn, *args)`` runs ``fn(*args)`` on an app thread (an
    :class:`~rhttp_wsgi._pool.AppThreadPool`'s ``submit``).  ``websockets``
    (the worker's :class:`~rhttp_wsgi.websocket.WebSocketService`, shared by its
    tunnels) serves ``:protocol websocket`` on its own pool, within its limit
    (503 beyond); without it a WebSocket is a CONNECT like any other.
    """

    __slots__ = ("_connect", "_submit", "_websockets", "_ws_serve", "ctx", "max_body_size", "request_timeout",
                 "send_timeout")

    def __init__(self, options: WorkerOptions, ctx: WSGIContext, submit: Callable[..., Any], *,
                 connect_handlers: Mapping[str | None, StreamHandler] = CONNECT_HANDLERS,
                 websockets: WebSocketService | None = None) -> None:
        self.ctx = ctx
        self._submit = submit
        self._connect = connect_handlers
        self._websockets = websockets
        #: The WebSocket handler, bound once (start() recognises it by identity).
        self._ws_serve: StreamHandler | None = websockets.serve if websockets is not None else None
        #: The limits, read once from ``options`` (same names).
        self.max_body_size = options.max_body_size
        self.request_timeout = options.request_timeout
        self.send_timeout = options.send_timeout

    # -- the tunnel's hooks, lock held -------------------------------------------------

    def opened_locked(self, ch: Channel) -> None:
        """A stream's HEADERS arrived: choose its handler, set its limits; 413 a declared body above the limit."""
        assert ch.headers is not None
        handler: StreamHandler = run_wsgi
        # (the core put the pseudo-headers first and checked them: :method is
        # nearly always the first field, so this loop is one step)
        for name, value in ch.headers:
            if name == b":method":
                if value == b"CONNECT":
                    handler = self._connect_handler(ch.headers)
                break
        ch.handler = handler
        ch.send_stall_limit = self.send_timeout
        if handler is not run_wsgi:
            return  # a tunnelled stream: the request limits are not its own
        if self.request_timeout:
            ch.set_deadline_locked(self.request_timeout, "request_timeout")
        if self.max_body_size:
            ch.body_limit = self.max_body_size
            declared = ch.expected_length_locked()
            if declared is not None and declared > self.max_body_size:
                self.body_over_limit_locked(ch)

    def over_header_limits_locked(self, ch: Channel, reason: str) -> None:
        """RFC 9113 §10.5.1: "can send an HTTP 431".  HPACK stayed in sync: only this stream ends."""
        ch.answer_locked(431)
        log.info("%s: stream %d answered 431: %s", ch.tunnel.name, ch.stream_id, reason)

    def body_over_limit_locked(self, ch: Channel) -> None:
        """413 (or RST_STREAM(CANCEL) once the response started) for a body above ``max_body_size``."""
        if ch.headers_sent:
            ch.reset_locked(ErrorCodes.CANCEL)
            outcome = "reset (CANCEL)"
        else:
            ch.answer_locked(413)
            outcome = "413"
        log.info("%s: stream %d: request body above max_body_size (%d bytes); %s", ch.tunnel.name,
                 ch.stream_id, self.max_body_size, outcome)

    # -- what the stream becomes, no lock ------------------------------------------------

    def start(self, ch: Channel) -> None:
        """Submit the stream's handler (chosen when it opened) to the app thread pool.

        A WebSocket goes to the WebSocket pool if its limit allows, else it is
        answered 503 here (on the reader thread: ``respond`` never blocks).
        """
        handler = ch.handler
        if handler is not self._ws_serve or handler is None:
            self._submit(self._serve, handler, ch)
            return
        ws = self._websockets
        assert ws is not None
        if ws.admit():
            ws.submit(self._serve, handler, ch)
        else:
            self._serve(ws.refuse, ch)

    def _connect_handler(self, headers: list[tuple[bytes, bytes]]) -> StreamHandler:
        protocol = _protocol(headers)
        if protocol == "websocket" and self._ws_serve is not None:
            return self._ws_serve
        return self._connect.get(protocol, connect_not_supported)

    def _serve(self, handler: StreamHandler, ch: Channel) -> None:
        """App thread: run the handler; the stream's thread is free only when it returns."""
        try:
            if ch.error is None:  # reset (or timed out) while it waited for a thread: skip it
                handler(ch, self.ctx)
        except RHTTPError as e:  # the stream or the tunnel ended under the handler
            log.debug("%s stream %d: gave up, %s", ch.tunnel.name, ch.stream_id, e)
        except Exception:
            log.exception("%s stream %d: the stream handler failed; resetting the stream", ch.tunnel.name,
                          ch.stream_id)
            ch.reset(ErrorCodes.INTERNAL_ERROR)
        finally:
            ch.handler_done()
