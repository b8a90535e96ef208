"""Waiting for the signal to stop: SIGTERM (service managers, containers) or SIGINT (Ctrl-C).

Meanwhile SIGHUP, when the caller can reload, re-reads the certificates.
Shared by the CLI's ``proxy`` and ``demo`` commands and :meth:`WorkerPool.serve_forever`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

__all__ = ["RELOAD_SIGNAL", "STOP_SIGNALS", "stop_signals", "wait_for_stop_signal"]

log = logging.getLogger("rhttp_wsgi.signals")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: What nginx, HAProxy (master-worker) and gunicorn's master use for "re-read your files".
RELOAD_SIGNAL = signal.SIGHUP


@contextlib.contextmanager
def stop_signals(stop: threading.Event | None = None, *,
                 reload: Callable[[], object] | None = None) -> Iterator[threading.Event]:
    """Within the block, SIGTERM or SIGINT sets the yielded ``stop`` event.

    Enter it *before* announcing readiness: a service manager may send SIGTERM
    the moment it sees the ready line, and without our handler that signal
    would kill the process instead of draining it.

    With ``reload``, SIGHUP calls it (and the service goes on).  The handlers
    are installed for the block only, and only in the main thread (Python
    delivers signals there alone); elsewhere ``stop`` is only set by others.

    ``reload`` runs inside the handler, on the main thread: that thread is
    parked in ``stop.wait()`` (see :func:`wait_for_stop_signal`), holding no
    lock of ours, so the reload may take whatever lock it needs.  A reload that
    raises is logged and the service goes on (the reload methods log their own
    failures and return False).
    """
    stop = threading.Event() if stop is None else stop

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    def reload_handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; reloading the certificates", signal.Signals(signum).name)
        if reload is None:
            return
        try:
            reload()
        except Exception:  # an exception here would end the wait, and the service with it
            log.exception("reloading on %s failed; still serving", signal.Signals(signum).name)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
        if reload is not None:
            previous[RELOAD_SIGNAL] = signal.signal(RELOAD_SIGNAL, reload_handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def wait_for_stop_signal(stop: threading.Event | None = None, timeout: float | None = None, *,
                         reload: Callable[[], object] | None = None) -> bool:
    """Block until SIGTERM or SIGINT arrives, ``stop`` is set, or ``timeout`` passes.

    The handlers are those of :func:`stop_signals`, installed for the wait only.
    Returns True when ``stop`` is set.
    """
    with stop_signals(stop, reload=reload) as event:
        # Event.wait is interrupted by a signal on POSIX: the handler runs at once.
        return event.wait(timeout)
