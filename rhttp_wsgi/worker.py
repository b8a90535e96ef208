"""The worker pool: keeps N tunnels to the proxy and serves a WSGI app on them.

Threads: each slot has one thread that dials, handshakes and then *is* the
tunnel's reader; the tunnel starts its own writer thread.  Each tunnel's
:class:`~rhttp_wsgi.streams.StreamPolicy` decides what a new stream becomes and
runs its handler (the app, for a request) on the shared
:class:`~rhttp_wsgi._pool.AppThreadPool`.  Pool-level state (slots,
flags) is guarded by ``WorkerPool._lock``; nothing here holds it across I/O.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import h2.events
from cryptography import x509
from h2.errors import ErrorCodes
from OpenSSL import SSL

from ._pool import AppThreadPool
from ._protocol import TunnelProtocol
from ._signals import stop_signals
from ._tunnel import Tunnel
from .accesslog import AccessLog, TunnelIdentity
from .errors import ConfigError, TLSSetupError
from .options import WorkerOptions
from .streams import StreamPolicy
from .tls import TLSSession, client_context, peer_common_name, reload_context
from .wsgi import WSGIApp, WSGIContext

__all__ = ["TunnelInfo", "WorkerPool"]

log = logging.getLogger("rhttp_wsgi.worker")

#: After a healthy tunnel closes, reconnect within this (jittered) delay.
REPLACE_JITTER = 0.05
#: A tunnel that dies this soon after its handshake, again, counts as a failure (backoff).
FLAP_SECONDS = 1.0


@dataclass
class TunnelInfo:
    """A snapshot of one slot, for monitoring."""

    slot: int
    connected: bool
    in_flight: int
    streams_total: int
    reconnects: int
    last_error: str | None
    #: App calls still running although their stream ended (reset or timed
    #: out under a stuck app): threads that only the app itself can free.
    lingering: int = 0


@dataclass
class _Slot:
    index: int
    generation: int = 0
    tunnel: Tunnel | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    failures: int = 0
    short_lived: int = 0
    reconnects: int = 0
    last_error: str | None = None
    threads: list[threading.Thread] = field(default_factory=list)


class WorkerPool:
    """Serve ``app`` through ``connections`` reverse-HTTP/2 tunnels to ``proxy``.

    ``WorkerPool(app, proxy="proxy.example:8443", cert="w.crt", key="w.key", ca="ca.crt")``
    or ``WorkerPool(options=WorkerOptions(...))``.  Raises
    :class:`~rhttp_wsgi.errors.MTLSRequiredError` without a client certificate,
    and :class:`~rhttp_wsgi.errors.ConfigError` for any invalid option.
    """

    def __init__(
        self,
        app: WSGIApp | None = None,
        *,
        options: WorkerOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        **kwargs: Any,
    ) -> None:
        if options is None:
            options = WorkerOptions(app=app, **kwargs)
        elif kwargs or (app is not None and options.app is not None):
            raise TypeError("pass either options= or keyword options, not both")
        elif app is not None:
            options = _replace(options, app=app)
        if options.app is None:
            raise ConfigError("app", "a WSGI application is required")
        options.check_files()
        self.options = options
        self.app: WSGIApp = options.app
        #: Replaced whole by :meth:`reload_certificates`; each dial reads it once.
        self._ctx = client_context(options.cert or "", options.key or "", options.ca)
        self._reload_lock = threading.Lock()
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._draining = threading.Event()
        self._started = False
        self._shutdown_done = threading.Event()
        self._shutdown_started = False
        #: Set by the first tunnel that comes up (see has_connected); logs "ready" once.
        self._connected = threading.Event()
        self._first_ready_lock = threading.Lock()
        self._shutdown_result = True
        self._pool = AppThreadPool(options.threads)
        #: None when the access log is off (options.access_log).
        self._access = AccessLog.from_options(options, "worker")
        self._slots = [_Slot(i) for i in range(options.connections)]
        #: Set by process managers (the gunicorn worker) when siblings serve the same app.
        self.multiprocess = False
        self._retiring: list[Tunnel] = []

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> WorkerPool:
        with self._lock:
            if self._started:
                return self
            if self._shutdown_started:
                raise RuntimeError("the pool was shut down")
            self._started = True
            for slot in self._slots:
                self._spawn_slot_locked(slot)
        return self

    def _spawn_slot_locked(self, slot: _Slot) -> None:
        slot.generation += 1
        t = threading.Thread(target=self._run_slot, args=(slot, slot.generation),
                             name=f"rhttp-tunnel-{slot.index}", daemon=True)
        slot.threads = [x for x in slot.threads if x.is_alive()] + [t]
        t.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once every tunnel has completed one handshake (proxy SETTINGS received)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for slot in self._slots:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not slot.ready.wait(remaining):
                return False
        return True

    def shutdown(self, timeout: float | None = 30.0) -> bool:
        """GOAWAY every tunnel, let in-flight requests finish within ``timeout``, then close.

        Idempotent; returns True when everything drained in time.
        """
        with self._lock:
            first = not self._shutdown_started
            self._shutdown_started = True
        if not first:
            self._shutdown_done.wait(timeout)
            return self._shutdown_result
        deadline = None if timeout is None else time.monotonic() + timeout
        self._stopping.set()
        self._draining.set()
        for t in self._live_tunnels():
            t.drain()
        ok = True
        for slot in self._slots:
            for th in list(slot.threads):
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                th.join(remaining)
                if th.is_alive():
                    ok = False
        if not ok:
            log.warning("shutdown deadline reached; closing tunnels with requests in flight")
            for t in self._live_tunnels():
                t.close("shutdown deadline")
            for slot in self._slots:
                for th in list(slot.threads):
                    th.join(5.0)
        remaining = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        ok = self._pool.shutdown(remaining if ok else 0.0) and ok
        if self._access is not None:
            self._access.close()  # the last access lines
        self._shutdown_result = ok
        self._shutdown_done.set()
        log.info("worker pool stopped (%s)", "drained" if ok else "deadline reached")
        return ok

    def serve_forever(self, timeout: float | None = None) -> bool:
        """Start, serve until SIGTERM/SIGINT, then drain within ``timeout`` (default: shutdown_timeout).

        SIGHUP meanwhile reloads the certificates (:meth:`reload_certificates`).
        Also returns when another thread calls :meth:`shutdown` (it sets ``_stopping``).
        """
        # Handlers first: the "ready" line may be logged as soon as start() returns.
        with stop_signals(self._stopping, reload=self.reload_certificates) as stop:
            self.start()
            stop.wait()
        return self.shutdown(self.options.shutdown_timeout if timeout is None else timeout)

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown(self.options.shutdown_timeout)

    def reload_certificates(self) -> bool:
        """Re-read ``cert``, ``key`` and ``ca`` from their files; tunnels dialled from now on use them.

        Tunnels already up, and their requests, keep the session they
        negotiated; to move every tunnel to the new certificate, let them be
        replaced (a proxy restart or drain does it).  On failure (a missing
        file, a key that does not match the certificate) the previous context
        stays, one ERROR line names the file, and False is returned.  The new
        files pass the checks of a start (:meth:`WorkerOptions.check_files`):
        an expired certificate or one meant for servers is refused here too.

        Thread safety: callable from any thread (SIGHUP runs it on the main
        thread).  The new context is built whole, then swapped in by one
        attribute store; a dial reads the attribute once (:meth:`_dial`), so a
        handshake sees the old context or the new one, never a mixture, and a
        session keeps the context it was made from.  Concurrent reloads are
        serialised by ``_reload_lock`` (held by nothing else).
        """
        o = self.options

        def build() -> SSL.Context:
            o.check_files()  # the startup checks (expiry, key usage, key match), on the new files
            return client_context(o.cert or "", o.key or "", o.ca)

        def install(ctx: SSL.Context) -> None:
            self._ctx = ctx

        with self._reload_lock:
            return reload_context(build, install, what="worker", certs=(o.cert,))

    # -- introspection -----------------------------------------------------------

    def _live_tunnels(self) -> list[Tunnel]:
        out = []
        with self._lock:
            for slot in self._slots:
                if slot.tunnel is not None:
                    out.append(slot.tunnel)
            out.extend(self._retiring)
        return out

    def tunnels(self) -> list[TunnelInfo]:
        with self._lock:
            return [
                TunnelInfo(
                    slot=s.index,
                    connected=s.tunnel is not None and s.tunnel.accepting,
                    in_flight=s.tunnel.in_flight if s.tunnel is not None else 0,
                    streams_total=s.tunnel.streams_total if s.tunnel is not None else 0,
                    reconnects=s.reconnects,
                    last_error=s.last_error,
                    lingering=s.tunnel.lingering if s.tunnel is not None else 0,
                )
                for s in self._slots
            ]

    # -- slot threads -------------------------------------------------------------

    def _backoff(self, failures: int) -> float:
        o = self.options
        cap = min(o.reconnect_max, o.reconnect_min * (2 ** min(failures - 1, 20)))
        # "equal jitter": never less than half the step, spread over the rest
        return float(cap / 2 + self._rng() * cap / 2)

    def _run_slot(self, slot: _Slot, generation: int) -> None:
        o = self.options
        host, port = o.proxy_host, o.proxy_port
        name = f"tunnel-{slot.index}"
        while not self._stopping.is_set() and slot.generation == generation:
            try:
                sock, session = self._dial(host, port)
            except (OSError, TLSSetupError) as e:
                slot.failures += 1
                slot.last_error = str(e)
                delay = self._backoff(slot.failures)
                self._log_failure(name, f"cannot connect to {o.proxy}: {e}", e, delay)
                self._stopping.wait(delay)
                continue
            peer = sock.getpeername()
            # REMOTE_PORT: never the tunnel's port (it is not the client's); REMOTE_ADDR is the proxy's
            # unless the request's X-Forwarded-For names the client (forwarded_for).
            ctx = WSGIContext(self.app, url_scheme=o.url_scheme, remote_addr=str(peer[0]),
                              remote_port=None, peer_certificate=session.peer_certificate(),
                              draining=self._draining, server_name=o.proxy_host, body_timeout=o.body_timeout,
                              body_min_rate=o.body_min_rate, multiprocess=self.multiprocess,
                              forwarded_for=1 + o.forwarded_for_hops if o.forwarded_for else 0,
                              access_log=self._access, identity=self._identity(name, sock))
            tunnel = Tunnel(
                sock, session, TunnelProtocol("server", o), o,
                name=name,
                streams=StreamPolicy(o, ctx, self._pool.submit),
                on_ready=lambda t: self._on_ready(slot, t),
                on_goaway=lambda t, ev: self._on_goaway(slot, generation, t, ev),
                clock=self._clock,
            )
            with self._lock:
                if self._stopping.is_set() or slot.generation != generation:
                    sock.close()
                    return
                slot.tunnel = tunnel
            reason = tunnel.run()
            with self._lock:
                if slot.tunnel is tunnel:
                    slot.tunnel = None
                if tunnel in self._retiring:
                    self._retiring.remove(tunnel)
            healthy = tunnel.ready.is_set()
            goaway = tunnel.peer_goaway
            refused = goaway is not None and goaway.error_code != ErrorCodes.NO_ERROR
            short = healthy and self._clock() - tunnel.created < FLAP_SECONDS
            flapping = short and slot.short_lived > 0
            slot.short_lived = slot.short_lived + 1 if short else 0
            if refused or flapping:
                # The proxy turned us away (e.g. an attach hook refused our
                # certificate) or keeps dropping us right after the handshake:
                # back off like a failed dial instead of hammering it.
                slot.failures += 1
                code = getattr(goaway.error_code, "name", goaway.error_code) if goaway else None
                detail = (goaway.additional_data or b"").decode("utf-8", "replace") if goaway else ""
                slot.last_error = f"proxy sent GOAWAY({code}) {detail}".strip() if refused else reason
                delay = self._backoff(slot.failures)
                log.warning("%s: %s (retry in %.2fs)", name, slot.last_error, delay)
            elif healthy:
                log.info("%s: disconnected from %s: %s", name, o.proxy, reason)
                slot.failures = 0
                slot.reconnects += 1
                # HAProxy purges idle tunnels all at once: whoever finds the pool
                # with no live tunnel redials at once; the others spread out a little.
                delay = self._rng() * REPLACE_JITTER if self._any_live_tunnel() else 0.0
            else:
                slot.failures += 1
                slot.last_error = reason
                delay = self._backoff(slot.failures)
                # A TLS 1.3 proxy refuses our certificate after our side of the
                # handshake is done: its alert ended the tunnel's first read.
                self._log_failure(name, f"handshake with {o.proxy} failed: {reason}", session.failure, delay)
            if slot.generation != generation:
                return  # a replacement thread already owns this slot
            self._stopping.wait(delay)

    def _log_failure(self, name: str, text: str, error: BaseException | None, delay: float) -> None:
        """One line per failed attempt: ERROR when only a changed certificate, key or CA can fix it."""
        if isinstance(error, TLSSetupError) and not error.retryable:
            log.error("%s: %s (retry in %.2fs; backing off up to %gs, this will fail until the files or the proxy"
                      " change)", name, text, delay, self.options.reconnect_max)
        else:
            log.warning("%s: %s (retry in %.2fs)", name, text, delay)

    def _identity(self, name: str, sock: socket.socket) -> TunnelIdentity | None:
        """How this tunnel's access lines name it: our certificate's CN (read from the file the
        handshake just used), the slot, and our end of the connection (the address the proxy logs)."""
        if self._access is None:
            return None
        cn = None
        try:
            with open(self.options.cert or "", "rb") as f:
                cn = peer_common_name(x509.load_pem_x509_certificate(f.read()))
        except (OSError, ValueError):
            pass
        return TunnelIdentity(cn, name, tuple(sock.getsockname()))

    def _any_live_tunnel(self) -> bool:
        with self._lock:
            return any(s.tunnel is not None and s.tunnel.accepting for s in self._slots)

    def _dial(self, host: str, port: int) -> tuple[socket.socket, TLSSession]:
        o = self.options
        sock = socket.create_connection((host, port), timeout=o.dial_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # self._ctx read once: a reload swaps the reference, this handshake keeps the one it got
            session = TLSSession(self._ctx, server_side=False, sni=o.sni, verify_name=o.verify_name)
            session.handshake(sock, o.handshake_timeout)
        except BaseException:
            sock.close()
            raise
        return sock, session

    def _on_ready(self, slot: _Slot, tunnel: Tunnel) -> None:
        # failures is reset when the tunnel ends healthy, not here: a proxy that
        # completes the handshake and then refuses us must still see backoff grow.
        slot.last_error = None
        log.info("%s: connected to %s (%s)", tunnel.name, self.options.proxy,
                 tunnel.tls.protocol_version() if tunnel.tls else "plaintext")
        slot.ready.set()
        with self._first_ready_lock:  # (taken under the tunnel lock; takes nothing else)
            first = not self._connected.is_set()
            self._connected.set()
        if first:
            log.info("ready: serving through the proxy at %s (first tunnel up)", self.options.proxy)

    @property
    def has_connected(self) -> bool:
        """True once a tunnel has been up (the proxy's SETTINGS received), ever: the worker was reachable."""
        return self._connected.is_set()

    def _on_goaway(self, slot: _Slot, generation: int, tunnel: Tunnel,
                   ev: h2.events.ConnectionTerminated) -> None:
        # Called with the tunnel lock held: only bookkeeping here.
        if self._stopping.is_set() or ev.error_code != ErrorCodes.NO_ERROR:
            return  # an error GOAWAY is handled as a failure, with backoff, once the tunnel closes
        with self._lock:
            if slot.generation != generation or slot.tunnel is not tunnel:
                return
            slot.tunnel = None
            self._retiring = [*self._retiring, tunnel]
            self._spawn_slot_locked(slot)


def _replace(options: WorkerOptions, **changes: Any) -> WorkerOptions:
    import dataclasses

    return dataclasses.replace(options, **changes)
