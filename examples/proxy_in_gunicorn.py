"""The rhttp-wsgi proxy inside gunicorn: gunicorn serves the public side, the
tunnel listener runs in the same process.

Run it (from the repository root, so ``examples`` is importable)::

    RHTTP_CERT=proxy.crt RHTTP_KEY=proxy.key RHTTP_WORKERS_CA=workers-ca.crt \\
    RHTTP_TUNNEL_BIND=0.0.0.0:8443 RHTTP_PUBLIC_BIND=0.0.0.0:8080 \\
        gunicorn -c examples/gunicorn_proxy_conf.py examples.proxy_in_gunicorn:app

``app`` is :attr:`rhttp_wsgi.proxy.Proxy.wsgi_app` (the forwarder, a plain WSGI
app).  The *tunnel listener* — where workers dial in over mutual TLS — must
run in the process that serves the requests, because the registry of attached
workers is an in-memory object of that process.  The config file's
``post_worker_init`` hook calls :func:`start` in the gunicorn worker process
(after the fork, so it also works with ``--preload``) and ``worker_exit``
calls :func:`stop`.

Every :class:`~rhttp_wsgi.options.ProxyOptions` setting is read from its
``RHTTP_*`` environment variable, exactly as ``rhttp-wsgi proxy`` reads them
(``rhttp-wsgi settings`` lists them): ``RHTTP_CERT``, ``RHTTP_KEY``,
``RHTTP_WORKERS_CA`` (required), ``RHTTP_TUNNEL_BIND``, ``RHTTP_RESPONSE_TIMEOUT``,
``RHTTP_SELECTOR``...  ``RHTTP_PUBLIC_BIND`` is used by the config file as
gunicorn's ``bind``; the turnkey server's own settings (``header_timeout``,
``max_connections``...) do not apply — gunicorn's do.

Gunicorn settings that matter (all set in ``examples/gunicorn_proxy_conf.py``):

* ``workers = 1`` — **one process**.  Each process would have its own registry;
  a second process cannot even bind the tunnel port.  The hook refuses to
  start otherwise.  For more cores run several proxies (each its own tunnel
  port) and have each worker dial all of them, or use HAProxy.
* ``worker_class = "gthread"`` and ``threads`` — every forward in flight holds a
  gunicorn thread for its whole duration (waiting for the worker's answer,
  streaming the body); every open server-sent-events stream holds one for as
  long as it lasts.  Size ``threads`` for the concurrent requests *plus* open
  streams you expect; requests beyond it queue inside gunicorn.  The ``sync``
  worker (one request at a time) is refused.
* ``worker_connections`` — gthread's cap on open client connections.
* Output is not buffered: gunicorn writes each chunk the forwarder yields
  straight to the socket (chunked encoding when the worker sent no
  ``Content-Length``), so SSE streams through.  Request bodies stream to the
  worker as gunicorn reads them.
* Do not use ``kill -HUP`` (reload), ``max_requests`` or anything else that
  starts a *new* gunicorn worker while the old one runs: the new one cannot
  bind the tunnel port until the old one exits.  Restart instead; workers
  reconnect on their own (jittered backoff).
* Shutdown: on SIGTERM gunicorn stops accepting and waits up to
  ``graceful_timeout`` for the requests in flight (SSE streams included), then
  ``worker_exit`` drains the proxy (GOAWAY to every worker).

Client disconnects: gunicorn notices a closed client only when a write to it
fails (it then calls the body's ``close()``, which resets the worker's stream
with CANCEL and sets ``environ["rhttp.cancelled"]`` on the worker).  To also
notice it while the forwarder *waits* (for the response headers, or during a
quiet stretch of an SSE stream), :func:`rhttp_wsgi.mount.with_disconnect_probe` offers the
forwarder ``environ["rhttp.client_disconnected"]``, a non-reading check of the
socket gunicorn exposes as ``environ["gunicorn.socket"]`` (Linux ``POLLRDHUP``;
elsewhere the probe reports nothing and only failed writes count), and turns
the forwarder's "client went away" error into ``BrokenPipeError``, which
gunicorn logs at debug level instead of as a traceback.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from rhttp_wsgi.mount import proxy_options_from_env, socket_probe, with_disconnect_probe
from rhttp_wsgi.proxy import Proxy

__all__ = ["app", "proxy", "start", "stop"]

log = logging.getLogger("rhttp_wsgi.examples.gunicorn")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

proxy = Proxy(proxy_options_from_env())
app = with_disconnect_probe(proxy.wsgi_app, socket_probe("gunicorn.socket"))

_lock = threading.Lock()
_started_in: int | None = None  # pid that owns the running tunnel listener


def start() -> tuple[str, int]:
    """Start the tunnel listener in this process (idempotent). Call it after the fork."""
    global _started_in
    with _lock:
        if _started_in == os.getpid():
            return proxy.tunnel_addresses[0]
        if _started_in is not None:
            raise RuntimeError("the tunnel listener was started before the fork: start it in the worker")
        host, port = proxy.start_tunnels()
        _started_in = os.getpid()
    log.info("rhttp-wsgi proxy in gunicorn (pid %d): worker tunnels on %s:%d", os.getpid(), host, port)
    return host, port


def stop(timeout: float | None = None) -> bool:
    """GOAWAY every worker, let forwards in flight finish within ``timeout``, close."""
    with _lock:
        if _started_in != os.getpid():
            return True  # not started in this process (e.g. the gunicorn master)
    return proxy.shutdown(timeout)
