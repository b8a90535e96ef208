"""The rhttp-wsgi proxy inside waitress: waitress serves the public side, the
tunnel listener runs in the same process.

Run it::

    RHTTP_CERT=proxy.crt RHTTP_KEY=proxy.key RHTTP_WORKERS_CA=workers-ca.crt \\
    RHTTP_TUNNEL_BIND=0.0.0.0:8443 RHTTP_PUBLIC_BIND=0.0.0.0:8080 \\
        python examples/proxy_in_waitress.py [--threads=128 ...]

Every :class:`~rhttp_wsgi.options.ProxyOptions` setting comes from its
``RHTTP_*`` environment variable (``rhttp-wsgi settings`` lists them);
``RHTTP_PUBLIC_BIND`` becomes waitress's ``listen`` unless ``--listen`` is
given.  Arguments are waitress adjustments in ``waitress-serve`` syntax.
SIGTERM or Ctrl-C drains: new requests get 503, workers get GOAWAY, forwards
in flight finish (``RHTTP_SHUTDOWN_TIMEOUT``), then waitress stops.

Waitress is one process by design, which is what the proxy needs (workers
attach to this process's in-memory registry).  The adjustments that matter,
with the defaults this script sets (:data:`WAITRESS_DEFAULTS`):

* ``threads`` (waitress default 4!) — every forward in flight holds a waitress
  thread for its whole duration; every open server-sent-events stream holds
  one for as long as it lasts.  Requests beyond it queue.  Set it to the
  concurrent requests *plus* open streams you expect.
* ``send_bytes`` — leave it alone.  Since waitress 1.3 it defaults to 1
  (deprecated since), so each chunk the forwarder yields is sent at once.  A
  larger value (waitress < 1.3 used 18000) keeps small chunks in waitress's
  output buffer until that many bytes accumulate: SSE events then stall until
  the stream ends.  This script refuses ``--send-bytes`` above 1.
* ``outbuf_high_watermark`` (waitress default 16 MiB, set here to 1 MiB) — how
  much response data waitress queues for one slow client before it blocks the
  app thread.  A lower value lets a slow public client push back on the
  worker (through HTTP/2 flow control) sooner and bounds memory per
  connection (waitress spills to a temporary file beyond ``outbuf_overflow``).
* ``channel_request_lookahead`` (waitress default 0, set here to 1) — keeps
  reading the connection while a request runs, so waitress notices a client
  that went away; the forwarder then gets ``rhttp.client_disconnected`` (from
  ``waitress.client_disconnected``) and resets the worker's stream with CANCEL
  while it is still *waiting* (for response headers or a quiet stretch of an
  SSE stream), instead of at the next failed write.  (The script also turns
  the forwarder's "client went away" error into waitress's
  ``ClientDisconnected``: one INFO line instead of a traceback.)
* ``asyncore_use_poll`` (set here to True) — waitress's loop uses ``select()``
  by default, which cannot watch file descriptors above 1023; the tunnel
  sockets share the process's descriptor table, so use ``poll()``.
* ``connection_limit`` (waitress default 100, set here to 1000) — open public
  connections (idle keep-alive ones included).

Request bodies: waitress reads each request body completely (memory, then a
temporary file beyond ``inbuf_overflow``) before it calls the app, so uploads
reach the worker only after the client finished sending them; bound them with
``max_request_body_size``.  gunicorn and werkzeug stream them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import waitress
from waitress.adjustments import Adjustments
from waitress.channel import ClientDisconnected

from rhttp_wsgi.errors import ConfigError
from rhttp_wsgi.mount import environ_probe, proxy_options_from_env, with_disconnect_probe
from rhttp_wsgi.proxy import Proxy

log = logging.getLogger("rhttp_wsgi.examples.waitress")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: Adjustments set unless given on the command line (see the module doc).
WAITRESS_DEFAULTS: dict[str, Any] = {
    "threads": 64,
    "outbuf_high_watermark": 1 << 20,
    "channel_request_lookahead": 1,
    "asyncore_use_poll": True,
    "connection_limit": 1000,
}


def waitress_settings(argv: Sequence[str], public_bind: str) -> dict[str, Any]:
    """waitress adjustments from ``waitress-serve``-style arguments plus our defaults."""
    parsed, args = Adjustments.parse_args(list(argv))
    kw: dict[str, Any] = dict(parsed)
    if kw.pop("help", False) or kw.pop("call", False) or args:
        raise SystemExit("usage: proxy_in_waitress.py [--ADJUSTMENT=VALUE ...]  (waitress-serve's"
                         " adjustments, e.g. --threads=128; no app argument)")
    if int(kw.get("send_bytes", 1)) > 1:
        raise SystemExit("--send-bytes above 1 buffers small writes: server-sent events would stall")
    if not any(k in kw for k in ("listen", "host", "port", "unix_socket", "sockets")):
        kw["listen"] = public_bind
    for name, value in WAITRESS_DEFAULTS.items():
        kw.setdefault(name, value)
    return kw


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("RHTTP_LOG_LEVEL", "info").upper(),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        options = proxy_options_from_env()
        settings = waitress_settings(sys.argv[1:] if argv is None else argv, options.public_bind)
        proxy = Proxy(options)
    except ConfigError as e:  # one line naming the option, like `rhttp-wsgi proxy`
        raise SystemExit(f"proxy_in_waitress: error: {e}") from None
    server = waitress.create_server(with_disconnect_probe(proxy.wsgi_app, environ_probe("waitress.client_disconnected"),
                                                          ClientDisconnected), **settings)
    host, port = proxy.start_tunnels()
    log.info("rhttp-wsgi proxy in waitress: worker tunnels on %s:%d, public HTTP on %s (%s threads)",
             host, port, settings["listen"] if "listen" in settings else "configured sockets",
             settings["threads"])

    # Shutdown order: drain the proxy while waitress still runs (so the last
    # responses are flushed), then stop waitress's loop.  The drain runs on
    # its own thread; the loop can only be left from the main thread, so the
    # drainer signals it when done.
    stop = threading.Event()
    drained = threading.Event()
    main_thread = threading.main_thread()

    def on_signal(signum: int, frame: Any) -> None:
        if drained.is_set():
            raise KeyboardInterrupt  # leaves server.run() (waitress catches it)
        if not stop.is_set():
            log.info("received %s; draining", signal.Signals(signum).name)
            stop.set()

    def drain() -> None:
        stop.wait()
        proxy.shutdown(options.shutdown_timeout)
        drained.set()
        signal.pthread_kill(main_thread.ident or 0, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    drainer = threading.Thread(target=drain, name="rhttp-drain", daemon=True)
    drainer.start()
    try:
        server.run()
    finally:
        stop.set()
        drainer.join(options.shutdown_timeout + 10)
        server.close()
    ok = proxy.shutdown(0)
    log.info("stopped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
