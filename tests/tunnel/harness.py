"""The worker under test: a real worker-role tunnel on a socketpair, driven by the raw-frame proxy peer.

The worker side is the real thing: ``Tunnel(sock_a, None, TunnelProtocol("server", options), options)``
running its reader/writer threads over one end of a ``socket.socketpair()``
(plaintext: ``tls=None``), with the worker's :class:`StreamPolicy` handing streams
to an :class:`AppThreadPool` (running :func:`run_wsgi` for a request).  The
other end is driven by :class:`tests.h2peer.ProxyPeer`, which speaks raw frames
(see ``tests/h2peer.py`` for what it does on its own and what it checks);
``WorkerHarness`` turns on its PING ACKs unless a test wants to watch liveness
fail, and asserts at teardown that it saw no protocol violation.

Typical use (``make_worker`` is a fixture, see ``conftest.py``)::

    h = make_worker(app, options=worker_options(...), peer_settings={S.INITIAL_WINDOW_SIZE: 10})
    h.peer.request(1, "POST", "/x", body=b"abc")
    r = h.peer.response(1)                      # status, headers, body, trailers, reset
    h.peer.wait_for(lambda f: isinstance(f, RstStreamFrame) and f.stream_id == 3, timeout=5)

Time: ``tunnel_kw={"clock": FakeClock()}`` gives the tunnel a clock the test
moves (:class:`FakeClock`), so a deadline is checked at the exact instant the
test chooses instead of by sleeping.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from rhttp_wsgi._pool import AppThreadPool
from rhttp_wsgi._protocol import TunnelProtocol
from rhttp_wsgi._tunnel import Tunnel
from rhttp_wsgi.options import WorkerOptions
from rhttp_wsgi.streams import StreamPolicy
from rhttp_wsgi.wsgi import WSGIContext
from tests.h2peer import DEFAULT_TIMEOUT, ProxyPeer

__all__ = [
    "DEFAULT_TIMEOUT",
    "FakeClock",
    "WorkerHarness",
    "make_worker",
    "worker_options",
]


class FakeClock:
    """A clock that only the test moves, for ``Tunnel(..., clock=...)`` (``tunnel_kw={"clock": clock}``).

    It counts its reads: the tunnel's writer reads it before it checks its
    timers, so after a move ``wait_reads(clock.reads + 2)`` proves the timers
    ran at the new time (a read is followed by a check; the next read means
    the check finished).  That is for deadlines no frame can wake the writer
    for (before the peer's SETTINGS); otherwise ``peer.barrier()`` is the
    simpler proof (the writer runs its timers before it sends the PING ACK).
    """

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t
        self.reads = 0
        self._cond = threading.Condition()

    def __call__(self) -> float:
        with self._cond:
            self.reads += 1
            self._cond.notify_all()
            return self.t

    def set(self, t: float) -> None:
        with self._cond:
            self.t = t

    def advance(self, dt: float) -> None:
        with self._cond:
            self.t += dt

    def wait_reads(self, total: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait until the clock has been read ``total`` times in all."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.reads >= total, timeout):
                raise AssertionError(f"the clock was read {self.reads} times, not {total}, within {timeout}s")


# -- the worker under test -------------------------------------------------------------


def worker_options(**kw: Any) -> WorkerOptions:
    """``WorkerOptions`` for a harness worker: ``kw`` over the defaults (no proxy is dialled, no file read).

    The peer's SETTINGS deadline (``handshake_timeout``) is 5 s unless given.
    """
    kw.setdefault("handshake_timeout", 5.0)
    return WorkerOptions(proxy="127.0.0.1:9", cert="unused.crt", key="unused.key", **kw)


class WorkerHarness:
    """A worker-role tunnel on one end of a socketpair, an app pool, and a ProxyPeer on the other.

    ``options`` (see :func:`worker_options`) configures the protocol core, the
    tunnel and the stream policy alike, as in a ``WorkerPool``.
    """

    def __init__(
        self,
        app: Callable[..., Any],
        *,
        options: WorkerOptions | None = None,
        peer_settings: dict[int, int] | None = None,
        peer_conn_window: int | None = None,
        handshake: bool = True,
        threads: int = 16,
        auto_ack_ping: bool = True,
        auto_window: bool = True,
        auto_ack_settings: bool = True,
        tunnel_kw: dict[str, Any] | None = None,
        ctx_kw: dict[str, Any] | None = None,
        connect_handlers: dict[str | None, Callable[..., None]] | None = None,
    ) -> None:
        a, b = socket.socketpair()
        self.pool = AppThreadPool(threads, name="test-app")
        self.ctx = WSGIContext(app, **(ctx_kw or {}))
        self.options = options = options or worker_options()
        self.proto = TunnelProtocol("server", options)
        #: streams handed to the app pool
        self.dispatched = 0
        #: stream handlers (run_wsgi) that returned: the app thread is free again
        self.served = 0
        self._served_cond = threading.Condition()
        self.streams = StreamPolicy(options, self.ctx, self._submit, connect_handlers=connect_handlers or {})
        self.tunnel = Tunnel(a, None, self.proto, options, name="worker", streams=self.streams,
                             **(tunnel_kw or {}))
        self.reason: str | None = None
        self.thread = threading.Thread(target=self._run, name="worker-tunnel", daemon=True)
        self.peer = ProxyPeer(b, auto_ack_ping=auto_ack_ping, auto_window=auto_window,
                              auto_ack_settings=auto_ack_settings)
        self.thread.start()
        self.peer.start()
        if handshake:
            self.peer.handshake(peer_settings, conn_window=peer_conn_window)
            assert self.tunnel.ready.wait(DEFAULT_TIMEOUT), "worker tunnel never became ready"

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.dispatched += 1
        self.pool.submit(self._serve, fn, args)

    def _serve(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)  # (the policy's runner: the handler, then ch.handler_done())
        finally:
            with self._served_cond:
                self.served += 1
                self._served_cond.notify_all()

    def wait_served(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        with self._served_cond:
            if not self._served_cond.wait_for(lambda: self.served >= n, timeout):
                raise AssertionError(f"only {self.served} of {n} app calls returned within {timeout}s")

    def _run(self) -> None:
        self.reason = self.tunnel.run()

    def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        assert self.tunnel.closed.wait(timeout), f"tunnel still open after {timeout}s; {self.peer.dump()}"
        return self.tunnel.close_reason or ""

    def wait_in_flight(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.tunnel.in_flight != n:  # (a plain len() read: no lock needed)
            if time.monotonic() >= deadline:
                raise AssertionError(f"in_flight is {self.tunnel.in_flight}, expected {n}")
            time.sleep(0.005)

    def close(self) -> None:
        self.tunnel.close("test teardown")
        self.thread.join(DEFAULT_TIMEOUT)
        self.peer.close()
        pool_ok = self.pool.shutdown(DEFAULT_TIMEOUT)
        assert not self.thread.is_alive(), "worker tunnel thread did not exit"
        assert pool_ok, "app threads did not exit (an app is still blocked)"
        assert not self.peer.violations, f"worker broke the protocol: {self.peer.violations}"


@pytest.fixture
def make_worker() -> Any:
    """Factory fixture: ``h = make_worker(app, options=worker_options(...), peer_settings=...)``.

    Teardown closes every harness and asserts no thread was left behind.
    """
    before = set(threading.enumerate())
    made: list[WorkerHarness] = []

    def factory(app: Callable[..., Any], **kw: Any) -> WorkerHarness:
        h = WorkerHarness(app, **kw)
        made.append(h)
        return h

    yield factory
    errors = []
    for h in made:
        try:
            h.close()
        except AssertionError as e:
            errors.append(str(e))
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    while True:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            break
        extra[0].join(max(0.0, deadline - time.monotonic()))
    if extra:
        errors.append(f"leftover threads: {extra}")
    assert not errors, "; ".join(errors)

