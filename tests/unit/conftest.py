"""``tests/unit`` is sans-I/O: a test here opens no socket and starts no thread.

Enforced for every test in this folder: creating a socket or starting a
thread from the test's own thread fails the test.  A test that needs either
belongs in ``tests/tunnel`` (a real tunnel's threads over a socketpair) or
``tests/integration`` (real sockets, threads, processes).  Other threads
(none should be alive here, see ``tests/conftest.py``) are left alone.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest


class SansIOViolation(AssertionError):
    pass


@pytest.fixture(autouse=True)
def sans_io(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    test_thread = threading.get_ident()
    real_socket_init = socket.socket.__init__
    real_thread_start = threading.Thread.start

    def socket_init(self: socket.socket, *args: Any, **kwargs: Any) -> None:
        if threading.get_ident() == test_thread:
            raise SansIOViolation("tests/unit is sans-I/O: this test opened a socket "
                                  "(it belongs in tests/tunnel or tests/integration)")
        real_socket_init(self, *args, **kwargs)

    def thread_start(self: threading.Thread) -> None:
        if threading.get_ident() == test_thread:
            raise SansIOViolation(f"tests/unit is sans-I/O: this test started a thread ({self.name}; "
                                  "it belongs in tests/tunnel or tests/integration)")
        real_thread_start(self)

    monkeypatch.setattr(socket.socket, "__init__", socket_init)
    monkeypatch.setattr(threading.Thread, "start", thread_start)
    yield
