"""Command line: ``rhttp-wsgi worker | proxy | certs | demo | settings``.

Every option flag is derived from :mod:`rhttp_wsgi.options`, and each can also
come from an ``RHTTP_``-prefixed environment variable (the flag wins).  A list
option's flag may be repeated.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._signals import wait_for_stop_signal
from ._version import __version__
from .errors import ConfigError, RHTTPError
from .options import (
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

WORKER_EXAMPLES = """examples:
  rhttp-wsgi worker myapp:app --proxy proxy.example.com:8443 --cert w.crt --key w.key --ca proxy-ca.crt
  rhttp-wsgi worker 'myapp:create_app()' --proxy 10.0.0.5:8443 --server-name proxy.example.com \\
      --cert w.crt --key w.key --connections 4 --threads 32
  RHTTP_PROXY=proxy:8443 RHTTP_CERT=w.crt RHTTP_KEY=w.key rhttp-wsgi worker myapp
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
    for f in option_fields(cls):
        kind = option_kind(cls, f.name)
        default = f.default
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}"
        help_text += "]" if default is None else f"; default {default}]"
        # No argparse defaults: an unset flag must not hide the environment variable.
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if kind.scalar is bool and not kind.many:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.metadata.get("metavar") or f.name.upper()
            if kind.many:
                kwargs["action"] = "append"
                kwargs["help"] += " (repeatable)"
            elif f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag_name(f.name), **kwargs)


def _collect(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """Flag value, else environment variable (else the declared default: left out)."""
    values = options_from_environ(cls, os.environ)
    for f in option_fields(cls):
        given = getattr(ns, f.name, None)
        if given is not None:
            values[f.name] = given if isinstance(given, bool) else parse_option(cls, f.name, given)
    return values


def load_app(spec: str) -> Any:
    """Import ``module``, ``module:attr`` or ``module:factory(args)`` (gunicorn's forms)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, expr = spec.partition(":")
    if not module_name:
        raise ConfigError("app", f"invalid app spec {spec!r}; expected MODULE[:APP]")
    expr = expr or "application"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError("app", f"cannot import {module_name!r}: {e}") from e
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError as e:
        raise ConfigError("app", f"invalid app expression {expr!r}") from e
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
        raise ConfigError("app", f"module {module_name!r} has no attribute {node.id!r}") from e
    if is_call:
        obj = obj(*call_args, **call_kwargs)
    if not callable(obj):
        raise ConfigError("app", f"{spec!r} is not a WSGI callable")
    return obj


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rhttp-wsgi",
        description="Reverse HTTP/2 for WSGI: serve an app through an outbound mTLS tunnel, or run the proxy.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'rhttp-wsgi COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"rhttp-wsgi {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("RHTTP_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"], help="logging level [env RHTTP_LOG_LEVEL]")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    w = sub.add_parser("worker", help="serve a WSGI app through tunnels to a proxy", epilog=WORKER_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("app", metavar="MODULE:APP", help="WSGI app, like gunicorn: module, module:app, module:factory()")
    _add_option_flags(w, WorkerOptions)

    p = sub.add_parser("proxy", help="accept worker tunnels and forward public HTTP to them",
                       epilog=PROXY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_option_flags(p, ProxyOptions)

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

    d = sub.add_parser("demo", help="run a throwaway proxy + worker + sample app on localhost",
                       epilog=DEMO_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--host", default="127.0.0.1", help="public listen address (default 127.0.0.1)")
    d.add_argument("--port", type=int, default=8080, help="public port (default 8080; 0 = any free port)")
    d.add_argument("--connections", type=int, default=2, help="tunnels the demo worker opens (default 2)")
    d.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: run until Ctrl-C)")

    sub.add_parser("settings", help="print the settings reference (markdown)")
    return parser


def _setup_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("h2", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    except (ConfigError, RHTTPError, OSError) as e:
        # One line, no traceback: this is a configuration problem, not a crash.
        parser.exit(2, f"rhttp-wsgi {args.command}: error: {e}\n")
    return 2  # pragma: no cover


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
    app = load_app(args.app)
    pool = WorkerPool(options=dataclasses.replace(options, app=app))
    if options.metrics_bind:
        from .metrics import WorkerMetrics

        mh, mp = WorkerMetrics(pool).start_server(options.metrics_bind)
        log.info("metrics on http://%s:%d/metrics", mh, mp)
    log.info("rhttp-wsgi %s worker: serving %s through %d tunnel(s) to %s", __version__, args.app,
             options.connections, options.proxy)
    return 0 if pool.serve_forever() else 1


def _cmd_proxy(args: argparse.Namespace) -> int:
    from .proxy import Proxy

    tune_malloc()
    options = ProxyOptions(**_collect(ProxyOptions, args))
    options.check_files()
    proxy = Proxy(options)
    if options.metrics_bind:
        from .metrics import ProxyMetrics

        mh, mp = ProxyMetrics(proxy).start_server(options.metrics_bind)
        log.info("metrics on http://%s:%d/metrics", mh, mp)
    th, tp = proxy.start_tunnels()
    ph, pp = proxy.start_public()
    log.info("rhttp-wsgi %s proxy: tunnels on %s:%d, public HTTP on %s:%d", __version__, th, tp, ph, pp)
    wait_for_stop_signal()
    return 0 if proxy.shutdown(options.shutdown_timeout) else 1


def _cmd_certs(args: argparse.Namespace) -> int:
    from .pki import generate_certs, summarize

    directory = Path(args.dir)
    workers = args.workers or (["rhttp-worker"] if not args.server else [])
    issued = generate_certs(directory, ca_name=args.ca_name, workers=workers, servers=args.server,
                            server_sans=args.san, overwrite=args.overwrite)
    sys.stdout.write(summarize(issued, issued[0].created, directory, ca_name=args.ca_name) + "\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo_app import app
    from .pki import DemoPKI
    from .proxy import Proxy
    from .worker import WorkerPool

    with tempfile.TemporaryDirectory(prefix="rhttp-demo-") as tmp:
        pki = DemoPKI.create(Path(tmp), worker_names=("demo-worker",))
        cert, key = pki.workers["demo-worker"]
        proxy = Proxy(cert=str(pki.server_cert), key=str(pki.server_key), workers_ca=str(pki.ca_cert),
                      tunnel_bind="127.0.0.1:0", public_bind=f"{_bracket(args.host)}:{args.port}")
        pool = None
        try:
            _, tport = proxy.start_tunnels()
            host, port = proxy.start_public()
            pool = WorkerPool(app, proxy=f"127.0.0.1:{tport}", cert=str(cert), key=str(key),
                              ca=str(pki.ca_cert), server_name="localhost", connections=args.connections)
            pool.start()
            if not pool.wait_ready(10) or not proxy.wait_for_workers(args.connections, 10):
                log.error("the demo worker did not connect to the demo proxy")
                return 1
            url = f"http://{_bracket(host)}:{port}"
            log.info("demo ready: open %s/  (certificates in %s)", url, tmp)
            log.info("try: curl -s %s/ ; curl -s -d 'hello' %s/echo ; curl -sN %s/events", url, url, url)
            wait_for_stop_signal(timeout=args.duration)
        finally:
            ok = pool.shutdown(5) if pool is not None else True
            ok = proxy.shutdown(5) and ok
        log.info("demo stopped")
        return 0 if ok else 1


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
