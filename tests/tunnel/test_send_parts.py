"""The writer's ``_send_parts``: a batch's TLS records go out in one ``sendmsg``, in order, whole.

A socket may take part of a ``sendmsg`` (a send timeout, a signal): the rest must follow, from
the first byte not taken, across part boundaries.  Driven by a fake socket that takes a fixed
number of bytes per call, so every split is exercised deterministically; and once over a real
socketpair.
"""

from __future__ import annotations

import random
import socket
import threading

import pytest

from rhttp_wsgi._tunnel import _send_parts


class TakesAtMost:
    """A socket whose sendmsg takes at most ``n`` bytes per call (and records them)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.got = bytearray()
        self.calls = 0

    def sendmsg(self, buffers: list[memoryview]) -> int:
        self.calls += 1
        left = self.n
        for b in buffers:
            take = min(left, len(b))
            self.got += b[:take]
            left -= take
            if not left:
                break
        return self.n - left

    def sendall(self, data: bytes) -> None:
        self.got += data


@pytest.mark.parametrize("n", [1, 7, 100, 16384, 65536, 1 << 30])
def test_every_byte_goes_out_in_order_whatever_each_call_takes(n: int) -> None:
    rng = random.Random(n)
    parts = [rng.randbytes(rng.choice([0, 1, 9, 300, 16413, 65536 + 22])) for _ in range(12)]
    parts.insert(3, bytearray(b"a bytearray part"))
    sock = TakesAtMost(n)
    _send_parts(sock, parts)  # type: ignore[arg-type]
    assert bytes(sock.got) == b"".join(parts)
    expected_calls = -(-sum(map(len, parts)) // n)
    assert sock.calls == expected_calls  # one call per n bytes: no call wasted on an empty part


def test_one_part_is_a_plain_sendall_and_no_part_sends_nothing() -> None:
    sock = TakesAtMost(5)
    _send_parts(sock, [b"", b"only", b""])  # type: ignore[arg-type]
    assert bytes(sock.got) == b"only" and sock.calls == 0
    _send_parts(sock, [])  # type: ignore[arg-type]
    assert bytes(sock.got) == b"only"


def test_a_socket_that_takes_nothing_is_an_error_not_a_busy_loop() -> None:
    with pytest.raises(OSError):
        _send_parts(TakesAtMost(0), [b"a", b"b"])  # type: ignore[arg-type]


def test_over_a_real_socketpair_with_a_small_send_buffer() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    parts = [random.Random(i).randbytes(200_000 + i) for i in range(6)]
    got = bytearray()

    def read() -> None:
        while True:
            chunk = b.recv(65536)
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=read)
    t.start()
    try:
        _send_parts(a, parts)
        a.shutdown(socket.SHUT_WR)
        t.join(30)
        assert not t.is_alive()
        assert bytes(got) == b"".join(parts)
    finally:
        a.close()
        b.close()
