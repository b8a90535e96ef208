"""The PEP 3333 adapter: one HTTP/2 stream in, one WSGI call, one response out.

Runs on an app thread.  It only talks to its :class:`~rhttp_wsgi._tunnel.Channel`
(never the socket, TLS or the HTTP/2 core), so a slow or broken app costs its own
stream and nothing else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import IO, Any

from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple

from ._http import (
    CONNECTION_SPECIFIC_STR,
    HOST_SPLITS,
    NEVER_INDEXED,
    NO_BODY_STATUS,
    OUTBOUND_STRIP_STR,
    SHORT_COOKIE,
    BadRequest,
    parse_content_length,
    request_environ,
    split_host,
    valid_name,
    valid_value,
)
from ._io import body_wait
from ._tunnel import Channel
from .accesslog import AccessLog, TunnelIdentity, forwarded_client, new_request_id, request_id
from .errors import RHTTPError, StreamReset, StreamTimeout, TunnelClosed

__all__ = ["FileWrapper", "InputStream", "WSGIContext", "close_response", "encode_response_fields", "run_wsgi"]

log = logging.getLogger("rhttp_wsgi.wsgi")
app_log = logging.getLogger("rhttp_wsgi.app")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class WSGIContext:
    """What a tunnel's requests share: the app, the policy, the peer.

    ``static_environ`` holds every environ key whose value is the same for all
    of the tunnel's requests (PEP 3333 constants, ``REMOTE_ADDR``/``REMOTE_PORT``,
    ``rhttp.draining``, ``rhttp.peer_certificate``); :func:`build_environ` copies
    it in one go.  The peer attributes are properties over it (one copy of the state).
    ``REMOTE_ADDR``/``REMOTE_PORT`` there are the tunnel's peer (``remote_port``
    None: ``""``); a request's ``X-Forwarded-For`` replaces them when
    ``forwarded_for`` (the number of trusted entries, 0 = none) says so.
    ``access_log`` (None: off) writes a line per request naming ``identity``.
    """

    __slots__ = (
        "access_log",
        "app",
        "body_min_rate",
        "body_timeout",
        "forwarded_for",
        "identity",
        "server_name",
        "static_environ",
        "url_scheme",
    )

    def __init__(self, app: WSGIApp, *, url_scheme: str = "forwarded", remote_addr: str = "",
                 remote_port: int | None = 0, peer_certificate: Any = None,
                 draining: threading.Event | None = None, server_name: str = "localhost",
                 body_timeout: float | None = None, body_min_rate: int = 0, multiprocess: bool = False,
                 forwarded_for: int = 1, access_log: AccessLog | None = None,
                 identity: TunnelIdentity | None = None) -> None:
        self.app = app
        #: Copied into every environ; ``wsgi.multiprocess`` is True when the app
        #: also runs in sibling processes (gunicorn --workers N).
        self.static_environ = dict(_STATIC_ENVIRON, **{"wsgi.multiprocess": multiprocess})
        self.url_scheme = url_scheme
        self.remote_addr = remote_addr
        self.remote_port = remote_port
        self.peer_certificate = peer_certificate
        self.draining = draining or threading.Event()
        self.server_name = server_name
        #: Most seconds a ``wsgi.input`` read waits for body bytes (None/0 = forever):
        #: a stalled upload then raises StreamTimeout in the app and gets 408.
        self.body_timeout = body_timeout or None
        #: With body_timeout: the slowest average body rate (bytes/s, 0 = none).
        self.body_min_rate = body_min_rate
        #: REMOTE_ADDR is the ``forwarded_for``-th X-Forwarded-For entry from the right (0: the peer's).
        self.forwarded_for = forwarded_for
        self.access_log = access_log
        self.identity = identity

    @property
    def remote_addr(self) -> str:
        return str(self.static_environ["REMOTE_ADDR"])

    @remote_addr.setter
    def remote_addr(self, value: str) -> None:
        self.static_environ["REMOTE_ADDR"] = value

    @property
    def remote_port(self) -> int | None:
        port = self.static_environ["REMOTE_PORT"]
        return int(port) if port else None

    @remote_port.setter
    def remote_port(self, value: int | None) -> None:
        self.static_environ["REMOTE_PORT"] = "" if value is None else str(value)

    @property
    def peer_certificate(self) -> Any:
        return self.static_environ["rhttp.peer_certificate"]

    @peer_certificate.setter
    def peer_certificate(self, value: Any) -> None:
        self.static_environ["rhttp.peer_certificate"] = value

    @property
    def draining(self) -> threading.Event:
        event: threading.Event = self.static_environ["rhttp.draining"]
        return event

    @draining.setter
    def draining(self, value: threading.Event) -> None:
        self.static_environ["rhttp.draining"] = value


class InputStream:
    """``wsgi.input``: reads pull body bytes from the stream and return flow-control credit."""

    __slots__ = ("_buf", "_ch", "_eof", "_got", "_started", "min_rate", "timeout")

    def __init__(self, channel: Channel, timeout: float | None = None, min_rate: int = 0) -> None:
        self._ch = channel
        self._buf = b""
        self._eof = False
        self.timeout = timeout
        self.min_rate = min_rate
        self._got = 0
        self._started: float | None = None

    def _pull(self, size: int) -> bytes:
        """One read from the stream, within the body timeouts (StreamTimeout past them)."""
        timeout = self.timeout
        if timeout is None or not self.min_rate:
            return self._ch.read(size, timeout)
        # Besides the idle timeout, a minimum average rate (_io.body_wait).
        # Only waiting is limited: buffered bytes are always returned.
        now = time.monotonic()
        if self._started is None:
            self._started = now
        wait = body_wait(self._started, self._got, timeout, self.min_rate, now)
        try:
            data = self._ch.read(size, wait)
        except StreamTimeout:
            if wait >= timeout:  # the idle timeout, not the rate
                raise
            raise StreamTimeout(f"stream {self._ch.stream_id}: request body slower than"
                                f" {self.min_rate} bytes/s") from None
        self._got += len(data)
        return data

    def _fill(self, hint: int) -> bool:
        if self._eof:
            return False
        data = self._pull(max(hint, 1) if hint > 0 else -1)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._buf]
            self._buf = b""
            while not self._eof:
                data = self._pull(-1)
                if not data:
                    self._eof = True
                    break
                parts.append(data)
            return b"".join(parts)
        while len(self._buf) < size and self._fill(size - len(self._buf)):
            pass
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        limit = -1 if size is None else size
        while True:
            idx = self._buf.find(b"\n")
            if idx >= 0 and (limit < 0 or idx < limit):
                line, self._buf = self._buf[: idx + 1], self._buf[idx + 1:]
                return line
            if 0 <= limit <= len(self._buf):
                line, self._buf = self._buf[:limit], self._buf[limit:]
                return line
            if not self._fill(65536):
                line, self._buf = self._buf, b""
                return line

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                break
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line


class _ErrorStream:
    """``wsgi.errors``: text written by the app goes to the ``rhttp_wsgi.app`` logger."""

    def __init__(self) -> None:
        self._pending = ""

    def write(self, s: str) -> int:
        self._pending += s
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            if line:
                app_log.error("%s", line)
        return len(s)

    def writelines(self, seq: Iterable[str]) -> None:
        for s in seq:
            self.write(s)

    def flush(self) -> None:
        if self._pending:
            app_log.error("%s", self._pending)
            self._pending = ""


class FileWrapper:
    """``wsgi.file_wrapper``: iterate a file in blocks; ``close()`` closes it."""

    def __init__(self, filelike: IO[bytes], blksize: int = 65536) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Iterator[bytes]:
        read = self.filelike.read
        while True:
            data = read(self.blksize)
            if not data:
                return
            yield data


def build_environ(ch: Channel, ctx: WSGIContext) -> dict[str, Any]:
    """The environ for one request, to the letter of PEP 3333 (raises :class:`BadRequest`)."""
    # The keys that never change, copied in one go (cheaper than setting them per request).
    environ: dict[str, Any] = ctx.static_environ.copy()
    assert ch.headers is not None
    scheme, host_value = request_environ(environ, ch.headers)
    trusted = ctx.forwarded_for
    if trusted and (xff := environ.get("HTTP_X_FORWARDED_FOR")):
        client = forwarded_client(xff, trusted)
        if client is not None:
            # (the client's port is not known: REMOTE_PORT "", never the tunnel's)
            environ["REMOTE_ADDR"] = client
            environ["REMOTE_PORT"] = ""
    rid = environ.get("HTTP_X_REQUEST_ID")
    environ["rhttp.request_id"] = new_request_id() if rid is None else request_id(rid)
    policy = ctx.url_scheme
    if policy == "forwarded" and (fwd_proto := environ.get("HTTP_X_FORWARDED_PROTO")):
        url_scheme = fwd_proto.split(",")[0].strip().lower()
    elif policy == "forwarded" or policy == "pseudo":
        url_scheme = (scheme or "http").lower()
    else:
        url_scheme = policy
    if url_scheme != "http" and url_scheme != "https":
        url_scheme = "https" if url_scheme == "wss" else "http"
    if host_value:
        hostname, port = HOST_SPLITS.get(host_value) or split_host(host_value)
        if not port:
            port = "443" if url_scheme == "https" else "80"
    else:
        hostname, port = ctx.server_name, ("443" if url_scheme == "https" else "80")
    environ["SERVER_NAME"] = hostname
    environ["SERVER_PORT"] = port
    environ["wsgi.url_scheme"] = url_scheme
    environ["wsgi.input"] = InputStream(ch, ctx.body_timeout, ctx.body_min_rate)
    environ["wsgi.errors"] = _ErrorStream()
    environ["rhttp.stream_id"] = ch.stream_id
    environ["rhttp.cancelled"] = ch.cancelled
    environ["rhttp.trailers"] = lambda: _decode_pairs(ch.trailers)
    return environ


#: The environ keys whose values are the same for every request (build_environ copies them first).
_STATIC_ENVIRON: dict[str, Any] = {
    "SCRIPT_NAME": "",
    "SERVER_PROTOCOL": "HTTP/2",
    "wsgi.version": (1, 0),
    "wsgi.multithread": True,
    "wsgi.multiprocess": False,
    "wsgi.run_once": False,
    "wsgi.input_terminated": True,
    "wsgi.file_wrapper": FileWrapper,
}


def _decode_pairs(pairs: list[tuple[bytes, bytes]] | None) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in pairs or ()]


def _encode_headers(status: str, headers: list[tuple[str, str]]) -> tuple[int, list[tuple[bytes, bytes]], int | None]:
    """Validate and encode a ``start_response`` status and header list for HTTP/2.

    Refuses (TypeError/ValueError) what PEP 3333 and RFC 9113 forbid; drops the
    connection-specific headers; strips what h2's outbound normalization would
    strip.  The worker's HTTP/2 core runs with its own outbound checks off
    (``H2Config.validate_outbound``) because of this
    (tests/unit/test_outbound_headers.py proves the equivalence with h2's).
    """
    st = _STATUS_CACHE.get(status) if type(status) is str else None
    if st is None:
        st = _encode_status(status)
    code, status_pair = st
    out: list[tuple[bytes, bytes]] = [status_pair]
    return code, out, _encode_fields(headers, out)


def close_response(result: Any, where: str) -> None:
    """PEP 3333: call the response iterable's ``close()`` if it has one, whatever happened; a
    failure there is logged (naming ``where``), never raised."""
    close = getattr(result, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.error("%s: the response iterable's close() failed", where, exc_info=True)


def encode_response_fields(headers: list[tuple[str, str]]) -> tuple[list[tuple[bytes, bytes]], int | None]:
    """A ``start_response`` header list as HTTP/2 fields, and its Content-Length (None without one).

    The same rules as a WSGI response's (the module's one header encoder): refuses
    (TypeError/ValueError) what PEP 3333 and RFC 9113 forbid, drops the
    connection-specific fields, strips values, keeps credentials out of HPACK tables.
    """
    out: list[tuple[bytes, bytes]] = []
    return out, _encode_fields(headers, out)


def _encode_fields(headers: list[tuple[str, str]], out: list[tuple[bytes, bytes]]) -> int | None:
    """Append ``headers`` to ``out`` as HTTP/2 fields; return their Content-Length."""
    content_length: int | None = None
    names = _PLAIN_NAMES
    for item in headers:
        # Fast path: exact tuple/str types, a name already validated (see
        # _PLAIN_NAMES), no CR/LF/NUL in the value.  Anything else takes the
        # full path in _encode_header.
        if type(item) is tuple and len(item) == 2:
            name, value = item
            if type(name) is str and type(value) is str:
                bname = names.get(name)
                if bname is not None and "\n" not in value and "\r" not in value and "\x00" not in value:
                    # (strip what h2's normalize_outbound_headers strips: bytes.strip(),
                    # i.e. SP, HTAB, VT, FF; CR/LF were refused above)
                    bvalue = value.strip(OUTBOUND_STRIP_STR)
                    if bname is _CONTENT_LENGTH:
                        content_length = parse_content_length(bvalue)
                    out.append((bname, bvalue.encode("latin-1")))
                    continue
        cl = _encode_header(item, out)
        if cl is not None:
            content_length = cl
    return content_length


def _encode_status(status: str) -> tuple[int, tuple[bytes, bytes]]:
    if not isinstance(status, str):
        raise TypeError(f"status must be str, got {type(status).__name__}")
    code_text = status[:3]
    if len(status) < 3 or not code_text.isdigit() or (len(status) > 3 and status[3] != " "):
        raise ValueError(f"invalid status line {status!r}")
    code = int(code_text)
    if not 200 <= code <= 599:
        # RFC 9110 §15: every valid status code is in 100-599 (1xx are not final responses);
        # a peer (our proxy included) treats anything else as a malformed response.
        raise ValueError(f"status {code} cannot be a final response")
    st = (code, (b":status", code_text.encode("ascii")))
    if type(status) is str and len(_STATUS_CACHE) < _CACHE_MAX:
        _STATUS_CACHE[status] = st
    return st


def _encode_header(item: tuple[str, str], out: list[tuple[bytes, bytes]]) -> int | None:
    """Validate, encode and append one response header (or drop it); its Content-Length if it is one."""
    if not isinstance(item, tuple) or len(item) != 2:
        raise TypeError(f"header must be a (name, value) tuple, got {item!r}")
    name, value = item
    if not isinstance(name, str) or not isinstance(value, str):
        raise TypeError(f"header name and value must be str: {item!r}")
    lname = name.lower()
    # (isascii: str.lower() maps a few non-ASCII letters to ASCII, e.g. KELVIN SIGN to "k")
    if not name.isascii() or not valid_name(lname):
        raise ValueError(f"invalid header name {name!r}")
    if not valid_value(value):
        raise ValueError(f"header {name!r} has CR, LF or NUL in its value")
    if lname in CONNECTION_SPECIFIC_STR:
        return None  # forbidden in HTTP/2 (RFC 9113 §8.2.2)
    if lname == "te" and value.strip().lower() != "trailers":
        return None
    content_length = None
    bname = lname.encode("ascii")
    # Strip what h2's normalize_outbound_headers strips (bytes.strip(): SP, HTAB,
    # VT, FF; CR/LF were refused above): the worker's HTTP/2 core runs with
    # outbound normalization and validation off because this function already
    # guarantees all of it (tests/unit/test_outbound_headers.py).
    svalue = value.strip(OUTBOUND_STRIP_STR)
    if lname == "content-length":
        content_length = parse_content_length(svalue)
        bname = _CONTENT_LENGTH
    bvalue = svalue.encode("latin-1")
    if bname in NEVER_INDEXED or (bname == b"cookie" and len(bvalue) < SHORT_COOKIE):
        # the never-index rule (_http.never_indexed, inlined): credentials stay out of HPACK tables
        out.append(NeverIndexedHeaderTuple(bname, bvalue))
        return content_length
    out.append((bname, bvalue))
    if type(name) is str and lname != "te" and bname != b"cookie" and len(_PLAIN_NAMES) < _CACHE_MAX:
        # A valid name with no special handling (or Content-Length, which the
        # fast path recognises by identity): the fast path may take it next time.
        _PLAIN_NAMES[name] = bname
    return content_length


#: Response header names (exactly as apps spell them) already validated as tokens,
#: mapped to their lowercase wire bytes; never a dropped, te, cookie or never-indexed
#: name.  Bounded, like the status cache (apps could generate names).
_PLAIN_NAMES: dict[str, bytes] = {}
_STATUS_CACHE: dict[str, tuple[int, tuple[bytes, bytes]]] = {}
_CACHE_MAX = 512
_CONTENT_LENGTH = b"content-length"


class _Response:
    """State of one response: headers chosen, headers sent, bytes counted."""

    __slots__ = (
        "ch",
        "content_length",
        "headers",
        "method_head",
        "no_body",
        "sent_bytes",
        "sent_headers",
        "status",
    )

    def __init__(self, ch: Channel, head: bool) -> None:
        self.ch = ch
        self.method_head = head
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.content_length: int | None = None
        self.sent_headers = False
        self.sent_bytes = 0
        self.no_body = head
        #: The status chosen last (by the app, or an error answer), for the access log.
        self.status = 0

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: ExcInfo | None = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.sent_headers:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # break the traceback cycle (PEP 3333)
        elif self.headers is not None:
            raise AssertionError("start_response() called twice without exc_info")
        code, self.headers, self.content_length = _encode_headers(status, headers)
        self.status = code
        self.no_body = self.method_head or code in NO_BODY_STATUS
        return self.write

    def answer_error(self, status: int, message: str) -> None:
        """Answer ``status`` instead of the app (nothing was sent yet)."""
        self.status = status
        self.sent_bytes = _error_response(self.ch, status, message)

    def _send_headers(self, end: bool) -> None:
        if self.headers is None:
            raise AssertionError("the application did not call start_response()")
        self.sent_headers = True
        self.ch.send_headers(self.headers, end_stream=end)

    def write(self, data: bytes) -> None:
        """The legacy ``write()`` callable, and the path every body chunk takes."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"body chunks must be bytes, got {type(data).__name__}")
        if not data:
            return
        if self.headers is None:
            raise AssertionError("write() before start_response()")
        if self.no_body:
            if not self.sent_headers:
                self._send_headers(end=True)
            return
        n = len(data)
        if self.content_length is not None and self.sent_bytes + n > self.content_length:
            raise _LengthMismatch(
                f"the app sent more than its Content-Length ({self.content_length}) bytes")
        if not self.sent_headers:
            self._send_headers(end=False)
        self.sent_bytes += n
        # Once the declared Content-Length is complete, END_STREAM rides on
        # these bytes rather than on an empty DATA frame sent when the
        # iterable finishes (finish() -> ch.end() is then a no-op): HAProxy
        # holds such a response ~200 ms when END_STREAM arrives alone after a
        # pause (haproxy/haproxy#3447, seen with 3.0.11).
        self.ch.write(bytes(data), end=self.sent_bytes == self.content_length)

    def finish(self) -> None:
        if not self.sent_headers:
            if self.headers is None:
                raise AssertionError("the application returned without calling start_response()")
            if self.content_length is not None and self.content_length != 0 and not self.no_body:
                raise _LengthMismatch(f"the app sent 0 of its Content-Length ({self.content_length}) bytes")
            self._send_headers(end=True)
            return
        if self.no_body:
            return
        if self.content_length is not None and self.sent_bytes != self.content_length:
            raise _LengthMismatch(
                f"the app sent {self.sent_bytes} of its Content-Length ({self.content_length}) bytes")
        self.ch.end()


class _LengthMismatch(Exception):
    pass


def _error_response(ch: Channel, status: int, message: str) -> int:
    """Answer ``status`` with ``message``; returns the body's size."""
    body = f"{message}\n".encode("utf-8", "replace")
    try:
        ch.send_headers([(b":status", str(status).encode()), (b"content-type", b"text/plain; charset=utf-8"),
                         (b"content-length", str(len(body)).encode())])
        ch.write(body, end=True)
    except RHTTPError:
        pass
    return len(body)


def _request_line(ch: Channel, environ: dict[str, Any]) -> str:
    """``tunnel-0 stream 5: GET /path``: which request a log line is about (error paths only)."""
    path = environ.get("RAW_URI") or environ.get("PATH_INFO", "")
    return f"{ch.tunnel.name} stream {ch.stream_id}: {environ.get('REQUEST_METHOD', '?')} {path}"


def run_wsgi(ch: Channel, ctx: WSGIContext) -> None:
    """Serve one request stream with the app (app thread).

    The stream handler of ordinary requests: ``streams.StreamPolicy`` runs it
    (and skips a stream reset while queued, and calls ``ch.handler_done()``).
    """
    try:
        environ = build_environ(ch, ctx)
    except BadRequest as e:
        log.info("%s stream %d: %d %s", ch.tunnel.name, ch.stream_id, e.status, e)
        _error_response(ch, e.status, str(e))
        return
    resp = _Response(ch, environ["REQUEST_METHOD"] == "HEAD")
    access = ctx.access_log
    rec = access.start(environ, ctx.identity) if access is not None else None
    result: Iterable[bytes] | None = None
    try:
        result = ctx.app(environ, resp.start_response)
        if resp.no_body and resp.headers is not None:
            # HEAD / 204 / 304: do not iterate the body (PEP 3333 allows it).
            resp.finish()
        elif isinstance(result, (list, tuple)) and len(result) == 1 and resp.headers is not None \
                and not resp.sent_headers:
            # The common case: one body chunk known up front goes out with its
            # headers and END_STREAM in a single writer pass.
            chunk = result[0]
            if not isinstance(chunk, (bytes, bytearray)):
                raise TypeError(f"body chunks must be bytes, got {type(chunk).__name__}")
            if resp.content_length is not None and len(chunk) != resp.content_length:
                raise _LengthMismatch(
                    f"the app sent {len(chunk)} of its Content-Length ({resp.content_length}) bytes")
            if not chunk:
                resp.finish()
            else:
                # Headers + body + END_STREAM under one lock hold: one writer
                # wake-up per request (benchmarks/RESULTS.md).
                resp.sent_headers = True
                resp.sent_bytes = len(chunk)
                ch.respond(resp.headers, bytes(chunk))
        else:
            for chunk in result:
                if chunk:
                    resp.write(chunk)
                elif not isinstance(chunk, (bytes, bytearray)):
                    raise TypeError(f"body chunks must be bytes, got {type(chunk).__name__}")
            resp.finish()
    except (StreamReset, TunnelClosed) as e:
        # The client (or the proxy) left, or the tunnel went: nobody reads the answer.
        log.debug("%s: gave up, %s", _request_line(ch, environ), e)
    except StreamTimeout as e:
        if ch.error is not None:  # the stream itself timed out (request_timeout, send stall)
            log.debug("%s: gave up, %s", _request_line(ch, environ), e)
        elif not resp.sent_headers:
            # wsgi.input waited body_timeout for bytes that never came.
            log.info("%s: 408, %s", _request_line(ch, environ), e)
            resp.answer_error(408, "Request Timeout")
        else:
            log.info("%s: %s after the response started; resetting the stream", _request_line(ch, environ), e)
            ch.reset(ErrorCodes.CANCEL)
    except _LengthMismatch as e:
        log.error("%s: %s; resetting the stream", _request_line(ch, environ), e)
        ch.reset(ErrorCodes.INTERNAL_ERROR)
    except Exception:
        if ch.error is not None:
            log.debug("%s: the app failed after the stream ended", _request_line(ch, environ), exc_info=True)
        elif not resp.sent_headers:
            log.error("%s: application error before the response headers; answering 500",
                      _request_line(ch, environ), exc_info=True)
            resp.answer_error(500, "Internal Server Error")
        else:
            log.error("%s: application error after the response headers; resetting the stream",
                      _request_line(ch, environ), exc_info=True)
            ch.reset(ErrorCodes.INTERNAL_ERROR)
    finally:
        close_response(result, _request_line(ch, environ))
        if rec is not None:
            # (a stream reset before any header went out has no status)
            rec.status = resp.status if ch.headers_sent else None
            rec.sent = resp.sent_bytes
            rec.response_headers = resp.headers
            rec.finish()
