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
registry (attached list,   forwarders (acquire /        ``_Registry.cond``
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
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from cryptography import x509
from h2.errors import ErrorCodes

from ._protocol import ProtocolSettings, TunnelProtocol
from ._tunnel import Tunnel
from .balancing import Selector, resolve_selector
from .errors import NoWorkerAvailable, TLSSetupError, UpstreamError
from .forwarder import Forwarder, WSGIApp
from .options import ProxyOptions, parse_address
from .public import PublicServer, ThreadedTCPServer
from .tls import TLSSession, peer_common_name, server_context

__all__ = ["Proxy", "WorkerInfo"]

log = logging.getLogger("rhttp_wsgi.proxy")

#: h2's "no limit" default is 2**32+1; treat anything above this as unlimited.
_UNLIMITED = 2**31 - 1
#: Grace for threads after the shutdown deadline forced everything closed.
_FORCE_GRACE = 5.0
#: After the deadline: how long public connections get to write their 502s.
_ERROR_GRACE = 1.0


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[str] = []
    for name in ext:
        value = name.value
        out.append(value if isinstance(value, str) else str(value))
    return out


class WorkerInfo:
    """One attached worker tunnel: its verified identity and live counters.

    The objects a selector and the hooks receive are live (``in_flight``,
    ``total`` and ``max_concurrent_streams`` change); :meth:`Proxy.workers`
    returns frozen copies (:meth:`snapshot`).  Identity attributes never change:
    ``id``, ``certificate`` (a ``cryptography`` certificate, verified against
    the workers' CA), ``common_name``, ``sans``, ``remote_addr``, ``attached_at``
    (``time.time()`` of the TLS handshake).
    """

    __slots__ = (
        "_mcs",
        "_state",
        "attached_at",
        "certificate",
        "common_name",
        "id",
        "in_flight",
        "remote_addr",
        "sans",
        "seq",
        "tls_version",
        "total",
        "tunnel",
    )

    def __init__(self, seq: int, certificate: x509.Certificate, remote_addr: tuple[Any, ...],
                 tunnel: Tunnel | None = None, tls_version: str = "") -> None:
        self.seq = seq
        self.id = f"w{seq}"
        self.certificate = certificate
        self.common_name: str | None = peer_common_name(certificate)
        self.sans: list[str] = _sans(certificate)
        self.remote_addr = remote_addr
        self.attached_at = time.time()
        self.in_flight = 0
        self.total = 0
        self.tunnel: Tunnel = tunnel  # type: ignore[assignment]  # set right after construction
        self._state = "pending"  # -> attached -> detached (registry lock)
        self._mcs = 0
        self.tls_version = tls_version

    @property
    def max_concurrent_streams(self) -> int:
        """The worker's SETTINGS_MAX_CONCURRENT_STREAMS (live while attached)."""
        if self._state == "snapshot" or self.tunnel is None:
            return self._mcs
        # Read without the tunnel lock (see the module doc): a plain int read of
        # h2's settings, at worst one SETTINGS frame stale.
        return min(self.tunnel.proto.peer_max_concurrent_streams(), _UNLIMITED)

    @property
    def attached(self) -> bool:
        return self._state in ("attached", "snapshot")

    @property
    def draining(self) -> bool:
        """The tunnel is closing or got/sent GOAWAY: it takes no new requests."""
        if self._state == "snapshot" or self.tunnel is None:
            return False
        return not self.tunnel.accepting

    @property
    def selectable(self) -> bool:
        return self._state == "attached" and self.tunnel is not None and self.tunnel.accepting

    def snapshot(self) -> WorkerInfo:
        copy = WorkerInfo.__new__(WorkerInfo)
        for name in WorkerInfo.__slots__:
            setattr(copy, name, getattr(self, name))
        copy.sans = list(self.sans)
        copy._mcs = self.max_concurrent_streams
        copy._state = "snapshot"
        return copy

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (for admin / monitoring endpoints)."""
        return {
            "id": self.id,
            "common_name": self.common_name,
            "sans": list(self.sans),
            "remote_addr": list(self.remote_addr[:2]),
            "in_flight": self.in_flight,
            "total": self.total,
            "attached_at": self.attached_at,
            "max_concurrent_streams": self.max_concurrent_streams,
            "serial": format(self.certificate.serial_number, "x"),
        }

    def __repr__(self) -> str:
        return (f"<WorkerInfo {self.id} cn={self.common_name!r} from={self.remote_addr[:2]!r}"
                f" in_flight={self.in_flight} total={self.total}>")


class _Registry:
    """Attached workers; reservation of stream slots for forwards."""

    def __init__(self, selector: Selector, stream_wait: float, attach_wait: float = 0.0) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.selector = selector
        self.stream_wait = stream_wait
        self.attach_wait = attach_wait
        self.attached: list[WorkerInfo] = []
        self.closed = False

    # -- forwarders (server threads) ---------------------------------------------

    def acquire(self, environ: Mapping[str, Any], avoid: Sequence[WorkerInfo]) -> WorkerInfo:
        """Pick a worker with a free stream slot and reserve it.

        Waits up to ``stream_wait`` while every eligible worker is full, and up
        to ``attach_wait`` while no worker is attached at all.
        """
        deadline: float | None = None
        attach_deadline: float | None = None
        with self.cond:
            while True:
                if self.closed:
                    raise NoWorkerAvailable("the proxy is shutting down")
                live = [w for w in self.attached if w.selectable]
                if avoid:
                    fresh = [w for w in live if all(w is not a and w.id != a.id for a in avoid)]
                    if fresh:
                        live = fresh
                if not live:
                    # Tunnels come and go (a proxy restart, a worker replacing a
                    # lost tunnel): optionally wait for one to attach.
                    now = time.monotonic()
                    if attach_deadline is None:
                        attach_deadline = now + self.attach_wait
                    if now >= attach_deadline:
                        raise NoWorkerAvailable("no worker is attached")
                    self.cond.wait(attach_deadline - now)
                    continue
                free = [w for w in live if w.in_flight < w.max_concurrent_streams]
                if free:
                    try:
                        chosen = self.selector(environ, free)
                    except Exception as e:
                        log.exception("the worker selector failed")
                        raise UpstreamError(f"the worker selector failed: {e}", status=500) from e
                    if chosen is not None:
                        picked = next((w for w in free if w is chosen or w.id == chosen.id), None)
                        if picked is not None:
                            picked.in_flight += 1
                            picked.total += 1
                            return picked
                        if not any(w is chosen or w.id == chosen.id for w in live):
                            raise NoWorkerAvailable(
                                f"the selector chose a worker that is not attached ({chosen!r})")
                    elif len(free) == len(live):
                        raise NoWorkerAvailable("the selector chose no worker")
                # Some worker is at its stream limit: wait for a slot.
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.stream_wait
                if now >= deadline:
                    raise NoWorkerAvailable(
                        f"every eligible worker is at its stream limit (waited {self.stream_wait:g}s)")
                self.cond.wait(deadline - now)

    def release(self, worker: WorkerInfo) -> None:
        with self.cond:
            worker.in_flight -= 1
            self.cond.notify_all()

    # -- lifecycle -------------------------------------------------------------------

    def attach(self, worker: WorkerInfo) -> bool:
        with self.cond:
            if worker._state != "pending" or self.closed or worker.tunnel.closing:
                return False
            worker._state = "attached"
            self.attached.append(worker)
            self.cond.notify_all()
            return True

    def detach(self, worker: WorkerInfo) -> bool:
        """Returns True if the worker had been attached."""
        with self.cond:
            was = worker._state == "attached"
            worker._state = "detached"
            if worker in self.attached:
                self.attached.remove(worker)
            self.cond.notify_all()
            return was

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float | None) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.attached) >= n, timeout)

    def snapshot(self) -> list[WorkerInfo]:
        with self.cond:
            return [w.snapshot() for w in self.attached]


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
        self._tls_ctx = server_context(options.cert or "", options.key or "", options.workers_ca or "")
        self.selector: Selector = resolve_selector(selector if selector is not None else options.selector)
        self.on_attach = on_attach
        self.on_detach = on_detach
        self._registry = _Registry(self.selector, options.stream_wait, options.attach_wait)
        self.wsgi_app: WSGIApp = Forwarder(self._registry, options)
        self._settings = ProtocolSettings.from_options(options)
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
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
            session = TLSSession(self._tls_ctx, server_side=True)
            session.handshake(sock, o.handshake_timeout)
            cert = session.peer_certificate()
            if cert is None:  # pragma: no cover - VERIFY_FAIL_IF_NO_PEER_CERT prevents it
                raise TLSSetupError("no client certificate")
        except (TLSSetupError, OSError) as e:
            log.info("tunnel from %s rejected: %s", _fmt_addr(addr), e)
            return
        finally:
            with self._lock:
                self._handshaking.discard(sock)
        worker = WorkerInfo(next(self._seq), cert, tuple(addr) if isinstance(addr, tuple) else (addr,),
                            tls_version=session.protocol_version())
        tunnel = Tunnel(
            sock, session, TunnelProtocol("client", self._settings),
            name=f"worker-{worker.id}",
            on_ready=lambda t: self._events.put(("attach", worker)),
            settings_timeout=o.handshake_timeout,
            send_timeout=max(o.ping_timeout, 1.0),
            peer=worker,
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
        if worker._state != "pending" or worker.tunnel.closing:
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
        ctx = None
        if o.public_cert is not None and o.public_key is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(o.public_cert, o.public_key)
            ctx.set_alpn_protocols(["http/1.1"])
        server = PublicServer(self.wsgi_app, (host, port), ssl_context=ctx, header_timeout=o.header_timeout,
                              idle_timeout=o.idle_timeout, body_timeout=o.body_timeout,
                              body_min_rate=o.body_min_rate, max_head=o.max_request_head,
                              max_body=o.max_request_body, max_connections=o.max_connections)
        with self._lock:
            closed = self._closed
            if not closed:
                self._publics.append(server)
        if closed:
            server.shutdown(0)
            raise RuntimeError("the proxy was shut down")
        return server.start()

    # -- introspection ---------------------------------------------------------------------

    def workers(self) -> list[WorkerInfo]:
        """Frozen snapshots of the attached workers, in attach order."""
        return self._registry.snapshot()

    def wait_for_workers(self, n: int = 1, timeout: float | None = None) -> bool:
        """Block until at least ``n`` workers are attached (selectable); False on timeout."""
        return self._registry.wait_for(n, timeout)

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

