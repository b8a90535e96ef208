"""Who made a request, and what became of it: the access log, request ids, the client's address.

One module for both sides, so a request reads the same in the proxy's log and in the worker's:

* **The access log**: one line per request through :mod:`logging`, logger ``rhttp_wsgi.access``
  (:data:`LOGGER`), level INFO.  The proxy's forwarder writes one per public request (option
  ``access_log``, on by default), the worker one per request its app served (``access_log``, off
  by default).  :class:`AccessLog` holds a side's format, compiled once; per request
  :meth:`AccessLog.start` returns an :class:`AccessRecord` (or None when the logger would drop
  INFO: then nothing is measured or formatted) and :meth:`AccessRecord.finish` hands it to the
  log's writer thread, which makes and logs the lines (:meth:`AccessLog.emit` says why);
  :meth:`AccessLog.close` (``Proxy.shutdown``, ``WorkerPool.shutdown``, exit) writes the rest.
  With the option off the callers hold no ``AccessLog`` at all: the cost is one ``is None`` test.
* **Formats** (option ``access_log_format``): ``combined`` (:data:`COMBINED`: Apache's combined
  log format, plus the duration, the request id and the tunnel), ``json`` (one JSON object per
  line, :data:`JSON_FIELDS`), or a format of gunicorn's atoms (``%(h)s %(r)s %(s)s``; the atoms
  are :data:`ATOMS`, plus ``%({name}i)s`` request header, ``%({name}o)s`` response header and
  ``%({key}e)s`` environ key).  A missing value is ``-`` (JSON: ``null``).
* **Request ids** (:func:`new_request_id`, :func:`request_id`): the proxy takes the client's
  ``X-Request-ID`` only when told to trust it (``trust_request_id``) and it is valid (1 to
  :data:`REQUEST_ID_MAX` visible ASCII characters), else makes one: a random per-process prefix
  and a counter (``4f1c9a0e2b-17``: unique, short, ~0.1 µs).  It sends it to the worker as
  ``x-request-id``; the worker keeps a valid one (HAProxy's ``unique-id`` too) and makes its own
  otherwise.  Both sides put it in the environ as ``rhttp.request_id``.
* **The tunnel's name**: the same on both sides, so a line of one side leads to the other's.  It
  is the worker's end of the tunnel's TCP connection, ``ip:port`` (:func:`format_address`): the
  proxy sees it as the peer's address, the worker as its own.  Each side's own short name (the
  proxy's worker id ``w3`` of its other log lines, the worker's slot ``tunnel-0``) is the atom
  ``wid``, and the worker certificate's CN is ``cn`` on both sides.
* **The client's address on the worker** (:func:`forwarded_client`): the last ``trusted`` entries
  of ``X-Forwarded-For`` were written by proxies the worker trusts (its proxy is authenticated by
  mTLS), so the ``trusted``-th entry from the right is the client (werkzeug's
  ``ProxyFix(x_for=N)`` rule).
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from json.encoder import encode_basestring_ascii  # (the C speedup when available)
from typing import Any, Protocol
from urllib.parse import quote

__all__ = [
    "ATOMS",
    "COMBINED",
    "FORMAT_HELP",
    "JSON_FIELDS",
    "LOGGER",
    "REQUEST_ID_MAX",
    "AccessLog",
    "AccessRecord",
    "LineBatchHandler",
    "Peer",
    "TunnelIdentity",
    "access_log_to",
    "check_format",
    "format_address",
    "forwarded_client",
    "new_request_id",
    "request_id",
]

#: The access log's logger.
LOGGER = "rhttp_wsgi.access"

_log = logging.getLogger("rhttp_wsgi.accesslog")

#: Apache's combined log format (gunicorn's default access format) plus the request time in
#: seconds, the request id, the worker's CN and the tunnel.
COMBINED = ('%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" rt=%(L)s rid=%(rid)s'
            ' cn=%(cn)s tunnel=%(tunnel)s')

#: The atoms of a custom format (``%(name)s``), gunicorn's names where gunicorn has one.
ATOMS: Mapping[str, str] = {
    "h": "client address (REMOTE_ADDR; on the worker the client's, see forwarded_for)",
    "l": "'-'",
    "u": "REMOTE_USER",
    "t": "time the request arrived, [10/Oct/2000:13:55:36 +0000]",
    "r": "request line: method, target as sent, protocol",
    "m": "method",
    "U": "path as sent (no query)",
    "q": "query string",
    "H": "protocol",
    "s": "status sent ('-' if none was)",
    "B": "response body bytes",
    "b": "response body bytes, '-' for 0",
    "f": "Referer",
    "a": "User-Agent",
    "T": "duration, whole seconds",
    "M": "duration, milliseconds",
    "D": "duration, microseconds",
    "L": "duration, decimal seconds",
    "p": "process id",
    "rid": "request id",
    "cn": "the worker certificate's CN",
    "tunnel": "the tunnel, the same on both sides: the worker's IP:PORT on it",
    "wid": "this side's name for the tunnel (proxy: worker id w3; worker: tunnel-0)",
    "side": "proxy or worker",
}

#: The keys of a ``json`` line, in order.
JSON_FIELDS = ("time", "side", "request_id", "client", "method", "target", "protocol", "status", "bytes",
               "duration", "referer", "user_agent", "cn", "tunnel", "wid")

#: The options' help text (docs/settings.md lists it).
FORMAT_HELP = (
    "Access-log line format: 'combined' (Apache combined + rt=SECONDS rid=ID cn=CN tunnel=IP:PORT), 'json'"
    " (one object per line: " + ", ".join(JSON_FIELDS) + "), or gunicorn-style atoms such as"
    " '%(h)s \"%(r)s\" %(s)s %(rid)s': " + "; ".join(f"{k} {v}" for k, v in ATOMS.items())
    + "; {NAME}i request header, {NAME}o response header, {KEY}e environ key."
)

#: Longest request id taken from a request (Heroku's bound).
REQUEST_ID_MAX = 200


# -- request ids ------------------------------------------------------------------------------


def _fresh_prefix() -> str:
    return os.urandom(5).hex() + "-"


_rid_prefix = _fresh_prefix()
_rid_counter = itertools.count(1)


def _reseed() -> None:
    """A forked child (gunicorn, multiprocessing) must not repeat its parent's ids."""
    global _rid_prefix, _rid_counter
    _rid_prefix = _fresh_prefix()
    _rid_counter = itertools.count(1)


os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> str:
    """A fresh request id: this process's random prefix and a counter (``next`` on a count is atomic)."""
    return _rid_prefix + str(next(_rid_counter))


def request_id(value: str | None) -> str:
    """``value`` if it is a usable request id (1 to REQUEST_ID_MAX visible ASCII characters), else a new one.

    Visible ASCII only: the id is written into log lines, where a space or a control character would
    let a client forge fields.
    """
    if (value and len(value) <= REQUEST_ID_MAX and value.isascii() and value.isprintable()
            and " " not in value):
        return value
    return new_request_id()


# -- the client's address ---------------------------------------------------------------------


def forwarded_client(value: str, trusted: int) -> str | None:
    """The client's address in an ``X-Forwarded-For`` value whose last ``trusted`` entries come from
    trusted proxies: the ``trusted``-th entry from the right; None when there are fewer entries (the
    request did not come through all of them: the caller keeps the peer's address, as ProxyFix does).
    """
    if trusted == 1:
        last = value.rpartition(",")[2].strip()
        return last or None
    entries = value.split(",")
    if len(entries) < trusted:
        return None
    return entries[-trusted].strip() or None


def format_address(addr: Any) -> str:
    """``ip:port`` (``[v6]:port``) of a socket address tuple; the tunnel's name on both sides."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr) if addr else "-"


# -- identities ---------------------------------------------------------------------------------


class Peer(Protocol):
    """The tunnel a request went through, as a log line names it (:class:`~rhttp_wsgi.registry.WorkerInfo`
    on the proxy, :class:`TunnelIdentity` on the worker)."""

    @property
    def id(self) -> str: ...

    @property
    def common_name(self) -> str | None: ...

    @property
    def remote_addr(self) -> tuple[Any, ...]: ...


class TunnelIdentity:
    """A worker's tunnel as its access lines name it: ``common_name`` is the worker's own certificate CN,
    ``id`` the slot (``tunnel-0``), ``remote_addr`` the worker's end of the connection, which is the
    address the proxy sees it from (so ``tunnel`` reads the same on both sides)."""

    __slots__ = ("common_name", "id", "remote_addr")

    def __init__(self, common_name: str | None, id: str, remote_addr: tuple[Any, ...]) -> None:
        self.common_name = common_name
        self.id = id
        self.remote_addr = remote_addr


# -- time stamps (formatted once per second) ------------------------------------------------------

_clf_cache: tuple[int, str] = (-1, "")
_iso_cache: tuple[int, str] = (-1, "")


def _clf_time(t: float) -> str:
    global _clf_cache
    sec = int(t)
    cached = _clf_cache  # one read: another thread may replace it
    if cached[0] == sec:
        return cached[1]
    text = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(sec))
    _clf_cache = (sec, text)
    return text


def _iso_time(t: float) -> str:
    global _iso_cache
    sec = int(t)
    cached = _iso_cache
    if cached[0] != sec:
        cached = _iso_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return "%s.%03dZ" % (cached[1], int((t - sec) * 1000))  # noqa: UP031 - fastest here


# -- one request ----------------------------------------------------------------------------------


class AccessRecord:
    """One request being logged: filled in by the side that serves it, written by :meth:`finish`.

    ``status`` (None: no status was sent), ``sent`` (response body bytes), ``peer`` (the tunnel, None
    when no worker was reached) and ``response_headers`` ((name, value) bytes, for ``{name}o``) are set
    as the request goes; ``environ`` is read only when the line is formatted.
    """

    __slots__ = ("environ", "log", "peer", "response_headers", "sent", "started", "status", "t0")

    def __init__(self, log: AccessLog, environ: Mapping[str, Any], peer: Peer | None) -> None:
        self.log: AccessLog | None = log
        self.environ = environ
        self.peer = peer
        self.started = time.time()
        self.t0 = time.perf_counter()
        self.status: int | None = None
        self.sent = 0
        self.response_headers: list[tuple[bytes, bytes]] | None = None

    def finish(self) -> None:
        """Write the line (once; later calls do nothing)."""
        log = self.log
        if log is not None:
            self.log = None
            log.emit(self, time.perf_counter() - self.t0)


# -- atoms ----------------------------------------------------------------------------------------


def _esc(text: str) -> str:
    """Escape what would end a quoted field or fake one (Apache's rule for %r and headers)."""
    if '"' in text or "\\" in text:
        return text.replace("\\", "\\\\").replace('"', '\\"')
    return text


def _target(env: Mapping[str, Any]) -> str:
    raw = env.get("RAW_URI") or env.get("REQUEST_URI")
    if raw:
        return str(raw)
    path = quote(str(env.get("SCRIPT_NAME", "")) + str(env.get("PATH_INFO", "")), safe="/:@!$&'()*+,;=-._~%")
    query = env.get("QUERY_STRING")
    return f"{path}?{query}" if query else path or "/"


def _request_line(env: Mapping[str, Any]) -> str:
    return _esc(f"{env.get('REQUEST_METHOD', '-')} {_target(env)} {env.get('SERVER_PROTOCOL', '-')}")


#: A peer's address -> its tunnel name; bounded (one entry per tunnel, few).
_TUNNEL_NAMES: dict[Any, str] = {}


def _tunnel(peer: Peer | None) -> str:
    if peer is None:
        return "-"
    addr = peer.remote_addr
    name = _TUNNEL_NAMES.get(addr)
    if name is None:
        name = format_address(addr)
        if len(_TUNNEL_NAMES) < 1024:
            _TUNNEL_NAMES[addr] = name
    return name


def _response_header(r: AccessRecord, want: bytes) -> str:
    for k, v in r.response_headers or ():
        if k == want:
            return _esc(v.decode("latin-1"))
    return "-"


def _env_expr(key: str, escape: bool = True) -> str:
    expr = f"(env.get({key!r}) or '-')"
    return f"_esc(str{expr})" if escape else f"str{expr}"


#: Each atom as a Python expression over ``r`` (the record), ``env`` (its environ), ``peer`` and
#: ``d`` (the duration): a format is compiled into one function that computes only its atoms.
_ATOM_EXPRS: dict[str, str] = {
    "h": _env_expr("REMOTE_ADDR", escape=False),
    "l": "'-'",
    "u": _env_expr("REMOTE_USER"),
    "t": "_clf_time(r.started)",
    "r": "_request_line(env)",
    "m": _env_expr("REQUEST_METHOD", escape=False),
    "U": "_esc(_target(env).partition('?')[0])",
    "q": _env_expr("QUERY_STRING"),
    "H": _env_expr("SERVER_PROTOCOL", escape=False),
    "s": "('-' if r.status is None else str(r.status))",
    "B": "str(r.sent)",
    "b": "(str(r.sent) if r.sent else '-')",
    "f": _env_expr("HTTP_REFERER"),
    "a": _env_expr("HTTP_USER_AGENT"),
    "T": "str(int(d))",
    "M": "str(int(d * 1e3))",
    "D": "str(int(d * 1e6))",
    "L": "('%.6f' % d)",
    "p": "_pid",
    "rid": _env_expr("rhttp.request_id", escape=False),
    "cn": "(((peer.common_name or '-') if peer is not None else '-'))",
    "tunnel": "_tunnel(peer)",
    "wid": "(peer.id if peer is not None else '-')",
    "side": "_side",
}

#: ``%(name)`` of a format, or ``%%``.
_ATOM_REF = re.compile(r"%%|%\(([^)]*)\)")
_BRACED = re.compile(r"\{([^}]+)\}([ioe])\Z")

#: A compiled format: (record, duration in seconds) -> the line.
LineFormat = Callable[["AccessRecord", float], str]


def _compile(fmt: str, side: str) -> LineFormat:
    """A gunicorn-style format -> one function that makes the line.

    ``%(name)s`` becomes ``%s`` and the atoms the format names become one tuple of
    expressions, so a line costs one call and one ``%``, computing only those atoms
    (generated source, as ``dataclasses`` does: per-atom calls cost several times more on a
    busy proxy).  Raises ValueError.
    """
    exprs: list[str] = []

    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name is None:
            return "%%"
        expr = _ATOM_EXPRS.get(name)
        if expr is None:
            braced = _BRACED.match(name)
            if braced is None:
                raise ValueError(f"unknown access-log atom %({name}); known: {', '.join(_ATOM_EXPRS)},"
                                 " {NAME}i, {NAME}o, {KEY}e")
            key, kind = braced.groups()
            if kind == "i":
                expr = _env_expr("HTTP_" + key.upper().replace("-", "_"))
            elif kind == "e":
                expr = _env_expr(key)
            else:
                expr = f"_response_header(r, {key.lower().encode('latin-1')!r})"
        exprs.append(expr)
        return "%"

    template = _ATOM_REF.sub(repl, fmt)
    try:
        template % tuple("x" for _ in exprs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid access-log format {fmt!r}: {e} (atoms are strings: write %(name)s)") from e
    source = ("def line(r, d):\n"
              "    env = r.environ\n"
              "    peer = r.peer\n"
              f"    return _template % ({''.join(e + ', ' for e in exprs)})\n")
    namespace: dict[str, Any] = {
        "_template": template, "_esc": _esc, "_target": _target, "_request_line": _request_line,
        "_clf_time": _clf_time, "_tunnel": _tunnel, "_response_header": _response_header,
        "_pid": str(os.getpid()), "_side": side,
    }
    exec(compile(source, f"<access log format {fmt!r}>", "exec"), namespace)
    line: LineFormat = namespace["line"]
    return line


def check_format(fmt: str) -> None:
    """Raise ValueError if ``fmt`` is not a usable ``access_log_format``."""
    if fmt not in ("combined", "json"):
        _compile(fmt, "proxy")


class LineBatchHandler(logging.Handler):
    """Bare lines (``%(message)s``) to a file descriptor, written when :meth:`flush` is called: the
    access log's writer flushes after each batch, so a busy proxy makes one ``write`` per batch instead
    of one per line (each costs a syscall and a GIL hand-off among dozens of threads).

    Each ``write`` holds whole lines and at most PIPE_BUF (4096) bytes, so it is atomic on a pipe: the
    lines never interleave with another writer's (the CLI's other log lines share stderr).
    """

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self._fd: int = stream.fileno()
        self._lines: list[bytes] = []

    def emit(self, record: logging.LogRecord) -> None:  # (Handler.handle holds the lock)
        try:
            self._lines.append((record.getMessage() + "\n").encode("utf-8", "backslashreplace"))
        except Exception:
            self.handleError(record)

    def add(self, line: str) -> None:
        """Queue one line (the access log's writer calls this directly when nothing else would see
        the record: see :meth:`AccessLog.direct_handler`)."""
        data = (line + "\n").encode("utf-8", "backslashreplace")
        with self.lock:  # type: ignore[union-attr]  # (flush swaps the list from any thread)
            self._lines.append(data)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # (created by Handler.__init__)
            lines, self._lines = self._lines, []
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > _PIPE_BUF:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write(b"".join(chunk))

    def _write(self, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError:
            pass  # (stderr closed: nothing to report it on)


_PIPE_BUF = 4096


def access_log_to(stream: Any) -> None:
    """Write the access log's lines bare to ``stream`` (a file with a descriptor: the CLI's stderr), at
    INFO whatever the root logger's level, and not through the root logger: the CLI's setup (an
    application that configures logging itself routes ``rhttp_wsgi.access`` as it likes).  Does
    nothing if the logger has a handler.
    """
    logger = logging.getLogger(LOGGER)
    if logger.handlers:
        return
    handler: logging.Handler
    try:
        handler = LineBatchHandler(stream)
    except (AttributeError, OSError, ValueError):  # no descriptor (a replaced sys.stderr): line by line
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


# -- one side's log ------------------------------------------------------------------------------


def _json_str(value: Any) -> str:
    return "null" if value is None else encode_basestring_ascii(str(value))


class AccessLog:
    """One side's access log: its format, compiled once, and the logger it writes to.

    ``side`` is ``"proxy"`` or ``"worker"``; ``fmt`` is ``combined``, ``json`` or a custom format
    (ValueError if it is not valid).
    """

    __slots__ = ("__weakref__", "_background", "_closed", "_line", "_lock", "_pending", "_sleeping", "_thread",
                 "_wake", "logger", "side")

    def __init__(self, fmt: str = "combined", *, side: str, logger: logging.Logger | None = None,
                 background: bool = True) -> None:
        self.side = side
        self.logger = logger if logger is not None else logging.getLogger(LOGGER)
        self._line: LineFormat = (self._json_line if fmt == "json"
                                  else _compile(COMBINED if fmt == "combined" else fmt, side))
        #: Lines are made and logged by one writer thread (see :meth:`emit`); False: by the thread
        #: that finishes the request.
        self._background = background
        self._pending: collections.deque[tuple[AccessRecord, float]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        #: The writer waits for ``_wake`` (True also before it exists: the first line starts it).
        self._sleeping = True
        self._thread: threading.Thread | None = None
        self._closed = False
        _OPEN.add(self)

    @classmethod
    def from_options(cls, options: Any, side: str) -> AccessLog | None:
        """The log ``options`` ask for (``access_log``, ``access_log_format``); None when it is off."""
        if not options.access_log:
            return None
        return cls(options.access_log_format, side=side)

    def start(self, environ: Mapping[str, Any], peer: Peer | None = None) -> AccessRecord | None:
        """A record for a request that begins now; None when the logger drops INFO (nothing to do)."""
        if not self.logger.isEnabledFor(logging.INFO):
            return None
        return AccessRecord(self, environ, peer)

    def format(self, rec: AccessRecord, duration: float) -> str:
        """The line for ``rec``."""
        return self._line(rec, duration)

    def _json_line(self, r: AccessRecord, d: float) -> str:
        env = r.environ
        peer = r.peer
        target = _target(env)
        return ('{"time":"%s","side":"%s","request_id":%s,"client":%s,"method":%s,"target":%s,"protocol":%s,'  # noqa: UP031
                '"status":%s,"bytes":%d,"duration":%.6f,"referer":%s,"user_agent":%s,"cn":%s,"tunnel":%s,'
                '"wid":%s}') % (
            _iso_time(r.started), self.side, _json_str(env.get("rhttp.request_id")),
            _json_str(env.get("REMOTE_ADDR") or None), _json_str(env.get("REQUEST_METHOD")),
            encode_basestring_ascii(target), _json_str(env.get("SERVER_PROTOCOL")),
            "null" if r.status is None else r.status, r.sent, d,
            _json_str(env.get("HTTP_REFERER")), _json_str(env.get("HTTP_USER_AGENT")),
            _json_str(peer.common_name if peer is not None else None),
            _json_str(_tunnel(peer) if peer is not None else None),
            _json_str(peer.id if peer is not None else None))

    def emit(self, rec: AccessRecord, duration: float) -> None:
        """Hand the finished request to the writer thread, which makes and logs its line.

        Performance: a line costs ~10 µs of logging machinery (a LogRecord, the handler's lock,
        format and write), twice that on a proxy thread among dozens whose caches it shares.
        The request's thread only appends to a deque (the writer is woken only when idle); the
        writer formats and logs the lines in batches, at most BATCH seconds late, so a slow log
        destination never holds a request either.  Past MAX_PENDING lines waiting (the writer
        cannot keep up) the request's thread writes its own line: backpressure, no unbounded queue.
        """
        pending = self._pending
        if not self._background or self._closed or len(pending) >= MAX_PENDING:
            self._write(rec, duration)
            return
        pending.append((rec, duration))
        if self._sleeping:
            self._wake_writer()

    def _write(self, rec: AccessRecord, duration: float) -> None:
        """Make the line and log it at once (not from the writer)."""
        self._log(rec, duration)
        self._flush()

    def _log(self, rec: AccessRecord, duration: float) -> None:
        """Make the line and log it (``Logger.info`` would also look for its caller's frame, which an
        access line never reports: the record is made and handled directly)."""
        logger = self.logger
        line = self._line(rec, duration)
        logger.handle(logger.makeRecord(logger.name, logging.INFO, "(access log)", 0, line, (), None))

    def _flush(self) -> None:
        """Flush the handlers that batch (:class:`LineBatchHandler`; others write each line already)."""
        logger: logging.Logger | None = self.logger
        while logger is not None:
            for handler in logger.handlers:
                if isinstance(handler, LineBatchHandler):
                    handler.flush()
            logger = logger.parent if logger.propagate else None

    def _wake_writer(self) -> None:
        with self._lock:
            if self._thread is None:
                if self._closed:
                    return
                self._thread = threading.Thread(target=self._run, name=f"rhttp-access-log-{self.side}",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def direct_handler(self) -> LineBatchHandler | None:
        """The logger's one handler when a LogRecord would only carry the line to it: a
        :class:`LineBatchHandler` (the CLI's setup), no filter, no other handler, nothing disabled.
        The writer then hands it the lines (a LogRecord and ``Logger.handle`` cost more than the rest
        of a line); otherwise every line goes through ``logging`` as usual.  Checked per batch."""
        logger = self.logger
        handlers = logger.handlers
        if len(handlers) != 1 or logger.propagate or logger.filters or logger.disabled:
            return None
        handler = handlers[0]
        if (type(handler) is not LineBatchHandler or handler.filters or handler.level > logging.INFO
                or not logger.isEnabledFor(logging.INFO)):
            return None
        return handler

    def _run(self) -> None:  # the writer thread
        pending = self._pending
        make_line = self._line
        while True:
            wrote = False
            direct = self.direct_handler() if pending else None
            while pending:
                rec, duration = pending.popleft()
                try:
                    if direct is not None:
                        direct.add(make_line(rec, duration))
                    else:
                        self._log(rec, duration)
                except Exception:  # (handlers report their own errors; this is the format's)
                    _log.exception("could not write an access line")
                wrote = True
            if wrote:
                self._flush()
            if self._closed and not pending:
                return
            if wrote:
                time.sleep(BATCH)  # lines are coming: let them gather
                continue
            # Idle: sleep until a request's thread wakes us (it looks at _sleeping after appending).
            self._sleeping = True
            if not pending and not self._closed:
                self._wake.wait()
            self._wake.clear()
            self._sleeping = False

    def close(self, timeout: float | None = 5.0) -> None:
        """Write the lines still waiting and stop the writer; later lines are written at once."""
        self._closed = True
        with self._lock:
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


#: How long the writer lets lines gather while they keep coming (seconds), and how many may wait.
BATCH = 0.01
MAX_PENDING = 10000
#: Every AccessLog not yet collected: their waiting lines are written at exit.
_OPEN: weakref.WeakSet[AccessLog] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # (registered after logging's own exit hook, so it runs first: handlers are still open)
    for access in list(_OPEN):
        access.close(1.0)
