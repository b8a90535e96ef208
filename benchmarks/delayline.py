"""A userspace delay line: a TCP relay that holds every byte for a fixed one-way delay.

netem is not available on these machines, so a long fat pipe is made in userspace: each
connection accepted on ``--listen`` is relayed to ``--to``, and every chunk read in one
direction is written out ``--delay`` seconds later (both directions, so the round trip is
twice the delay).  ``--rate`` adds a bottleneck link: chunks leave one after the other at that
many bytes per second, then travel ``--delay``.  What is in flight is bounded by ``--queue``
bytes per direction (a router's buffer): beyond it the relay stops reading, and TCP's flow
control holds the sender back.

    python benchmarks/delayline.py --listen 127.0.0.1:9000 --to 127.0.0.1:8443 --delay 0.025
    python benchmarks/delayline.py --listen 127.0.0.1:9000 --to 127.0.0.1:8443 --delay 0.025 --rate 125e6

Between loopback endpoints the relay's own sockets see loopback round trips, so a plain TCP
connection through it is never limited by its TCP windows: it gets whatever the relay moves.
An HTTP/2 tunnel through it is limited by its flow-control windows, which are end to end and
see the full round trip: that is what ``benchmarks/wan.py`` measures.

Threads: one acceptor, and per connection one reader and one writer per direction.  Used as
a library (``DelayLine(...).start()``) or as a process (``python benchmarks/delayline.py``,
stopped by SIGTERM/SIGINT).  Prints nothing but its ready line.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import signal
import socket
import sys
import threading
import time

__all__ = ["DelayLine"]

CHUNK = 1 << 20


class _Direction:
    """One direction of one connection: read from ``src`` now, write to ``dst`` ``delay`` later."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, rate: float | None,
                 queue_limit: int) -> None:
        self.src = src
        self.dst = dst
        self.delay = delay
        self.rate = rate
        self.queue_limit = queue_limit
        self.cond = threading.Condition()
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()  # (due, data; b"" = EOF)
        self.queued = 0
        self.closed = False
        self._link_free = 0.0  # with a rate: when the bottleneck has sent what it holds
        self.threads = [threading.Thread(target=self._read, daemon=True, name="delayline-read"),
                        threading.Thread(target=self._write, daemon=True, name="delayline-write")]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.queued >= self.queue_limit and not self.closed:
                        self.cond.wait(1.0)
                    if self.closed:
                        return
                try:
                    data = self.src.recv(CHUNK)
                except OSError:
                    data = b""
                now = time.monotonic()
                if self.rate:
                    start = max(now, self._link_free)
                    self._link_free = start + len(data) / self.rate
                    due = self._link_free + self.delay
                else:
                    due = now + self.delay
                with self.cond:
                    self.queue.append((due, data))
                    self.queued += len(data)
                    self.cond.notify_all()
                if not data:
                    return
        finally:
            with self.cond:
                self.cond.notify_all()

    def _write(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait(1.0)
                if self.closed:
                    return
                due = self.queue[0][0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            # everything due by now leaves in one write
            parts: list[bytes] = []
            eof = False
            with self.cond:
                now = time.monotonic()
                while self.queue and self.queue[0][0] <= now:
                    _, data = self.queue.popleft()
                    if not data:
                        eof = True
                        break
                    parts.append(data)
                n = sum(len(p) for p in parts)
                self.queued -= n
                self.cond.notify_all()
            try:
                if parts:
                    self.dst.sendall(b"".join(parts) if len(parts) > 1 else parts[0])
                if eof:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
            except OSError:
                self.close()
                return

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class DelayLine:
    """Relay ``listen`` → ``target`` with ``delay`` seconds each way (optionally ``rate`` bytes/s)."""

    def __init__(self, target: tuple[str, int], delay: float, *, rate: float | None = None,
                 listen: tuple[str, int] = ("127.0.0.1", 0), queue_limit: int = 256 << 20) -> None:
        self.target = target
        self.delay = delay
        self.rate = rate
        self.queue_limit = queue_limit
        self.sock = socket.create_server(listen, backlog=128)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[tuple[socket.socket, socket.socket, list[_Direction]]] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name="delayline-accept")

    def start(self) -> DelayLine:
        self._acceptor.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(self.target, timeout=5)
            except OSError:
                a.close()
                continue
            b.settimeout(None)
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            dirs = [_Direction(a, b, self.delay, self.rate, self.queue_limit),
                    _Direction(b, a, self.delay, self.rate, self.queue_limit)]
            with self._lock:
                self._conns.append((a, b, dirs))
            for d in dirs:
                d.start()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for a, b, dirs in conns:
            for d in dirs:
                d.close()
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
        self._acceptor.join(5)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, type=_address, help="HOST:PORT to accept on")
    ap.add_argument("--to", required=True, type=_address, help="HOST:PORT to relay to")
    ap.add_argument("--delay", type=float, default=0.025, help="one-way delay in seconds (default 0.025)")
    ap.add_argument("--rate", type=float, default=None, help="bottleneck bytes/s per direction (default: none)")
    ap.add_argument("--queue", type=int, default=256 << 20, help="most bytes in flight per direction")
    args = ap.parse_args(argv)
    line = DelayLine(args.to, args.delay, rate=args.rate, listen=args.listen, queue_limit=args.queue).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"delayline ready on 127.0.0.1:{line.port} -> {args.to[0]}:{args.to[1]}, {args.delay * 1000:g} ms each way",
          flush=True)
    stop.wait()
    line.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
