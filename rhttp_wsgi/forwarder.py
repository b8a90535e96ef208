"""The forwarder: a plain WSGI app that sends each request down a worker's tunnel.

``Proxy.wsgi_app`` is an instance of :class:`Forwarder`; mount it on any WSGI
server (the turnkey one in :mod:`rhttp_wsgi.public`, gunicorn, waitress...).
Per request, on the server's thread:

1. The request is mapped to HTTP/2 (:func:`build_request`, the one mapping,
   whatever server built the environ): ``:method``; ``:scheme`` from
   ``wsgi.url_scheme``; ``:authority`` from ``Host``; ``:path`` from
   ``RAW_URI``/``REQUEST_URI`` when the server offers it (byte-exact, so
   ``%2F`` survives) else re-quoted ``SCRIPT_NAME + PATH_INFO`` plus the query.
   The other fields come from the environ's ``HTTP_*`` keys as a neutral list
   of (name, value) bytes (:func:`request_fields`); hop-by-hop ones and every
   token named in ``Connection`` are dropped (``TE: trailers`` is kept),
   ``X-Forwarded-For/-Proto/-Host`` are set, ``X-Request-ID`` is the request
   id (ours, or the client's with ``trust_request_id``: ``environ["rhttp.request_id"]``),
   and a CR, LF or NUL in any value is a 400 before anything is encoded.
2. A worker is reserved (:mod:`rhttp_wsgi.balancing` picks; a full worker is
   never given another stream; a request may wait ``stream_wait`` for one).
3. The body streams up in chunks; :meth:`Channel.write` blocks while the
   worker is slow, so a fast client cannot fill the proxy's memory.
4. The response headers are awaited (``response_timeout``, then 504), checked
   (including that HTTP/1.1 can carry them: else 502) and handed to
   ``start_response``.  A response that is already complete (the common small
   one) is returned as a :class:`~rhttp_wsgi._http.CompleteResponse`: a
   one-item body to any server, written in one ``sendall`` by the turnkey
   server (also through middleware that leaves it as it is).  Otherwise the
   body streams down chunk by chunk as DATA frames arrive, so server-sent
   events work.

Each request, answered or failed, is one access line (:mod:`rhttp_wsgi.accesslog`, option
``access_log``), written when the server is done with the response.

Failures: 503 (+ ``Retry-After``) when no worker is attached or selectable
(after waiting up to ``attach_wait`` for one to attach, when that is set);
502 when the tunnel dies or the stream is reset before the response headers
or the response is invalid (a malformed response -- bad ``:status``, CR/LF in a
value, a body disagreeing with its content-length... -- is reset by the
protocol core with PROTOCOL_ERROR, a stream error: the tunnel's other streams
go on); 504 on timeout.  Once the headers are out, a
failure can no longer change the status, so the body iterable *raises*: a
correct WSGI server then closes the connection without a clean end (no
terminating chunk, or fewer bytes than ``Content-Length``), which the client
sees as a truncated response.  A GET/HEAD/OPTIONS without a body that the
worker refused before answering (REFUSED_STREAM, GOAWAY, tunnel lost) is
retried once on another worker.  When the public client goes away (the server
calls the iterable's ``close()`` early, or the turnkey server reports a
closed socket), the worker's stream is reset with CANCEL, which sets
``environ["rhttp.cancelled"]`` on the worker.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import filterfalse
from typing import Any
from urllib.parse import quote

from h2.errors import ErrorCodes

from ._http import (
    HOP_BY_HOP,
    NO_BODY_STATUS,
    BadRequest,
    CompleteResponse,
    h1_block,
    h1_problem,
    parse_content_length,
    reason_phrase,
    valid_name,
    valid_value,
)
from ._tunnel import Channel
from .accesslog import AccessLog, AccessRecord, new_request_id, request_id
from .errors import (
    BadGateway,
    GatewayTimeout,
    NoWorkerAvailable,
    RHTTPError,
    StreamReset,
    StreamTimeout,
    TunnelClosed,
    UpstreamError,
)
from .options import ProxyOptions
from .registry import Registry, WorkerInfo
from .upgrade import (
    ClientOffer,
    HandshakeError,
    Relay,
    WebSocketStats,
    client_offer,
    connect_headers,
    handshake_key,
    response_head,
    wants_websocket,
)

__all__ = ["Forwarder", "WSGIApp"]

log = logging.getLogger("rhttp_wsgi.proxy.forward")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
StartResponse = Callable[..., Any]

#: Request body chunk read from ``wsgi.input`` per write.
CHUNK = 64 * 1024
#: How often a wait on the worker checks whether the public client went away.
CLIENT_CHECK = 0.5
IDEMPOTENT_RETRY = frozenset({"GET", "HEAD", "OPTIONS"})
#: Client-supplied headers that would let a client speak for the proxy.
_FORWARDING = frozenset({b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                         b"x-forwarded-port", b"x-forwarded-prefix", b"x-real-ip"})
#: Dropped besides HOP_BY_HOP: Host becomes :authority; Expect is answered at
#: the public edge; HTTP2-Settings belongs to h2c upgrades; X-Request-ID is
#: replaced by the id the forwarder chose (``environ["rhttp.request_id"]``).
_DROP = HOP_BY_HOP | frozenset({b"host", b"expect", b"http2-settings", b"x-request-id"})
#: RFC 3986 pchar plus "/" and "%": what may stay unescaped in :path.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
_BAD_TARGET = re.compile(r"[ \r\n\x00\t#]")
#: What a Host value (an authority without userinfo) never holds.
_BAD_AUTHORITY = re.compile(rb"[ /?#@]")
#: Environ key -> the request field it holds (``HTTP_USER_AGENT`` -> ``user-agent``),
#: b"" for a key that holds none.  Filled by :func:`_field_name`, bounded (clients
#: choose the names).
_ENVIRON_FIELDS: dict[str, bytes] = {}
_ENVIRON_FIELDS_MAX = 1024
#: The keys of _ENVIRON_FIELDS that hold no field.
_NOT_FIELDS: set[str] = set()
#: Request methods known to be tokens; Connection values -> the fields they make
#: hop-by-hop.  Both bounded (clients choose them).
_METHODS: set[str] = set()
_CONNECTION_DROP: dict[bytes, frozenset[bytes]] = {}
_CACHE_MAX = 64


class _ClientBodyError(Exception):
    """Reading the public request body failed."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        status = getattr(cause, "status", 400)
        self.status = status if isinstance(status, int) and 400 <= status < 500 else 400


#: Other workers a refused idempotent request is retried on (a refused stream was
#: never processed, RFC 9113 §8.7); two covers a rolling restart's draining neighbour.
MAX_RETRIES = 2


class Forwarder:
    """The WSGI app that forwards to workers (see the module doc)."""

    def __init__(self, registry: Registry, options: ProxyOptions) -> None:
        self.registry = registry
        self.options = options
        #: None when the access log is off (options.access_log): then nothing is measured.
        self.access = AccessLog.from_options(options, "proxy")
        self._trust_request_id = options.trust_request_id
        #: WebSockets relayed (open now, in total, bytes each way): read by Proxy.websocket_stats().
        self.websockets = WebSocketStats()

    def close(self) -> None:
        """Write the access lines still waiting and stop the access log's writer (Proxy.shutdown)."""
        if self.access is not None:
            self.access.close()

    # -- WSGI entry (server thread) ------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        # The request id: the client's only when trusted (and valid), else ours.  build_request
        # sends it to the worker as x-request-id; both access lines show it.
        environ["rhttp.request_id"] = (request_id(environ.get("HTTP_X_REQUEST_ID")) if self._trust_request_id
                                       else new_request_id())
        access = self.access
        return self._respond(environ, start_response, access.start(environ) if access is not None else None)

    def _respond(self, environ: dict[str, Any], start_response: StartResponse,
                 rec: AccessRecord | None) -> Iterable[bytes]:
        if "HTTP_UPGRADE" in environ and self.options.websockets and wants_websocket(environ):
            return self._websocket(environ, start_response, rec)
        try:
            method, headers, length = build_request(environ, self.options)
        except BadRequest as e:
            log.info("%s %s: %d %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), e.status, e)
            return _error(start_response, e.status, str(e), rec=rec)
        try:
            return self._forward(environ, start_response, method, headers, length, rec)
        except UpstreamError as e:
            level = logging.INFO if isinstance(e, (NoWorkerAvailable, _ClientGone)) else logging.WARNING
            log.log(level, "%s %s: %d %s", method, environ.get("PATH_INFO"), e.status, e)
            extra = [("Retry-After", str(self.options.retry_after))] if e.status == 503 else []
            return _error(start_response, e.status, str(e), extra, rec=rec)
        except _ClientBodyError as e:
            log.info("%s %s: request body failed: %s", method, environ.get("PATH_INFO"), e)
            return _error(start_response, e.status, f"could not read the request body: {e}", rec=rec)

    def _forward(self, environ: dict[str, Any], start_response: StartResponse, method: str,
                 headers: list[tuple[bytes, bytes]], length: int | None,
                 rec: AccessRecord | None = None) -> Iterable[bytes]:
        body = environ.get("wsgi.input")
        gone = environ.get("rhttp.client_disconnected")
        client_gone: Callable[[], bool] | None = gone if callable(gone) else None
        # Unknown length (chunked upload): peek so a bodyless request ends the
        # stream with its HEADERS and stays retryable.
        first = b""
        if length is None and body is not None and (
                environ.get("wsgi.input_terminated") or "HTTP_TRANSFER_ENCODING" in environ):
            first = _read_client(body, CHUNK)
            has_body = bool(first)
        else:
            has_body = bool(length)
        retryable = method in IDEMPOTENT_RETRY and not has_body
        # RFC 9113 §6.5.2 accounting, checked against each worker's advertised
        # limit: a worker that must refuse an oversized header list may have to
        # drop its whole tunnel (HPACK), taking every other stream with it.
        head_size = sum([len(k) + len(v) + 32 for k, v in headers])
        tried: list[WorkerInfo] = []
        failure: BaseException | None = None
        while True:
            try:
                worker = self.registry.acquire(environ, tried)
            except NoWorkerAvailable as e:
                if isinstance(failure, TunnelClosed):
                    # Retrying a request whose tunnel died found no other
                    # worker: the answer is the original failure.
                    raise BadGateway(f"the worker's tunnel failed before responding ({failure});"
                                     " no other worker to retry on") from e
                raise
            tunnel = worker.tunnel
            if rec is not None:
                rec.peer = worker
            limit = tunnel.proto.peer_max_header_list_size()
            if limit is not None and head_size > limit:
                self.registry.release(worker)
                raise UpstreamError(f"request header list of {head_size} bytes exceeds the worker's limit"
                                    f" ({limit})", status=431)
            try:
                ch = tunnel.open_stream(headers, end_stream=not has_body)
            except RHTTPError as e:  # TunnelClosed, or StreamReset when the worker's limit was lowered
                # Nothing went out: safe to try elsewhere whatever the method.
                self.registry.release(worker)
                tried.append(worker)
                if len(tried) > 3:
                    raise BadGateway(f"no tunnel accepted the request: {e}") from e
                log.debug("worker %s: cannot open a stream (%s); trying another", worker.id, e)
                continue
            try:
                if has_body:
                    self._upload(ch, body, first, length)
                resp = self._wait_response(ch, client_gone)
            except (StreamReset, TunnelClosed) as e:
                _finish(ch)
                self.registry.release(worker)
                if retryable and len(tried) < MAX_RETRIES and _refused(e, ch):
                    # Refused (REFUSED_STREAM, or above its GOAWAY: a draining worker) or lost
                    # with its tunnel (a dying worker): either way it processed nothing.
                    what = "refused" if isinstance(e, StreamReset) else "lost its tunnel before answering"
                    log.info("worker %s %s %s %s (%s); retrying on another worker", worker.id, what, method,
                             environ.get("PATH_INFO"), e)
                    tried.append(worker)
                    failure = e
                    continue
                raise BadGateway(f"worker {worker.id} failed before responding: {e}") from e
            except BaseException:
                _finish(ch)
                self.registry.release(worker)
                raise
            break
        try:
            code, fields, block, declared = _response_head(resp)
        except BadGateway:
            _finish(ch)
            self.registry.release(worker)
            raise
        if ch.in_ended and ch.error is None:
            # The whole response is already here (the common small answer):
            # one CompleteResponse with a Content-Length, which the turnkey
            # server writes in one go (and any server as a one-item body).
            try:
                data = ch.read(-1, timeout=0)
            except (StreamReset, TunnelClosed) as e:
                _finish(ch)
                self.registry.release(worker)
                raise BadGateway(f"worker {worker.id} failed mid-response: {e}") from e
            _finish(ch)
            self.registry.release(worker)
            if not (method == "HEAD" or code in NO_BODY_STATUS):
                if declared is None:
                    fields.append((b"content-length", b"%d" % len(data)))
                    block += b"content-length: %d\r\n" % len(data)
                elif declared != len(data):
                    raise BadGateway(f"worker {worker.id} sent {len(data)} bytes for a Content-Length"
                                     f" of {declared}")
            status = f"{code} {reason_phrase(code)}"
            out_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in fields]
            result = CompleteResponse(code, status, tuple(out_headers), block, data)
            start_response(status, out_headers)
            if rec is not None:
                rec.status, rec.response_headers = code, fields
                rec.sent = 0 if method == "HEAD" else len(data)
                result.on_close = rec.finish  # the line is written once the server is done with it
            return result
        return self._stream_response(start_response, rec, worker, ch, client_gone, code, fields)

    def _stream_response(self, start_response: StartResponse, rec: AccessRecord | None, worker: WorkerInfo,
                         ch: Channel, client_gone: Callable[[], bool] | None, code: int,
                         fields: list[tuple[bytes, bytes]]) -> _ResponseBody:
        """Start the response and return the iterable that streams its body (it releases the worker)."""
        if rec is not None:
            rec.status, rec.response_headers = code, fields
        body_iter = _ResponseBody(self.registry, worker, ch, client_gone, rec)
        try:
            start_response(f"{code} {reason_phrase(code)}",
                           [(k.decode("latin-1"), v.decode("latin-1")) for k, v in fields])
        except BaseException:
            body_iter.close()
            raise
        return body_iter

    def _upload(self, ch: Channel, body: Any, first: bytes, length: int | None) -> None:
        """Stream the request body to the worker; raises on failure (stream reset here)."""
        timeout = self.options.response_timeout
        try:
            remaining = length
            if first:
                ch.write(first, timeout=timeout)
            while True:
                want = CHUNK if remaining is None else min(CHUNK, remaining)
                if want <= 0:
                    break
                data = _read_client(body, want)
                if not data:
                    if remaining:
                        raise _ClientBodyError(ValueError(
                            f"the client sent {length - remaining} of {length} body bytes"))  # type: ignore
                    break
                if remaining is not None:
                    remaining -= len(data)
                ch.write(data, timeout=timeout)
            ch.end()
        except StreamReset as e:
            if ch.response is not None and not e.by_peer:
                # The worker answered and stopped the upload (RST_STREAM
                # NO_ERROR after a complete response, RFC 9113 §8.1).
                return
            raise
        except StreamTimeout as e:
            ch.reset(ErrorCodes.CANCEL)
            raise GatewayTimeout(f"the worker accepted no request body for {timeout:g}s") from e
        except _ClientBodyError:
            ch.reset(ErrorCodes.CANCEL)
            raise

    def _wait_response(self, ch: Channel,
                       client_gone: Callable[[], bool] | None) -> list[tuple[bytes, bytes]]:
        timeout = self.options.response_timeout
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            step = remaining if client_gone is None else min(remaining, CLIENT_CHECK)
            try:
                return ch.wait_response(max(0.0, step))
            except StreamTimeout as e:
                if client_gone is not None and client_gone():
                    ch.reset(ErrorCodes.CANCEL)
                    raise _ClientGone("the client went away while waiting for the response") from e
                if time.monotonic() >= deadline:
                    ch.reset(ErrorCodes.CANCEL)
                    raise GatewayTimeout(f"no response from the worker within {timeout:g}s") from e

    # -- WebSockets (the relay itself: rhttp_wsgi.upgrade) ----------------------------------------

    def _websocket(self, environ: dict[str, Any], start_response: StartResponse,
                   rec: AccessRecord | None) -> Iterable[bytes]:
        """A public WebSocket upgrade: checked, sent as an extended CONNECT, answered 101, relayed."""
        path = environ.get("PATH_INFO")
        offer = client_offer(environ)
        if offer is None:
            log.info("GET %s: 501 for a WebSocket upgrade: the WSGI server offers no socket to take over", path)
            return _error(start_response, 501, "WebSockets are not available through this WSGI server: it offers"
                          " no way to take over the client connection (the turnkey server, werkzeug and"
                          " gunicorn do)", rec=rec)
        try:
            key = handshake_key(environ)
            _, headers, _ = build_request(environ, self.options)
        except (HandshakeError, BadRequest) as e:
            log.info("GET %s: %d for a WebSocket upgrade: %s", path, e.status, e)
            return _error(start_response, e.status, str(e), getattr(e, "headers", None), rec=rec)
        stats = self.websockets
        limit = self.options.max_websockets
        if not stats.reserve(limit):
            log.warning("GET %s: 503 for a WebSocket upgrade: %d WebSockets open (max_websockets)", path, limit)
            return _error(start_response, 503, f"too many WebSockets open ({limit}, max_websockets)",
                          [("Retry-After", str(self.options.retry_after))], rec=rec)
        try:
            return self._relay_websocket(environ, start_response, rec, offer, key, connect_headers(headers))
        finally:
            stats.release()

    def _open_websocket(self, environ: dict[str, Any], headers: list[tuple[bytes, bytes]],
                        client_gone: Callable[[], bool] | None
                        ) -> tuple[WorkerInfo, Channel, list[tuple[bytes, bytes]]]:
        """Send the extended CONNECT to a worker that takes it; (worker, stream, response headers).

        Like a bodyless GET, an upgrade that a worker refused before answering (REFUSED_STREAM, a
        draining worker's GOAWAY, its tunnel lost) is retried on another worker, at most
        MAX_RETRIES times: it processed nothing.  The worker stays reserved for the caller.
        """
        tried: list[WorkerInfo] = []
        while True:
            worker = self.registry.acquire(environ, tried, extended_connect=True)
            try:
                ch = worker.tunnel.open_stream(headers, end_stream=False)
            except RHTTPError as e:
                self.registry.release(worker)
                tried.append(worker)
                if len(tried) > MAX_RETRIES:
                    raise BadGateway(f"no tunnel accepted the WebSocket upgrade: {e}") from e
                continue
            try:
                return worker, ch, self._wait_response(ch, client_gone)
            except (StreamReset, TunnelClosed) as e:
                _finish(ch)
                self.registry.release(worker)
                if len(tried) < MAX_RETRIES and _refused(e, ch):
                    log.info("worker %s refused the WebSocket upgrade of %s (%s); trying another worker",
                             worker.id, environ.get("PATH_INFO"), e)
                    tried.append(worker)
                    continue
                raise BadGateway(f"worker {worker.id} failed before answering the WebSocket upgrade: {e}") from e
            except BaseException:
                _finish(ch)
                self.registry.release(worker)
                raise

    def _relay_websocket(self, environ: dict[str, Any], start_response: StartResponse, rec: AccessRecord | None,
                         offer: ClientOffer, key: str, headers: list[tuple[bytes, bytes]]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        gone = environ.get("rhttp.client_disconnected")
        client_gone: Callable[[], bool] | None = gone if callable(gone) else None
        try:
            worker, ch, resp = self._open_websocket(environ, headers, client_gone)
        except UpstreamError as e:
            log.log(logging.WARNING if isinstance(e, BadGateway) else logging.INFO,
                    "GET %s: %d for a WebSocket upgrade: %s", path, e.status, e)
            extra = [("Retry-After", str(self.options.retry_after))] if e.status == 503 else []
            return _error(start_response, e.status, str(e), extra, rec=rec)
        if rec is not None:
            rec.peer = worker
        released = False
        try:
            try:
                code, fields, _, _ = _response_head(resp)
            except BaseException:
                _finish(ch)
                raise
            if not 200 <= code < 300:
                # The app answered without upgrading (403, 404...): an ordinary response.
                released = True
                return self._stream_response(start_response, rec, worker, ch, client_gone, code, fields)
            head = response_head(key, fields)
            block = h1_block(head)
            if block is None:
                _finish(ch)
                raise BadGateway(f"the worker's WebSocket answer cannot be forwarded: {h1_problem(head)}")
            self.websockets.opened()  # (before the 101: a client that saw it finds the socket counted)
            try:
                try:
                    sock, early = offer.accept(b"HTTP/1.1 101 Switching Protocols\r\n%s\r\n" % block)
                except OSError as e:
                    _finish(ch)
                    raise _ClientGone(f"the client went away before the 101: {e}") from e
                if rec is not None:
                    rec.status, rec.response_headers = 101, head
                name = f"websocket {worker.id}/{ch.stream_id}"
                log.debug("%s: GET %s upgraded", name, path)
                relay = Relay(ch, sock, early, idle_timeout=self.options.websocket_idle_timeout,
                              stats=self.websockets, name=name)
                how = relay.run()
            finally:
                self.websockets.closed()
            log.debug("%s: ended (%s): %d bytes up, %d down", name, how, relay.bytes_up, relay.bytes_down)
            # (for custom access-log formats: %({rhttp.websocket_bytes_in}e)s)
            environ["rhttp.websocket_bytes_in"] = relay.bytes_up
            if rec is not None:
                rec.sent = relay.bytes_down
        except UpstreamError as e:
            log.log(logging.INFO if isinstance(e, _ClientGone) else logging.WARNING,
                    "GET %s: %d for a WebSocket upgrade: %s", path, e.status, e)
            return _error(start_response, e.status, str(e), rec=rec)
        finally:
            if not released:
                self.registry.release(worker)
        if rec is not None:
            rec.finish()
        return offer.finish()


class _ClientGone(UpstreamError):
    """The public client closed its connection; nobody will read the answer."""

    status = 499


def _refused(e: BaseException, ch: Channel) -> bool:
    """Did the worker refuse the request before processing any of it?"""
    if ch.response is not None or ch.bytes_in:
        return False
    if isinstance(e, StreamReset):
        return bool(e.by_peer and e.error_code == ErrorCodes.REFUSED_STREAM)
    return isinstance(e, TunnelClosed)


def _finish(ch: Channel) -> None:
    """Make sure the stream is closed (CANCEL if it is still open)."""
    if not ch.finished:
        ch.reset(ErrorCodes.CANCEL)


def _read_client(body: Any, n: int) -> bytes:
    # read1() (the turnkey server offers it) returns what has arrived, so a
    # trickling upload streams through instead of waiting for whole chunks.
    read = getattr(body, "read1", None) or body.read
    try:
        data = read(n)
    except Exception as e:
        raise _ClientBodyError(e) from e
    if not isinstance(data, (bytes, bytearray)):
        raise _ClientBodyError(TypeError("wsgi.input returned non-bytes"))
    return bytes(data)


class _ResponseBody:
    """The response body iterable: one item per DATA chunk, as it arrives."""

    def __init__(self, registry: Registry, worker: WorkerInfo, ch: Channel,
                 client_gone: Callable[[], bool] | None, rec: AccessRecord | None = None) -> None:
        self._registry = registry
        self._worker = worker
        self._ch = ch
        self._client_gone = client_gone
        self._done = False
        #: The access-log record (None: off), counted per chunk and written when the body ends.
        self._rec = rec

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        ch = self._ch
        while True:
            try:
                data = ch.read_chunk(timeout=None if self._client_gone is None else CLIENT_CHECK)
            except StreamTimeout:
                assert self._client_gone is not None
                if self._client_gone():
                    self._release(cancel=True)
                    raise _ClientGone("the client went away mid-response") from None
                continue
            except (StreamReset, TunnelClosed) as e:
                self._release(cancel=True)
                raise BadGateway(f"worker {self._worker.id} failed mid-response ({e});"
                                 " the response is truncated") from e
            if data:
                if self._rec is not None:
                    self._rec.sent += len(data)
                return data
            self._release(cancel=False)
            raise StopIteration

    def _release(self, *, cancel: bool) -> None:
        if self._done:
            return
        self._done = True
        if cancel or not self._ch.finished:
            _finish(self._ch)
        self._registry.release(self._worker)
        if self._rec is not None:
            self._rec.finish()

    def close(self) -> None:
        """Called by the server; early means the client went away: CANCEL the stream."""
        if not self._done:
            log.debug("stream %d: response abandoned by the client; cancelling", self._ch.stream_id)
        self._release(cancel=True)


# ---------------------------------------------------------------------------
# Request and response mapping
# ---------------------------------------------------------------------------


def _encode(value: str, what: str) -> bytes:
    if not valid_value(value):
        raise BadRequest(400, f"CR, LF or NUL in {what}")
    try:
        return value.strip(" \t").encode("latin-1")
    except UnicodeEncodeError as e:
        raise BadRequest(400, f"non-latin-1 characters in {what}") from e


def _request_path(environ: Mapping[str, Any]) -> bytes:
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        path = str(raw)
        if not path.startswith("/") and path != "*":
            # absolute-form from some servers: keep only path and query
            scheme_end = path.find("://")
            if scheme_end >= 0:
                rest = path[scheme_end + 3:]
                cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
                path = rest[cut:] or "/"
                if not path.startswith("/"):
                    path = "/" + path
            else:
                raise BadRequest(400, f"invalid request target {path[:100]!r}")
    else:
        script = str(environ.get("SCRIPT_NAME", ""))
        info = str(environ.get("PATH_INFO", ""))
        if environ.get("REQUEST_METHOD") == "OPTIONS" and info == "*" and not script:
            path = "*"
        else:
            try:
                path = quote((script + info).encode("latin-1"), safe=_PATH_SAFE) or "/"
            except UnicodeEncodeError as e:
                raise BadRequest(400, "non-latin-1 characters in the path") from e
            query = environ.get("QUERY_STRING")
            if query:
                path += "?" + str(query)
    if _BAD_TARGET.search(path):
        raise BadRequest(400, "invalid characters in the request target")
    if not path.startswith("/") and path != "*":
        path = "/" + path
    return _encode(path, "the request target")


def _authority(environ: Mapping[str, Any], scheme: str) -> bytes:
    host = environ.get("HTTP_HOST")
    if not host:
        name = str(environ.get("SERVER_NAME", "localhost"))
        port = str(environ.get("SERVER_PORT", ""))
        default = "443" if scheme == "https" else "80"
        host = name if not port or port == default else f"{name}:{port}"
    authority = _encode(str(host), "Host")
    if not authority or _BAD_AUTHORITY.search(authority):
        raise BadRequest(400, "invalid Host header")
    return authority


def _content_length(environ: Mapping[str, Any]) -> int | None:
    cl = environ.get("CONTENT_LENGTH")
    if cl in (None, ""):
        return None
    try:
        return parse_content_length(str(cl).strip())
    except ValueError as e:
        raise BadRequest(400, str(e)) from None


def request_fields(environ: Mapping[str, Any]) -> list[tuple[bytes, bytes]]:
    """The request's header fields as the neutral list: (lowercase name, value) bytes, one per
    ``HTTP_*`` key and a non-empty ``CONTENT_TYPE``, in the environ's order.

    Values are checked (no CR, LF or NUL: 400) and stripped of surrounding SP/HTAB
    (joining repeated fields may have left an empty last element).
    """
    names = _ENVIRON_FIELDS
    fields: list[tuple[bytes, bytes]] = []
    # (the keys known to hold no field, most of an environ, are skipped at C speed)
    for key in filterfalse(_NOT_FIELDS.__contains__, environ):
        name = names.get(key)
        if name is None:
            name = _field_name(key)
        if not name:
            continue
        value = environ[key]
        if name is _CONTENT_TYPE and not value:
            continue
        text = value if type(value) is str else str(value)
        if "\n" in text or "\r" in text or "\x00" in text:
            raise BadRequest(400, f"CR, LF or NUL in {name.decode('latin-1')}")
        try:
            fields.append((name, text.strip(" \t").encode("latin-1")))
        except UnicodeEncodeError as e:
            raise BadRequest(400, f"non-latin-1 characters in {name.decode('latin-1')}") from e
    return fields


_CONTENT_TYPE = b"content-type"


def _field_name(key: str) -> bytes:
    """The field an environ key holds (b"" for none); an invalid name is a 400."""
    if key[:5] == "HTTP_":
        text = key[5:].lower().replace("_", "-")
        if not valid_name(text):
            raise BadRequest(400, f"invalid header name {text[:40]!r}")
        name = text.encode("ascii")
    else:
        name = _CONTENT_TYPE if key == "CONTENT_TYPE" else b""
    if len(_ENVIRON_FIELDS) < _ENVIRON_FIELDS_MAX:
        _ENVIRON_FIELDS[key] = name
        if not name:
            _NOT_FIELDS.add(key)
    return name


def build_request(environ: Mapping[str, Any], options: ProxyOptions
                  ) -> tuple[str, list[tuple[bytes, bytes]], int | None]:
    """Map a WSGI request to HTTP/2 request headers (whatever server built the environ).

    Returns (method, headers, body length or None when unknown).  The fields come
    from :func:`request_fields`; hop-by-hop ones (and every token named in
    ``Connection``) are dropped, ``TE: trailers`` is kept, and the
    ``X-Forwarded-*`` set is ours (or the trusted client's, with our hop appended).
    A client's ``X-Request-ID`` is dropped; ``environ["rhttp.request_id"]``, when
    set, goes as ``x-request-id``.
    """
    method = str(environ.get("REQUEST_METHOD", "GET"))
    if method not in _METHODS:
        if not valid_name(method):
            raise BadRequest(400, f"invalid method {method[:40]!r}")
        if len(_METHODS) < _CACHE_MAX:
            _METHODS.add(method)
    if method == "CONNECT":
        raise BadRequest(405, "CONNECT is not supported")
    scheme = str(environ.get("wsgi.url_scheme", "http"))
    authority = _authority(environ, scheme)
    path = _request_path(environ)
    length = _content_length(environ)
    fields = request_fields(environ)
    drop = _DROP
    te_trailers = False
    for name, value in fields:
        if name == b"connection":
            drop = _CONNECTION_DROP.get(value) or _connection_drop(value)
        elif name == b"te":
            te_trailers = b"trailers" in {t.split(b";")[0].strip().lower() for t in value.split(b",")}
    trusted = options.trust_forwarded
    headers = [
        (b":method", method.encode("ascii")),
        (b":scheme", scheme.encode("ascii", "replace")),
        (b":authority", authority),
        (b":path", path),
    ]
    client_xff: bytes | None = None
    client_proto = client_host = False
    for field in fields:
        name = field[0]
        if name in drop:
            continue
        if name in _FORWARDING:
            if not trusted:
                continue
            if name == b"x-forwarded-for":
                client_xff = field[1]
                continue
            if name == b"x-forwarded-proto":
                client_proto = True
            elif name == b"x-forwarded-host":
                client_host = True
        headers.append(field)
    if length is not None:
        headers.append((b"content-length", b"%d" % length))
    if te_trailers:
        headers.append((b"te", b"trailers"))
    remote = str(environ.get("REMOTE_ADDR", ""))
    if remote:
        addr = _encode(remote, "X-Forwarded-For")
        headers.append((b"x-forwarded-for", client_xff + b", " + addr if client_xff else addr))
    if not client_proto:
        headers.append((b"x-forwarded-proto", scheme.encode("ascii", "replace")))
    if not client_host:
        headers.append((b"x-forwarded-host", authority))
    rid = environ.get("rhttp.request_id")
    if rid:
        headers.append((b"x-request-id", _encode(str(rid), "the request id")))
    return method, headers, length


def _connection_drop(value: bytes) -> frozenset[bytes]:
    """What a request with this Connection value must not forward: the tokens it lists are
    hop-by-hop too (RFC 9110 §7.6.1).  Cached, bounded (the usual values are few)."""
    drop = _DROP | {t.strip().lower() for t in value.split(b",")}
    if len(_CONNECTION_DROP) < _CACHE_MAX:
        _CONNECTION_DROP[value] = drop
    return drop


def _response_head(resp: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]], bytes, int | None]:
    """Check the worker's response headers: (status, fields, HTTP/1.1 header block, Content-Length).

    The fields are the response's minus the hop-by-hop ones, and must be ones
    HTTP/1.1 can carry (:func:`~rhttp_wsgi._http.h1_block`): the public side is
    HTTP/1.1, and a value h11 refuses to write would otherwise cost the client
    its connection after the proxy had committed to the response.  Anything
    wrong is a :class:`BadGateway` (502).  What a field list makes is remembered
    (bounded): a worker repeats its answers, and this is the proxy's per-response work.
    """
    key = tuple(resp)
    hit = _RESPONSE_HEADS.get(key)
    if hit is not None:
        return hit[0], list(hit[1]), hit[2], hit[3]
    status_b = None
    declared: bytes | None = None
    fields: list[tuple[bytes, bytes]] = []
    for field in resp:
        name = field[0]
        if name[:1] == b":":
            if name == b":status":
                status_b = field[1]
                continue
            raise BadGateway(f"the worker sent the pseudo-header {name!r} in a response")
        if name in HOP_BY_HOP:
            continue
        if name == b"content-length":
            if declared is not None and field[1] != declared:
                raise BadGateway("the worker sent conflicting Content-Length values")
            declared = field[1]
        fields.append(field)
    code = _status_code(status_b)
    length = None
    if declared is not None:
        try:
            length = parse_content_length(declared)
        except ValueError as e:
            raise BadGateway(f"the worker sent an {e}") from None
    block = h1_block(fields)
    if block is None:
        raise BadGateway(f"the worker's response cannot be forwarded: {h1_problem(fields)}")
    if len(key) <= _RESPONSE_HEADS_MAX_FIELDS and len(block) <= _RESPONSE_HEADS_MAX_BYTES:
        if len(_RESPONSE_HEADS) >= _RESPONSE_HEADS_MAX:
            _RESPONSE_HEADS.clear()
        _RESPONSE_HEADS[key] = (code, tuple(fields), block, length)
    return code, fields, block, length


#: Response field lists -> what :func:`_response_head` made of them (status, fields, block,
#: length).  Bounded: at most _RESPONSE_HEADS_MAX lists of at most _RESPONSE_HEADS_MAX_FIELDS
#: fields and a _RESPONSE_HEADS_MAX_BYTES block; emptied when full.  (Plain dict reads and
#: writes: safe across threads; entries are never changed.)
_Fields = tuple[tuple[bytes, bytes], ...]
_RESPONSE_HEADS: dict[_Fields, tuple[int, _Fields, bytes, int | None]] = {}
_RESPONSE_HEADS_MAX = 128
_RESPONSE_HEADS_MAX_FIELDS = 32
_RESPONSE_HEADS_MAX_BYTES = 2048


def _status_code(status_b: bytes | None) -> int:
    if status_b is None or len(status_b) != 3 or not status_b.isdigit():
        raise BadGateway(f"the worker sent an invalid :status {status_b!r}")
    code = int(status_b)
    if not 200 <= code <= 599:
        raise BadGateway(f"the worker sent an unusable status {code}")
    return code


def _error(start_response: StartResponse, status: int, message: str,
           extra: list[tuple[str, str]] | None = None, *, rec: AccessRecord | None = None) -> list[bytes]:
    reason = reason_phrase(status)
    body = f"{status} {reason}: {message}\n".encode("utf-8", "replace")
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
               ("Cache-Control", "no-store")]
    if extra:
        headers += extra
    start_response(f"{status} {reason}", headers)
    if rec is not None:
        rec.status, rec.sent = status, len(body)
        rec.finish()
    return [body]
