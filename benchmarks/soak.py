"""Soak test (run by hand, not in CI): mixed traffic through our proxy and a worker for N minutes.

    python benchmarks/soak.py                 # 30 minutes, a report line every minute
    python benchmarks/soak.py --minutes 1     # quick check (a line every 15 s)
    python benchmarks/soak.py --minutes 2 --interval 30

Two subprocesses, each with its own PID so memory and threads are measured
apart: ``rhttp-wsgi proxy`` (tunnel listener + turnkey public server) and
``rhttp-wsgi worker benchmarks.apps:app`` (one tunnel), with a throwaway PKI
and free loopback ports.  This process is the load: client threads that loop

* ``GET /``                 -> 200 ``Hello, world!`` (keep-alive connections),
* ``POST /upload`` 64 KiB   -> 200 ``65536`` (the worker counts what it read),
* ``GET /sse?n=5&interval=0.05`` -> 200, five ``data:`` events, chunk by chunk,

and checks every answer (status, body) -- anything unexpected is an error.
Every interval it prints requests per kind, errors, and VmRSS / Threads of
both processes (from ``/proc/PID/status``).  At the end: a summary table that
compares the last sample with the 1-minute mark (the first sample for runs of
a minute or less) and says whether RSS and threads stayed within 10 %.

Exit status 0 when there was no error and both stayed within 10 %.  Every
process it starts is stopped by PID (SIGTERM, then SIGKILL); the kernel also
stops them if this script dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rhttp_wsgi.pki import DemoPKI  # noqa: E402

BODY = bytes(range(256)) * 256  # 64 KiB
KINDS = ("get", "post", "sse")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _pdeathsig() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def proc_status(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, Threads) from /proc/PID/status."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads


class Server:
    """One ``python -m rhttp_wsgi ...`` subprocess, output in a log file, stopped by PID."""

    def __init__(self, name: str, argv: list[str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", "rhttp_wsgi", "--log-level", "warning", *argv],
                                         cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, preexec_fn=_pdeathsig)
        self.pid = self.proc.pid

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Load:
    """Client threads; counters guarded by ``lock``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.done: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.messages: list[str] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, gets: int, posts: int, sses: int) -> None:
        for kind, n in (("get", gets), ("post", posts), ("sse", sses)):
            for i in range(n):
                t = threading.Thread(target=self._loop, args=(kind,), name=f"soak-{kind}-{i}", daemon=True)
                self.threads.append(t)
                t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _loop(self, kind: str) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self.stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                problem = getattr(self, "_" + kind)(conn)
            except (OSError, http.client.HTTPException) as e:
                problem = f"{type(e).__name__}: {e}"
                conn.close()
                conn = None
            with self.lock:
                if problem is None:
                    self.done[kind] += 1
                else:
                    self.errors[kind] += 1
                    if len(self.messages) < 20:
                        self.messages.append(f"{kind}: {problem}")
        if conn is not None:
            conn.close()

    @staticmethod
    def _get(conn: http.client.HTTPConnection) -> str | None:
        conn.request("GET", "/")
        r = conn.getresponse()
        body = r.read()
        return None if (r.status, body) == (200, b"Hello, world!") else f"GET / -> {r.status} {body[:80]!r}"

    @staticmethod
    def _post(conn: http.client.HTTPConnection) -> str | None:
        conn.request("POST", "/upload", body=BODY, headers={"Content-Type": "application/octet-stream"})
        r = conn.getresponse()
        body = r.read()
        return None if (r.status, body) == (200, b"65536\n") else f"POST /upload -> {r.status} {body[:80]!r}"

    @staticmethod
    def _sse(conn: http.client.HTTPConnection) -> str | None:
        conn.request("GET", "/sse?n=5&interval=0.05")
        r = conn.getresponse()
        body = r.read()
        expected = b"".join(b"data: event %d\n\n" % i for i in range(5))
        if r.status != 200 or r.getheader("content-type") != "text/event-stream" or body != expected:
            return f"GET /sse -> {r.status} {body[:80]!r}"
        return None

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        with self.lock:
            return Counter(self.done), Counter(self.errors)


@dataclass
class Sample:
    elapsed: float
    done: Counter[str]
    errors: Counter[str]
    proxy: tuple[int, int]
    worker: tuple[int, int]


def wait_ready(port: int, servers: list[Server], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in servers:
            if s.proc.poll() is not None:
                raise SystemExit(f"{s.name} exited ({s.proc.returncode}):\n{s.tail()}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/")
            r = c.getresponse()
            r.read()
            c.close()
            if r.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("proxy + worker did not become ready:\n" + "\n".join(s.tail() for s in servers))


def fmt_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    return "\n".join(out)


def pct(new: int, base: int) -> float:
    return 0.0 if base == 0 else (new - base) * 100.0 / base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long to run (default 30)")
    ap.add_argument("--interval", type=float, default=None,
                    help="seconds between report lines (default 60; 15 for runs of 2 minutes or less)")
    ap.add_argument("--get-threads", type=int, default=4)
    ap.add_argument("--post-threads", type=int, default=2)
    ap.add_argument("--sse-threads", type=int, default=2)
    ap.add_argument("--worker-threads", type=int, default=16)
    ap.add_argument("--tolerance", type=float, default=10.0, help="allowed RSS/thread growth in %% (default 10)")
    args = ap.parse_args(argv)
    duration = args.minutes * 60.0
    interval = args.interval or (60.0 if args.minutes > 2 else 15.0)

    with tempfile.TemporaryDirectory(prefix="rhttp-soak-") as tmpdir:
        tmp = Path(tmpdir)
        pki = DemoPKI.create(tmp, worker_names=("soak-worker",))
        cert, key = pki.workers["soak-worker"]
        tport, pport = free_ports(2)
        servers: list[Server] = []
        load: Load | None = None
        samples: list[Sample] = []
        try:
            proxy = Server("proxy", ["proxy", "--cert", str(pki.server_cert), "--key", str(pki.server_key),
                                     "--workers-ca", str(pki.ca_cert), "--tunnel-bind", f"127.0.0.1:{tport}",
                                     "--public-bind", f"127.0.0.1:{pport}"], tmp)
            servers.append(proxy)
            worker = Server("worker", ["worker", "benchmarks.apps:app", "--proxy", f"127.0.0.1:{tport}",
                                       "--cert", str(cert), "--key", str(key), "--ca", str(pki.ca_cert),
                                       "--threads", str(args.worker_threads)], tmp)
            servers.append(worker)
            wait_ready(pport, servers)
            log(f"soak: {args.minutes:g} min of GET / POST 64 KiB / SSE through proxy pid {proxy.pid} ->"
                f" worker pid {worker.pid}; {args.get_threads}+{args.post_threads}+{args.sse_threads}"
                f" client threads; a line every {interval:g}s")
            load = Load(pport)
            t0 = time.monotonic()
            load.start(args.get_threads, args.post_threads, args.sse_threads)
            prev: Counter[str] = Counter()
            next_at = t0 + interval
            while True:
                end = t0 + duration
                time.sleep(max(0.0, min(next_at, end) - time.monotonic()))
                now = time.monotonic()
                for s in servers:
                    if s.proc.poll() is not None:
                        raise SystemExit(f"{s.name} died ({s.proc.returncode}):\n{s.tail()}")
                done, errors = load.snapshot()
                sample = Sample(now - t0, done, errors, proc_status(proxy.pid), proc_status(worker.pid))
                samples.append(sample)
                rate = {k: (done[k] - prev[k]) / max(1e-9, now - (next_at - interval)) for k in KINDS}
                prev = done
                log(f"t={sample.elapsed / 60:5.2f} min  " + "  ".join(
                    f"{k} {done[k]} ({rate[k]:.0f}/s)" for k in KINDS)
                    + f"  errors {sum(errors.values())}"
                    + f"  proxy {sample.proxy[0] / 1024:.1f} MiB {sample.proxy[1]} thr"
                    + f"  worker {sample.worker[0] / 1024:.1f} MiB {sample.worker[1]} thr")
                if now >= end - 0.01:
                    break
                next_at += interval
            load.join()
            done, errors = load.snapshot()
        finally:
            if load is not None:
                load.join()
            codes = {s.name: s.stop() for s in reversed(servers)}
        if not samples:
            return 1

        base = next((s for s in samples if s.elapsed >= 60.0 - 0.5), samples[0]) \
            if duration > 60.0 + 0.5 else samples[0]
        last = samples[-1]
        total = sum(done.values())
        rows = [[k, str(done[k]), str(errors[k]), f"{done[k] / last.elapsed:.1f}"] for k in KINDS]
        rows.append(["total", str(total), str(sum(errors.values())), f"{total / last.elapsed:.1f}"])
        print()
        print(f"Requests over {last.elapsed / 60:.2f} minutes")
        print(fmt_table(["kind", "ok", "errors", "req/s"], rows))
        print()
        verdicts = []
        mem_rows = []
        for who, b, e in (("proxy", base.proxy, last.proxy), ("worker", base.worker, last.worker)):
            rss_ok = pct(e[0], b[0]) <= args.tolerance
            thr_ok = pct(e[1], b[1]) <= args.tolerance
            verdicts += [rss_ok, thr_ok]
            mem_rows.append([f"{who} RSS (MiB)", f"{b[0] / 1024:.1f}", f"{e[0] / 1024:.1f}",
                             f"{pct(e[0], b[0]):+.1f}%", "yes" if rss_ok else "NO"])
            mem_rows.append([f"{who} threads", str(b[1]), str(e[1]), f"{pct(e[1], b[1]):+.1f}%",
                             "yes" if thr_ok else "NO"])
        print(f"Resources: t={base.elapsed / 60:.2f} min (baseline) vs t={last.elapsed / 60:.2f} min (end)")
        print(fmt_table(["", "baseline", "end", "change", f"within {args.tolerance:g}%"], mem_rows))
        print()
        print("Samples")
        print(fmt_table(["t (min)", "get", "post", "sse", "errors", "proxy MiB", "proxy thr", "worker MiB",
                         "worker thr"],
                        [[f"{s.elapsed / 60:.2f}", str(s.done["get"]), str(s.done["post"]), str(s.done["sse"]),
                          str(sum(s.errors.values())), f"{s.proxy[0] / 1024:.1f}", str(s.proxy[1]),
                          f"{s.worker[0] / 1024:.1f}", str(s.worker[1])] for s in samples]))
        if load is not None and load.messages:
            print("\nFirst errors:\n  " + "\n  ".join(load.messages))
        print(f"\nexit codes after SIGTERM: {codes}")
        ok = sum(errors.values()) == 0 and all(verdicts)
        print("RESULT:", "OK" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
