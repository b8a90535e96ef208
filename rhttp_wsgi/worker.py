"""The worker pool: keeps N tunnels to every proxy and serves a WSGI app on them.

Several proxies (``proxy`` is a list) and proxy names with several addresses:
each address is a *target* with ``connections`` slots, its own retry schedule
and health; a name is re-resolved on every reconnect, so an address that
appears gets its slots and one that disappears is dropped once its tunnels end.

Threads: each slot has one thread that dials, handshakes and then *is* the
tunnel's reader; the tunnel starts its own writer thread.  Each proxy entry
has a short-lived thread for its first name resolution.  Each tunnel's
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
from ._protocol import TunnelProtocol, WindowBudget
from ._signals import stop_signals
from ._tunnel import Tunnel
from .accesslog import AccessLog, TunnelIdentity
from .errors import ConfigError, TLSSetupError
from .options import WorkerOptions
from .streams import StreamPolicy
from .tls import TLSSession, client_context, peer_common_name, reload_context
from .websocket import WebSocketService
from .wsgi import WSGIApp, WSGIContext

__all__ = ["RetrySchedule", "TunnelInfo", "WorkerPool", "resolve_addresses"]

log = logging.getLogger("rhttp_wsgi.worker")

#: After a healthy tunnel closes, reconnect within this (jittered) delay.
REPLACE_JITTER = 0.05
#: A tunnel that dies this soon after its handshake, again, counts as a failure (backoff).
FLAP_SECONDS = 1.0
#: Longest wait of a slot for its turn before it looks at the pool's state again.
TURN_RECHECK = 1.0

#: ``(host, port) -> [(address, port), ...]``: how a proxy name becomes addresses (injectable for tests).
Resolver = Callable[[str, int], list[tuple[str, int]]]


def resolve_addresses(host: str, port: int) -> list[tuple[str, int]]:
    """Every TCP address of ``host`` (``getaddrinfo``), in the resolver's order, without duplicates."""
    out: list[tuple[str, int]] = []
    for _family, _type, _proto, _canon, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = (str(sockaddr[0]), int(sockaddr[1]))
        if address not in out:
            out.append(address)
    return out


class RetrySchedule:
    """When to dial one proxy address again after ``failures`` failed attempts in a row.

    "Equal jitter" on a capped exponential: step = min(cap, minimum * 2**(failures-1)), the delay
    drawn uniformly from [step/2, step], so a fleet that lost its proxy at the same instant does not
    retry in lock step.  Two caps: ``maximum`` (``reconnect_max``, low: 2 s) while the proxy cannot be
    reached, so traffic resumes at most that long after it accepts again, and ``refused_maximum``
    (``reconnect_refused_max``, 30 s) when it answered and turned us away, each attempt costing it a
    full TLS handshake.  The two streaks are counted apart: a proxy that was unreachable for a minute
    and then drops us right after a handshake (a restart in progress) starts the refused streak at
    its beginning.  The pool dials only one probe per address while it fails (see
    ``WorkerPool._await_turn``), so a fleet of N workers costs a dead proxy about N / (0.75 * cap)
    refused SYNs a second, whatever ``connections`` is.  Not thread-safe: the pool's lock guards it.
    """

    def __init__(self, minimum: float, maximum: float, refused_maximum: float, rng: Callable[[], float]) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.refused_maximum = refused_maximum
        self._rng = rng
        #: Failed attempts in a row to reach the proxy (refused, timed out, reset, TLS failed).
        self.failures = 0
        #: Times in a row the proxy answered and turned us away.
        self.refusals = 0

    def failed(self, *, refused: bool = False) -> float:
        """Count one more failure; the delay before the next attempt (seconds)."""
        if refused:
            self.refusals += 1
            streak, cap = self.refusals, self.refused_maximum
        else:
            self.failures += 1
            streak, cap = self.failures, self.maximum
        step = min(cap, self.minimum * (2 ** min(streak - 1, 20)))
        return float(step / 2 + self._rng() * step / 2)

    def reached(self) -> None:
        """A handshake completed: the proxy is reachable (whether it keeps us is another streak)."""
        self.failures = 0

    def succeeded(self) -> None:
        """A tunnel served and closed normally: both streaks end."""
        self.failures = self.refusals = 0


@dataclass
class TunnelInfo:
    """A snapshot of one slot, for monitoring: which proxy (and address) it dials, and its tunnel."""

    slot: int
    connected: bool
    in_flight: int
    streams_total: int
    reconnects: int
    last_error: str | None
    #: App calls still running although their stream ended (reset or timed
    #: out under a stuck app): threads that only the app itself can free.
    lingering: int = 0
    #: The ``proxy`` entry this slot belongs to, as configured (``proxy.example:8443``).
    proxy: str = ""
    #: The address it dials (``203.0.113.7:8443``): one of the entry's name's addresses.
    address: str = ""


@dataclass
class _Slot:
    index: int
    target: _Target
    generation: int = 0
    #: A thread runs this slot (False once its address left the DNS answer and its tunnel ended).
    active: bool = False
    tunnel: Tunnel | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    short_lived: int = 0
    reconnects: int = 0
    last_error: str | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    #: When its last tunnel ended or was replaced, or its last dial began: the next dial
    #: re-resolves the name unless a resolution started since (the first uses the entry's answer).
    lost: float = -1e18


@dataclass
class _Entry:
    """One ``proxy`` entry: a host (name or IP) and port, and the addresses it resolved to."""

    text: str
    host: str
    port: int
    targets: dict[tuple[str, int], _Target] = field(default_factory=dict)
    resolved_at: float = -1e18
    resolved: bool = False
    last_error: str | None = None


@dataclass
class _Target:
    """One proxy address and its health, shared by the slots that dial it (guarded by the pool lock).

    ``gate_open``: a tunnel to it came up since its last failure, so every slot may dial at once;
    closed by a failure, after which one slot at a time (``prober``) dials it, at ``next_dial``.
    """

    entry: _Entry
    address: tuple[str, int]
    schedule: RetrySchedule
    slots: list[_Slot] = field(default_factory=list)
    gate_open: bool = True
    next_dial: float = 0.0
    prober: _Slot | None = None
    #: The last dial or handshake failed (and no tunnel came up since).
    down: bool = False
    retired: bool = False
    last_error: str | None = None

    @property
    def label(self) -> str:
        """The address as ``host:port`` (IPv6 in brackets)."""
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def where(self) -> str:
        """The entry as configured, plus the address when the entry is a name."""
        return self.entry.text if self.entry.host == self.address[0] else f"{self.entry.text} ({self.label})"


class WorkerPool:
    """Serve ``app`` through ``connections`` reverse-HTTP/2 tunnels to ``proxy``.

    ``WorkerPool(app, proxy="proxy.example:8443", cert="w.crt", key="w.key", ca="ca.crt")``
    (``proxy`` may be a list, or a comma-separated string, of several proxies)
    or ``WorkerPool(options=WorkerOptions(...))``.  ``resolver`` turns a proxy host into its
    addresses (default :func:`resolve_addresses`; tests inject one).  Raises
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
        resolver: Resolver = resolve_addresses,
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
        self._resolver = resolver
        self._lock = threading.Lock()
        #: Bound to _lock: slots wait on it for their turn to dial; readiness waits on it too.
        self._cond = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._draining = threading.Event()
        self._started = False
        self._shutdown_done = threading.Event()
        self._shutdown_started = False
        #: Set by the first tunnel that comes up (see has_connected); logs "ready" once.
        self._connected = threading.Event()
        self._shutdown_result = True
        self._pool = AppThreadPool(options.threads)
        #: What all tunnels' connection windows may grow beyond their start, together (max_window_growth).
        self._window_budget = WindowBudget(options.max_window_growth)
        #: WebSockets' own pool and limit (max_websockets), shared by the tunnels; None when off.
        self._websockets = WebSocketService.from_options(options)
        #: None when the access log is off (options.access_log).
        self._access = AccessLog.from_options(options, "worker")
        self._entries = [_Entry(text, host, port)
                         for text, (host, port) in zip(options.proxy or (), options.proxy_addresses, strict=True)]
        #: Every slot ever made, in order (their index names them: tunnel-N).
        self._slots: list[_Slot] = []
        self._entry_threads: list[threading.Thread] = []
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
            for entry in self._entries:
                t = threading.Thread(target=self._run_entry, args=(entry,), name=f"rhttp-resolve-{entry.text}",
                                     daemon=True)
                self._entry_threads.append(t)
                t.start()
        return self

    def _spawn_slot_locked(self, slot: _Slot) -> None:
        slot.generation += 1
        slot.active = True
        t = threading.Thread(target=self._run_slot, args=(slot, slot.generation),
                             name=f"rhttp-tunnel-{slot.index}", daemon=True)
        slot.threads = [x for x in slot.threads if x.is_alive()] + [t]
        t.start()

    def wait_ready(self, timeout: float | None = None, *, every: bool | None = None) -> bool:
        """True once one proxy address has all its ``connections`` tunnels up (each completed a handshake).

        ``every`` (default: the ``wait_all_proxies`` option): also every other proxy address that
        answers, that is, every address of every entry except those whose last dial failed, and every
        entry's name resolved.  False after ``timeout`` seconds.
        """
        every = self.options.wait_all_proxies if every is None else every
        with self._cond:
            return self._cond.wait_for(lambda: self._ready_locked(every), timeout)

    def _ready_locked(self, every: bool) -> bool:
        targets = [t for e in self._entries for t in e.targets.values() if not t.retired]
        up = [all(s.ready.is_set() for s in t.slots) for t in targets]
        if not any(up):
            return False
        if not every:
            return True
        return all(e.resolved for e in self._entries) and all(u or t.down for t, u in zip(targets, up, strict=True))

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
        with self._cond:
            self._cond.notify_all()  # slots waiting for their turn to dial
        for t in self._live_tunnels():
            t.drain()
        if self._websockets is not None:
            self._websockets.drain()  # (open WebSockets would otherwise hold the drain to its deadline)
        ok = True
        for th in self._entry_threads:
            th.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._lock:
            slots = list(self._slots)  # an entry thread may have added some before it saw the stop
        for slot in slots:
            for th in list(slot.threads):
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                th.join(remaining)
                if th.is_alive():
                    ok = False
        if not ok:
            log.warning("shutdown deadline reached; closing tunnels with requests in flight")
            for t in self._live_tunnels():
                t.close("shutdown deadline")
            for slot in slots:
                for th in list(slot.threads):
                    th.join(5.0)
        remaining = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        ok = self._pool.shutdown(remaining if ok else 0.0) and ok
        if self._websockets is not None:
            ok = self._websockets.shutdown(remaining if ok else 0.0) and ok
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
        """One row per slot, in slot order: the slots of every address of every proxy."""
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
                    proxy=s.target.entry.text,
                    address=s.target.label,
                )
                for s in self._slots if s.active or s.tunnel is not None
            ]

    def last_errors(self) -> list[str]:
        """The latest error of each slot and each proxy name that could not be resolved, oldest slot first."""
        with self._lock:
            return ([s.last_error for s in self._slots if s.last_error]
                    + [e.last_error for e in self._entries if e.last_error])

    # -- proxy names and addresses -------------------------------------------------

    def _run_entry(self, entry: _Entry) -> None:
        """Resolve ``entry`` until it has addresses (their slots then take over re-resolving it)."""
        o = self.options
        schedule = RetrySchedule(o.reconnect_min, o.reconnect_max, o.reconnect_refused_max, self._rng)
        while not self._stopping.is_set():
            if self._refresh(entry):
                return
            delay = schedule.failed()
            log.warning("%s (retry in %.2fs)", entry.last_error, delay)
            self._stopping.wait(delay)

    def _refresh(self, entry: _Entry, *, since: float | None = None) -> bool:
        """Re-resolve ``entry`` and sync its targets, unless a resolution started after ``since``.

        Each reconnect asks with ``since`` = when its tunnel ended or its dial failed, so the slots
        that lost their tunnels at the same instant share one answer, and every later one asks again.

        False when the name did not resolve: the addresses known so far are kept (a DNS outage must not
        take tunnels down).  Called on slot and entry threads, never with the lock held (DNS blocks).
        """
        now = time.monotonic()
        with self._lock:
            if since is not None and entry.resolved_at >= since:
                return True
            entry.resolved_at = now
        try:
            addresses = self._resolver(entry.host, entry.port)
            if not addresses:
                raise OSError("no address")
        except OSError as e:
            with self._cond:
                entry.last_error = f"cannot resolve {entry.text}: {e}"
            return False
        with self._cond:
            entry.last_error = None
            self._sync_targets_locked(entry, addresses)
            entry.resolved = True
            self._cond.notify_all()
        return True

    def _sync_targets_locked(self, entry: _Entry, addresses: list[tuple[str, int]]) -> None:
        o = self.options
        for address in addresses:
            target = entry.targets.get(address)
            if target is None:
                target = _Target(entry, address,
                                 RetrySchedule(o.reconnect_min, o.reconnect_max, o.reconnect_refused_max, self._rng))
                entry.targets[address] = target
                for _ in range(o.connections):
                    slot = _Slot(len(self._slots), target)
                    target.slots.append(slot)
                    self._slots.append(slot)
                if entry.resolved:
                    log.info("proxy %s: new address %s, dialling it", entry.text, target.label)
            elif target.retired:
                target.retired = False
                log.info("proxy %s: address %s is back", entry.text, target.label)
            else:
                continue
            if not self._stopping.is_set():
                for slot in target.slots:
                    if not slot.active:
                        self._spawn_slot_locked(slot)
        for address, target in entry.targets.items():
            if address not in addresses and not target.retired:
                target.retired = True
                log.info("proxy %s: address %s no longer resolves; its tunnels end when they close",
                         entry.text, target.label)

    # -- slot threads -------------------------------------------------------------

    def _await_turn(self, slot: _Slot, generation: int) -> bool:
        """Wait until ``slot`` may dial its target; False when it must stop instead.

        While the target's gate is open (it worked last time), at once.  After a failure, one slot
        at a time (the prober) dials, when the retry schedule says; the others wait for its outcome,
        and all dial at once when its tunnel comes up (the fast path after an outage).
        """
        target = slot.target
        with self._cond:
            while True:
                if self._stopping.is_set() or slot.generation != generation:
                    if target.prober is slot:
                        target.prober = None
                        self._cond.notify_all()
                    return False
                if target.retired:
                    slot.active = False
                    return False
                if target.gate_open:
                    return True
                if target.prober is None:
                    wait = target.next_dial - time.monotonic()
                    if wait <= 0:
                        target.prober = slot
                        return True
                    self._cond.wait(min(wait, TURN_RECHECK))
                else:
                    self._cond.wait(TURN_RECHECK)

    def _failed(self, slot: _Slot, error: str, *, refused: bool = False) -> float:
        """Record a failed dial or tunnel of ``slot``'s target: close its gate; the delay drawn."""
        target = slot.target
        with self._cond:
            delay = target.schedule.failed(refused=refused)
            target.gate_open = False
            target.down = True
            target.next_dial = time.monotonic() + delay
            target.last_error = slot.last_error = error
            if target.prober is slot:
                target.prober = None
            self._cond.notify_all()
        return delay

    def _run_slot(self, slot: _Slot, generation: int) -> None:
        o = self.options
        target = slot.target
        host = target.entry.host
        name = f"tunnel-{slot.index}"
        while self._await_turn(slot, generation):
            self._refresh(target.entry, since=slot.lost)  # every reconnect: addresses may have come or gone
            slot.lost = time.monotonic()
            if target.retired:
                continue  # it left the answer just now: _await_turn ends this slot
            try:
                sock, session = self._dial(target)
            except (OSError, TLSSetupError) as e:
                refused = isinstance(e, TLSSetupError) and not e.retryable
                delay = self._failed(slot, str(e), refused=refused)
                self._log_failure(name, f"cannot connect to {target.entry.text}: {e}"
                                  + ("" if target.entry.host == target.address[0] else f" (at {target.label})"),
                                  e, delay)
                continue
            peer = sock.getpeername()
            # REMOTE_PORT: never the tunnel's port (it is not the client's); REMOTE_ADDR is the proxy's
            # unless the request's X-Forwarded-For names the client (forwarded_for).
            ctx = WSGIContext(self.app, url_scheme=o.url_scheme, remote_addr=str(peer[0]),
                              remote_port=None, peer_certificate=session.peer_certificate(),
                              draining=self._draining, server_name=host, body_timeout=o.body_timeout,
                              body_min_rate=o.body_min_rate, multiprocess=self.multiprocess,
                              forwarded_for=1 + o.forwarded_for_hops if o.forwarded_for else 0,
                              access_log=self._access, identity=self._identity(name, sock))
            tunnel = Tunnel(
                sock, session, TunnelProtocol("server", o, self._window_budget), o,
                name=name,
                streams=StreamPolicy(o, ctx, self._pool.submit, websockets=self._websockets),
                on_ready=lambda t: self._on_ready(slot, t),
                on_goaway=lambda t, ev: self._on_goaway(slot, generation, t, ev),
                clock=self._clock,
            )
            with self._cond:
                if self._stopping.is_set() or slot.generation != generation:
                    sock.close()
                    if target.prober is slot:
                        target.prober = None
                        self._cond.notify_all()
                    return
                slot.tunnel = tunnel
            reason = tunnel.run()
            slot.lost = time.monotonic()
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
                # back off like a failed dial (to the higher cap) instead of hammering it.
                code = getattr(goaway.error_code, "name", goaway.error_code) if goaway else None
                detail = (goaway.additional_data or b"").decode("utf-8", "replace") if goaway else ""
                error = f"proxy sent GOAWAY({code}) {detail}".strip() if refused else reason
                delay = self._failed(slot, error, refused=True)
                log.warning("%s: %s: %s (retry in %.2fs)", name, target.where(), error, delay)
            elif healthy:
                log.info("%s: disconnected from %s: %s", name, target.where(), reason)
                slot.reconnects += 1
                with self._lock:
                    target.schedule.succeeded()
                    others_live = any(s.tunnel is not None and s.tunnel.accepting for s in target.slots)
                # HAProxy purges idle tunnels all at once: whoever finds its proxy
                # with no live tunnel redials at once; the others spread out a little.
                delay = self._rng() * REPLACE_JITTER if others_live else 0.0
                if slot.generation != generation:
                    return  # a replacement thread already owns this slot
                self._stopping.wait(delay)
            else:
                failure = session.failure
                delay = self._failed(slot, reason,
                                     refused=isinstance(failure, TLSSetupError) and not failure.retryable)
                # A TLS 1.3 proxy refuses our certificate after our side of the
                # handshake is done: its alert ended the tunnel's first read.
                self._log_failure(name, f"handshake with {target.where()} failed: {reason}", failure, delay)

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

    def _dial(self, target: _Target) -> tuple[socket.socket, TLSSession]:
        o = self.options
        host = target.entry.host
        sock = socket.create_connection(target.address, timeout=o.dial_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # self._ctx read once: a reload swaps the reference, this handshake keeps the one it got
            session = TLSSession(self._ctx, server_side=False, sni=o.sni_for(host), verify_name=o.verify_name_for(host))
            session.handshake(sock, o.handshake_timeout)
        except BaseException:
            sock.close()
            raise
        return sock, session

    def _on_ready(self, slot: _Slot, tunnel: Tunnel) -> None:
        # Only the unreachable streak ends here; the refused one when the tunnel ends healthy: a
        # proxy that completes the handshake and then refuses us must still see backoff grow.
        target = slot.target
        log.info("%s: connected to %s (%s)", tunnel.name, target.where(),
                 tunnel.tls.protocol_version() if tunnel.tls else "plaintext")
        with self._cond:  # (taken under the tunnel lock, as in _on_goaway; never the reverse)
            slot.last_error = None
            slot.ready.set()
            # The fast path: the address works again, every slot waiting for it dials now.
            target.gate_open = True
            target.down = False
            target.schedule.reached()
            if target.prober is slot:
                target.prober = None
            first = not self._connected.is_set()
            self._connected.set()
            self._cond.notify_all()
        if first:
            log.info("ready: serving through the proxy at %s (first tunnel up)", target.entry.text)

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
            slot.lost = time.monotonic()  # the replacement re-resolves: the proxy may be leaving the cluster
            self._retiring = [*self._retiring, tunnel]
            self._spawn_slot_locked(slot)


def _replace(options: WorkerOptions, **changes: Any) -> WorkerOptions:
    import dataclasses

    return dataclasses.replace(options, **changes)
