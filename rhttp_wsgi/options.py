"""Options, declared once.

Each option is one dataclass field: its annotation gives its type, its
metadata its help text and bounds.  The constructor validation, the CLI flags
(``--max-concurrent-streams``), the environment variables
(``RHTTP_MAX_CONCURRENT_STREAMS``, read by :func:`options_from_environ` alone)
and the settings reference in ``docs/settings.md`` are all derived from these
declarations, so they cannot drift apart.  The layers below take the options
object itself and read each option under its own name.

Types: ``bool``, ``int``, ``float``, ``str`` and lists of those, declared as
``tuple[str, ...]``.  A list option is given as a tuple or list (a string is
split on commas), as a repeated CLI flag, or as one comma-separated
environment variable.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .accesslog import FORMAT_HELP, check_format
from .errors import ConfigError, MTLSRequiredError

__all__ = [
    "REQUIRED_OPTIONS",
    "OptionKind",
    "ProxyOptions",
    "TunnelOptions",
    "WorkerOptions",
    "env_name",
    "flag_name",
    "option_fields",
    "option_kind",
    "options_from_environ",
    "parse_address",
    "parse_option",
    "settings_reference",
]

ENV_PREFIX = "RHTTP_"
MAX_WINDOW = 2**31 - 1
URL_SCHEME_POLICIES = ("forwarded", "pseudo", "http", "https")


def _opt(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    essential: int | None = None,
) -> Any:
    """An option: a field with help text, and bounds (for numbers) or choices (for strings) if any.

    For a list option, the bounds and choices apply to each element.  ``essential``: the option is
    one of the few every deployment sets; ``--help`` lists those first, in this order.
    """
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "choices": choices, "metavar": metavar,
            "essential": essential}
    return field(default=default, metadata=meta)


def parse_address(value: str, *, option: str = "address") -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6]:port``) and validate both halves."""
    if not isinstance(value, str) or not value:
        raise ConfigError(option, "expected HOST:PORT, got an empty value")
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(option, f"expected [IPv6]:PORT, got {value!r}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(option, f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ConfigError(option, f"expected HOST:PORT, got {value!r}")
        if ":" in host:
            raise ConfigError(option, f"IPv6 addresses need brackets: [{host}]:{port_text}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(option, f"port must be a number 0-65535, got {port_text!r}")
    if any(c.isspace() or c in "/@?#" for c in host):
        raise ConfigError(option, f"invalid host {host!r}")
    return host, int(port_text)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def option_fields(cls: type) -> Iterator[dataclasses.Field[Any]]:
    """The fields of an options class that are real options (declared with help)."""
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            yield f


class OptionKind(NamedTuple):
    """An option's type: ``scalar`` (bool, int, float or str) and whether it is a list of those."""

    scalar: type
    many: bool


_SCALARS = (bool, int, float)  # bool first: a bool is an int


#: Per options class: each option's kind (computed once; get_type_hints evaluates the annotations).
_KINDS: dict[type, dict[str, OptionKind]] = {}


def _kinds(cls: type) -> dict[str, OptionKind]:
    known = _KINDS.get(cls)
    if known is not None:
        return known
    hints = typing.get_type_hints(cls)
    out: dict[str, OptionKind] = {}
    for f in option_fields(cls):
        members = _union_members(hints[f.name])
        many = False
        if len(members) == 1 and typing.get_origin(members[0]) is tuple:
            args = typing.get_args(members[0])
            if len(args) != 2 or args[1] is not Ellipsis:
                raise TypeError(f"{cls.__name__}.{f.name}: a list option is declared tuple[T, ...]")
            members, many = _union_members(args[0]), True
        # The first parsable type wins; anything else (str | Callable, say) is given as text.
        out[f.name] = OptionKind(next((t for t in _SCALARS if t in members), str), many)
    _KINDS[cls] = out
    return out


def _union_members(hint: Any) -> list[Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)]
    return [hint]


def option_kind(cls: type, name: str) -> OptionKind:
    """The type of option ``name`` of ``cls``, from its annotation."""
    return _kinds(cls)[name]


def _parse_scalar(kind: type, name: str, text: str) -> Any:
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(name, f"invalid value {text!r}") from None
    return text


def parse_option(cls: type, name: str, value: str | Sequence[str]) -> Any:
    """Convert a CLI/environment text (or, for a list option, several) to option ``name``'s type.

    A list option's texts are each split on commas; empty items are dropped.
    Raises :class:`ConfigError` naming the option.
    """
    kind = option_kind(cls, name)
    texts = [value] if isinstance(value, str) else list(value)
    if kind.many:
        return tuple(_parse_scalar(kind.scalar, name, item.strip())
                     for text in texts for item in text.split(",") if item.strip())
    if len(texts) != 1:
        raise ConfigError(name, "takes one value")
    return _parse_scalar(kind.scalar, name, texts[0])


def options_from_environ(cls: type, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The options of ``cls`` set in ``environ`` (default ``os.environ``) as ``RHTTP_*``, parsed.

    The one reader of the environment: the CLI (under its flags), the gunicorn
    worker and :func:`rhttp_wsgi.mount.proxy_options_from_env` all use it.
    """
    env = os.environ if environ is None else environ
    return {f.name: parse_option(cls, f.name, env[env_name(f.name)])
            for f in option_fields(cls) if env_name(f.name) in env}


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _validate_fields(obj: Any) -> None:
    """Bounds and choices of every option; a list option given as a string or list becomes a tuple."""
    kinds = _kinds(type(obj))
    for f in option_fields(type(obj)):
        value = getattr(obj, f.name)
        if value is None:
            continue
        if kinds[f.name].many:
            if isinstance(value, str):
                value = parse_option(type(obj), f.name, value)
            elif not isinstance(value, (list, tuple)):
                raise ConfigError(f.name, f"expected a list, got {type(value).__name__}")
            if not isinstance(value, tuple):
                value = tuple(value)
            # Frozen dataclass: the normalised value is stored the way __init__ stores fields.
            object.__setattr__(obj, f.name, value)
            for item in value:
                _validate_value(f, item)
        else:
            _validate_value(f, value)


def _validate_value(f: dataclasses.Field[Any], value: Any) -> None:
    meta = f.metadata
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        lo, hi = meta["minimum"], meta["maximum"]
        if lo is not None and value < lo:
            raise ConfigError(f.name, f"must be >= {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise ConfigError(f.name, f"must be <= {hi}, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f.name, f"must be one of {', '.join(meta['choices'])}; got {value!r}")


def _check_file(option: str, path: str | None) -> None:
    if path is None:
        return
    if not os.path.isfile(path):
        raise ConfigError(option, f"no such file: {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(option, f"file is not readable: {path}")


@dataclass(frozen=True)
class TunnelOptions:
    """Settings both ends of a tunnel share: its TLS identity and its HTTP/2 connection.

    Declared once here; :class:`WorkerOptions` and :class:`ProxyOptions` extend it, and the
    tunnel layers (``_protocol.TunnelProtocol``, ``_tunnel.Tunnel``) read these fields from the
    options object they are handed, so no default is written twice.  "The peer" below is the
    other end of the tunnel: the proxy for a worker, a worker for the proxy.
    """

    cert: str | None = _opt(
        None,
        "Certificate (PEM) this side presents on the tunnel: the worker's client certificate, the proxy's"
        " server certificate.",
        metavar="FILE",
        essential=3,
    )
    key: str | None = _opt(None, "Private key (PEM) of that certificate.", metavar="FILE", essential=4)
    max_concurrent_streams: int = _opt(
        100,
        "SETTINGS_MAX_CONCURRENT_STREAMS advertised per tunnel; streams beyond it get REFUSED_STREAM.",
        minimum=1,
        maximum=2**31 - 1,
    )
    initial_window_size: int = _opt(
        1 << 20, "Per-stream receive window advertised to the peer (bytes).", minimum=65535, maximum=MAX_WINDOW
    )
    connection_window_size: int = _opt(
        1 << 26, "Connection receive window advertised to the peer (bytes).", minimum=65535, maximum=MAX_WINDOW
    )
    max_frame_size: int = _opt(
        1 << 18,
        "SETTINGS_MAX_FRAME_SIZE advertised: the largest frame payload the peer may send (bytes). Above the"
        " RFC's minimum of 16384, a bulk transfer takes fewer frames, so less CPU per byte on both ends"
        " (benchmarks/RESULTS.md: 256 KiB against 64 KiB, 6% less CPU and 7% more throughput on a long"
        " fat pipe). A frame is delivered once whole, so this is also the most a partial frame holds;"
        " small writes still go as small frames. The peer's own setting bounds what we send.",
        minimum=16384,
        maximum=(1 << 24) - 1,
    )
    max_header_list_size: int = _opt(
        65536,
        "Largest header list accepted from the peer (bytes, RFC 9113 accounting), advertised as"
        " SETTINGS_MAX_HEADER_LIST_SIZE. Worker: a larger request gets 431 without running the app, and a"
        " header block over 4x this (CONTINUATION flood) or an HPACK expansion over 4x (HPACK bomb) ends the"
        " tunnel with ENHANCE_YOUR_CALM. Proxy: a larger response is a 502.",
        minimum=1024,
        maximum=1 << 24,
    )
    handshake_timeout: float = _opt(
        10.0,
        "Deadline for the tunnel's TLS handshake, preface and the peer's first SETTINGS (seconds).",
        minimum=0.01,
    )
    ping_interval: float = _opt(30.0, "Idle seconds before a PING is sent on a tunnel.", minimum=0.05,
                                maximum=86400)
    ping_timeout: float = _opt(15.0, "Seconds to wait for a PING ACK before the tunnel is dropped.", minimum=0.05)
    control_frame_rate: float = _opt(
        100.0,
        "PING/SETTINGS frames (each forces a reply), and empty DATA, PRIORITY and unknown frames, the"
        " peer may send per second, sustained; beyond it and control_frame_burst the tunnel is closed"
        " with GOAWAY(ENHANCE_YOUR_CALM) (CVE-2019-9512/9515/9518). 0 = unlimited.",
        minimum=0.0,
    )
    control_frame_burst: int = _opt(
        1000,
        "Such frames the peer may send at once before control_frame_rate applies (like Envoy's"
        " max_outbound_control_frames, 1000).",
        minimum=1,
        maximum=1 << 20,
    )
    max_output_backlog: int = _opt(
        1 << 20,
        "Bytes of frames (replies to PING/SETTINGS, RST_STREAM, headers) that may wait for a peer that"
        " is not reading before the tunnel is closed with ENHANCE_YOUR_CALM (Envoy closes at 10000"
        " queued frames).",
        minimum=65536,
    )
    body_timeout: float = _opt(
        60.0,
        "Most seconds to wait for the next request-body bytes (nginx client_body_timeout, 60 s). Worker: a"
        " wsgi.input read then raises StreamTimeout and the proxy gets 408 (or RST_STREAM(CANCEL) once the"
        " response started); 0 = wait forever. Proxy (turnkey server): the public client gets 408 and its"
        " connection is closed.",
        minimum=0.0,
    )
    body_min_rate: int = _opt(
        500,
        "With body_timeout: the slowest average request-body rate (bytes/s) waited for; the allowance is"
        " body_timeout plus 1 s per body_min_rate bytes received, so a trickle of a byte every few seconds"
        " still ends in 408 (Apache mod_reqtimeout MinRate=500). 0 = no rate check.",
        minimum=0,
    )
    shutdown_timeout: float = _opt(
        30.0, "How long in-flight requests may finish on shutdown (SIGTERM) before they are cut (seconds).",
        minimum=0.0,
    )
    metrics_bind: str | None = _opt(
        None, "Serve Prometheus /metrics on HOST:PORT (needs the 'prometheus' extra).", metavar="HOST:PORT"
    )
    access_log_format: str = _opt("combined", FORMAT_HELP, metavar="FORMAT")
    max_window_size: int = _opt(
        64 << 20,
        "Largest a stream's receive window grows to (bytes). A window starts at initial_window_size and grows"
        " toward the bandwidth-delay product, up to this, while its reader keeps up and the peer is held back"
        " by the window (half of it read within two PING round trips), so a long fat pipe fills; a slow or"
        " stopped reader's window never grows, so this caps the bytes a stream leaves unread (the"
        " connection window caps them all). At or below initial_window_size: fixed windows.",
        minimum=65535,
        maximum=MAX_WINDOW,
    )
    max_connection_window_size: int = _opt(
        1 << 27,
        "Largest the connection receive window grows to (bytes), the same way, from connection_window_size:"
        " the cap on the bytes all streams of a tunnel together leave unread. A stream's window never grows"
        " past half of its connection's, so one stalled stream cannot hold a whole tunnel. At or below"
        " connection_window_size: fixed.",
        minimum=65535,
        maximum=MAX_WINDOW,
    )
    max_window_growth: int = _opt(
        1 << 28,
        "What the connection windows of all this process's tunnels together may grow beyond"
        " connection_window_size (bytes), taken as they grow and given back when a tunnel closes: what a"
        " process's tunnels can leave unread is at most tunnels x connection_window_size plus this. 0: windows"
        " of connections stay at connection_window_size (streams then grow to half of it at most).",
        minimum=0,
    )

    def __post_init__(self) -> None:
        """The checks every options class shares; subclasses run theirs around it."""
        _validate_fields(self)
        if self.metrics_bind is not None:
            parse_address(self.metrics_bind, option="metrics_bind")
        try:
            check_format(self.access_log_format)
        except ValueError as e:
            raise ConfigError("access_log_format", str(e)) from None


@dataclass(frozen=True)
class WorkerOptions(TunnelOptions):
    """Settings of a worker pool (the side that dials out and serves the app)."""

    proxy: tuple[str, ...] | None = _opt(
        None,
        "The reverse-HTTP proxies' tunnel ports, HOST:PORT; several for high availability (every proxy gets"
        " `connections` tunnels). A host name is resolved on every reconnect and each of its addresses gets"
        " its own tunnels, so one DNS name can stand for a whole cluster of proxies.",
        metavar="HOST:PORT",
        essential=1,
    )
    ca: str | None = _opt(
        None, "CA bundle (PEM) that signed the proxy's certificate; system roots when unset.", metavar="FILE",
        essential=5,
    )
    server_name: str | None = _opt(
        None,
        "TLS server name to send (SNI) and verify; derived from the proxy host when unset"
        " (no SNI for IP literals, whose certificate must then carry the IP).",
        metavar="NAME",
        essential=6,
    )
    connections: int = _opt(1, "Number of tunnels to keep open to each proxy (each address of a proxy name).",
                            minimum=1, maximum=1024, essential=7)
    threads: int = _opt(
        16, "Size of the thread pool that runs the WSGI app (shared by all tunnels).", minimum=1, maximum=10000,
        essential=8,
    )
    max_header_count: int = _opt(
        100,
        "Most header fields in a request (pseudo-headers not counted); more get 431 without running the"
        " app (HAProxy's tune.http.maxhdr is 101).",
        minimum=1,
        maximum=65535,
    )
    max_body_size: int = _opt(
        0,
        "Largest request body accepted (bytes; 0 = unlimited, as in HAProxy, gunicorn and waitress). A"
        " larger Content-Length gets 413 before the app runs; a body that grows past it gets 413, or"
        " RST_STREAM(CANCEL) once the response has started.",
        minimum=0,
    )
    send_timeout: float = _opt(
        60.0,
        "Most seconds a response may make no progress because the proxy grants no flow-control credit"
        " (nginx send_timeout, 60 s); then its stream is reset (CANCEL), rhttp.cancelled is set and a"
        " blocked write() raises. 0 = wait forever.",
        minimum=0.0,
    )
    request_timeout: float = _opt(
        0.0,
        "Deadline for a whole request, HEADERS to last response byte (seconds; 0 = none, the default:"
        " streaming responses such as SSE are legitimate). When reached, rhttp.cancelled is set and the"
        " stream is reset (CANCEL). Python cannot kill a thread: the app's thread is free only when the"
        " app returns; meanwhile it counts against max_concurrent_streams (TunnelInfo.lingering).",
        minimum=0.0,
    )
    max_resets: int = _opt(
        500,
        "Stream resets a tunnel may cause per 10 s (token bucket; 0 = unlimited): RST_STREAM from the"
        " proxy, and resets its frames force on the worker (malformed requests, streams beyond"
        " max_concurrent_streams, flow-control errors). Beyond it the tunnel is closed with"
        " GOAWAY(ENHANCE_YOUR_CALM) (HTTP/2 Rapid Reset, CVE-2023-44487; MadeYouReset, CVE-2025-8671).",
        minimum=0,
    )
    dial_timeout: float = _opt(10.0, "TCP connect timeout (seconds).", minimum=0.01)
    reconnect_min: float = _opt(
        0.5, "First retry delay after a failed dial or handshake (seconds, jittered).", minimum=0.0
    )
    reconnect_max: float = _opt(
        2.0,
        "Cap of the growing retry delay while a proxy cannot be reached (seconds; each delay is drawn from"
        " [cap/2, cap]); traffic resumes at most this long after the proxy accepts again. While a proxy is"
        " down only one tunnel per proxy address probes it; the others follow once a probe gets through.",
        minimum=0.0,
    )
    url_scheme: str = _opt(
        "forwarded",
        "How wsgi.url_scheme is chosen: 'forwarded' (X-Forwarded-Proto, else :scheme), 'pseudo'"
        " (:scheme), or a fixed 'http' / 'https'.",
        choices=URL_SCHEME_POLICIES,
    )
    forwarded_for: bool = _opt(
        True,
        "Set REMOTE_ADDR from the proxy's X-Forwarded-For (its last entry; our proxy and HAProxy's `option"
        " forwardfor` write it) and REMOTE_PORT to '' (the client's port is not known; never the tunnel's)."
        " The proxy is authenticated by mTLS, so what it says is trusted. Off: REMOTE_ADDR is the proxy's"
        " address. Do not also apply werkzeug's ProxyFix(x_for=...) (docs/deployment.md).",
    )
    forwarded_for_hops: int = _opt(
        0,
        "With forwarded_for: how many more proxies in front of the tunnel's proxy append to X-Forwarded-For"
        " and are trusted (ProxyFix's x_for minus 1): REMOTE_ADDR is the (1+N)-th entry from the right, or"
        " the proxy's address when there are fewer entries.",
        minimum=0,
        maximum=64,
    )
    reconnect_refused_max: float = _opt(
        30.0,
        "Cap of the growing retry delay when a proxy answered but refused us (certificate or name not"
        " accepted, GOAWAY with an error code, tunnels dropped right after their handshake): each retry"
        " costs it a full TLS handshake, and only a change of files or configuration can help.",
        minimum=0.0,
    )
    wait_all_proxies: bool = _opt(
        False,
        "wait_ready() (and the gunicorn worker's readiness) waits for every proxy address that answers,"
        " not only the first proxy with all its tunnels up; a proxy whose last dial failed is not waited for.",
    )
    access_log: bool = _opt(
        False,
        "Log one line per request the app served (logger rhttp_wsgi.access, INFO; format access_log_format)"
        " with the real client address and the proxy's request id. The CLI writes the lines bare on"
        " stderr, whatever the log level.",
    )
    websockets: bool = _opt(
        True,
        "Accept WebSockets (RFC 8441 extended CONNECT): advertise SETTINGS_ENABLE_CONNECT_PROTOCOL and hand"
        " `:protocol websocket` streams to the app as an HTTP/1.1 upgrade (environ werkzeug.socket /"
        " gunicorn.socket), as flask-sock, Flask-SocketIO (threading) and simple-websocket expect.",
    )
    max_websockets: int = _opt(
        100,
        "Most WebSockets open at once in this worker (all tunnels): each holds an app thread of its own pool"
        " for its lifetime, separate from `threads`, so sockets cannot starve plain requests; one more gets"
        " 503. Each also counts against its tunnel's max_concurrent_streams.",
        minimum=1,
        maximum=100000,
    )
    websocket_idle_timeout: float = _opt(
        3600.0,
        "A WebSocket with no traffic either way for this long (seconds; 0 = never) is closed: its stream is"
        " reset (CANCEL), rhttp.cancelled is set and the app's reads return EOF. request_timeout does not"
        " apply to WebSockets.",
        minimum=0.0,
    )
    #: Not an option (no help: no flag, no variable): the WSGI app, given from Python.
    app: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.proxy is None:
            raise ConfigError("proxy", "the proxy address (HOST:PORT) is required")
        super().__post_init__()  # first: it turns a comma-separated proxy string into a tuple
        if not self.proxy:
            raise ConfigError("proxy", "the proxy address (HOST:PORT) is required")
        for entry in self.proxy:
            parse_address(entry, option="proxy")
        if len(set(self.proxy)) != len(self.proxy):
            raise ConfigError("proxy", f"a proxy is listed twice: {', '.join(self.proxy)}")
        if self.cert is None or self.key is None:
            raise MTLSRequiredError(
                "cert", "a client certificate and key are required: the proxy authenticates workers by mTLS"
            )
        if self.app is not None and not callable(self.app):
            raise ConfigError("app", f"the WSGI app must be callable, got {type(self.app).__name__}")
        if self.reconnect_max < self.reconnect_min:
            raise ConfigError("reconnect_max", "must be >= reconnect_min")
        if self.reconnect_refused_max < self.reconnect_min:
            raise ConfigError("reconnect_refused_max", "must be >= reconnect_min")
        if self.server_name is not None and (not self.server_name or any(c.isspace() for c in self.server_name)):
            raise ConfigError("server_name", f"invalid server name {self.server_name!r}")

    def check_files(self) -> None:
        """Check that the certificate, key and CA files exist and are readable, and our certificate
        and key themselves (:func:`rhttp_wsgi.certcheck.check_identity`)."""
        _check_file("cert", self.cert)
        _check_file("key", self.key)
        _check_file("ca", self.ca)
        from .certcheck import check_identity  # cryptography: not loaded by `import rhttp_wsgi`

        check_identity(self.cert or "", self.key or "", role="client")

    @property
    def proxy_addresses(self) -> tuple[tuple[str, int], ...]:
        """Each ``proxy`` entry as (host, port), in the order given."""
        return tuple(parse_address(entry, option="proxy") for entry in self.proxy or ())

    def sni_for(self, host: str) -> str | None:
        """The name sent in the ClientHello to proxy ``host``: None for IP literals (RFC 6066 forbids them)."""
        name = self.verify_name_for(host)
        return None if _is_ip(name) else name

    def verify_name_for(self, host: str) -> str:
        """The name (or IP) the certificate of proxy ``host`` must match: ``server_name`` if set, else the host."""
        return self.server_name if self.server_name is not None else host


@dataclass(frozen=True)
class ProxyOptions(TunnelOptions):
    """Settings of the proxy (tunnel listener + public forwarder)."""

    tunnel_bind: str = _opt("0.0.0.0:8443", "Where workers' tunnels are accepted, HOST:PORT.", metavar="HOST:PORT",
                            essential=1)
    public_bind: str = _opt("0.0.0.0:8080", "Where public HTTP/1.1 clients connect, HOST:PORT.", metavar="HOST:PORT",
                            essential=2)
    workers_ca: str | None = _opt(
        None, "CA bundle that signed the workers' client certificates (mTLS: every worker presents one).",
        metavar="FILE",
        essential=5,
    )
    public_cert: str | None = _opt(None, "Certificate for TLS on the public port (optional).", metavar="FILE")
    public_key: str | None = _opt(None, "Key for TLS on the public port.", metavar="FILE")
    # (noqa: _opt returns a dataclasses.field, not a shared default; ruff cannot tell for this annotation.)
    selector: str | Callable[..., Any] = _opt(  # noqa: RUF009
        "least-in-flight",
        "How a worker is picked per request: 'least-in-flight' (fewest forwards in flight, ties in"
        " rotation), 'round-robin', or 'cn:HEADER' (only the workers whose certificate CN is the value of"
        " the request header HEADER; 503 without one). From Python also any callable (environ, workers)"
        " -> worker | None; see rhttp_wsgi.balancing.",
        metavar="NAME",
    )
    response_timeout: float = _opt(
        60.0, "Seconds to wait for a worker's response headers before answering 504.", minimum=0.01
    )
    stream_wait: float = _opt(
        2.0,
        "How long a request may wait for a free stream slot when every worker is at its"
        " MAX_CONCURRENT_STREAMS, before 503 (seconds).",
        minimum=0.0,
    )
    attach_wait: float = _opt(
        0.0,
        "How long a request may wait for a worker to attach when none is attached (the proxy just"
        " (re)started, tunnels reconnecting), before 503 (seconds; 0 = 503 at once, as HAProxy and"
        " Envoy answer when no server is up).",
        minimum=0.0,
    )
    trust_forwarded: bool = _opt(
        False, "Keep client-supplied X-Forwarded-* headers (only behind a trusted front proxy)."
    )
    access_log: bool = _opt(
        True,
        "Log one line per public request (logger rhttp_wsgi.access, INFO; format access_log_format): client,"
        " request, status, bytes, duration, request id and the worker (CN, tunnel). The CLI writes the lines"
        " bare on stderr, whatever the log level.",
    )
    trust_request_id: bool = _opt(
        False,
        "Keep a client's X-Request-ID (1-200 visible ASCII characters; else a new id) instead of always"
        " making one; only behind a front proxy that sets it. The id goes to the worker as x-request-id.",
    )
    header_timeout: float = _opt(
        15.0, "Turnkey server: seconds a client has to send its request head.", minimum=0.01
    )
    idle_timeout: float = _opt(60.0, "Turnkey server: keep-alive idle timeout (seconds).", minimum=0.01)
    retry_after: int = _opt(
        1, "Retry-After (seconds) sent with 503 when no worker is available.", minimum=0, maximum=86400
    )
    max_request_head: int = _opt(
        65536, "Turnkey server: largest request line + headers accepted (bytes); larger gets 431.",
        minimum=1024, maximum=1 << 24,
    )
    max_request_body: int = _opt(
        0, "Turnkey server: largest request body accepted (bytes, 0 = unlimited); larger gets 413.", minimum=0
    )
    max_connections: int = _opt(
        1000, "Turnkey server: most concurrent public connections (one thread each; 0 = unlimited).", minimum=0
    )
    admin_bind: str | None = _opt(
        None,
        "Serve the health and inventory endpoints on HOST:PORT: /healthz (200 ready, 503 not), /workers"
        " (JSON) and /status (an HTML page that refreshes itself). No extra needed. The same address as"
        " metrics_bind serves /metrics there too. Keep it private (127.0.0.1 or an internal network).",
        metavar="HOST:PORT",
    )
    websockets: bool = _opt(
        True,
        "Relay public WebSocket upgrades (HTTP/1.1 Upgrade: websocket) to the workers that advertised"
        " SETTINGS_ENABLE_CONNECT_PROTOCOL, as RFC 8441 extended CONNECT streams (503 when none did). Needs a"
        " server that lets the forwarder take over the client socket: the turnkey one, werkzeug or gunicorn"
        " (elsewhere 501). Off: an upgrade request is forwarded as a plain GET.",
    )
    max_websockets: int = _opt(
        1000,
        "Most public WebSockets relayed at once; one more gets 503. Each holds a public-server thread and a"
        " relay thread for its lifetime, and a stream of its worker's tunnel (max_concurrent_streams).",
        minimum=1,
        maximum=1000000,
    )
    websocket_idle_timeout: float = _opt(
        3600.0,
        "A relayed WebSocket with no bytes either way for this long (seconds; 0 = never) is closed: the client"
        " connection is cut and the worker's stream reset (CANCEL). response_timeout and idle_timeout do not"
        " apply to an open WebSocket.",
        minimum=0.0,
    )

    def __post_init__(self) -> None:
        if self.cert is None or self.key is None:
            raise ConfigError("cert", "the proxy's server certificate and key are required")
        if self.workers_ca is None:
            raise MTLSRequiredError(
                "workers_ca", "a workers' CA is required: tunnels must be authenticated by client certificate"
            )
        parse_address(self.tunnel_bind, option="tunnel_bind")
        parse_address(self.public_bind, option="public_bind")
        if self.admin_bind is not None:
            parse_address(self.admin_bind, option="admin_bind")
        if (self.public_cert is None) != (self.public_key is None):
            raise ConfigError("public_cert", "public_cert and public_key go together")
        super().__post_init__()
        # The selector vocabulary is balancing's, so Proxy(selector=...) and this option accept the
        # same names.  Imported here: balancing needs the TLS stack, which `import rhttp_wsgi` skips.
        from .balancing import resolve_selector

        resolve_selector(self.selector)

    def check_files(self) -> None:
        for name in ("cert", "key", "workers_ca", "public_cert", "public_key"):
            _check_file(name, getattr(self, name))
        from .certcheck import check_identity  # cryptography: not loaded by `import rhttp_wsgi`

        check_identity(self.cert or "", self.key or "", role="server")
        if self.public_cert is not None and self.public_key is not None:
            check_identity(self.public_cert, self.public_key, role="server", cert_option="public_cert",
                           key_option="public_key")


#: The sections of ``docs/settings.md``: each options class and its title.
_REFERENCE_SECTIONS: tuple[tuple[type, str], ...] = (
    (WorkerOptions, "Worker (`rhttp-wsgi worker`, `WorkerPool`)"),
    (ProxyOptions, "Proxy (`rhttp-wsgi proxy`, `Proxy`)"),
)
#: Options without a default that the constructor requires (it says why when one is missing).
REQUIRED_OPTIONS = frozenset({"proxy", "cert", "key", "workers_ca"})


def settings_reference(sections: Sequence[tuple[type, str]] = _REFERENCE_SECTIONS) -> str:
    """Markdown reference of every option: API keyword, CLI flag, environment variable."""
    lines = ["# Settings reference", "", "Generated from `rhttp_wsgi/options.py` by "
             "`python -m rhttp_wsgi settings`. Every option is the same under three names."]
    if any(option_kind(cls, f.name).many for cls, _ in sections for f in option_fields(cls)):
        lines += ["A list option takes its CLI flag once per value, or one environment variable with the"
                  " values separated by commas."]
    lines.append("")
    for cls, title in sections:
        lines += [f"## {title}", "", "| keyword | CLI flag | environment | default | meaning |",
                  "|---|---|---|---|---|"]
        for f in option_fields(cls):
            many = option_kind(cls, f.name).many
            if f.default is None:
                default = "required" if f.name in REQUIRED_OPTIONS else "unset"
            else:
                default = "none" if f.default == () else repr(f.default)
            flag = f"`{flag_name(f.name)}`" + (" (repeatable)" if many else "")
            env = f"`{env_name(f.name)}`" + (" (comma-separated)" if many else "")
            meaning = f.metadata["help"].replace("|", "\\|")  # a bare | would end the table cell
            lines.append(f"| `{f.name}` | {flag} | {env} | {default} | {meaning} |")
        lines.append("")
    return "\n".join(lines)
