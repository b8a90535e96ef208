"""The forwarder: a plain WSGI app that sends each request down a worker's tunnel.

``Proxy.wsgi_app`` is an instance of :class:`Forwarder`; mount it on any WSGI
server (the turnkey one in :mod:`rhttp_wsgi.public`, gunicorn, waitress...).
Per request, on the server's thread:

1. The request is mapped to HTTP/2: ``:method``; ``:scheme`` from
   ``wsgi.url_scheme``; ``:authority`` from ``Host``; ``:path`` from
   ``RAW_URI``/``REQUEST_URI`` when the server offers it (byte-exact, so
   ``%2F`` survives) else re-quoted ``SCRIPT_NAME + PATH_INFO`` plus the query.
   Hop-by-hop headers and every token named in ``Connection`` are dropped
   (``TE: trailers`` is kept), ``X-Forwarded-For/-Proto/-Host`` are set, and a
   CR, LF or NUL in any value is a 400 before anything is encoded.
2. A worker is reserved (:mod:`rhttp_wsgi.balancing` picks; a full worker is
   never given another stream; a request may wait ``stream_wait`` for one).
3. The body streams up in chunks; :meth:`Channel.write` blocks while the
   worker is slow, so a fast client cannot fill the proxy's memory.
4. The response headers are awaited (``response_timeout``, then 504), checked
   and handed to ``start_response``; the body streams down chunk by chunk as
   DATA frames arrive, so server-sent events work.

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

import http
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from h2.errors import ErrorCodes

from ._headers import HOP_BY_HOP, valid_name, valid_value
from ._tunnel import Channel
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

if TYPE_CHECKING:
    from .proxy import WorkerInfo

__all__ = ["Forwarder", "WSGIApp"]

log = logging.getLogger("rhttp_wsgi.proxy.forward")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
StartResponse = Callable[..., Any]
#: ``respond(status, header_block, body) -> sent?`` (see ``Forwarder.public_direct``).
Respond = Callable[[int, bytes, bytes], bool]

#: Request body chunk read from ``wsgi.input`` per write.
CHUNK = 64 * 1024
#: How often a wait on the worker checks whether the public client went away.
CLIENT_CHECK = 0.5
IDEMPOTENT_RETRY = frozenset({"GET", "HEAD", "OPTIONS"})
#: Client-supplied headers that would let a client speak for the proxy.
_FORWARDING = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                         "x-forwarded-port", "x-forwarded-prefix", "x-real-ip"})
#: Dropped besides HOP_BY_HOP: Host becomes :authority; Expect is answered at
#: the public edge; HTTP2-Settings belongs to h2c upgrades.
_DROP = HOP_BY_HOP | frozenset({"host", "expect", "http2-settings"})
#: RFC 3986 pchar plus "/" and "%": what may stay unescaped in :path.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
#: The same sets as bytes, for the direct path (h11's header names are bytes).
_DROP_B = frozenset(n.encode("ascii") for n in _DROP)
_FORWARDING_B = frozenset(n.encode("ascii") for n in _FORWARDING)
_HOP_BY_HOP_B = frozenset(n.encode("ascii") for n in HOP_BY_HOP)
_BAD_TARGET = re.compile(r"[ \r\n\x00\t#]")
#: Response header lines the public side may write as they are: lowercase
#: token names and values h11 would accept (see ``public.HEADER_BLOCK``).
_RESPONSE_BLOCK = re.compile(rb"(?:[-!#$%&'*+.^_`|~0-9a-z]+: (?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?\r\n)*")
#: Reason phrases, precomputed (``http.HTTPStatus`` lookups cost a few µs each).
_REASONS: dict[int, str] = {int(st): st.phrase for st in http.HTTPStatus}
#: The answer to a complete response sent through the public server's ``respond``.
_ANSWERED: tuple[bytes, ...] = ()


class Registry(Protocol):
    """What the forwarder needs from the proxy's worker registry."""

    def acquire(self, environ: Mapping[str, Any], avoid: Sequence[WorkerInfo]) -> WorkerInfo: ...

    def release(self, worker: WorkerInfo) -> None: ...


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _ClientBodyError(Exception):
    """Reading the public request body failed."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause
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

    # -- WSGI entry (server thread) ------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            method, headers, length = build_request(environ, self.options)
        except BadRequest as e:
            log.info("%s %s: %d %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), e.status, e)
            return _error(start_response, e.status, str(e))
        return self._run(environ, start_response, method, headers, length, None, None)

    def public_direct(self, environ: dict[str, Any], items: Sequence[tuple[bytes, bytes]], bodyless: bool,
                      start_response: StartResponse, respond: Respond) -> Iterable[bytes]:
        """The turnkey public server's entry (``public.PublicServer``), when it runs this forwarder bare.

        Same answers as the WSGI call, cheaper: ``items`` are h11's request
        headers (lowercase names, values h11 validated), mapped straight to
        HTTP/2 (:func:`build_request_h11`, the same mapping as
        :func:`build_request` on the environ the server built from them);
        ``bodyless`` is h11's framing verdict (no peek at ``wsgi.input``); a
        complete response goes out through ``respond(status, header_block,
        body)`` in one write, and anything else through ``start_response``.
        """
        try:
            method, headers, length = build_request_h11(environ, items, self.options)
        except BadRequest as e:
            log.info("%s %s: %d %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), e.status, e)
            return _error(start_response, e.status, str(e))
        return self._run(environ, start_response, method, headers, length, bodyless, respond)

    def _run(self, environ: dict[str, Any], start_response: StartResponse, method: str,
             headers: list[tuple[bytes, bytes]], length: int | None, bodyless: bool | None,
             respond: Respond | None) -> Iterable[bytes]:
        try:
            return self._forward(environ, start_response, method, headers, length, bodyless, respond)
        except UpstreamError as e:
            level = logging.INFO if isinstance(e, (NoWorkerAvailable, _ClientGone)) else logging.WARNING
            log.log(level, "%s %s: %d %s", method, environ.get("PATH_INFO"), e.status, e)
            extra = [("Retry-After", str(self.options.retry_after))] if e.status == 503 else []
            return _error(start_response, e.status, str(e), extra)
        except _ClientBodyError as e:
            log.info("%s %s: request body failed: %s", method, environ.get("PATH_INFO"), e)
            return _error(start_response, e.status, f"could not read the request body: {e}")

    def _forward(self, environ: dict[str, Any], start_response: StartResponse, method: str,
                 headers: list[tuple[bytes, bytes]], length: int | None, bodyless: bool | None = None,
                 respond: Respond | None = None) -> Iterable[bytes]:
        body = environ.get("wsgi.input")
        gone = environ.get("rhttp.client_disconnected")
        client_gone: Callable[[], bool] | None = gone if callable(gone) else None
        # Unknown length (chunked upload): peek so a bodyless request ends the
        # stream with its HEADERS and stays retryable.
        first = b""
        if bodyless:
            has_body = False  # the public server's framing says so: no peek
        elif length is None and body is not None and (
                environ.get("wsgi.input_terminated") or "HTTP_TRANSFER_ENCODING" in environ):
            first = _read_client(body, CHUNK)
            has_body = bool(first)
        else:
            has_body = bool(length)
        retryable = method in IDEMPOTENT_RETRY and not has_body
        # RFC 9113 §6.5.2 accounting, checked against each worker's advertised
        # limit: a worker that must refuse an oversized header list may have to
        # drop its whole tunnel (HPACK), taking every other stream with it.
        head_size = sum(len(k) + len(v) + 32 for k, v in headers)
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
            limit = tunnel.proto.h2.remote_settings.max_header_list_size
            if limit is not None and head_size > limit:
                self.registry.release(worker)
                raise UpstreamError(f"request header list of {head_size} bytes exceeds the worker's limit"
                                    f" ({limit})", status=431)
            try:
                ch = tunnel.open_stream(headers, end_stream=not has_body)
            except (TunnelClosed, RHTTPError) as e:
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
                    log.info("worker %s refused %s %s (%s); retrying on another worker", worker.id, method,
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
        complete = ch.in_ended and ch.error is None
        fast: tuple[int, bytes, bytes | None] | None = None
        try:
            if respond is not None and complete:
                fast = _raw_response(resp)
            if fast is None:
                status, out_headers = _response_headers(resp, method)
        except BadGateway:
            _finish(ch)
            self.registry.release(worker)
            raise
        if complete:
            # The whole response is already here (the common small answer):
            # hand it over as one chunk with a Content-Length, so the public
            # side needs no chunked encoding and writes it in one go.
            try:
                data = ch.read(-1, timeout=0)
            except (StreamReset, TunnelClosed) as e:
                _finish(ch)
                self.registry.release(worker)
                raise BadGateway(f"worker {worker.id} failed mid-response: {e}") from e
            _finish(ch)
            self.registry.release(worker)
            if fast is not None:
                assert respond is not None
                code, block, declared_b = fast
                no_body = method == "HEAD" or code == 204 or code == 304
                if declared_b is None and not no_body:
                    block += b"content-length: %d\r\n" % len(data)
                elif declared_b is not None and not no_body and int(declared_b) != len(data):
                    raise BadGateway(f"worker {worker.id} sent {len(data)} bytes for a Content-Length"
                                     f" of {declared_b.decode()}")
                if respond(code, block, data):
                    return _ANSWERED
                status, out_headers = _response_headers(resp, method)
            bodyless = method == "HEAD" or status[:3] in ("204", "304")
            declared = next((v for k, v in out_headers if k == "content-length"), None)
            if declared is None and not bodyless:
                out_headers.append(("content-length", str(len(data))))
            elif declared is not None and not bodyless and int(declared) != len(data):
                raise BadGateway(f"worker {worker.id} sent {len(data)} bytes for a Content-Length"
                                 f" of {declared}")
            start_response(status, out_headers)
            return [data]
        body_iter = _ResponseBody(self.registry, worker, ch, client_gone)
        try:
            start_response(status, out_headers)
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
                 client_gone: Callable[[], bool] | None) -> None:
        self._registry = registry
        self._worker = worker
        self._ch = ch
        self._client_gone = client_gone
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        ch = self._ch
        while True:
            try:
                data = ch.read(-1, timeout=None if self._client_gone is None else CLIENT_CHECK)
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
        raise BadRequest(f"CR, LF or NUL in {what}")
    try:
        return value.strip(" \t").encode("latin-1")
    except UnicodeEncodeError as e:
        raise BadRequest(f"non-latin-1 characters in {what}") from e


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
                raise BadRequest(f"invalid request target {path[:100]!r}")
    else:
        script = str(environ.get("SCRIPT_NAME", ""))
        info = str(environ.get("PATH_INFO", ""))
        if environ.get("REQUEST_METHOD") == "OPTIONS" and info == "*" and not script:
            path = "*"
        else:
            try:
                path = quote((script + info).encode("latin-1"), safe=_PATH_SAFE) or "/"
            except UnicodeEncodeError as e:
                raise BadRequest("non-latin-1 characters in the path") from e
            query = environ.get("QUERY_STRING")
            if query:
                path += "?" + str(query)
    if _BAD_TARGET.search(path):
        raise BadRequest("invalid characters in the request target")
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
    if not authority or any(c in authority for c in b" /?#@"):
        raise BadRequest("invalid Host header")
    return authority


def _content_length(environ: Mapping[str, Any]) -> int | None:
    cl = environ.get("CONTENT_LENGTH")
    if cl in (None, ""):
        return None
    text = str(cl).strip()
    if not text.isdigit():
        raise BadRequest(f"invalid Content-Length {text[:40]!r}")
    return int(text)


def build_request(environ: Mapping[str, Any], options: ProxyOptions
                  ) -> tuple[str, list[tuple[bytes, bytes]], int | None]:
    """Map a WSGI environ to HTTP/2 request headers.

    Returns (method, headers, body length or None when unknown).
    """
    method = str(environ.get("REQUEST_METHOD", "GET"))
    if not valid_name(method):
        raise BadRequest(f"invalid method {method[:40]!r}")
    if method == "CONNECT":
        raise BadRequest("CONNECT is not supported", 405)
    scheme = str(environ.get("wsgi.url_scheme", "http"))
    authority = _authority(environ, scheme)
    path = _request_path(environ)

    length = _content_length(environ)
    # Tokens listed in Connection are hop-by-hop too (RFC 9110 §7.6.1).
    connection_tokens = {t.strip().lower() for t in str(environ.get("HTTP_CONNECTION", "")).split(",")
                         if t.strip()}
    te_trailers = "trailers" in {t.split(";")[0].strip().lower()
                                 for t in str(environ.get("HTTP_TE", "")).split(",")}
    trusted = options.trust_forwarded
    headers = _pseudo_headers(method, scheme, authority, path)
    client_xff: bytes | None = None
    client_proto = client_host = False
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].lower().replace("_", "-")
        elif key == "CONTENT_TYPE":
            name = "content-type"
            if not value:
                continue
        else:
            continue
        if name in _DROP or name in connection_tokens:
            continue
        if name in _FORWARDING:
            if trusted:
                if name == "x-forwarded-for":
                    client_xff = _encode(str(value), "X-Forwarded-For")
                    continue
                if name == "x-forwarded-proto":
                    client_proto = True
                elif name == "x-forwarded-host":
                    client_host = True
            else:
                continue
        if not valid_name(name):
            raise BadRequest(f"invalid header name {name[:40]!r}")
        text = str(value)
        if name == "cookie":
            headers.append((b"cookie", _encode(text, "Cookie")))
            continue
        headers.append((name.encode("ascii"), _encode(text, name)))
    _append_tail(headers, environ, scheme, authority, length, te_trailers, client_xff, client_proto, client_host)
    return method, headers, length


def _pseudo_headers(method: str, scheme: str, authority: bytes, path: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method.encode("ascii")),
        (b":scheme", scheme.encode("ascii", "replace")),
        (b":authority", authority),
        (b":path", path),
    ]


def _append_tail(headers: list[tuple[bytes, bytes]], environ: Mapping[str, Any], scheme: str, authority: bytes,
                 length: int | None, te_trailers: bool, client_xff: bytes | None, client_proto: bool,
                 client_host: bool) -> None:
    """The fields both request builders end with: framing, then X-Forwarded-* (ours, or the
    trusted client's with our hop appended)."""
    if length is not None:
        headers.append((b"content-length", str(length).encode("ascii")))
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


def build_request_h11(environ: Mapping[str, Any], items: Sequence[tuple[bytes, bytes]],
                      options: ProxyOptions) -> tuple[str, list[tuple[bytes, bytes]], int | None]:
    """:func:`build_request` for the turnkey public server, from h11's request headers.

    ``items`` are (lowercase name, value) as h11 parsed and validated them
    (token names; values without CR, LF, NUL or surrounding whitespace), and
    ``environ`` is what ``public.py`` built from the same request.  The result
    is the one :func:`build_request` gives for that environ (same headers,
    same order, same joining of repeated fields), without the round trip
    through environ keys and str.
    """
    method = str(environ["REQUEST_METHOD"])  # an h11-validated token
    if method == "CONNECT":
        raise BadRequest("CONNECT is not supported", 405)
    scheme = str(environ.get("wsgi.url_scheme", "http"))
    authority = _authority(environ, scheme)
    path = _request_path(environ)
    length = _content_length(environ)
    # The fields as the environ holds them: repeated ones joined with ", ",
    # Content-Type last wins, names with "_" left out, Cookie joined with "; "
    # and last.
    fields: dict[bytes, bytes] = {}
    cookies: list[bytes] = []
    for name, value in items:
        if name == b"cookie":
            cookies.append(value)
        elif name == b"content-type":
            fields[name] = value
        elif name == b"content-length" or b"_" in name:
            continue
        else:
            prev = fields.get(name)
            fields[name] = value if prev is None else prev + b", " + value
    if cookies:
        fields[b"cookie"] = b"; ".join(cookies)
    conn = fields.get(b"connection")
    connection_tokens = ({t.strip().lower() for t in conn.split(b",") if t.strip()} if conn is not None
                         else frozenset())
    te = fields.get(b"te")
    te_trailers = te is not None and b"trailers" in {t.split(b";")[0].strip().lower() for t in te.split(b",")}
    trusted = options.trust_forwarded
    headers = _pseudo_headers(method, scheme, authority, path)
    client_xff: bytes | None = None
    client_proto = client_host = False
    for name, value in fields.items():
        if name in _DROP_B or name in connection_tokens:
            continue
        if name == b"content-type" and not value:
            continue
        if name in _FORWARDING_B:
            if not trusted:
                continue
            if name == b"x-forwarded-for":
                client_xff = value.strip(b" \t")
                continue
            if name == b"x-forwarded-proto":
                client_proto = True
            elif name == b"x-forwarded-host":
                client_host = True
        # (joining may have left an empty last element: strip as _encode does)
        headers.append((name, value.strip(b" \t")))
    _append_tail(headers, environ, scheme, authority, length, te_trailers, client_xff, client_proto, client_host)
    return method, headers, length


def _response_headers(resp: list[tuple[bytes, bytes]], method: str) -> tuple[str, list[tuple[str, str]]]:
    """Validate the worker's response headers; returns (WSGI status, WSGI headers)."""
    status_b = None
    out: list[tuple[str, str]] = []
    lengths: set[bytes] = set()
    for name, value in resp:
        if name == b":status":
            status_b = value
            continue
        if name[:1] == b":":
            raise BadGateway(f"the worker sent the pseudo-header {name!r} in a response")
        try:
            text_name = name.decode("ascii")
        except UnicodeDecodeError as e:
            raise BadGateway("the worker sent a non-ASCII header name") from e
        if not valid_name(text_name) or text_name != text_name.lower():
            raise BadGateway(f"the worker sent an invalid header name {text_name[:40]!r}")
        if text_name in HOP_BY_HOP:
            continue
        text_value = value.decode("latin-1")
        if not valid_value(text_value):
            raise BadGateway(f"the worker sent CR, LF or NUL in the {text_name} header")
        if text_name == "content-length":
            lengths.add(value.strip())
            if len(lengths) > 1 or not value.strip().isdigit():
                raise BadGateway("the worker sent an invalid Content-Length")
        out.append((text_name, text_value))
    code = _status_code(status_b)
    return f"{code} {_REASONS.get(code, 'Unknown')}", out


def _status_code(status_b: bytes | None) -> int:
    if status_b is None or len(status_b) != 3 or not status_b.isdigit():
        raise BadGateway(f"the worker sent an invalid :status {status_b!r}")
    code = int(status_b)
    if not 200 <= code <= 599:
        raise BadGateway(f"the worker sent an unusable status {code}")
    return code


def _raw_response(resp: list[tuple[bytes, bytes]]) -> tuple[int, bytes, bytes | None] | None:
    """The worker's response as (status, HTTP/1.1 header block, declared Content-Length).

    The same checks as :func:`_response_headers` (raising the same
    ``BadGateway``), on bytes: the block is the lines the public server may
    write as they are.  None when some name or value is not plainly valid
    (then :func:`_response_headers` and the WSGI path decide, as before).
    """
    status_b = None
    declared: bytes | None = None
    lines: list[bytes] = []
    for name, value in resp:
        if name[:1] == b":":
            if name == b":status":
                status_b = value
                continue
            raise BadGateway(f"the worker sent the pseudo-header {name!r} in a response")
        if name in _HOP_BY_HOP_B:
            continue
        if name == b"content-length":
            v = value.strip()
            if (declared is not None and v != declared) or not v.isdigit():
                raise BadGateway("the worker sent an invalid Content-Length")
            declared = v
        lines.append(name + b": " + value + b"\r\n")
    block = b"".join(lines)
    if not _RESPONSE_BLOCK.fullmatch(block):
        return None
    return _status_code(status_b), block, declared


def _error(start_response: StartResponse, status: int, message: str,
           extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    reason = _REASONS.get(status) or ("Client Closed Request" if status == 499 else "Error")
    body = f"{status} {reason}: {message}\n".encode("utf-8", "replace")
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
               ("Cache-Control", "no-store")]
    if extra:
        headers += extra
    start_response(f"{status} {reason}", headers)
    return [body]
