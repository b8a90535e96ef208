"""A small bounded thread pool for running the WSGI app.

``concurrent.futures.ThreadPoolExecutor`` would do, but its threads are joined
at interpreter exit (an app blocked forever would hang the process) and it
allocates a Future per call.  Threads here are daemons, spawned lazily up to
``max_threads``, and fed from one queue.  The queue is bounded by the tunnels'
MAX_CONCURRENT_STREAMS: a stream beyond it is refused before it gets here.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("rhttp_wsgi.pool")

_STOP = object()


class AppThreadPool:
    def __init__(self, max_threads: int, name: str = "rhttp-app") -> None:
        self.max_threads = max_threads
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._stopped = False

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._stopped:
                raise RuntimeError("thread pool is shut down")
            if self._idle == 0 and len(self._threads) < self.max_threads:
                t = threading.Thread(target=self._run, name=f"{self.name}-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
            else:
                self._idle -= 1 if self._idle else 0
        self._queue.put((fn, args))

    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            if item is _STOP:
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException:  # the task logs its own errors; this is a last resort
                log.exception("task %r failed", fn)
            del item, fn, args
            with self._lock:
                self._idle += 1

    @property
    def size(self) -> int:
        return len(self._threads)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop the threads once queued tasks are done; True if all exited in time."""
        with self._lock:
            if self._stopped:
                threads = list(self._threads)
            else:
                self._stopped = True
                threads = list(self._threads)
                for _ in threads:
                    self._queue.put(_STOP)
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        for t in threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(remaining)
        return not any(t.is_alive() for t in threads)
