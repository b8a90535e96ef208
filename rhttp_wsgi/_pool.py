"""A small bounded thread pool for running the WSGI app.

``concurrent.futures.ThreadPoolExecutor`` would do, but its threads are joined
at interpreter exit (an app blocked forever would hang the process) and it
allocates a Future per call.  Threads here are daemons, spawned lazily up to
``max_threads``.  The work is bounded by the tunnels' MAX_CONCURRENT_STREAMS:
a stream beyond it is refused before it gets here.

Hand-off (one per request, the hot path), designed to wake as few threads as
possible -- on a GIL every extra wake-up is a context switch plus a GIL
hand-off (benchmarks/RESULTS.md):

* Idle threads *park*, each on its own lock used as a binary semaphore, in a
  LIFO stack (the most recently parked thread is woken first: warm caches).
* At most one woken thread is on its way to the task queue at a time (the
  *searcher*).  ``submit`` wakes a parked thread (or spawns one) only when
  there is no searcher; the searcher, once it took a task, wakes the next one
  only if tasks are still queued.  A burst of tasks is thus picked up by a
  chain of threads, and threads that finish a task take the next queued one
  without sleeping, so a burst often needs fewer wake-ups than tasks.
* Nothing waits behind a busy thread while another could run it: whenever
  tasks are queued there is a searcher, or every thread is busy (the pool is
  at ``max_threads``) and the first to finish takes the next task.
* No spurious wake-ups: ``queue.SimpleQueue`` (used before) releases its lock
  after every successful blocking ``get``, which wakes one more sleeping
  thread just to find the queue empty -- one wasted wake-up per request
  whenever two threads were idle.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("rhttp_wsgi.pool")

_Task = tuple[Callable[..., None], tuple[Any, ...]]


class _Spot:
    """One app thread's parking spot."""

    __slots__ = ("search", "wake")

    def __init__(self) -> None:
        #: Held while the thread is parked; released (once) to wake it.
        self.wake = threading.Lock()
        self.wake.acquire()
        #: Woken as the searcher (not by shutdown).
        self.search = False


class AppThreadPool:
    def __init__(self, max_threads: int, name: str = "rhttp-app") -> None:
        self.max_threads = max_threads
        self.name = name
        #: Guards everything below.  Held only for a few list operations; never
        #: across a task or a wait.
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._tasks: collections.deque[_Task] = collections.deque()
        self._parked: list[_Spot] = []
        #: A thread was woken (or spawned) to take a queued task and has not yet.
        self._searching = False
        self._stopped = False

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._stopped:
                raise RuntimeError("thread pool is shut down")
            self._tasks.append((fn, args))
            if not self._searching:
                self._wake_one_locked()

    def _wake_one_locked(self) -> None:
        """Make a searcher: the most recently parked thread, else a new one (within max_threads)."""
        if self._parked:
            spot = self._parked.pop()
            spot.search = True
            self._searching = True
            spot.wake.release()
        elif len(self._threads) < self.max_threads and not self._stopped:
            # (once stopped, the threads shutdown() joins drain the queue: no new ones)
            self._searching = True
            t = threading.Thread(target=self._run, name=f"{self.name}-{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()
        # else every thread is busy: the first to finish takes the next task.

    def _run(self) -> None:
        spot = _Spot()
        lock = self._lock
        tasks = self._tasks
        searcher = True  # spawned as the searcher
        while True:
            with lock:
                if searcher:
                    self._searching = searcher = False
                if tasks:
                    fn, args = tasks.popleft()
                    if tasks and not self._searching:
                        self._wake_one_locked()  # more queued: keep one thread coming
                else:
                    if self._stopped:
                        return
                    self._parked.append(spot)
                    fn = None
            if fn is None:
                spot.wake.acquire()
                searcher, spot.search = spot.search, False
                continue
            try:
                fn(*args)
            except BaseException:  # the task logs its own errors; this is a last resort
                log.exception("task %r failed", fn)
            del fn, args  # (drop the request's objects before parking)

    @property
    def size(self) -> int:
        return len(self._threads)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop the threads once submitted tasks are done; True if all exited in time."""
        with self._lock:
            self._stopped = True
            threads = list(self._threads)
            # Parked threads wake, find no task and exit; busy ones exit once the queue is empty.
            for spot in self._parked:
                spot.wake.release()
            self._parked.clear()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(remaining)
        return not any(t.is_alive() for t in threads)
