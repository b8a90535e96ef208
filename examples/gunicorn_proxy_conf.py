"""Gunicorn configuration for the rhttp-wsgi proxy (see examples/proxy_in_gunicorn.py).

    gunicorn -c examples/gunicorn_proxy_conf.py examples.proxy_in_gunicorn:app

Command-line flags override these values (``--threads 200``), except that the
hooks below insist on one process and the gthread worker.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

#: The module whose ``start()``/``stop()`` the hooks call; it also provides ``app``.
APP_MODULE = "examples.proxy_in_gunicorn"

bind = [os.environ.get("RHTTP_PUBLIC_BIND", "0.0.0.0:8080")]
# ONE process: the workers' tunnels attach to this process's in-memory registry.
workers = 1
worker_class = "gthread"
# Each forward in flight holds a thread; each open SSE stream holds one for its lifetime.
threads = 64
# gthread's cap on open client connections (idle keep-alive ones included).
worker_connections = 1000
keepalive = 5
# How long in-flight requests (SSE streams too) may run on after SIGTERM.
graceful_timeout = 30
# gunicorn >= 25.1's control socket can add worker processes at runtime (which
# the proxy cannot allow) and lives at one per-user path; older versions
# ignore this name.
control_socket_disable = True
# gthread's heartbeat runs on its main loop, so long requests do not trip this.
timeout = 30
# gunicorn >= 25.1's control socket can add worker processes at runtime (which
# the proxy cannot allow) and lives at one per-user path; older versions
# ignore this name.
control_socket_disable = True


def post_worker_init(worker: Any) -> None:
    """In the gunicorn worker process, after the app was loaded: start the tunnel listener."""
    cfg = worker.cfg
    if cfg.workers != 1:
        raise RuntimeError(f"the rhttp-wsgi proxy needs exactly one gunicorn worker process (--workers 1),"
                           f" got {cfg.workers}: workers attach to one process's registry")
    from gunicorn.workers.gthread import ThreadWorker

    if not isinstance(worker, ThreadWorker):
        raise RuntimeError(f"the rhttp-wsgi proxy needs the gthread worker (-k gthread), got"
                           f" {type(worker).__name__}: each forward holds a thread for its duration")
    if cfg.max_requests:
        raise RuntimeError("max_requests restarts the worker process, whose replacement cannot bind the"
                           " tunnel port while the old one runs; leave it at 0")
    level = os.environ.get("RHTTP_LOG_LEVEL", "info").upper()
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(process)d] %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    logging.getLogger("rhttp_wsgi").setLevel(level)
    importlib.import_module(APP_MODULE).start()


def worker_exit(server: Any, worker: Any) -> None:
    """After gunicorn's graceful wait: GOAWAY every worker tunnel and close them."""
    module = sys.modules.get(APP_MODULE)
    if module is None:
        return
    # gunicorn already spent up to graceful_timeout on the requests in flight
    # and its master SIGKILLs this process soon after: keep the drain short.
    timeout = min(module.proxy.options.shutdown_timeout, 5.0)
    module.stop(timeout)
