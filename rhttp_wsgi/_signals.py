"""Waiting for the signal to stop: SIGTERM (service managers, containers) or SIGINT (Ctrl-C).

Shared by the CLI's ``proxy`` and ``demo`` commands and :meth:`WorkerPool.serve_forever`.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

__all__ = ["STOP_SIGNALS", "wait_for_stop_signal"]

log = logging.getLogger("rhttp_wsgi.signals")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def wait_for_stop_signal(stop: threading.Event | None = None, timeout: float | None = None) -> bool:
    """Block until SIGTERM or SIGINT arrives, ``stop`` is set, or ``timeout`` passes.

    The handlers are installed for the wait only, and only in the main thread
    (Python delivers signals there alone); elsewhere this just waits for
    ``stop``.  A signal sets ``stop``.  Returns True when ``stop`` is set.
    """
    stop = threading.Event() if stop is None else stop

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        # Event.wait is interrupted by a signal on POSIX: the handler runs at once.
        return stop.wait(timeout)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
