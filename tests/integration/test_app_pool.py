"""The app thread pool (``rhttp_wsgi._pool.AppThreadPool``): real threads, bounded, never queueing
behind a blocked thread while one is free."""

from __future__ import annotations

import logging
import threading

import pytest

from rhttp_wsgi._pool import AppThreadPool

pytestmark = pytest.mark.timeout(60)


def test_pool_never_queues_behind_a_blocked_thread() -> None:
    """A task waits only when every thread is busy, even when tasks arrive in a burst."""
    pool = AppThreadPool(4, name="t-pool")
    release = threading.Event()
    started = threading.Semaphore(0)
    done = threading.Semaphore(0)

    def blocked() -> None:
        started.release()
        release.wait(10)
        done.release()

    try:
        for _ in range(3):  # three threads stuck in the app (SSE streams, say)
            pool.submit(blocked)
        for _ in range(3):
            assert started.acquire(timeout=5)
        ran = threading.Event()
        pool.submit(ran.set)  # the fourth thread runs it
        assert ran.wait(5)
        for _ in range(5):  # a burst, while 3 of 4 threads are blocked: all run on the free one
            ev = threading.Event()
            pool.submit(ev.set)
            assert ev.wait(5)
        assert pool.size == 4
        # all four blocked: the next task waits (bounded pool) and runs as soon as one is free
        pool.submit(blocked)
        assert started.acquire(timeout=5)
        late = threading.Event()
        pool.submit(late.set)
        assert not late.wait(0.2)
        release.set()
        assert late.wait(5)
        for _ in range(4):
            assert done.acquire(timeout=5)
        assert pool.size == 4
    finally:
        release.set()
        assert pool.shutdown(5)


def test_pool_bursts_and_shutdown_drains_queued_tasks() -> None:
    pool = AppThreadPool(3, name="t-pool")
    lock = threading.Lock()
    count = [0]
    gate = threading.Event()

    def task(wait: bool) -> None:
        if wait:
            gate.wait(10)
        with lock:
            count[0] += 1

    for round_ in range(20):
        for _ in range(10):
            pool.submit(task, False)
        deadline = 10.0
        while count[0] < (round_ + 1) * 10 and deadline > 0:
            threading.Event().wait(0.001)
            deadline -= 0.001
        assert count[0] == (round_ + 1) * 10
    assert 1 <= pool.size <= 3
    for _ in range(3):
        pool.submit(task, True)
    for _ in range(5):
        pool.submit(task, False)  # queued behind the three blocked tasks
    threading.Timer(0.1, gate.set).start()
    assert pool.shutdown(10)
    assert count[0] == 200 + 8
    with pytest.raises(RuntimeError):
        pool.submit(task, False)
    assert pool.shutdown(1)  # twice is fine


def test_pool_task_exception_is_logged_and_the_thread_lives(caplog: pytest.LogCaptureFixture) -> None:
    pool = AppThreadPool(1, name="t-pool")

    def boom() -> None:
        raise RuntimeError("boom")

    ok = threading.Event()
    with caplog.at_level(logging.ERROR, logger="rhttp_wsgi.pool"):
        pool.submit(boom)
        pool.submit(ok.set)
        assert ok.wait(5)
    assert pool.size == 1
    assert any("failed" in r.getMessage() for r in caplog.records)
    assert pool.shutdown(5)
