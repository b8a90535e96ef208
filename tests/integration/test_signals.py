"""The stop-signal wait shared by the CLI and WorkerPool.serve_forever: real signals, sent from a thread."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from rhttp_wsgi._signals import wait_for_stop_signal


def _send_once_installed(sig: signal.Signals, before: object) -> threading.Thread:
    """Send ``sig`` to this process as soon as the wait's handler replaced ``before``."""

    def run() -> None:
        deadline = time.monotonic() + 10
        while signal.getsignal(sig) is before and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), sig)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_the_wait_and_the_previous_handler_comes_back(sig: signal.Signals,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    before = signal.getsignal(sig)
    stop = threading.Event()
    sender = _send_once_installed(sig, before)
    with caplog.at_level("INFO", logger="rhttp_wsgi.signals"):
        assert wait_for_stop_signal(stop, timeout=10) is True
    sender.join(5)
    assert stop.is_set()
    assert signal.getsignal(sig) is before
    assert f"received {sig.name}" in caplog.text


def test_stop_event_ends_the_wait_without_a_signal() -> None:
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    assert wait_for_stop_signal(stop, timeout=10) is True


def test_timeout_ends_the_wait() -> None:
    before = signal.getsignal(signal.SIGTERM)
    assert wait_for_stop_signal(timeout=0.01) is False
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_no_handler_is_installed() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = threading.Event()
    seen: list[object] = []
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(wait_for_stop_signal(stop, timeout=10)))
    t.start()
    time.sleep(0.05)
    seen.append(signal.getsignal(signal.SIGTERM))
    stop.set()
    t.join(5)
    assert result == [True] and seen == [before]
