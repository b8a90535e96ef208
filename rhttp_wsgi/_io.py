"""Small socket-side helpers shared by the public server, the mount helpers and the worker's ``wsgi.input``."""

from __future__ import annotations

import select
import socket

__all__ = ["POLLRDHUP", "body_wait", "peer_closed"]

#: Linux's "peer closed its side" poll flag (0 where the platform has none: nothing can tell).
POLLRDHUP: int = getattr(select, "POLLRDHUP", 0)
_GONE = POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


def peer_closed(sock: socket.socket) -> bool:
    """True when the peer closed its side (or the socket is closed); never reads, so pipelined
    bytes stay queued.  Always False where POLLRDHUP does not exist (check :data:`POLLRDHUP`)."""
    if not POLLRDHUP:
        return False
    try:
        p = select.poll()
        p.register(sock.fileno(), select.POLLIN | POLLRDHUP)
        events = p.poll(0)
    except (OSError, ValueError):  # closed socket: fileno() is -1
        return True
    return any(mask & _GONE for _, mask in events)


def body_wait(started: float, seen: int, timeout: float, min_rate: int, now: float) -> float:
    """How long the next request-body read may wait, ``timeout`` at most (the idle bound).

    Besides that per-read bound, a minimum average rate (Apache mod_reqtimeout's
    MinRate): the allowance, ``timeout`` plus one second per ``min_rate`` bytes
    received since ``started``, grows with what arrived, so a trickle -- a byte
    every few seconds, each within ``timeout`` -- still ends.  A result below
    ``timeout`` means the rate is what limits the wait (the caller says so when it
    times out).  Needs ``timeout > 0`` and ``min_rate > 0`` (callers skip the call
    otherwise); never negative.
    """
    left = started + timeout + seen / min_rate - now
    return timeout if left >= timeout else max(left, 0.0)
