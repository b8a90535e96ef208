"""The HTTP rules, written once: used by the HTTP/2 core, the worker, the forwarder and the public server.

Rules on the wire have a bytes form (what the HTTP/2 core and the HTTP/1.1 fast
path handle: compiled regexes and frozensets as module constants, so a hot path
pays one C-level call) and, where WSGI needs one, a str form (``valid_name``,
``valid_value``, names ending in ``_STR``).

* Field names and values: RFC 9110 §5.1, §5.5; RFC 9113 §8.2.1 (HTTP/2 adds
  "lowercase only"); RFC 9112 §5 (what an HTTP/1.1 header block may hold:
  :data:`H1_HEADER_BLOCK`, :func:`h1_block`).
* Connection-specific and hop-by-hop fields: RFC 9113 §8.2.2, RFC 9110 §7.6.1.
* The never-index rule (HPACK, RFC 7541 §7.1.3): h2's ``_secure_headers``.
* Content-Length: RFC 9110 §8.6 (one parser, :func:`parse_content_length`).
* Repeated fields: RFC 9110 §5.3 (", "); cookies: RFC 9113 §8.2.3 ("; ").
* Reason phrases (RFC 9112 §4), precomputed.
* The WSGI environ of a request (:func:`request_environ`), from the neutral
  header list -- (lowercase name, value) bytes pairs -- that both HTTP/2 (the
  worker) and h11 (the turnkey public server) produce.
* :class:`CompleteResponse`: a response known whole, which the forwarder returns
  and the turnkey server writes in one go.
"""

from __future__ import annotations

import http
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import unquote_to_bytes

__all__ = [
    "BAD_VALUE",
    "CONNECTION_SPECIFIC",
    "CONNECTION_SPECIFIC_STR",
    "COOKIE_SEPARATOR",
    "H1_HEADER_BLOCK",
    "H2_BAD_NAME",
    "HOP_BY_HOP",
    "HOSTS_MAX",
    "HOST_SPLITS",
    "HTTP_KEYS_MAX",
    "LIST_SEPARATOR",
    "NEVER_INDEXED",
    "NO_BODY_STATUS",
    "OUTBOUND_STRIP_STR",
    "PER_REQUEST",
    "SHORT_COOKIE",
    "BadRequest",
    "CompleteResponse",
    "content_length",
    "h1_block",
    "h1_problem",
    "join_cookies",
    "never_indexed",
    "parse_content_length",
    "reason_phrase",
    "request_environ",
    "split_host",
    "valid_name",
    "valid_value",
]

# -- field names and values ----------------------------------------------------------------------

#: An HTTP/2 field name holds none of these (RFC 9113 §8.2.1: 0x00-0x20, uppercase, 0x7f-0xff,
#: and ":" outside a pseudo-header's first octet).  ``search`` it: a match means invalid.
H2_BAD_NAME = re.compile(rb"[\x00-\x20A-Z:\x7f-\xff]")
#: An HTTP/2 field value holds no NUL, CR or LF anywhere and no SP/HTAB at either end
#: (RFC 9113 §8.2.1).  ``search`` it: a match means invalid.
BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")

# \Z, not $: "$" also matches before a trailing newline, which let "x-foo\n" pass as a token.
_TOKEN_STR = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def valid_name(name: str) -> bool:
    """A field name (or method) is a token (RFC 9110 §5.6.2)."""
    return bool(_TOKEN_STR.match(name))


def valid_value(value: str) -> bool:
    """No CR, LF or NUL (three C-speed scans: ~4x cheaper than a regex search on short values)."""
    return "\n" not in value and "\r" not in value and "\x00" not in value


#: A block of header lines as HTTP/1.1 carries them and as h11 would accept and write
#: them: token names, ``": "``, a field value (h11's ``field_value``: no NUL, no
#: whitespace other than inner SP/HTAB, so no VT, FF, CR or LF; none at either end),
#: each line ended by CRLF.  ``fullmatch`` a joined block: one C-level match per
#: response replaces a per-field check (the only grammar regex for a response header
#: block).  (Written as first char, middle, last char: ~20% faster than h11's
#: ``vchar+ (ws+ vchar+)*`` form, and equivalent.)
H1_HEADER_BLOCK = re.compile(
    rb"(?:[-!#$%&'*+.^_`|~0-9a-zA-Z]+: (?:[^\x00\s](?:[^\x00\n\r\x0b\x0c]*[^\x00\s])?)?\r\n)*")

def h1_block(fields: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The fields as an HTTP/1.1 header block (``name: value\\r\\n`` each), or None when HTTP/1.1
    (h11) cannot carry one of them: a name that is not a token, a value with a NUL, CR, LF, VT or FF
    or with whitespace at either end.

    Names must hold no ":" (HTTP/2 and the callers' own checks guarantee it); a CR LF inside a value
    would pass the grammar as a line break, so the line count is checked too.
    """
    lines = [b"%s: %s\r\n" % field for field in fields]
    block = b"".join(lines)
    if H1_HEADER_BLOCK.fullmatch(block) is None or block.count(b"\n") != len(lines):
        return None
    return block


def h1_problem(fields: Iterable[tuple[bytes, bytes]]) -> str:
    """Why :func:`h1_block` refused ``fields``: the first field HTTP/1.1 cannot carry."""
    for name, value in fields:
        if h1_block([(name, value)]) is None:
            return f"the {name[:40]!r} field (value {value[:60]!r}) cannot be carried by HTTP/1.1"
    return "no field is at fault"


#: What h2's outbound normalization strips from a value (``bytes.strip()``: SP, HTAB, VT,
#: FF; CR and LF are refused before): the worker strips the same from app headers.
OUTBOUND_STRIP_STR = " \t\x0b\x0c"

# -- connection-specific and hop-by-hop fields ------------------------------------------------------

#: Forbidden in HTTP/2 messages (RFC 9113 §8.2.2); ``te`` is allowed only as "trailers".
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                 b"upgrade"})
#: Hop-by-hop fields a proxy does not forward (RFC 9110 §7.6.1), besides the tokens named in
#: ``Connection``.
HOP_BY_HOP = CONNECTION_SPECIFIC | frozenset({b"te", b"trailer", b"proxy-authenticate", b"proxy-authorization"})
CONNECTION_SPECIFIC_STR = frozenset(n.decode("ascii") for n in CONNECTION_SPECIFIC)

# -- the never-index rule ------------------------------------------------------------------------

#: h2's ``_secure_headers`` rule: these fields, and ``cookie`` values shorter than
#: :data:`SHORT_COOKIE` bytes (guessable), are sent as HPACK literals never indexed
#: (RFC 7541 §7.1.3), so credentials never enter a compression table.
NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization"})
SHORT_COOKIE = 20


#: Fields whose value is new on every request (the request id the forwarder sends): HPACK sends
#: them as literals *without indexing*, their value not Huffman-coded, and the HTTP/2 core does not
#: remember them as validated.  Indexed, each would add a table entry per request, shifting every
#: other entry's index, so no header block would ever repeat and the block caches of both ends
#: (and the core's validated-field cache) would miss on every request.
PER_REQUEST = frozenset({b"x-request-id"})


def never_indexed(name: bytes, value: bytes) -> bool:
    """Must this (lowercase) field be sent never-indexed?  (Hot paths inline the same test.)"""
    return name in NEVER_INDEXED or (name == b"cookie" and len(value) < SHORT_COOKIE)


# -- content-length ------------------------------------------------------------------------------

#: The longest Content-Length accepted: 18 digits always fit a 64-bit integer.
_MAX_LENGTH_DIGITS = 18


def parse_content_length(value: bytes | str) -> int:
    """One Content-Length value (surrounding whitespace already stripped): ``1*DIGIT`` (RFC 9110 §8.6).

    Raises ValueError otherwise (ASCII digits only: ``str.isdigit`` alone also accepts
    other scripts' digits, which ``int`` would read).
    """
    if not (value.isdigit() and value.isascii()) or len(value) > _MAX_LENGTH_DIGITS:
        raise ValueError(f"invalid Content-Length {value[:40]!r}")
    return int(value)


def content_length(fields: Iterable[tuple[bytes, bytes]]) -> int | None:
    """A message's Content-Length from its (lowercase name, value) fields; None when absent.

    Several ``content-length`` fields are allowed when their values are identical
    (RFC 9110 §8.6 lets a recipient accept the repetition); different values, or an
    invalid one, raise ValueError.
    """
    found: bytes | None = None
    for name, value in fields:
        if name == b"content-length":
            if found is not None and value != found:
                raise ValueError("conflicting Content-Length values")
            found = value
    return None if found is None else parse_content_length(found)


# -- repeated fields -----------------------------------------------------------------------------

#: Repeated fields are joined with ", " (RFC 9110 §5.3), cookies with "; " (RFC 9113 §8.2.3,
#: RFC 6265 §5.4): in the environ (:func:`request_environ`) and by the HTTP/2 core.
LIST_SEPARATOR = ", "
COOKIE_SEPARATOR = "; "
_COOKIE_SEPARATOR_B = COOKIE_SEPARATOR.encode("ascii")


def join_cookies(values: list[bytes]) -> bytes:
    """Split cookie fields as one (RFC 9113 §8.2.3)."""
    return _COOKIE_SEPARATOR_B.join(values)


# -- status --------------------------------------------------------------------------------------

#: Responses to these never carry content (RFC 9110 §15.3.5, §15.4.5); nor does any answer to HEAD.
NO_BODY_STATUS = frozenset({204, 304})
#: Status code -> reason phrase, precomputed (an ``http.HTTPStatus`` lookup costs a few µs).
#: 499 is nginx's "client closed request", which the forwarder logs and answers.
_REASONS: dict[int, str] = {int(st): st.phrase for st in http.HTTPStatus}
_REASONS.setdefault(499, "Client Closed Request")


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Unknown")


# -- the WSGI environ of a request -----------------------------------------------------------------


class BadRequest(ValueError):
    """A request no environ can be built for; ``status`` is the answer (400, or 501 for CONNECT)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def request_environ(environ: dict[str, Any], fields: Iterable[tuple[bytes, bytes]], method: bytes | None = None,
                    target: bytes | None = None, authority: str | None = None) -> tuple[str | None, str | None]:
    """Add a request's CGI keys to ``environ``, to the letter of PEP 3333; the one environ builder.

    ``fields`` is the neutral header list: (lowercase name, value) bytes pairs as
    received, HTTP/2 pseudo-headers first when there are any.  The method, the
    origin-form (or ``*``) target and the authority come from ``:method``,
    ``:path`` and ``:authority``, or from the arguments (an HTTP/1.1 request line;
    ``authority`` from an absolute-form target, RFC 9112 §3.2.2).  Sets
    ``REQUEST_METHOD``, ``PATH_INFO``, ``QUERY_STRING``, ``RAW_URI``/``REQUEST_URI``,
    ``CONTENT_LENGTH``, ``CONTENT_TYPE`` (the last one wins), ``HTTP_HOST`` (the
    authority, else ``Host``), ``HTTP_COOKIE`` (cookies joined with "; ") and an
    ``HTTP_*`` key per other field (repeats joined with ", "; a name with "_" is
    dropped: ``x_foo`` would impersonate ``x-foo``, as nginx and gunicorn rule).
    Returns (``:scheme`` or None, the host value or None) for the caller's
    ``wsgi.url_scheme`` and ``SERVER_NAME``.  Raises :class:`BadRequest`.

    The keys a request makes depend on nothing else, and a client or proxy repeats the same
    requests: they are remembered per distinct (fields, method, target, authority), bounded, and
    copied in with one ``update``.  A last field in :data:`PER_REQUEST` (the request id, new on
    every request) is left out of that key and added on its own.
    """
    if type(fields) is not list or not fields:
        return _request_keys(environ, fields, method, target, authority)
    tail = fields[-1]
    if tail[0] in PER_REQUEST:
        key = (tuple(fields[:-1]), method, target, authority)
    else:
        key = (tuple(fields), method, target, authority)
        tail = None
    hit = _ENVIRONS.get(key)
    if hit is None:
        keys: dict[str, Any] = {}
        scheme, host_value = _request_keys(keys, key[0], method, target, authority)
        if len(key[0]) <= ENVIRONS_MAX_FIELDS and sum([len(k) + len(v) for k, v in key[0]]) <= ENVIRONS_MAX_BYTES:
            if len(_ENVIRONS) >= ENVIRONS_MAX:
                _ENVIRONS.clear()
            _ENVIRONS[key] = keys, scheme, host_value
    else:
        keys, scheme, host_value = hit
    environ.update(keys)
    if tail is not None:
        _add_field(environ, tail[0], tail[1])
    return scheme, host_value


#: (fields, method, target, authority) -> (the environ keys they make, scheme, host value): what
#: :func:`request_environ` remembers.  Bounded: at most ENVIRONS_MAX requests of at most
#: ENVIRONS_MAX_FIELDS fields and ENVIRONS_MAX_BYTES bytes of names and values (the client
#: chooses them); emptied when full.  (Plain dict reads and writes: safe across threads; a
#: remembered dict is never changed.)
_ENVIRONS: dict[tuple[Any, ...], tuple[dict[str, Any], str | None, str | None]] = {}
ENVIRONS_MAX = 128
ENVIRONS_MAX_FIELDS = 64
ENVIRONS_MAX_BYTES = 4096


def _add_field(environ: dict[str, Any], name_b: bytes, value_b: bytes) -> None:
    """One ordinary field (not a pseudo-header nor a field with its own key) into ``environ``."""
    key = _HTTP_KEYS.get(name_b) or _http_key(name_b)
    if key is not None:
        value = value_b.decode("latin-1")
        if key in environ:
            environ[key] += LIST_SEPARATOR + value
        else:
            environ[key] = value


def _request_keys(environ: dict[str, Any], fields: Iterable[tuple[bytes, bytes]], method: bytes | None,
                  target: bytes | None, authority: str | None) -> tuple[str | None, str | None]:
    """What :func:`request_environ` adds, worked out from the fields."""
    scheme = host = cookie = None
    path = target
    http_keys = _HTTP_KEYS
    for name_b, value_b in fields:
        key = http_keys.get(name_b)
        if key is None:
            # Pseudo-headers, the fields with their own environ key, and names
            # not seen before (or with "_" in them: never cached).
            if name_b[:1] == b":":
                if name_b == b":method":
                    method = value_b
                elif name_b == b":path":
                    path = value_b
                elif name_b == b":scheme":
                    scheme = value_b.decode("latin-1")
                elif name_b == b":authority":
                    authority = value_b.decode("latin-1")
                continue
            if name_b == b"host":
                host = value_b.decode("latin-1")
                continue
            if name_b == b"content-length":
                value = value_b.decode("latin-1")
                try:
                    parse_content_length(value_b)
                except ValueError:
                    raise BadRequest(400, f"invalid content-length {value[:40]!r}") from None
                old = environ.get("CONTENT_LENGTH")
                if old is not None and old != value:
                    raise BadRequest(400, "conflicting content-length values")
                environ["CONTENT_LENGTH"] = value
                continue
            if name_b == b"content-type":
                environ["CONTENT_TYPE"] = value_b.decode("latin-1")
                continue
            if name_b == b"cookie":
                value = value_b.decode("latin-1")
                cookie = value if cookie is None else cookie + COOKIE_SEPARATOR + value
                continue
            key = _http_key(name_b)
            if key is None:
                continue
        value = value_b.decode("latin-1")
        if key in environ:
            environ[key] += LIST_SEPARATOR + value
        else:
            environ[key] = value
    if method == b"CONNECT":  # (before the target check: a plain CONNECT has none)
        raise BadRequest(501, "CONNECT is not supported")
    if method is None or path is None:
        raise BadRequest(400, "missing :method or :path")
    if cookie is not None:
        environ["HTTP_COOKIE"] = cookie
    host_value = authority if authority is not None else host
    if host_value is not None:
        environ["HTTP_HOST"] = host_value
    if path == b"*":
        if method != b"OPTIONS":  # asterisk-form is for OPTIONS only (RFC 9110 §7.1)
            raise BadRequest(400, "invalid request target")
        path_part, query = b"*", b""
    else:
        path_part, _, query = path.partition(b"?")
        if path_part[:1] != b"/":
            raise BadRequest(400, "invalid request target")
    environ["REQUEST_METHOD"] = method.decode("latin-1")
    # (unquote_to_bytes returns a path without "%" unchanged: skip the call)
    environ["PATH_INFO"] = (unquote_to_bytes(path_part) if b"%" in path_part else path_part).decode("latin-1")
    environ["QUERY_STRING"] = query.decode("latin-1")
    environ["RAW_URI"] = environ["REQUEST_URI"] = path.decode("latin-1")
    return scheme, host_value


#: Field name (bytes, as received) -> its ``HTTP_*`` environ key, for the ordinary
#: fields seen so far (not the pseudo-headers, content-length/-type, cookie, host,
#: nor names with "_").  Filled by :func:`_http_key`, bounded: the peer chooses the
#: names.  (Plain dict reads and writes: safe across threads.)
_HTTP_KEYS: dict[bytes, str] = {}
HTTP_KEYS_MAX = 512


def _http_key(name_b: bytes) -> str | None:
    """The ``HTTP_*`` key of an ordinary field name; None for a name with "_" (dropped)."""
    if b"_" in name_b:
        return None
    key = "HTTP_" + name_b.decode("latin-1").upper().replace("-", "_")
    if len(_HTTP_KEYS) < HTTP_KEYS_MAX:
        _HTTP_KEYS[name_b] = key
    return key


def split_host(value: str) -> tuple[str, str]:
    """``Host``/``:authority`` -> (host, port); port "" when absent or not ASCII digits.

    Fills :data:`HOST_SPLITS`, which a hot path reads first (``HOST_SPLITS.get(v) or split_host(v)``).
    """
    if value.startswith("["):
        end = value.find("]")
        if end > 0:
            rest = value[end + 1:]
            port = rest[1:]
            hp = value[: end + 1], port if rest[:1] == ":" and port.isdigit() and port.isascii() else ""
        else:
            hp = value, ""
    else:
        host, sep, port = value.rpartition(":")
        hp = (host, port) if sep and port.isdigit() and port.isascii() else (value, "")
    if len(HOST_SPLITS) < HOSTS_MAX:
        HOST_SPLITS[value] = hp
    return hp


#: Host values seen -> their (host, port) split; bounded (the peer chooses them).
HOST_SPLITS: dict[str, tuple[str, str]] = {}
HOSTS_MAX = 256


# -- a response whose every byte is known -------------------------------------------------------


class CompleteResponse:
    """The WSGI result of a response known whole before any of it is sent (the forwarder's
    common small answer): the app has called ``start_response(status, list(headers))`` and
    returns this.

    To any WSGI server (and middleware) it is an ordinary one-item iterable of ``body``.
    The turnkey server (:mod:`rhttp_wsgi.public`) recognises it and, when ``status`` and
    ``headers`` are still what reached its ``start_response`` (middleware may have changed
    them), writes the status line, ``block`` and ``body`` in one ``sendall`` without
    re-validating anything.  ``block`` is ``headers`` as HTTP/1.1 lines (from
    :func:`h1_block`: lowercase token names, values HTTP/1.1 carries, no hop-by-hop field)
    and frames ``body``: it holds a ``content-length`` equal to ``len(body)`` unless the
    status or the request (HEAD) has no content.  ``on_close`` (for middleware: counting,
    timing) runs once, from :meth:`close`.
    """

    __slots__ = ("block", "body", "code", "headers", "on_close", "status")

    def __init__(self, code: int, status: str, headers: tuple[tuple[str, str], ...], block: bytes,
                 body: bytes) -> None:
        self.code = code
        self.status = status
        self.headers = headers
        self.block = block
        self.body = body
        self.on_close: Callable[[], None] | None = None

    def __iter__(self) -> Iterator[bytes]:
        return iter((self.body,))

    def __len__(self) -> int:
        return 1

    def close(self) -> None:
        hook, self.on_close = self.on_close, None
        if hook is not None:
            hook()
