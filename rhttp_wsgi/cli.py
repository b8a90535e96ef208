"""Command line: ``rhttp-wsgi worker | proxy | certs | demo | settings``.

Every option flag is derived from :mod:`rhttp_wsgi.options`, and each can also
come from an ``RHTTP_``-prefixed environment variable (the flag wins).  A list
option's flag may be repeated.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import errno
import importlib
import inspect
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ._signals import stop_signals
from ._version import __version__
from .accesslog import access_log_to
from .errors import ConfigError, RHTTPError
from .options import (
    REQUIRED_OPTIONS,
    ProxyOptions,
    WorkerOptions,
    env_name,
    flag_name,
    option_fields,
    option_kind,
    options_from_environ,
    parse_option,
    settings_reference,
)

log = logging.getLogger("rhttp_wsgi.cli")

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_LEVELS = ["debug", "info", "warning", "error"]

#: Exit statuses of the commands (docs/deployment.md has the table).
EXIT_OK = 0  #: stopped, everything drained
EXIT_DEADLINE = 1  #: stopped, but the shutdown deadline cut requests off (demo: its worker never connected)
EXIT_CONFIG = 2  #: configuration error, one line on stderr: restarting will not fix it
EXIT_NEVER_CONNECTED = 3  #: worker: stopped before any tunnel ever reached the proxy

WORKER_EXAMPLES = """examples:
  rhttp-wsgi worker myapp:app --proxy proxy.example.com:8443 --cert rhttp-certs/worker-1.crt \\
      --key rhttp-certs/worker-1.key --ca rhttp-certs/workers-ca.crt
  rhttp-wsgi worker 'myapp:create_app()' --proxy 10.0.0.5:8443 --server-name proxy.example.com \\
      --cert w.crt --key w.key --ca workers-ca.crt --connections 4 --threads 32
  RHTTP_PROXY=proxy:8443 RHTTP_CERT=w.crt RHTTP_KEY=w.key RHTTP_CA=workers-ca.crt rhttp-wsgi worker myapp
exit status: 0 stopped and drained, 1 the drain deadline cut requests off, 2 configuration error,
  3 stopped before any tunnel ever connected (docs/deployment.md)
"""
PROXY_EXAMPLES = """examples:
  rhttp-wsgi proxy --tunnel-bind 0.0.0.0:8443 --public-bind 0.0.0.0:8080 \\
      --cert server.crt --key server.key --workers-ca workers-ca.crt
  rhttp-wsgi proxy ... --public-cert site.crt --public-key site.key --selector round-robin
  rhttp-wsgi proxy ... --selector cn:X-Tenant      # pin requests to workers by certificate CN
"""
CERTS_EXAMPLES = """examples:
  rhttp-wsgi certs                          # CA + worker cert 'rhttp-worker' in ./rhttp-certs
  rhttp-wsgi certs worker-1 worker-2        # more workers, same CA (reused)
  rhttp-wsgi certs --server proxy.example.com --san proxy.example.com --san 10.0.0.5
"""
DEMO_EXAMPLES = """examples:
  rhttp-wsgi demo                 # proxy on 127.0.0.1:8080, worker, sample app; Ctrl-C to stop
  rhttp-wsgi demo --port 0 --duration 5
"""


def _add_option_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per option: the essential ones first (in their declared order), then the rest.

    Also records the flags' option names (``flags``) so that an error about an
    option can name its flag (see :func:`_error_line`).
    """
    fields = list(option_fields(cls))
    essential = sorted((f for f in fields if f.metadata.get("essential")), key=lambda f: f.metadata["essential"])
    groups = [(parser.add_argument_group("essential options"), essential),
              (parser.add_argument_group("other options"), [f for f in fields if f not in essential])]
    for group, members in groups:
        for f in members:
            _add_option_flag(group, cls, f)
    parser.set_defaults(flags=frozenset(f.name for f in fields))


def _add_option_flag(group: Any, cls: type, f: dataclasses.Field[Any]) -> None:
    kind = option_kind(cls, f.name)
    required = "required; " if f.name in REQUIRED_OPTIONS else ""
    help_text = f"{f.metadata['help']} [{required}env {env_name(f.name)}"
    help_text += "]" if f.default is None else f"; default {f.default}]"
    # No argparse defaults: an unset flag must not hide the environment variable.
    # (argparse expands %-formats in help: a literal % must be doubled.)
    kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text.replace("%", "%%")}
    if kind.scalar is bool and not kind.many:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["metavar"] = f.metadata.get("metavar") or f.name.upper()
        if kind.many:
            kwargs["action"] = "append"
            kwargs["help"] += " (repeatable)"
        elif f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
    group.add_argument(flag_name(f.name), **kwargs)


def _collect(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """Flag value, else environment variable (else the declared default: left out)."""
    values = options_from_environ(cls, os.environ)
    for f in option_fields(cls):
        given = getattr(ns, f.name, None)
        if given is not None:
            values[f.name] = given if isinstance(given, bool) else parse_option(cls, f.name, given)
    return values


def load_app(spec: str) -> Any:
    """Import ``module``, ``module:attr`` or ``module:factory(args)`` (gunicorn's forms).

    Every failure is one :class:`ConfigError` line that says what to do; when
    the app's own code raised (at import or in the factory), its traceback is
    logged at DEBUG (``--log-level debug``).
    """
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, expr = spec.partition(":")
    if not module_name:
        raise ConfigError("app", f"invalid app spec {spec!r}; expected MODULE[:APP]")
    default_name = not expr
    expr = expr or "application"
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError as e:
        raise ConfigError("app", f"invalid app expression {expr!r}") from e
    module = _import_app_module(module_name)
    call_args: list[Any] = []
    call_kwargs: dict[str, Any] = {}
    is_call = isinstance(node, ast.Call)
    if isinstance(node, ast.Call):
        try:
            call_args = [ast.literal_eval(a) for a in node.args]
            call_kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
        except ValueError as e:
            raise ConfigError("app", f"factory arguments must be literals in {expr!r}") from e
        node = node.func
    if not isinstance(node, ast.Name):
        raise ConfigError("app", f"expected a name or a call in {expr!r}")
    try:
        obj = getattr(module, node.id)
    except AttributeError as e:
        given = f" ({module_name!r} alone means {module_name}:application)" if default_name else ""
        raise ConfigError("app", f"module {module_name!r} has no attribute {node.id!r}{given}"
                                 f"{_suggest_app(module, module_name)}") from e
    if is_call:
        try:
            obj = obj(*call_args, **call_kwargs)
        except Exception as e:
            log.debug("%s raised", spec, exc_info=True)
            raise ConfigError("app", f"calling {module_name}:{expr} raised {type(e).__name__}: {e}"
                                     f"{_TRACEBACK_HINT}") from e
    if not callable(obj):
        raise ConfigError("app", f"{spec!r} is not a WSGI callable (it is a {type(obj).__name__})"
                                 f"{_suggest_app(module, module_name)}")
    return obj


_TRACEBACK_HINT = " (--log-level debug shows the traceback)"


def _import_app_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError("app", f"no module named {e.name!r}: run from the directory that holds it, or add"
                                     " that directory to PYTHONPATH") from e
        log.debug("importing %s failed", name, exc_info=True)
        raise ConfigError("app", f"importing {name!r} failed: {e} (is it installed in this Python environment,"
                                 f" {sys.executable}?){_TRACEBACK_HINT}") from e
    except SyntaxError as e:
        log.debug("importing %s failed", name, exc_info=True)
        where = f"{e.filename}, line {e.lineno}" if e.filename else name
        raise ConfigError("app", f"importing {name!r} failed: syntax error in {where}: {e.msg}") from e
    except Exception as e:  # the module's own code raised while it was imported
        log.debug("importing %s failed", name, exc_info=True)
        raise ConfigError("app", f"importing {name!r} raised {type(e).__name__}: {e}{_TRACEBACK_HINT}") from e


#: Names a WSGI app object or factory is usually given (gunicorn, Flask, Django, Pyramid conventions).
_APP_NAMES = ("app", "application", "api", "wsgi_app")
_FACTORY_NAMES = ("create_app", "make_app")


def _suggest_app(module: Any, module_name: str) -> str:
    """``; did you mean 'x:app'?`` or the callables ``module`` offers, for an app that was not found."""
    found: list[str] = []
    for name, value in vars(module).items():
        if name.startswith("_") or not callable(value) or isinstance(value, type) or inspect.ismodule(value):
            continue
        if inspect.isfunction(value) or inspect.isbuiltin(value):
            if getattr(value, "__module__", None) != module.__name__:
                continue  # imported helpers are not the app
            found.append(f"{module_name}:{name}()" if name in _FACTORY_NAMES else f"{module_name}:{name}")
        else:
            found.append(f"{module_name}:{name}")  # an app object (Flask, Django's WSGIHandler, ...)
    best = [f for f in found if f.partition(":")[2].rstrip("()") in _APP_NAMES + _FACTORY_NAMES]
    if best:
        return f"; did you mean {' or '.join(repr(f) for f in best[:2])}?"
    if found:
        return f"; callables it defines: {', '.join(repr(f) for f in found[:6])}"
    return "; it defines no callable: name the WSGI app as MODULE:NAME"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rhttp-wsgi",
        description="Reverse HTTP/2 for WSGI: serve an app through an outbound mTLS tunnel, or run the proxy.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'rhttp-wsgi COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"rhttp-wsgi {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("RHTTP_LOG_LEVEL", "info"), choices=LOG_LEVELS,
                        help="logging level [env RHTTP_LOG_LEVEL] (also accepted after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    w = sub.add_parser("worker", help="serve a WSGI app through tunnels to a proxy", epilog=WORKER_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False,
                       usage="rhttp-wsgi worker MODULE:APP --proxy HOST:PORT --cert FILE --key FILE [--ca FILE]"
                             " [options]")
    w.add_argument("app", metavar="MODULE:APP", help="WSGI app, like gunicorn: module, module:app, module:factory()")
    _add_option_flags(w, WorkerOptions)
    _add_general_flags(w.add_argument_group("general options"), help_flag=True)

    p = sub.add_parser("proxy", help="accept worker tunnels and forward public HTTP to them",
                       epilog=PROXY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False,
                       usage="rhttp-wsgi proxy --cert FILE --key FILE --workers-ca FILE [--tunnel-bind HOST:PORT]"
                             " [--public-bind HOST:PORT] [options]")
    _add_option_flags(p, ProxyOptions)
    _add_general_flags(p.add_argument_group("general options"), help_flag=True)

    c = sub.add_parser("certs", help="create a CA (once) and worker/server certificates",
                       epilog=CERTS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--dir", default="rhttp-certs", help="output directory (default ./rhttp-certs)")
    c.add_argument("--ca-name", default="workers-ca", help="file stem of the CA (default workers-ca)")
    c.add_argument("--server", action="append", default=[], metavar="NAME",
                   help="also issue a server certificate for the proxy (repeatable)")
    c.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                   help="subject alternative name for --server certificates (repeatable)")
    c.add_argument("--overwrite", action="store_true", help="re-issue existing worker/server certificates")
    c.add_argument("workers", nargs="*", metavar="WORKER_NAME", help="worker certificate names")
    _add_general_flags(c)
    c.set_defaults(flags=frozenset({"dir", "ca_name", "server", "san", "overwrite"}))

    d = sub.add_parser("demo", help="run a throwaway proxy + worker + sample app on localhost",
                       epilog=DEMO_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--host", default="127.0.0.1", help="public listen address (default 127.0.0.1)")
    d.add_argument("--port", type=int, default=8080, help="public port (default 8080; 0 = any free port)")
    d.add_argument("--connections", type=int, default=2, help="tunnels the demo worker opens (default 2)")
    d.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: run until Ctrl-C)")
    _add_general_flags(d)
    d.set_defaults(flags=frozenset({"host", "port", "connections", "duration"}))

    _add_general_flags(sub.add_parser("settings", help="print the settings reference (markdown)"))
    return parser


def _add_general_flags(group: Any, *, help_flag: bool = False) -> None:
    """``--log-level`` after the command as well as before it (and ``-h`` when the parser has none)."""
    if help_flag:
        group.add_argument("-h", "--help", action="help", help="show this help message and exit")
    # SUPPRESS: when not given here, the value parsed before the command stays.
    group.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                       help="logging level [env RHTTP_LOG_LEVEL]")


def _setup_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        # Access lines: bare (they carry their own time), and not muted by --log-level (their
        # switch is --access-log / --no-access-log).
        access_log_to(sys.stderr)
    root.setLevel(level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "worker":
            return _cmd_worker(args)
        if args.command == "proxy":
            return _cmd_proxy(args)
        if args.command == "certs":
            return _cmd_certs(args)
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "settings":
            sys.stdout.write(settings_reference() + "\n")
            return 0
    except (RHTTPError, OSError) as e:
        # One line, no traceback: this is a configuration problem, not a crash.
        parser.exit(EXIT_CONFIG, f"rhttp-wsgi {args.command}: error: {_error_line(e, args)}\n")
    return EXIT_CONFIG  # pragma: no cover


def _error_line(e: BaseException, args: argparse.Namespace) -> str:
    """The error, naming the option by its flag (``--cert: ...``) when the command has that flag."""
    if isinstance(e, ConfigError) and e.option in getattr(args, "flags", ()):
        return f"{flag_name(e.option)}: {e.message}"
    return str(e)


@contextlib.contextmanager
def _binding(option: str, address: str, fix: str = "stop it, or choose another address") -> Iterator[None]:
    """A listener that cannot bind is a configuration error naming its option and address.

    ``fix``: what to do when the address is in use.
    """
    try:
        yield
    except OSError as e:
        if isinstance(e, socket.gaierror):
            why = f"cannot be resolved ({e.strerror or e})"
        elif e.errno == errno.EADDRINUSE:
            why = f"is already in use: another process listens there ({fix})"
        elif e.errno == errno.EADDRNOTAVAIL:
            why = "is not an address of this machine"
        elif e.errno == errno.EACCES:
            why = "needs privileges: ports below 1024 need root or CAP_NET_BIND_SERVICE"
        else:
            raise
        raise ConfigError(option, f"{address} {why}") from e


def _require_extra(module: str, option: str, extra: str) -> None:
    """An option that needs an optional dependency fails at startup, naming the extra to install."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(option, f"needs {module}, which is not installed: pip install 'rhttp-wsgi[{extra}]'") from e


#: glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_ARENA_MAX = -8
_M_MMAP_THRESHOLD = -3


def tune_malloc(environ: Any = None) -> bool:
    """Keep glibc from mmap()ing and trimming the tunnels' transient buffers (CLI processes only).

    Performance (benchmarks/RESULTS.md): each writer pass and TLS read/write
    allocates and frees buffers of 64 KiB-1 MiB.  With glibc's defaults those
    land above the mmap/trim thresholds, so every one costs fresh pages and
    page faults: a 1 MiB download cost the worker ~2.9 ms of CPU, ~1.3 ms with
    these settings.  Only the CLI's own processes do this (an app embedding
    WorkerPool keeps its allocator alone); skipped when the operator set any
    ``MALLOC_*`` variable, off with ``RHTTP_MALLOC_TUNING=0``, and a no-op off
    glibc.  Returns True when applied.
    """
    env = os.environ if environ is None else environ
    if env.get("RHTTP_MALLOC_TUNING", "1") == "0" or any(k.startswith("MALLOC_") for k in env):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    # Blocks up to 4 MiB come from the heap; up to 16 MiB free at its top is kept.
    # At most 2 arenas: with one arena per thread (glibc allows 8 per core),
    # each keeps its own fragmented free chunks and RSS creeps up for tens of
    # minutes (the soak's proxy: +11% over 30 min, all of it free memory in
    # arenas); threads here mostly hold the GIL anyway, so arena contention is moot.
    return (bool(mallopt(_M_MMAP_THRESHOLD, 4 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 16 << 20))
            and bool(mallopt(_M_ARENA_MAX, 2)))


def _cmd_worker(args: argparse.Namespace) -> int:
    from .worker import WorkerPool

    tune_malloc()
    kwargs = _collect(WorkerOptions, args)
    options = WorkerOptions(**kwargs)  # validates before importing the app
    options.check_files()
    if options.metrics_bind:
        _require_extra("prometheus_client", "metrics_bind", "prometheus")
    app = load_app(args.app)
    pool = WorkerPool(options=dataclasses.replace(options, app=app))
    if options.metrics_bind:
        from .metrics import WorkerMetrics

        with _binding("metrics_bind", options.metrics_bind):
            mh, mp = WorkerMetrics(pool).start_server(options.metrics_bind)
        log.info("metrics on http://%s:%d/metrics", mh, mp)
    # "ready" comes from the pool, once the first tunnel is up.
    log.info("rhttp-wsgi %s worker: starting %s, dialling %s with %d tunnel(s)%s", __version__, args.app,
             ", ".join(options.proxy or ()), options.connections,
             " per proxy address" if len(options.proxy or ()) > 1 else "")
    drained = pool.serve_forever()
    if not pool.has_connected:
        errors = pool.last_errors()
        log.error("stopped before any tunnel connected to %s%s", ", ".join(options.proxy or ()),
                  f"; last error: {errors[0]}" if errors else "")
        return EXIT_NEVER_CONNECTED
    return EXIT_OK if drained else EXIT_DEADLINE


def _cmd_proxy(args: argparse.Namespace) -> int:
    from .proxy import Proxy

    tune_malloc()
    options = ProxyOptions(**_collect(ProxyOptions, args))
    options.check_files()
    if options.metrics_bind:
        _require_extra("prometheus_client", "metrics_bind", "prometheus")
    proxy = Proxy(options)
    # --admin-bind and --metrics-bind naming the same HOST:PORT share one listener (the admin one).
    shared = options.metrics_bind is not None and options.metrics_bind == options.admin_bind
    metrics_app = None
    if options.metrics_bind:
        from .metrics import ProxyMetrics

        metrics = ProxyMetrics(proxy)
        metrics_app = metrics.wsgi_app
        if not shared:
            with _binding("metrics_bind", options.metrics_bind):
                mh, mp = metrics.start_server(options.metrics_bind)
            log.info("metrics on http://%s:%d/metrics", mh, mp)
    admin = None
    if options.admin_bind:
        from .admin import AdminApp, AdminServer

        with _binding("admin_bind", options.admin_bind):  # (the server binds when constructed)
            admin = AdminServer(AdminApp(proxy, metrics_app if shared else None), options.admin_bind)
        admin.start()
    with _binding("tunnel_bind", options.tunnel_bind):
        th, tp = proxy.start_tunnels()
    with _binding("public_bind", options.public_bind):
        ph, pp = proxy.start_public()
    # Handlers before the ready line: a SIGTERM sent on seeing it must drain, not kill.
    with stop_signals(reload=proxy.reload_certificates) as stop:
        log.info("rhttp-wsgi %s proxy: tunnels on %s:%d, public HTTP on %s:%d", __version__, th, tp, ph, pp)
        stop.wait()
    ok = proxy.shutdown(options.shutdown_timeout)
    if admin is not None:
        admin.stop()  # after the drain: /healthz says 503 "shutting down" while it lasts
    return 0 if ok else 1


def _cmd_certs(args: argparse.Namespace) -> int:
    from .pki import generate_certs, summarize

    directory = Path(args.dir)
    if args.san and not args.server:
        raise ConfigError("san", "names the --server certificates: add --server NAME (the proxy's name)")
    workers = args.workers or (["rhttp-worker"] if not args.server else [])
    issued = generate_certs(directory, ca_name=args.ca_name, workers=workers, servers=args.server,
                            server_sans=args.san, overwrite=args.overwrite)
    sys.stdout.write(summarize(issued, issued[0].created, directory, ca_name=args.ca_name) + "\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .balancing import LeastInFlight
    from .demo_app import DemoApp, RouteLog
    from .pki import DemoPKI
    from .proxy import Proxy
    from .worker import WorkerPool

    with tempfile.TemporaryDirectory(prefix="rhttp-demo-") as tmp:
        pki = DemoPKI.create(Path(tmp), worker_names=("demo-worker",))
        cert, key = pki.workers["demo-worker"]
        # The proxy runs in this process: its selector records which tunnel carried each request,
        # so the page can show the whole path.
        routes = RouteLog(LeastInFlight())
        app = DemoApp(routes=routes, worker_name="demo-worker")
        proxy = Proxy(cert=str(pki.server_cert), key=str(pki.server_key), workers_ca=str(pki.ca_cert),
                      tunnel_bind="127.0.0.1:0", public_bind=f"{_bracket(args.host)}:{args.port}",
                      selector=routes)
        pool = None
        try:
            _, tport = proxy.start_tunnels()
            with _binding("port", f"{_bracket(args.host)}:{args.port}",
                          "pass another --port, or --port 0 for any free port"):
                host, port = proxy.start_public()
            pool = WorkerPool(app, proxy=f"127.0.0.1:{tport}", cert=str(cert), key=str(key),
                              ca=str(pki.ca_cert), server_name="localhost", connections=args.connections)
            pool.start()
            if not pool.wait_ready(10) or not proxy.wait_for_workers(args.connections, 10):
                log.error("the demo worker did not connect to the demo proxy")
                return 1
            url = f"http://{_bracket(host)}:{port}"
            with stop_signals() as stop:
                log.info("demo ready: open %s/  (certificates in %s)", url, tmp)
                log.info("try: curl -s %s/ ; curl -s -d 'hello' %s/echo ; curl -sN %s/events", url, url, url)
                stop.wait(args.duration)
        finally:
            ok = pool.shutdown(5) if pool is not None else True
            ok = proxy.shutdown(5) and ok
        log.info("demo stopped")
        return 0 if ok else 1


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
