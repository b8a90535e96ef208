"""Worker selectors: which attached worker serves a public request.

A selector is any callable ``(environ, workers) -> worker | None``.
``workers`` holds only the workers that can take one more stream right now
(attached, not draining, below their ``MAX_CONCURRENT_STREAMS``), never empty.
Returning ``None`` means "none of these": the request waits for a busy worker
up to ``stream_wait`` if some worker was left out for being full, else it gets
503.  Selectors run under the proxy's registry lock, so they see consistent
counters and need no locking of their own, but must be quick and must not
block or call back into the proxy.

(The module is not called ``selectors``: that would shadow the stdlib.)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from .errors import ConfigError
from .registry import Environ, Selector, WorkerInfo

__all__ = [
    "LeastInFlight",
    "RoundRobin",
    "Selector",
    "by_common_name",
    "resolve_selector",
]


class LeastInFlight:
    """The worker with the fewest forwards in flight (the default).

    Ties are broken in rotation, so an idle fleet still shares the load
    instead of sending everything to the first worker.
    """

    def __init__(self) -> None:
        self._tick = itertools.count()

    def __call__(self, environ: Environ, workers: Sequence[WorkerInfo]) -> WorkerInfo | None:
        if not workers:
            return None
        low = min(w.in_flight for w in workers)
        tied = [w for w in workers if w.in_flight == low]
        if len(tied) == 1:
            return tied[0]
        return tied[next(self._tick) % len(tied)]

    def __repr__(self) -> str:
        return "LeastInFlight()"


class RoundRobin:
    """Strict rotation over the attached workers, in attach order.

    Rotation follows worker ids rather than list positions, so a worker
    leaving or filling up does not make its neighbour take two turns.
    """

    def __init__(self) -> None:
        self._last: int = -1

    def __call__(self, environ: Environ, workers: Sequence[WorkerInfo]) -> WorkerInfo | None:
        if not workers:
            return None
        ordered = sorted(workers, key=lambda w: w.seq)
        for w in ordered:
            if w.seq > self._last:
                self._last = w.seq
                return w
        self._last = ordered[0].seq
        return ordered[0]

    def __repr__(self) -> str:
        return "RoundRobin()"


def by_common_name(
    header: str = "X-Worker",
    *,
    prefix: str = "",
    fallback: Selector | None = None,
    then: Selector | None = None,
) -> Selector:
    """Pin requests to workers by certificate common name (tenant pinning).

    The request header ``header`` (``X-Worker`` by default) names the worker:
    a request with ``X-Worker: alpha`` goes only to workers whose certificate
    CN is ``prefix + "alpha"``; several such tunnels share the load with
    ``then`` (least-in-flight by default).  A request without the header goes
    to ``fallback`` (``None``: 503).  An unknown name is 503; a known but
    busy worker makes the request wait up to ``stream_wait``.
    """
    key = "HTTP_" + header.upper().replace("-", "_")
    inner: Selector = then if then is not None else LeastInFlight()

    def select(environ: Environ, workers: Sequence[WorkerInfo]) -> WorkerInfo | None:
        wanted = environ.get(key)
        if not wanted:
            return fallback(environ, workers) if fallback is not None else None
        cn = prefix + str(wanted).strip()
        matching = [w for w in workers if w.common_name == cn]
        return inner(environ, matching) if matching else None

    select.__name__ = f"by_common_name({header!r})"
    select.__qualname__ = select.__name__
    return select


def resolve_selector(spec: str | Selector | None) -> Selector:
    """A selector from a name (``least-in-flight``, ``round-robin``, ``cn:HEADER``) or a callable."""
    if spec is None:
        return LeastInFlight()
    if callable(spec):
        return spec
    if isinstance(spec, str):
        name = spec.strip().lower().replace("_", "-")
        if name in ("least-in-flight", "least", "lif"):
            return LeastInFlight()
        if name in ("round-robin", "rr"):
            return RoundRobin()
        if name.startswith("cn:") or name.startswith("common-name:"):
            header = spec.split(":", 1)[1].strip() or "X-Worker"
            return by_common_name(header)
        if name in ("cn", "common-name", "by-common-name"):
            return by_common_name()
    raise ConfigError("selector", f"unknown selector {spec!r}: use least-in-flight, round-robin, cn:HEADER"
                                  " or a callable (environ, workers) -> worker | None")
