"""The proxy's worker registry: attached workers, their identity and stream-slot reservations.

Its own module so that the proxy (which fills it), the forwarder (which
reserves workers from it) and the selectors (which choose among its workers)
all import it and none of them imports another: ``proxy -> registry``,
``forwarder -> registry``, ``balancing -> registry``.

The registry reads a worker's tunnel only through public, lock-free attributes
(``accepting``, ``closing``, the peer's MAX_CONCURRENT_STREAMS): a tunnel's lock
may be held when the registry lock is taken, never the other way round (see
:mod:`rhttp_wsgi.proxy`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Union

from cryptography import x509

from .errors import NoWorkerAvailable, UpstreamError
from .tls import peer_common_name

if TYPE_CHECKING:
    from ._tunnel import Tunnel

__all__ = ["Environ", "Registry", "Selector", "WorkerInfo", "WorkerRegistry"]

log = logging.getLogger("rhttp_wsgi.proxy.registry")

Environ = Mapping[str, Any]
#: Picks the worker for a request among those that can take a stream now (see :mod:`rhttp_wsgi.balancing`).
Selector = Callable[[Environ, Sequence["WorkerInfo"]], Union["WorkerInfo", None]]

#: The peer's MAX_CONCURRENT_STREAMS is 2**32+1 ("no limit", h2's sentinel) until it sends one;
#: anything above this counts as unlimited.
_UNLIMITED = 2**31 - 1

_PENDING, _ATTACHED, _DETACHED, _SNAPSHOT = "pending", "attached", "detached", "snapshot"


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name.value if isinstance(name.value, str) else str(name.value) for name in ext]


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
        "_connect",
        "_draining",
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
        self._state = _PENDING  # -> attached -> detached (registry lock)
        self._mcs = 0
        self._draining = False
        self._connect = False
        self.tls_version = tls_version

    @property
    def max_concurrent_streams(self) -> int:
        """The worker's SETTINGS_MAX_CONCURRENT_STREAMS (live while attached)."""
        if self._state == _SNAPSHOT or self.tunnel is None:
            return self._mcs
        # Read without the tunnel lock (see the module doc): a plain int read of
        # the peer's settings, at worst one SETTINGS frame stale.
        return min(self.tunnel.proto.peer_max_concurrent_streams(), _UNLIMITED)

    @property
    def extended_connect(self) -> bool:
        """The worker advertised SETTINGS_ENABLE_CONNECT_PROTOCOL: it takes WebSockets (RFC 8441)."""
        if self._state == _SNAPSHOT or self.tunnel is None:
            return self._connect
        # A plain read of the peer's settings, as max_concurrent_streams (see the module doc).
        return self.tunnel.proto.peer_enable_connect_protocol()

    @property
    def pending(self) -> bool:
        """Handshake done, not attached yet, tunnel still open: waiting for the attach hook."""
        return self._state == _PENDING and not self.tunnel.closing

    @property
    def attached(self) -> bool:
        return self._state in (_ATTACHED, _SNAPSHOT)

    @property
    def draining(self) -> bool:
        """The tunnel is closing or got/sent GOAWAY: it takes no new requests (a snapshot: it was then)."""
        if self._state == _SNAPSHOT or self.tunnel is None:
            return self._draining
        return not self.tunnel.accepting

    @property
    def selectable(self) -> bool:
        return self._state == _ATTACHED and self.tunnel is not None and self.tunnel.accepting

    def snapshot(self) -> WorkerInfo:
        copy = WorkerInfo.__new__(WorkerInfo)
        for name in WorkerInfo.__slots__:
            setattr(copy, name, getattr(self, name))
        copy.sans = list(self.sans)
        copy._mcs = self.max_concurrent_streams
        copy._draining = self.draining
        copy._connect = self.extended_connect
        copy._state = _SNAPSHOT
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
            "not_after": self.certificate.not_valid_after_utc.isoformat(),
            "draining": self.draining,
            "tls_version": self.tls_version,
        }

    def __repr__(self) -> str:
        return (f"<WorkerInfo {self.id} cn={self.common_name!r} from={self.remote_addr[:2]!r}"
                f" in_flight={self.in_flight} total={self.total}>")


class Registry(Protocol):
    """What the forwarder needs from the worker registry: reserve a worker's stream slot, give it back."""

    def acquire(self, environ: Mapping[str, Any], avoid: Sequence[WorkerInfo], *,
                extended_connect: bool = False) -> WorkerInfo: ...

    def release(self, worker: WorkerInfo) -> None: ...


class WorkerRegistry:
    """Attached workers; reservation of stream slots for forwards (implements :class:`Registry`)."""

    def __init__(self, selector: Selector, stream_wait: float, attach_wait: float = 0.0) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.selector = selector
        self.stream_wait = stream_wait
        self.attach_wait = attach_wait
        self.attached: list[WorkerInfo] = []
        self.closed = False

    # -- forwarders (server threads) ---------------------------------------------

    def acquire(self, environ: Mapping[str, Any], avoid: Sequence[WorkerInfo], *,
                extended_connect: bool = False) -> WorkerInfo:
        """Pick a worker with a free stream slot and reserve it.

        Waits up to ``stream_wait`` while every eligible worker is full, and up
        to ``attach_wait`` while no worker is attached at all.  With
        ``extended_connect`` (a WebSocket) only the workers that advertised
        SETTINGS_ENABLE_CONNECT_PROTOCOL are eligible; none of them: 503 at once.
        """
        deadline: float | None = None
        attach_deadline: float | None = None
        with self.cond:
            while True:
                if self.closed:
                    raise NoWorkerAvailable("the proxy is shutting down")
                live = [w for w in self.attached if w.selectable]
                if extended_connect and live:
                    live = [w for w in live if w.extended_connect]
                    if not live:
                        raise NoWorkerAvailable("no attached worker accepts WebSockets (none advertised"
                                                " SETTINGS_ENABLE_CONNECT_PROTOCOL, RFC 8441)")
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
                        if self.attached:  # attached, none selectable: each sent or got GOAWAY
                            raise NoWorkerAvailable(f"every attached worker is draining ({len(self.attached)});"
                                                    " none takes new requests")
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
            if not worker.pending or self.closed:
                return False
            worker._state = _ATTACHED
            self.attached.append(worker)
            self.cond.notify_all()
            return True

    def detach(self, worker: WorkerInfo) -> bool:
        """Returns True if the worker had been attached."""
        with self.cond:
            was = worker._state == _ATTACHED
            worker._state = _DETACHED
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
