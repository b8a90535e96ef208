"""In-process micro-benchmark of the worker's hot path: µs per request, no sockets.

Two modes:

``inline`` (default)
    The worker side is the real code — ``TunnelProtocol("server")``, a
    ``Tunnel`` (never ``run()``: no socket, no thread), ``Tunnel._handle_events_locked``,
    its stream policy running :func:`rhttp_wsgi.wsgi.run_wsgi` inline, and the writer's flush pass — driven in
    one thread against an HTTP/2 client peer in memory
    (``TunnelProtocol("client")``, i.e. what our proxy runs).  Only the worker's
    steps are timed, with the thread's CPU clock (``thread_time_ns``: time other
    processes take from this core is not counted, which keeps the figure stable
    on a busy machine), so the peer's h2 cost is excluded.  ``--tls`` adds a
    memory-BIO TLS session on both sides (the worker decrypts its input and
    encrypts its output inside the timed steps).
    This is the number to track for regressions of the hot path.  With no
    writer thread, a response is buffered whole (the backpressure watermark is
    lifted for the run), so large ``--path /download?n=...`` bodies work too.

``threads``
    A real worker ``Tunnel.run()`` (reader + writer threads) and an
    ``AppThreadPool`` on one end of a ``socketpair()``; the peer is driven from
    the benchmark thread.  Reports wall µs/request and the *worker threads'*
    CPU µs/request (per-thread CPU clocks of the reader, writer and app threads,
    so the peer's CPU is excluded).  Includes thread hand-offs; no TLS.

``--profile`` runs the inline mode under cProfile and prints the top functions
by tottime.

    python benchmarks/micro_core.py                 # inline, hello world
    python benchmarks/micro_core.py --tls
    python benchmarks/micro_core.py --mode threads --concurrency 16
    python benchmarks/micro_core.py --profile --limit 20
    python benchmarks/micro_core.py --path '/download?n=65536'
    python benchmarks/micro_core.py --path /upload --body 1048576 --mode threads
    python benchmarks/micro_core.py --json          # one JSON line (for run.py)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import h2.events  # noqa: E402

from benchmarks import apps  # noqa: E402
from rhttp_wsgi import _tunnel  # noqa: E402
from rhttp_wsgi._protocol import TunnelProtocol  # noqa: E402
from rhttp_wsgi._tunnel import WRITE_BATCH, Channel, Tunnel  # noqa: E402
from rhttp_wsgi.options import ProxyOptions, WorkerOptions  # noqa: E402
from rhttp_wsgi.streams import StreamPolicy  # noqa: E402
from rhttp_wsgi.wsgi import WSGIContext  # noqa: E402

#: The worker's and the proxy's options: the defaults (no file is read, no proxy dialled).
WORKER_OPTIONS = WorkerOptions(proxy="127.0.0.1:9", cert="unused.crt", key="unused.key")
PROXY_OPTIONS = ProxyOptions(cert="unused.crt", key="unused.key", workers_ca="unused.ca")


#: Request headers as HAProxy sends them for an HTTP/1.1 client (host, no :authority).
def request_headers(path: str, body: int = 0) -> list[tuple[bytes, bytes]]:
    extra = [(b"content-length", str(body).encode())] if body else []
    return [
        (b":method", b"POST" if body else b"GET"),
        (b":scheme", b"https"),
        (b":path", path.encode()),
        (b"host", b"127.0.0.1:8080"),
        (b"user-agent", b"h2load nghttp2/1.52.0"),
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"127.0.0.1"),
        (b"x-forwarded-proto", b"http"),
        *extra,
    ]


def send_body(proto: TunnelProtocol, sid: int, remaining: int, block: bytes) -> int:
    """Queue as much of a request body as the windows allow; returns what is left."""
    while remaining:
        n = min(remaining, proto.outbound_window(sid), proto.max_outbound_frame_size, len(block))
        if n <= 0:
            break
        remaining -= n
        proto.send_data(sid, block[:n], end_stream=not remaining)
    return remaining


# ---------------------------------------------------------------------------
# TLS in memory
# ---------------------------------------------------------------------------


def tls_pair() -> tuple[Any, Any, tempfile.TemporaryDirectory[str]]:
    """A worker (client) and proxy (server) TLSSession with a finished handshake, in memory."""
    from OpenSSL import SSL

    from rhttp_wsgi.pki import DemoPKI
    from rhttp_wsgi.tls import TLSSession, client_context, server_context

    tmp = tempfile.TemporaryDirectory(prefix="rhttp-micro-")
    pki = DemoPKI.create(Path(tmp.name), worker_names=("micro",))
    cert, key = pki.workers["micro"]
    cctx = client_context(str(cert), str(key), str(pki.ca_cert))
    sctx = server_context(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert))
    w = TLSSession(cctx, server_side=False, sni="localhost", verify_name="localhost")
    p = TLSSession(sctx, server_side=True)
    done = {w: False, p: False}
    for _ in range(50):
        for me, other in ((w, p), (p, w)):
            if not done[me]:
                try:
                    me._conn.do_handshake()
                    done[me] = True
                except SSL.WantReadError:
                    pass
            out = me.pending_output()
            if out:
                other._conn.bio_write(out)
        if all(done.values()):
            break
    if not all(done.values()):
        raise RuntimeError("in-memory TLS handshake did not finish")
    w._post_handshake_checks()
    return w, p, tmp


# ---------------------------------------------------------------------------
# inline mode
# ---------------------------------------------------------------------------


class Inline:
    """The worker's hot path, single-threaded, against an in-memory h2 client."""

    def __init__(self, app: Callable[..., Any], path: str, tls: bool = False, body: int = 0) -> None:
        # One thread plays the app and the writer: an app write must never
        # block waiting for a writer pass, so lift the watermark.
        _tunnel.HIGH_WATER = 1 << 62
        self.worker = TunnelProtocol("server", WORKER_OPTIONS)
        self.ctx = WSGIContext(app, remote_addr="127.0.0.1", remote_port=1)
        # The stream policy runs each handler inline (no app thread in this mode).
        policy = StreamPolicy(WORKER_OPTIONS, self.ctx, lambda fn, *args: fn(*args))
        self.tunnel = Tunnel(None, None, self.worker, WORKER_OPTIONS, name="micro",  # type: ignore[arg-type]
                             streams=policy)
        self.peer = TunnelProtocol("client", PROXY_OPTIONS)
        self.headers = request_headers(path, body)
        self.body = body
        self.block = b"u" * 65536
        self.worker_ns = 0
        self.body_bytes = 0
        self._pending = b""
        #: When set, only the worker's steps run under this profiler.
        self.profiler: cProfile.Profile | None = None
        self._tmp = None
        self.wtls = self.ptls = None
        if tls:
            self.wtls, self.ptls, self._tmp = tls_pair()
        now = time.monotonic()
        with self.tunnel.lock:
            self.worker.initiate(now)
        self.peer.initiate(now)
        # Exchange prefaces and SETTINGS (and their ACKs) until quiet.
        for _ in range(4):
            self._to_peer(self._worker_output())
            self._to_worker(self._peer_output())

    # -- plumbing ------------------------------------------------------------

    def _peer_output(self) -> bytes:
        data = self.peer.data_to_send()
        if self.ptls is not None and data:
            data = self.ptls.encrypt(data)
        return data

    def _to_worker(self, data: bytes) -> list[Channel]:
        """Worker reader step (timed by the caller): decrypt, parse, dispatch."""
        new: list[Channel] = []
        if not data:
            return new
        t = self.tunnel
        with t.lock:
            plain = self.wtls.decrypt(data) if self.wtls is not None else data
            events = self.worker.receive(plain, 0.0)
            if events:
                t._handle_events_locked(events, new)
                for ch in new:  # as the reader does
                    ch._handler = True
        return new

    def _worker_output(self) -> bytes:
        """Worker writer step: what one pass of ``Tunnel._writer_loop`` does (lock held)."""
        t = self.tunnel
        with t.lock:
            t._dirty = False
            if t._ready:
                budget = WRITE_BATCH
                for ch in list(t._ready):
                    moved, blocked = ch._flush_locked(budget)
                    budget -= moved
                    if blocked:
                        t._ready.discard(ch)
                        t._blocked.add(ch)
                    elif not ch._out or ch.error is not None:
                        t._ready.discard(ch)
                    if budget <= 0:
                        t._dirty = True
                        break
            plain = self.worker.data_to_send()
            if self.wtls is not None:
                return self.wtls.encrypt(plain) if plain else self.wtls.pending_output()
            return plain

    def _to_peer(self, data: bytes) -> list[h2.events.Event]:
        if not data:
            return []
        if self.ptls is not None:
            data = self.ptls.decrypt(data)
        events = self.peer.receive(data, 0.0)
        for ev in events:
            if type(ev) is h2.events.DataReceived:
                self.body_bytes += len(ev.data)
                self.peer.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        return events

    # -- one request -----------------------------------------------------------

    def request(self) -> None:
        peer = self.peer
        sid = peer.open_stream(self.headers, end_stream=not self.body)
        left = send_body(peer, sid, self.body, self.block)
        # (plus what the peer still owed from the previous request, e.g. WINDOW_UPDATE)
        wire = self._pending + self._peer_output()
        clock = time.thread_time_ns
        prof = self.profiler
        done = False
        while not done:
            if prof is not None:
                prof.enable()
            t0 = clock()
            new = self._to_worker(wire)
            for ch in new:
                self.tunnel._dispatch(ch)
            out = self._worker_output()
            self.worker_ns += clock() - t0
            if prof is not None:
                prof.disable()
            for ev in self._to_peer(out):
                if type(ev) is h2.events.StreamEnded and ev.stream_id == sid:
                    done = True
                elif type(ev) is h2.events.StreamReset:
                    raise RuntimeError(f"stream reset: {ev}")
            if left:
                left = send_body(peer, sid, left, self.block)
            wire = self._peer_output()
            if not out and not wire and not done:
                raise RuntimeError("the worker stalled")
        self._pending = wire

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def run_inline(args: argparse.Namespace) -> dict[str, Any]:
    app = apps.app
    bench = Inline(app, args.path, tls=args.tls, body=args.body)
    for _ in range(args.warmup):
        bench.request()
    samples = []
    for _ in range(args.repeat):
        bench.worker_ns = 0
        t0 = time.perf_counter_ns()
        for _ in range(args.requests):
            bench.request()
        total = time.perf_counter_ns() - t0
        samples.append((bench.worker_ns / args.requests / 1000, total / args.requests / 1000))
    bench.close()
    worker = sorted(s[0] for s in samples)
    both = sorted(s[1] for s in samples)
    return {
        "mode": "inline", "tls": args.tls, "path": args.path, "requests": args.requests,
        "repeat": args.repeat,
        "worker_us_per_req": statistics.median(worker), "worker_us_min": worker[0], "worker_us_max": worker[-1],
        "worker_plus_peer_us_per_req": statistics.median(both),
    }


def run_profile(args: argparse.Namespace) -> str:
    bench = Inline(apps.app, args.path, tls=args.tls, body=args.body)
    for _ in range(args.warmup):
        bench.request()
    prof = cProfile.Profile()
    bench.profiler = prof  # the worker's steps only, not the in-memory peer
    for _ in range(args.requests):
        bench.request()
    bench.profiler = None
    bench.close()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(args.limit)
    us = bench.worker_ns / args.requests / 1000
    head = (f"cProfile of the worker's steps only (inline mode, path {args.path}, tls={args.tls}),"
            f" {args.requests} requests; {us:.1f} µs/request under the profiler\n")
    return head + out.getvalue()


# ---------------------------------------------------------------------------
# threads mode
# ---------------------------------------------------------------------------


def _thread_cpu_ns(threads: list[threading.Thread]) -> int:
    total = 0
    for th in threads:
        ident = th.ident
        if ident is None or not th.is_alive():
            continue
        try:
            total += time.clock_gettime_ns(time.pthread_getcpuclockid(ident))
        except (OSError, AttributeError):
            pass
    return total


def run_threads(args: argparse.Namespace) -> dict[str, Any]:
    from rhttp_wsgi._pool import AppThreadPool

    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    pool = AppThreadPool(16, name="micro-app")
    ctx = WSGIContext(apps.app, remote_addr="127.0.0.1", remote_port=1)
    proto = TunnelProtocol("server", WORKER_OPTIONS)
    tunnel = Tunnel(a, None, proto, WORKER_OPTIONS, name="micro",
                    streams=StreamPolicy(WORKER_OPTIONS, ctx, pool.submit))
    reader = threading.Thread(target=tunnel.run, name="micro-reader", daemon=True)
    reader.start()
    peer = TunnelProtocol("client", PROXY_OPTIONS)
    peer.initiate(time.monotonic())
    b.sendall(peer.data_to_send())
    headers = request_headers(args.path, args.body)
    block = b"u" * 65536
    uploading: dict[int, int] = {}  # stream -> body bytes still to send
    in_flight: set[int] = set()
    done = 0

    def pump(block: bool) -> None:
        nonlocal done
        b.setblocking(block)
        try:
            data = b.recv(1 << 20)
        except BlockingIOError:
            return
        finally:
            b.setblocking(True)
        if not data:
            raise RuntimeError("worker closed")
        for ev in peer.receive(data, time.monotonic()):
            if type(ev) is h2.events.DataReceived:
                peer.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif type(ev) is h2.events.StreamEnded:
                in_flight.discard(ev.stream_id)
                uploading.pop(ev.stream_id, None)
                done += 1
            elif type(ev) is h2.events.StreamReset:
                raise RuntimeError(f"stream reset: {ev}")
        for sid, left in list(uploading.items()):
            uploading[sid] = send_body(peer, sid, left, block)
            if not uploading[sid]:
                del uploading[sid]
        out = peer.data_to_send()
        if out:
            b.sendall(out)

    while not tunnel.ready.is_set():
        pump(True)

    def batch(n: int) -> None:
        nonlocal done
        target = done + n
        sent = 0
        while done < target:
            while len(in_flight) < args.concurrency and sent < n:
                sid = peer.open_stream(headers, end_stream=not args.body)
                if args.body:
                    uploading[sid] = send_body(peer, sid, args.body, block)
                in_flight.add(sid)
                sent += 1
            out = peer.data_to_send()
            if out:
                b.sendall(out)
            pump(True)

    batch(args.warmup)
    workers = [reader, *(t for t in threading.enumerate() if t.name.startswith(("micro-writer", "micro-app")))]
    workers = list({id(t): t for t in workers}.values())
    samples = []
    for _ in range(args.repeat):
        threads = [reader, *(t for t in threading.enumerate() if t.name.startswith(("micro-writer", "micro-app")))]
        cpu0 = _thread_cpu_ns(threads)
        t0 = time.perf_counter_ns()
        batch(args.requests)
        wall = time.perf_counter_ns() - t0
        cpu = _thread_cpu_ns(threads) - cpu0
        samples.append((wall / args.requests / 1000, cpu / args.requests / 1000))
    tunnel.close("benchmark done")
    reader.join(5)
    pool.shutdown(5)
    b.close()
    del workers
    wall_s = sorted(s[0] for s in samples)
    cpu_s = sorted(s[1] for s in samples)
    return {
        "mode": "threads", "path": args.path, "concurrency": args.concurrency, "requests": args.requests,
        "repeat": args.repeat,
        "wall_us_per_req": statistics.median(wall_s), "wall_us_min": wall_s[0], "wall_us_max": wall_s[-1],
        "worker_cpu_us_per_req": statistics.median(cpu_s), "worker_cpu_us_min": cpu_s[0],
        "worker_cpu_us_max": cpu_s[-1],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("inline", "threads"), default="inline")
    p.add_argument("--path", default="/", help="request path served by benchmarks.apps:app (default /)")
    p.add_argument("--tls", action="store_true", help="inline mode: memory-BIO TLS on both sides")
    p.add_argument("--body", type=int, default=0,
                   help="POST a request body of this many bytes (use with --path /upload)")
    p.add_argument("--requests", type=int, default=5000, help="requests per repetition")
    p.add_argument("--repeat", type=int, default=5, help="repetitions (the median is reported)")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=1, help="threads mode: requests in flight")
    p.add_argument("--profile", action="store_true", help="cProfile the inline mode; print top by tottime")
    p.add_argument("--limit", type=int, default=25, help="--profile: how many functions to print")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.profile:
        sys.stdout.write(run_profile(args))
        return 0
    result = run_inline(args) if args.mode == "inline" else run_threads(args)
    result["python"] = sys.version.split()[0]
    result["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v:.2f}" if isinstance(v, float) else f"{k:>28}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
