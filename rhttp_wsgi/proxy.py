"""The proxy: accepts workers' mTLS tunnels and forwards public requests down them.

``Proxy`` ties together

* a **tunnel listener** (a threaded ``socketserver``): each connection gets
  one thread that runs the TLS handshake (client certificate required and
  verified against ``workers_ca``, TLS >= 1.2, ALPN ``h2``) within
  ``handshake_timeout``, then *is* the tunnel's reader (the tunnel starts its
  own writer thread).  The worker's preface and first SETTINGS must arrive
  within ``handshake_timeout`` too, so a silent or garbage peer holds one
  thread for a bounded time;
* a **registry** of attached workers.  A worker becomes selectable only once
  its SETTINGS arrived and the ``on_attach`` hook (if any) accepted it; it is
  removed the moment its tunnel closes (PING timeout, read error, GOAWAY and
  drained), and forwards in flight on it fail at once (502);
* the **forwarder** (:attr:`Proxy.wsgi_app`, a plain WSGI app) and an optional
  turnkey public HTTP/1.1 server (:meth:`Proxy.start_public`).

Threads and locks:

=========================  ===========================  ==========================
state                      threads                      guard
=========================  ===========================  ==========================
registry (attached list,   forwarders (acquire /        ``WorkerRegistry.cond``
per-worker counters)       release), lifecycle thread
                           (attach), tunnel threads
                           (detach)
listeners, tunnels,        listener / tunnel threads,   ``Proxy._lock``
handshaking sockets        ``shutdown()``
attach/detach hooks        the one lifecycle thread     (serialised by its queue)
=========================  ===========================  ==========================

Lock order: a tunnel's lock may be held when the registry lock is taken
(``on_ready`` runs under the tunnel lock and only enqueues), never the other
way round: the registry never calls into a tunnel while locked; it only reads
plain attributes (``accepting``, the peer's MAX_CONCURRENT_STREAMS).  Hooks run
on the lifecycle thread with no lock held, so they may call :meth:`Proxy.workers`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from h2.errors import ErrorCodes
from OpenSSL import SSL

from ._protocol import TunnelProtocol, WindowBudget
from ._tunnel import Tunnel
from .balancing import Selector, resolve_selector
from .errors import TLSSetupError
from .forwarder import Forwarder, WSGIApp
from .options import ProxyOptions, parse_address
from .public import PublicServer
from .registry import WorkerInfo, WorkerRegistry
from .server import ThreadedTCPServer
from .tls import TLSSession, public_context, reload_context, server_context

__all__ = ["Proxy", "WorkerInfo"]

log = logging.getLogger("rhttp_wsgi.proxy")

#: Grace for threads after the shutdown deadline forced everything closed.
_FORCE_GRACE = 5.0
#: After the deadline: how long public connections get to write their 502s.
_ERROR_GRACE = 1.0


AttachHook = Callable[[WorkerInfo], "bool | None"]
DetachHook = Callable[[WorkerInfo], None]
SelectorSpec = Selector | str | None


class Proxy:
    """Reverse-HTTP/2 proxy: tunnel listener, worker registry and WSGI forwarder.

    ``Proxy(cert=..., key=..., workers_ca=...)`` or ``Proxy(ProxyOptions(...))``.
    Without ``workers_ca`` it raises :class:`~rhttp_wsgi.errors.MTLSRequiredError`.

    ``selector`` picks a worker per request: ``"least-in-flight"`` (default),
    ``"round-robin"``, ``"cn:HEADER"`` (:func:`~rhttp_wsgi.balancing.by_common_name`)
    or any callable ``(environ, workers) -> worker | None`` (None -> 503).
    ``on_attach(worker)`` may return False to refuse a worker (its tunnel is
    closed with GOAWAY); it and ``on_detach(worker)`` run on one lifecycle
    thread, in order, with no lock held.
    """

    def __init__(
        self,
        options: ProxyOptions | None = None,
        *,
        selector: SelectorSpec = None,
        on_attach: AttachHook | None = None,
        on_detach: DetachHook | None = None,
        **kwargs: Any,
    ) -> None:
        if options is None:
            options = ProxyOptions(**kwargs)
        elif kwargs:
            raise TypeError("pass either options= or keyword options, not both")
        options.check_files()
        self.options = options
        # Both replaced whole by reload_certificates(); see there for who reads them when.
        self._tls_ctx, self._public_ctx = self._build_contexts()
        self._reload_lock = threading.Lock()
        self.selector: Selector = resolve_selector(selector if selector is not None else options.selector)
        self.on_attach = on_attach
        self.on_detach = on_detach
        self._registry = WorkerRegistry(self.selector, options.stream_wait, options.attach_wait)
        #: The forwarder itself (``wsgi_app`` may be wrapped, e.g. by metrics): closed by shutdown().
        self._forwarder = Forwarder(self._registry, options)
        self.wsgi_app: WSGIApp = self._forwarder
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        #: What all tunnels' connection windows may grow beyond their start, together (max_window_growth).
        self._window_budget = WindowBudget(options.max_window_growth)
        self._listeners: list[ThreadedTCPServer] = []
        self._publics: list[PublicServer] = []
        self._threads: list[threading.Thread] = []
        self._tunnels: set[Tunnel] = set()
        self._handshaking: set[socket.socket] = set()
        self._closed = False
        self._shutdown_done = threading.Event()
        self._shutdown_ok = True
        self._events: queue.Queue[tuple[str, WorkerInfo] | None] = queue.Queue()
        self._lifecycle: threading.Thread | None = None

    # -- tunnel side -----------------------------------------------------------------

    def _new_listener(self, addr: str | None, sock: socket.socket | None) -> ThreadedTCPServer:
        with self._lock:
            if self._closed:
                raise RuntimeError("the proxy was shut down")
        if sock is None:
            host, port = parse_address(addr or self.options.tunnel_bind, option="tunnel_bind")
            server = ThreadedTCPServer((host, port), self._handle_tunnel, name="rhttp-tunnel")
        else:
            server = ThreadedTCPServer(None, self._handle_tunnel, name="rhttp-tunnel", sock=sock)
        with self._lock:
            closed = self._closed
            if not closed:
                self._listeners.append(server)
                self._ensure_lifecycle_locked()
        if closed:
            server.server_close()
            raise RuntimeError("the proxy was shut down")
        log.info("accepting worker tunnels on %s:%d (mTLS, ALPN h2)", *server.bound)
        return server

    def start_tunnels(self, addr: str | None = None) -> tuple[str, int]:
        """Bind ``addr`` (default ``options.tunnel_bind``) and accept tunnels in the background."""
        server = self._new_listener(addr, None)
        t = threading.Thread(target=server.serve, name="rhttp-tunnel-listener", daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()
        return server.bound

    def serve_tunnels(self, addr: str | None = None) -> None:
        """Bind ``addr`` and accept tunnels in this thread until :meth:`shutdown`."""
        self._new_listener(addr, None).serve()

    def serve_tunnel_listener(self, sock: socket.socket) -> None:
        """Accept tunnels on a bound, listening socket in this thread until :meth:`shutdown`."""
        self._new_listener(None, sock).serve()

    def _ensure_lifecycle_locked(self) -> None:
        if self._lifecycle is None:
            self._lifecycle = threading.Thread(target=self._lifecycle_loop, name="rhttp-proxy-lifecycle",
                                               daemon=True)
            self._lifecycle.start()

    def _handle_tunnel(self, sock: socket.socket, addr: Any) -> None:  # tunnel thread
        o = self.options
        with self._lock:
            if self._closed:
                return
            self._handshaking.add(sock)
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover
                pass
            # self._tls_ctx read once: a reload swaps the reference, this handshake keeps the one it got
            session = TLSSession(self._tls_ctx, server_side=True)
            session.handshake(sock, o.handshake_timeout)
            cert = session.peer_certificate()
            if cert is None:  # pragma: no cover - VERIFY_FAIL_IF_NO_PEER_CERT prevents it
                raise TLSSetupError("no client certificate")
        except (TLSSetupError, OSError) as e:
            # ERROR when a certificate was refused (a worker or this proxy is misconfigured and
            # will fail the same way until a file changes); INFO for scanners, plain HTTP, timeouts.
            level = logging.ERROR if isinstance(e, TLSSetupError) and not e.retryable else logging.INFO
            log.log(level, "tunnel from %s rejected: %s", _fmt_addr(addr), e)
            return
        finally:
            with self._lock:
                self._handshaking.discard(sock)
        worker = WorkerInfo(next(self._seq), cert, tuple(addr) if isinstance(addr, tuple) else (addr,),
                            tls_version=session.protocol_version())
        tunnel = Tunnel(
            sock, session, TunnelProtocol("client", o, self._window_budget), o,
            name=f"worker-{worker.id}",
            on_ready=lambda t: self._events.put(("attach", worker)),
        )
        worker.tunnel = tunnel
        with self._lock:
            if self._closed:
                return
            self._tunnels.add(tunnel)
        log.debug("tunnel from %s (CN=%s): TLS done, waiting for the worker's SETTINGS",
                  _fmt_addr(addr), worker.common_name)
        reason = "closed"
        try:
            reason = tunnel.run()
        finally:
            with self._lock:
                self._tunnels.discard(tunnel)
            if self._registry.detach(worker):
                log.info("worker %s (CN=%s, %s) detached: %s", worker.id, worker.common_name,
                         _fmt_addr(addr), reason)
                self._events.put(("detach", worker))
            else:
                log.info("tunnel from %s (CN=%s) closed before attaching: %s", _fmt_addr(addr),
                         worker.common_name, reason)

    def _lifecycle_loop(self) -> None:  # lifecycle thread
        while True:
            item = self._events.get()
            if item is None:
                return
            kind, worker = item
            if kind == "attach":
                self._attach(worker)
            elif self.on_detach is not None:
                try:
                    self.on_detach(worker)
                except Exception:
                    log.exception("on_detach hook failed for worker %s", worker.id)

    def _attach(self, worker: WorkerInfo) -> None:
        if not worker.pending:
            return
        if self.on_attach is not None:
            try:
                verdict = self.on_attach(worker)
            except Exception:
                log.exception("on_attach hook failed for worker %s (CN=%s); refusing it", worker.id,
                              worker.common_name)
                verdict = False
            if verdict is False:
                log.warning("worker %s (CN=%s, %s) refused by the on_attach hook", worker.id,
                            worker.common_name, _fmt_addr(worker.remote_addr))
                # The identity does not meet local policy: GOAWAY with an
                # error code (not NO_ERROR) so the worker's log says why.
                worker.tunnel.close("refused by the on_attach hook", code=ErrorCodes.INADEQUATE_SECURITY)
                return
        if self._registry.attach(worker):
            log.info("worker %s attached: CN=%s from %s (%s, max %d streams)", worker.id, worker.common_name,
                     _fmt_addr(worker.remote_addr), worker.tls_version, worker.max_concurrent_streams)

    # -- public side --------------------------------------------------------------------

    def start_public(self, addr: str | None = None) -> tuple[str, int]:
        """Run the turnkey HTTP/1.1 server (TLS when ``public_cert`` is set) in the background."""
        o = self.options
        with self._lock:
            if self._closed:
                raise RuntimeError("the proxy was shut down")
        host, port = parse_address(addr or o.public_bind, option="public_bind")
        # (the forwarder's access log: the requests the server refuses itself get their lines there)
        server = PublicServer(self.wsgi_app, (host, port), options=o, ssl_context=self._public_ctx,
                              access_log=self._forwarder.access)
        with self._lock:
            closed = self._closed
            if not closed:
                # a reload that ran since the read above: give this server the newest context
                server.ssl_context = self._public_ctx
                self._publics.append(server)
        if closed:
            server.shutdown(0)
            raise RuntimeError("the proxy was shut down")
        return server.start()

    # -- certificates --------------------------------------------------------------------

    def _build_contexts(self) -> tuple[SSL.Context, ssl.SSLContext | None]:
        o = self.options
        tunnel = server_context(o.cert or "", o.key or "", o.workers_ca or "")
        public = None
        if o.public_cert is not None and o.public_key is not None:
            public = public_context(o.public_cert, o.public_key)
        return tunnel, public

    def reload_certificates(self) -> bool:
        """Re-read ``cert``, ``key``, ``workers_ca`` (and ``public_cert``/``public_key``) from their files.

        Handshakes that start afterwards, on the tunnel port and on the public
        HTTPS port, use the new files; tunnels already attached, public
        connections already open and every request in flight keep the sessions
        they negotiated.  All or nothing: when any file cannot be used (missing,
        unparsable, a key that does not match its certificate) nothing changes,
        one ERROR line names the file, and False is returned.  The new files
        pass the checks of a start (:meth:`ProxyOptions.check_files`): an
        expired certificate or one meant for clients is refused here too.

        Thread safety: callable from any thread (SIGHUP runs it on the main
        thread).  The new contexts are built whole, off to the side, then
        swapped in by plain reference stores: a tunnel handshake reads
        ``_tls_ctx`` once when it creates its session, a public connection
        reads its server's ``ssl_context`` once when it wraps its socket, so
        each handshake sees one complete context, old or new.  The public
        servers' references are swapped under ``_lock``, the lock
        :meth:`start_public` registers a new server under, so a server started
        during a reload also ends with the new context.  Concurrent reloads are
        serialised by ``_reload_lock``.
        """

        def install(built: tuple[SSL.Context, ssl.SSLContext | None]) -> None:
            self._tls_ctx, public = built
            with self._lock:
                self._public_ctx = public
                for p in self._publics:
                    p.ssl_context = public

        def build() -> tuple[SSL.Context, ssl.SSLContext | None]:
            self.options.check_files()  # the startup checks (expiry, key usage, key match), on the new files
            return self._build_contexts()

        with self._reload_lock:
            return reload_context(build, install, what="proxy", certs=(self.options.cert, self.options.public_cert))

    # -- introspection ---------------------------------------------------------------------

    def workers(self) -> list[WorkerInfo]:
        """Frozen snapshots of the attached workers, in attach order."""
        return self._registry.snapshot()

    def websocket_stats(self) -> dict[str, int]:
        """Public WebSockets relayed (:mod:`rhttp_wsgi.upgrade`): ``open`` now, ``total`` opened, and the
        bytes relayed ``bytes_up`` (client to worker) and ``bytes_down`` (worker to client)."""
        return self._forwarder.websockets.snapshot()

    def wait_for_workers(self, n: int = 1, timeout: float | None = None) -> bool:
        """Block until at least ``n`` workers are attached (selectable); False on timeout."""
        return self._registry.wait_for(n, timeout)

    @property
    def shutting_down(self) -> bool:
        """True once :meth:`shutdown` has begun (and after): no new tunnels or connections, workers drained."""
        with self._lock:
            return self._closed

    @property
    def tunnel_addresses(self) -> list[tuple[str, int]]:
        with self._lock:
            return [s.bound for s in self._listeners]

    @property
    def public_addresses(self) -> list[tuple[str, int]]:
        with self._lock:
            return [p.address for p in self._publics]

    # -- lifecycle ---------------------------------------------------------------------------

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop both listeners, GOAWAY every worker, let in-flight forwards finish, close.

        Order: stop accepting (tunnels and public), close idle public
        connections, let the public requests already read finish (workers
        still attached, so none of them gets 503), then close the registry and
        GOAWAY every worker, and wait for the tunnels to drain.

        ``timeout`` defaults to ``options.shutdown_timeout``.  Idempotent (a
        second call waits for the first).  Returns True when everything
        finished before the deadline.
        """
        if timeout is None:
            timeout = self.options.shutdown_timeout
        with self._lock:
            first = not self._closed
            self._closed = True
        if not first:
            self._shutdown_done.wait(timeout)
            return self._shutdown_ok
        deadline = time.monotonic() + timeout

        def remaining() -> float:
            return max(0.0, deadline - time.monotonic())

        log.info("proxy shutting down (%.3gs to drain)", timeout)
        with self._lock:
            listeners = list(self._listeners)
            publics = list(self._publics)
            handshaking = list(self._handshaking)
        # 1. no new tunnels; abort handshakes in progress
        for server in listeners:
            server.stop_accepting()
        for sock in handshaking:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        # 2. no new public connections; idle keep-alive connections closed
        for p in publics:
            p.stop_accepting()
        # 3. Let the public requests already read finish *before* the
        # registry closes and the workers get GOAWAY: a request that reached
        # this proxy just as it stopped (read before its connection could be
        # closed as idle) is still forwarded, not answered 503.  Busy
        # connections close after their response (the server is stopping).
        ok = True
        for p in publics:
            ok = p.wait(remaining()) and ok
        # 4. no new forwards (503); in-flight ones continue
        self._registry.close()
        # 5. GOAWAY to every worker; each tunnel closes once its streams are done
        with self._lock:
            tunnels = list(self._tunnels)
        for t in tunnels:
            t.drain()
        for server in listeners:
            ok = server.join_threads(remaining()) and ok
        if not ok:
            # Fail the forwards still in flight (their clients get 502, or a
            # visibly truncated response), then close what is left.
            log.warning("shutdown deadline reached; closing tunnels with forwards in flight")
            with self._lock:
                tunnels = list(self._tunnels)
            for t in tunnels:
                t.close("proxy shutdown deadline")
            for server in listeners:
                server.join_threads(_FORCE_GRACE)
            for p in publics:
                p.wait(_ERROR_GRACE)
        for p in publics:
            p.shutdown(0.0 if not ok else _FORCE_GRACE)
        self._events.put(None)
        with self._lock:
            threads = list(self._threads)
            lifecycle = self._lifecycle
        if lifecycle is not None:
            lifecycle.join(_FORCE_GRACE)
        for th in threads:
            th.join(_FORCE_GRACE)
        self._forwarder.close()  # the last access lines
        self._shutdown_ok = ok
        self._shutdown_done.set()
        log.info("proxy stopped (%s)", "drained" if ok else "deadline reached")
        return ok

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()


def _fmt_addr(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)

