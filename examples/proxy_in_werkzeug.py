"""The rhttp-wsgi proxy inside werkzeug's development server (threaded).

Run it::

    RHTTP_CERT=proxy.crt RHTTP_KEY=proxy.key RHTTP_WORKERS_CA=workers-ca.crt \\
    RHTTP_TUNNEL_BIND=127.0.0.1:8443 RHTTP_PUBLIC_BIND=127.0.0.1:8080 \\
        python examples/proxy_in_werkzeug.py

Werkzeug's server is a **development** server (its own documentation says
so): use this to debug the forwarder next to a Flask app, not in production
— there, use ``rhttp-wsgi proxy`` (its turnkey server), gunicorn or waitress.

Every :class:`~rhttp_wsgi.options.ProxyOptions` setting comes from its
``RHTTP_*`` environment variable (``rhttp-wsgi settings`` lists them);
``RHTTP_PUBLIC_BIND`` is where werkzeug listens.  SIGTERM or Ctrl-C drains:
new requests get 503, workers get GOAWAY, forwards in flight finish
(``RHTTP_SHUTDOWN_TIMEOUT``), then the server stops.

Settings that matter:

* ``threaded=True`` — without it werkzeug serves one request at a time, and
  one open server-sent-events stream blocks every other client.  Threaded, it
  starts one (daemon) thread per connection with **no upper bound**: each
  forward in flight and each open SSE stream holds one.
* One process (``processes=1``, the default; ``threaded`` excludes
  ``processes``): workers attach to this process's in-memory registry.
* No ``use_reloader``: the reloader runs the app in a child process that it
  restarts on file changes, which drops every worker tunnel each time.
* Output is not buffered (each chunk the forwarder yields is written and
  flushed), so SSE streams through; request bodies stream to the worker.

Client disconnects: werkzeug notices a closed client only when a write to it
fails (it then calls the body's ``close()``, which resets the worker's stream
with CANCEL and sets ``environ["rhttp.cancelled"]`` on the worker).  To also
notice it while the forwarder *waits*, :func:`rhttp_wsgi.mount.with_disconnect_probe` offers
``environ["rhttp.client_disconnected"]``, a non-reading check of the socket
werkzeug exposes as ``environ["werkzeug.socket"]`` (Linux ``POLLRDHUP``), and
turns the forwarder's "client went away" error into ``BrokenPipeError``, which
werkzeug treats as a dropped connection instead of logging a traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from werkzeug.serving import make_server

from rhttp_wsgi.errors import ConfigError
from rhttp_wsgi.mount import proxy_options_from_env, socket_probe, with_disconnect_probe
from rhttp_wsgi.options import parse_address
from rhttp_wsgi.proxy import Proxy

log = logging.getLogger("rhttp_wsgi.examples.werkzeug")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args:
        raise SystemExit("usage: proxy_in_werkzeug.py  (configured by RHTTP_* environment variables)")
    logging.basicConfig(level=os.environ.get("RHTTP_LOG_LEVEL", "info").upper(),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        options = proxy_options_from_env()
        host, port = parse_address(options.public_bind, option="public_bind")
        proxy = Proxy(options)
    except ConfigError as e:  # one line naming the option, like `rhttp-wsgi proxy`
        raise SystemExit(f"proxy_in_werkzeug: error: {e}") from None
    app = with_disconnect_probe(proxy.wsgi_app, socket_probe("werkzeug.socket"))
    server = make_server(host, port, app, threaded=True)
    thost, tport = proxy.start_tunnels()
    log.info("rhttp-wsgi proxy in werkzeug: worker tunnels on %s:%d, public HTTP on %s:%d",
             thost, tport, host, server.server_port)

    # Shutdown order: drain the proxy while werkzeug still serves (so the last
    # responses go out), then stop werkzeug (socketserver's shutdown() is
    # meant to be called from another thread).
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if not stop.is_set():
            log.info("received %s; draining", signal.Signals(signum).name)
            stop.set()

    def drain() -> None:
        stop.wait()
        proxy.shutdown(options.shutdown_timeout)
        server.shutdown()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    drainer = threading.Thread(target=drain, name="rhttp-drain", daemon=True)
    drainer.start()
    try:
        server.serve_forever()  # closes the listening socket when it returns
    finally:
        stop.set()
        drainer.join(options.shutdown_timeout + 10)
    ok = proxy.shutdown(0)
    log.info("stopped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
