"""A gunicorn worker class that serves the app through reverse-HTTP/2 tunnels.

Instead of accepting connections on gunicorn's listening socket, each worker
process runs a :class:`~rhttp_wsgi.worker.WorkerPool` that dials the proxy over
mutual TLS and serves gunicorn's WSGI app (``self.wsgi``) on the tunnels::

    RHTTP_PROXY=proxy.example.com:8443 RHTTP_CERT=w.crt RHTTP_KEY=w.key RHTTP_CA=ca.crt \\
        gunicorn -k rhttp_wsgi.gunicorn_worker.RHTTPWorker -b 127.0.0.1:0 --workers 4 myapp:app

``-k`` forms that work (gunicorn resolves ``-k`` with ``gunicorn.util.load_class``):

* ``-k rhttp_wsgi.gunicorn_worker.RHTTPWorker`` (a dotted path; always works);
* ``-k egg:rhttp-wsgi#rhttp`` (our ``gunicorn.workers`` entry point; needs the
  package *installed*, editable installs included).

A bare ``-k rhttp`` does **not** work: gunicorn looks bare names up only in its
own table and in the *gunicorn* distribution's entry points.

Configuration.  The tunnel settings are the CLI's, read from the same
``RHTTP_*`` environment variables (every :class:`~rhttp_wsgi.options.WorkerOptions`
option: ``RHTTP_PROXY``, ``RHTTP_CERT``, ``RHTTP_KEY``, ``RHTTP_CA``,
``RHTTP_SERVER_NAME``, ``RHTTP_CONNECTIONS``, ``RHTTP_THREADS``,
``RHTTP_MAX_CONCURRENT_STREAMS``, ...; gunicorn's ``--env`` / ``raw_env`` works
too, it is applied before they are read).  gunicorn settings that apply:

* ``RHTTP_PROXY=p1:8443,p2:8443``: several proxies (or one name with several
  addresses), each process dialling every one of them; a new process counts as
  ready for a reload's hand-over once every proxy that answers has its tunnels;
* ``--workers N``: N processes, each with its own ``RHTTP_CONNECTIONS`` tunnels
  to every proxy;
* ``--threads N``: the app thread pool size of each process when
  ``RHTTP_THREADS`` is unset and N > 1.  gunicorn's default (1) keeps
  rhttp-wsgi's default of 16 threads, because one tunnel multiplexes many
  requests; set ``RHTTP_THREADS=1`` for a single app thread;
* ``--graceful-timeout``: the drain budget on SIGTERM (``RHTTP_SHUTDOWN_TIMEOUT``,
  if set, may only shorten it);
* ``--timeout``: the heartbeat; the worker notifies the master at least every
  second, whatever the traffic (a long request does not get the process killed);
* ``--max-requests`` / ``--max-requests-jitter``: see below;
* ``-b``: gunicorn binds its listening socket anyway, and nothing accepts on it.
  Bind it somewhere harmless, e.g. ``-b 127.0.0.1:0``.

* ``--access-logfile``: turns the worker's access log on (unless
  ``RHTTP_ACCESS_LOG=0``) and receives its lines (format
  ``RHTTP_ACCESS_LOG_FORMAT``, not gunicorn's ``--access-logformat``: the atoms
  are gunicorn's plus the request id and the tunnel).  Without it,
  ``RHTTP_ACCESS_LOG=1`` sends them to the error log.

Not applicable: ``pre_request`` / ``post_request`` hooks and request-parsing
limits (requests do not pass through gunicorn's HTTP parser; the proxy enforces
limits).  Our ``rhttp_wsgi`` log messages go to gunicorn's error log unless
logging was configured otherwise.

Lifecycle.

* SIGTERM (and the master's graceful stop): GOAWAY on every tunnel, in-flight
  requests finish within ``graceful_timeout``, then exit.
* SIGQUIT / SIGINT: close the tunnels at once and exit.
* SIGHUP to the master (reload): the master starts new workers, then SIGTERMs
  the old ones.  An old worker keeps serving until a *younger* worker has its
  tunnels up (at most half of ``graceful_timeout``), and only then drains, so
  the proxy always has a worker and no request fails.  The old workers send
  their GOAWAYs one at a time, a quarter second apart: a request racing one
  GOAWAY is refused by that worker and retried by the proxy on another, which
  must not be racing its own.  The processes of one
  master share their state (booting / ready / draining) through a small shared
  memory table created by the master.
* ``max_requests``: when the process has started that many requests it retires
  (graceful drain, exit; the master starts a replacement).  With several
  workers, a process retires only while another one is ready and not retiring,
  so the proxy never loses its last tunnel; it keeps serving meanwhile (for at
  most ``graceful_timeout``).  With ``--workers 1`` there is nobody to hand over
  to: between the old process's exit and the new one's connection the proxy
  has no worker and answers 503.  Use at least two workers with
  ``max_requests``.  A request already on its way when the GOAWAY leaves may
  still be served, so a process can serve a request or two more than the limit.

This is the only module of the package that imports gunicorn.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import mmap
import os
import select
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any, ClassVar, NoReturn

from gunicorn.workers.base import Worker  # type: ignore[import-untyped,import-not-found,unused-ignore]

from .accesslog import LOGGER as ACCESS_LOGGER
from .errors import RHTTPError
from .options import WorkerOptions, options_from_environ
from .worker import WorkerPool

__all__ = ["RHTTPWorker"]

#: gunicorn's exit status for "Worker failed to boot" (``Arbiter.WORKER_BOOT_ERROR``): the master stops.
WORKER_BOOT_ERROR = 3
#: Longest pause of the main loop: heartbeat, parent check, readiness check.
MAX_BEAT = 1.0
#: Poll interval while something is expected soon (own tunnels, a successor).
FAST_POLL = 0.05
#: After a worker's tunnels are up, how long before another worker relies on it:
#: the proxy attaches a tunnel on its own thread, a moment after the handshake.
SETTLE = 0.25
#: A spawned worker that has not reported its pid after this long is ignored.
BOOT_GRACE = 30.0

_EMPTY, _BOOTING, _READY, _DRAINING, _EXITED = range(5)


class _Siblings:
    """The states of the worker processes of one gunicorn master.

    A table in shared memory (a ``MAP_SHARED`` mapping of an unlinked temporary
    file), created in the master before the first fork, so every worker
    inherits it.  Entry ``age % SLOTS`` belongs to the worker of that age:
    (age, pid, state, since), ``since`` being ``time.monotonic()`` of the last
    change (CLOCK_MONOTONIC is system-wide).  Writes and consistent reads take
    a POSIX record lock (``lockf``) on the file, which is per process and
    released by the kernel if its holder dies.  Only main threads use it (the
    master's, then each worker's), never from a signal handler.
    """

    SLOTS = 1024
    _ENTRY = struct.Struct("=qqqd")

    def __init__(self) -> None:
        # One more entry after the slots: (0, 0, 0, time of the last hand-over GOAWAY).
        size = (self.SLOTS + 1) * self._ENTRY.size
        self._file = tempfile.TemporaryFile(prefix="rhttp-gunicorn-")
        os.ftruncate(self._file.fileno(), size)
        self._mem = mmap.mmap(self._file.fileno(), size)

    def _lock(self) -> None:
        fcntl.lockf(self._file.fileno(), fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self._file.fileno(), fcntl.LOCK_UN)

    def _write(self, age: int, pid: int, state: int) -> None:
        self._ENTRY.pack_into(self._mem, (age % self.SLOTS) * self._ENTRY.size, age, pid, state, time.monotonic())

    def _entries(self) -> list[tuple[int, int, int, float]]:
        size = self._ENTRY.size
        return [self._ENTRY.unpack_from(self._mem, i * size) for i in range(self.SLOTS)]

    def spawned(self, age: int) -> None:
        """In the master, just before the fork."""
        self._lock()
        try:
            self._write(age, 0, _BOOTING)
        finally:
            self._unlock()

    def update(self, age: int, pid: int, state: int) -> None:
        self._lock()
        try:
            self._write(age, pid, state)
        finally:
            self._unlock()

    def _live(self, now: float) -> list[tuple[int, int, int, float]]:
        out = []
        for age, pid, state, since in self._entries():
            if state not in (_BOOTING, _READY, _DRAINING):
                continue
            if pid == 0:
                if now - since > BOOT_GRACE:
                    continue  # forked (or not) and never heard of
            elif not _pid_alive(pid):
                continue
            out.append((age, pid, state, since))
        return out

    def _snapshot(self) -> list[tuple[int, int, int, float]]:
        now = time.monotonic()
        self._lock()
        try:
            return self._live(now)
        finally:
            self._unlock()

    def booting_younger(self, age: int) -> set[int]:
        """Ages of the workers spawned after ``age`` that are booting (a reload's new workers), or
        connected so recently that the proxy may not have attached them yet."""
        now = time.monotonic()
        return {a for a, _, s, since in self._snapshot()
                if a > age and (s == _BOOTING or (s == _READY and since + SETTLE > now))}

    def successor_status(self, ages: set[int]) -> tuple[bool, float | None]:
        """Of the workers ``ages``: (one is still booting, when the first ready one is settled or None)."""
        live = [x for x in self._snapshot() if x[0] in ages]
        booting = any(s == _BOOTING for _, _, s, _ in live)
        ready = [since + SETTLE for _, _, s, since in live if s == _READY]
        return booting, (min(ready) if ready else None)

    def next_handover(self) -> float:
        """0.0 if this worker may send its hand-over GOAWAY now (recorded), else how long to wait.

        Old workers hand over one at a time, SETTLE apart.  A request the proxy
        sent to a worker whose GOAWAY was on its way is refused and retried
        once, on another worker: that one must not be in the same window.
        """
        now = time.monotonic()
        offset = self.SLOTS * self._ENTRY.size
        self._lock()
        try:
            last = float(self._ENTRY.unpack_from(self._mem, offset)[3])
            if last and now < last + SETTLE:
                return last + SETTLE - now
            self._ENTRY.pack_into(self._mem, offset, 0, 0, 0, now)
            return 0.0
        finally:
            self._unlock()

    def claim_retirement(self, age: int, pid: int) -> bool:
        """Mark ``age`` draining if another worker is ready (and settled); atomically."""
        now = time.monotonic()
        self._lock()
        try:
            others = [x for x in self._live(now) if x[0] != age and x[2] == _READY and x[3] + SETTLE <= now]
            if others:
                self._write(age, pid, _DRAINING)
            return bool(others)
        finally:
            self._unlock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_options(app: Callable[..., Any] | None, *, gunicorn_threads: int = 1,
                  graceful_timeout: float | None = None,
                  environ: Mapping[str, str] | None = None,
                  gunicorn_access_log: bool = False) -> WorkerOptions:
    """The pool's options: the ``RHTTP_*`` variables, then gunicorn's settings.

    gunicorn's ``--threads`` is the app thread pool size when ``RHTTP_THREADS``
    is unset and it is > 1; its ``--graceful-timeout`` is the drain budget,
    which ``RHTTP_SHUTDOWN_TIMEOUT`` may only shorten; its ``--access-logfile``
    (``gunicorn_access_log``) turns the worker's access log on unless
    ``RHTTP_ACCESS_LOG`` says otherwise.
    """
    values = options_from_environ(WorkerOptions, environ)
    if gunicorn_access_log and "access_log" not in values:
        values["access_log"] = True
    if "threads" not in values and gunicorn_threads > 1:
        values["threads"] = gunicorn_threads
    if graceful_timeout is not None:
        values["shutdown_timeout"] = min(graceful_timeout, values.get("shutdown_timeout", graceful_timeout))
    return WorkerOptions(app=app, **values)


class RHTTPWorker(Worker):  # type: ignore[misc]  # gunicorn ships no type information
    """gunicorn worker: serves ``self.wsgi`` through tunnels dialled to the proxy (see the module doc)."""

    _siblings: ClassVar[_Siblings | None] = None

    def __init__(self, age: int, ppid: int, sockets: list[Any], app: Any, timeout: float, cfg: Any,
                 log: Any) -> None:
        # Runs in the master, before the fork.
        super().__init__(age, ppid, sockets, app, timeout, cfg, log)
        if RHTTPWorker._siblings is None:
            RHTTPWorker._siblings = _Siblings()
        self.shared: _Siblings = RHTTPWorker._siblings
        self.shared.spawned(age)
        self.pool: WorkerPool | None = None
        self.options: WorkerOptions | None = None
        self._quick = False
        self._count_lock = threading.Lock()

    # -- boot (in the worker process) ------------------------------------------------

    def init_process(self) -> None:
        self.shared.update(self.age, os.getpid(), _BOOTING)
        self._route_logging()
        super().init_process()  # ... load_wsgi(), then run()

    def _route_logging(self) -> None:
        """Send ``rhttp_wsgi`` records to gunicorn's error log, and our access lines to its access
        log when it has one (``--access-logfile``), unless logging is configured."""
        ours = logging.getLogger("rhttp_wsgi")
        error_log = getattr(self.log, "error_log", None)
        configured = [h for h in ours.handlers if not isinstance(h, logging.NullHandler)]
        if configured or logging.getLogger().handlers or not isinstance(error_log, logging.Logger):
            return
        access_log = getattr(self.log, "access_log", None)
        if isinstance(access_log, logging.Logger) and access_log.handlers:
            ours_access = logging.getLogger(ACCESS_LOGGER)
            for handler in access_log.handlers:
                ours_access.addHandler(handler)
            ours_access.setLevel(logging.INFO)
            ours_access.propagate = False
        for handler in error_log.handlers:
            ours.addHandler(handler)
        ours.setLevel(error_log.level)
        ours.propagate = False

    def load_wsgi(self) -> None:
        # The settings are checked before the app is imported and before the
        # worker counts as booted: a bad setting stops the master with
        # "Worker failed to boot" (one log line, exit code 3) instead of a
        # crash loop.
        try:
            options = build_options(None, gunicorn_threads=self.cfg.threads,
                                    graceful_timeout=float(self.cfg.graceful_timeout),
                                    gunicorn_access_log=bool(self.cfg.accesslog))
            options.check_files()
        except RHTTPError as e:
            self._boot_error(e)
        super().load_wsgi()
        app: Callable[..., Any] = self.wsgi
        if self.max_requests < sys.maxsize:
            app = self._counting(app)
        try:
            self.options = dataclasses.replace(options, app=app)
            self.pool = WorkerPool(options=self.options)
            self.pool.multiprocess = self.cfg.workers > 1
        except (RHTTPError, OSError) as e:
            self._boot_error(e)

    def _boot_error(self, e: BaseException) -> NoReturn:
        self.log.error("rhttp worker: invalid setting: %s", e)
        sys.exit(WORKER_BOOT_ERROR)

    def _counting(self, app: Callable[..., Any]) -> Callable[..., Any]:
        def counting_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            with self._count_lock:
                self.nr += 1
                reached = self.nr == self.max_requests
            if reached:
                self._wake()
            return app(environ, start_response)  # type: ignore[no-any-return]

        return counting_app

    # -- signals -------------------------------------------------------------------

    def handle_quit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike the base class, do not sys.exit() inside the handler: the main
        # thread may be holding a lock.  It wakes on the wakeup fd (self.PIPE)
        # and closes the tunnels at once.
        self.alive = False
        self._quick = True
        self.cfg.worker_int(self)

    # -- main loop -------------------------------------------------------------------

    def run(self) -> None:
        pool = self.pool
        assert pool is not None and self.options is not None
        if not self.alive:  # SIGTERM while booting
            self.shared.update(self.age, os.getpid(), _EXITED)
            return
        self.log.info("rhttp worker: dialling %s with %d tunnel(s), %d app thread(s)",
                      ", ".join(self.options.proxy or ()), self.options.connections, self.options.threads)
        pool.start()
        try:
            self._serve(pool)
            if self._quick:
                self._stop_now(pool)
            else:
                self._stop_gracefully(pool)
        finally:
            self.shared.update(self.age, os.getpid(), _EXITED)

    def _beat(self) -> float:
        return min(MAX_BEAT, self.timeout / 2) if self.timeout else MAX_BEAT

    def _wake(self) -> None:
        try:
            os.write(self.PIPE[1], b".")
        except OSError:  # full (a wakeup is already pending) or closed
            pass

    def _sleep(self, timeout: float) -> None:
        """Wait for a signal (gunicorn's wakeup fd), a wake-up or ``timeout``."""
        try:
            ready, _, _ = select.select([self.PIPE[0]], [], [], max(0.0, timeout))
        except OSError:
            return
        if ready:
            try:
                while os.read(self.PIPE[0], 4096):
                    pass
            except OSError:  # BlockingIOError once empty
                pass

    def _parent_gone(self) -> bool:
        if self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            return True
        return False

    def _serve(self, pool: WorkerPool) -> None:
        ready = False
        limit_since: float | None = None
        pid = os.getpid()
        while self.alive:
            self.notify()
            if self._parent_gone():
                break
            # Ready for the hand-over once every proxy that answers has our tunnels: an old worker
            # drains from all of them, so a proxy we have not reached yet would be left with none.
            if not ready and pool.wait_ready(0, every=True):
                ready = True
                self.shared.update(self.age, pid, _READY)
            if self.nr >= self.max_requests:
                now = time.monotonic()
                if limit_since is None:
                    limit_since = now
                if (self.cfg.workers <= 1 or self.shared.claim_retirement(self.age, pid)
                        or now - limit_since >= self.cfg.graceful_timeout):
                    self.log.info("Autorestarting worker after current request (%d requests).", self.nr)
                    self.alive = False
                    break
            self._sleep(self._beat() if ready and limit_since is None else FAST_POLL)

    def _await_successor(self, deadline: float) -> None:
        """If a reload's new workers are booting, keep serving until one is connected (and settled).

        The successors are the younger workers that are *booting* when we are
        told to stop: on SIGHUP the master forks the new workers, then
        SIGTERMs the old ones.  Younger workers that are already serving are
        not successors (on SIGHUP they are old ones too, about to be stopped).
        Then the old workers send their GOAWAYs one at a time (``next_handover``).
        """
        successors = self.shared.booting_younger(self.age)
        if not successors:
            return
        self.log.info("rhttp worker: serving until a new worker is connected")
        while not self._quick and not self._parent_gone():
            booting, settled_at = self.shared.successor_status(successors)
            now = time.monotonic()
            settled = settled_at is not None and now >= settled_at
            if settled and self.shared.next_handover() == 0.0:
                return
            if settled_at is None and not booting:
                self.log.warning("rhttp worker: the new workers exited before connecting; draining")
                return
            if now >= deadline:
                self.log.warning("rhttp worker: %s; draining anyway",
                                 "no hand-over slot in time" if settled else "no new worker connected in time")
                return
            self.notify()
            self._sleep(FAST_POLL)

    def _stop_gracefully(self, pool: WorkerPool) -> None:
        assert self.options is not None
        start = time.monotonic()
        budget = self.options.shutdown_timeout
        self.shared.update(self.age, os.getpid(), _DRAINING)
        self._await_successor(start + budget / 2)
        if self._quick:
            self._stop_now(pool)
            return
        remaining = max(0.0, start + budget - time.monotonic())
        self.log.info("rhttp worker: draining (up to %.1fs)", remaining)
        result: list[bool] = []
        drainer = threading.Thread(target=lambda: result.append(pool.shutdown(remaining)),
                                   name="rhttp-gunicorn-drain", daemon=True)
        drainer.start()
        while drainer.is_alive():
            self.notify()  # the master may be reloading: it must not think we hang
            if self._quick:
                self.log.info("rhttp worker: quick exit requested while draining")
                return  # the process exits; the tunnels die with it
            self._sleep(min(self._beat(), 0.1))
        if result and result[0]:
            self.log.info("rhttp worker: drained")
        else:
            self.log.warning("rhttp worker: drain deadline reached with requests in flight")

    def _stop_now(self, pool: WorkerPool) -> None:
        self.log.info("rhttp worker: closing tunnels now")
        pool.shutdown(0)
