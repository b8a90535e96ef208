"""The peer-closed probe (``_io.peer_closed``) on a real socket: it sees a close without reading.

The public server and the mount use it to notice a client that went away
while its response is still being produced, without consuming a pipelined
request that may be waiting behind it.
"""

from __future__ import annotations

import socket

import pytest

from rhttp_wsgi._io import POLLRDHUP, peer_closed


@pytest.mark.skipif(not POLLRDHUP, reason="POLLRDHUP is Linux-only")
def test_peer_closed_probe_never_reads() -> None:
    a, b = socket.socketpair()
    try:
        b.sendall(b"pipelined")
        assert not peer_closed(a)
        b.close()
        assert peer_closed(a)
        assert a.recv(100) == b"pipelined"  # the probe left the bytes queued
    finally:
        a.close()
    assert peer_closed(a)  # a closed socket counts as gone
