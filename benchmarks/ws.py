"""WebSocket figures, every system in the same run: echo latency, messages/s, MB/s, memory of idle sockets.

    python benchmarks/ws.py                 # the full run (~5 minutes on 2 cores)
    python benchmarks/ws.py --quick         # fewer messages, 200 idle sockets
    python benchmarks/ws.py --systems proxy,haproxy --json out.json

The app is the flask-sock example (``examples.flask_sock_app.app:app``, route ``/echo``),
unchanged, served by:

* ``gunicorn`` — baseline: ``gunicorn -k gthread`` serving it directly (HTTP/1.1 upgrade, one
  worker process; each socket holds one of its threads);
* ``proxy``    — our ``rhttp-wsgi proxy`` → tunnel (RFC 8441 extended CONNECT) → ``rhttp-wsgi worker``;
* ``haproxy``  — HAProxy 3.x (``rhttp@``, when installed) → tunnel → ``rhttp-wsgi worker``.

The client is ``websockets``' sync client in this process.  CPU placement as in
benchmarks/run.py: the app server alone on CPU 1, the client and the front proxy on CPU 0.

Loads (each system in turn, ``--reps`` times, interleaved; the median and the spread are shown):

* ``rtt``      — one socket, sequential echo of a 32-byte text message: round trip p50/p99 (µs);
* ``pipe``     — one socket, 32-byte messages with up to 64 unanswered: messages/s;
* ``c16``      — 16 sockets at once, each a sequential echo loop: messages/s, all sockets together;
* ``1mib``     — one socket, sequential echo of 1 MiB binary messages (64, or 30 s): MB/s of payload
  (each message crosses both ways, so the path carries twice that), and how many echoes took
  more than a second (stalls);
* ``idle``     — memory: RSS of the process that runs the app (gunicorn's worker, our worker)
  and of the front proxy before and after opening N idle sockets (default 1,000), per socket.

Nothing here is asserted: it prints numbers.  Stops every process it started, by PID.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import (  # noqa: E402  (after the sys.path line: runs as a script)
    CPU_APP,
    CPU_FRONT,
    HAPROXY_CFG,
    PY,
    Proc,
    _wait_port,
    find_haproxy,
    free_ports,
    lab_dir,
    log,
    rss_kib,
    thread_count,
    wait_ready,
)

APP = "examples.flask_sock_app.app:app"
MIB = 1 << 20
SYSTEMS = ("gunicorn", "proxy", "haproxy")


def _connect(url: str) -> Any:
    from websockets.sync.client import connect

    # No compression: permessage-deflate would measure zlib, and the servers do not all offer it.
    # Entered at once (websockets >= 16 warns otherwise); the caller closes the connection.
    return connect(url, open_timeout=30, close_timeout=10, max_size=4 * MIB, compression=None).__enter__()


# ---------------------------------------------------------------------------
# systems
# ---------------------------------------------------------------------------


@dataclass
class System:
    name: str
    url: str  # ws://127.0.0.1:PORT
    procs: list[Proc]
    app_proc: Proc
    front_proc: Proc | None
    label: str

    @property
    def app_pid(self) -> int:
        if self.name == "gunicorn":
            kids = self.app_proc.children()
            if len(kids) != 1:
                raise RuntimeError(f"gunicorn has {len(kids)} worker processes, expected 1")
            return kids[0]
        return self.app_proc.pid

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop(timeout=10)


def _help_has(argv: list[str], flag: str) -> bool:
    out = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    return flag in out.stdout


class Lab:
    def __init__(self, d: Path, sockets: int, haproxy_bin: str | None) -> None:
        from rhttp_wsgi.pki import DemoPKI

        self.dir = d
        self.logs = d / "logs"
        self.logs.mkdir()
        self.sockets = sockets
        self.haproxy_bin = haproxy_bin
        self.pki = DemoPKI.create(d / "pki", worker_names=("bench-worker",))
        self.server_pem = d / "pki" / "server.pem"
        self.server_pem.write_bytes(self.pki.server_cert.read_bytes() + self.pki.server_key.read_bytes())
        # Room for every idle socket (plus the loads) on one tunnel, on both sides of it.
        self.streams = sockets + 100

    def _worker(self, name: str, tunnel_port: int) -> Proc:
        cert, key = self.pki.workers["bench-worker"]
        return Proc(name, [PY, "-m", "rhttp_wsgi", "--log-level", "warning", "worker", APP,
                           "--proxy", f"127.0.0.1:{tunnel_port}", "--server-name", "localhost",
                           "--cert", str(cert), "--key", str(key), "--ca", str(self.pki.ca_cert),
                           "--threads", "16", "--max-websockets", str(self.streams),
                           "--max-concurrent-streams", str(self.streams), "--connections", "1"],
                    CPU_APP, self.logs)

    def gunicorn(self) -> System:
        (port,) = free_ports(1)
        g = Proc("gunicorn", [PY, "-m", "gunicorn", "-k", "gthread", "-w", "1",
                              "--threads", str(self.streams), "--worker-connections", str(4 * self.streams),
                              "--backlog", "4096", "--timeout", "300", "--graceful-timeout", "2",
                              "--log-level", "warning", "-b", f"127.0.0.1:{port}", APP],
                 CPU_APP, self.logs).start()
        wait_ready(f"http://127.0.0.1:{port}/hello", [g])
        return System("gunicorn", f"ws://127.0.0.1:{port}", [g], g, None, "gunicorn gthread direct")

    def proxy(self) -> System:
        tport, pport = free_ports(2)
        argv = [PY, "-m", "rhttp_wsgi", "--log-level", "warning", "proxy"]
        extra = []
        if _help_has(argv, "--max-websockets"):
            extra = ["--max-websockets", str(self.streams)]
        p = Proc("proxy", [*argv, "--tunnel-bind", f"127.0.0.1:{tport}", "--public-bind", f"127.0.0.1:{pport}",
                           "--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key),
                           "--workers-ca", str(self.pki.ca_cert), "--max-connections", str(4 * self.streams),
                           "--max-concurrent-streams", str(self.streams), "--no-access-log", *extra],
                 CPU_FRONT, self.logs).start()
        _wait_port(tport, [p])
        w = self._worker("worker-proxy", tport).start()
        wait_ready(f"http://127.0.0.1:{pport}/hello", [p, w])
        return System("proxy", f"ws://127.0.0.1:{pport}", [p, w], w, p, "our proxy -> worker")

    def haproxy(self) -> System | None:
        if not self.haproxy_bin:
            return None
        tport, pport = free_ports(2)
        cfg = self.dir / "haproxy.cfg"
        text = HAPROXY_CFG.format(tport=tport, pport=pport, pem=self.server_pem, ca=self.pki.ca_cert,
                                  mcs=self.streams)
        # An open WebSocket is a tunnel for HAProxy: only `timeout tunnel` applies to it.
        text = text.replace("    timeout http-keep-alive 60s\n", "    timeout http-keep-alive 60s\n"
                            "    timeout tunnel 1h\n")
        text = text.replace("maxconn 9000", f"maxconn {max(9000, 4 * self.streams)}")
        cfg.write_text(text)
        h = Proc("haproxy", [self.haproxy_bin, "-db", "-f", str(cfg)], CPU_FRONT, self.logs).start()
        _wait_port(tport, [h])
        w = self._worker("worker-haproxy", tport).start()
        wait_ready(f"http://127.0.0.1:{pport}/hello", [h, w])
        return System("haproxy", f"ws://127.0.0.1:{pport}", [h, w], w, h, "HAProxy -> worker")


# ---------------------------------------------------------------------------
# loads
# ---------------------------------------------------------------------------


def load_rtt(url: str, n: int) -> dict[str, float]:
    rtts = []
    with _connect(url + "/echo") as ws:
        for _ in range(50):  # warm-up
            ws.send("x" * 32)
            ws.recv(30)
        for _ in range(n):
            t0 = time.perf_counter()
            ws.send("x" * 32)
            ws.recv(30)
            rtts.append(time.perf_counter() - t0)
    rtts.sort()
    return {"p50_us": rtts[len(rtts) // 2] * 1e6, "p99_us": rtts[int(len(rtts) * 0.99)] * 1e6,
            "msgs_per_s": n / sum(rtts)}


def load_pipe(url: str, n: int, window: int = 64) -> dict[str, float]:
    credit = threading.Semaphore(window)
    with _connect(url + "/echo") as ws:
        def sender() -> None:
            for _ in range(n):
                if not credit.acquire(timeout=30):
                    return
                ws.send("y" * 32)

        t0 = time.perf_counter()
        t = threading.Thread(target=sender, name="pipe-sender")
        t.start()
        for _ in range(n):
            ws.recv(30)
            credit.release()
        elapsed = time.perf_counter() - t0
        t.join(30)
    return {"msgs_per_s": n / elapsed}


def load_concurrent(url: str, sockets: int, per_socket: int) -> dict[str, float]:
    conns = [_connect(url + "/echo") for _ in range(sockets)]
    errors: list[BaseException] = []
    start = threading.Barrier(sockets + 1, timeout=30)

    def talk(ws: Any) -> None:
        try:
            start.wait()
            for _ in range(per_socket):
                ws.send("z" * 32)
                ws.recv(30)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=talk, args=(ws,), name=f"c{i}") for i, ws in enumerate(conns)]
    try:
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join(300)
        elapsed = time.perf_counter() - t0
    finally:
        for ws in conns:
            ws.close()
    if errors:
        raise RuntimeError(f"{len(errors)} sockets failed: {errors[0]!r}")
    return {"msgs_per_s": sockets * per_socket / elapsed}


def load_big(url: str, n: int, budget: float = 30.0) -> dict[str, float]:
    """Sequential echo of 1 MiB messages: at most ``n``, for at most ``budget`` seconds.

    ``stalled`` counts echoes slower than a second (on loopback one takes milliseconds): a
    server that misses bytes it already has shows there, not only as a lower MB/s.
    """
    blob = bytes(range(256)) * (MIB // 256)
    done = stalled = 0
    with _connect(url + "/echo") as ws:
        ws.send(blob)
        ws.recv(60)  # warm-up (windows grow, buffers allocated)
        t0 = time.perf_counter()
        while done < n and time.perf_counter() - t0 < budget:
            t1 = time.perf_counter()
            ws.send(blob)
            back = ws.recv(60)
            if len(back) != MIB:
                raise RuntimeError(f"echo of {len(back)} bytes")
            done += 1
            stalled += time.perf_counter() - t1 > 1.0
        elapsed = time.perf_counter() - t0
    return {"MB_per_s": done * MIB / elapsed / 1e6, "messages": done, "stalled": stalled}


def measure_idle(system: System, n: int) -> dict[str, float]:
    """RSS of the app process (and the front) before and after opening ``n`` idle sockets."""
    app_pid = system.app_pid
    front_pid = system.front_proc.pid if system.front_proc else None
    before_app, before_front = rss_kib(app_pid), rss_kib(front_pid) if front_pid else 0
    conns = []
    t0 = time.perf_counter()
    try:
        for i in range(n):
            conns.append(_connect(system.url + "/echo"))
            if i % 100 == 99:
                log(f"  {system.name}: {i + 1} sockets open")
        opened = time.perf_counter() - t0
        # Every socket answers (each app thread reached its receive loop), then settle for a moment.
        for ws in conns:
            ws.send("?")
        for ws in conns:
            ws.recv(60)
        time.sleep(1.0)
        after_app, after_front = rss_kib(app_pid), rss_kib(front_pid) if front_pid else 0
        threads = thread_count(app_pid)
    finally:
        for ws in conns:
            ws.close()
    return {"sockets": n, "open_s": opened, "app_rss_before_mib": before_app / 1024,
            "app_rss_after_mib": after_app / 1024, "app_kib_per_socket": (after_app - before_app) / n,
            "front_kib_per_socket": (after_front - before_front) / n if front_pid else 0.0,
            "app_threads": threads}


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def _med(vals: list[float]) -> float:
    return statistics.median(vals) if vals else float("nan")


def _spread(vals: list[float]) -> str:
    if len(vals) < 2 or not _med(vals):
        return ""
    return f" ±{(max(vals) - min(vals)) / _med(vals) * 50:.0f}%"


def report(results: dict[str, dict[str, list[dict[str, float]]]], idle: dict[str, dict[str, float]],
           names: list[str]) -> str:
    rows = [("rtt p50 (µs)", "rtt", "p50_us"), ("rtt p99 (µs)", "rtt", "p99_us"),
            ("msgs/s, 1 socket, 64 in flight", "pipe", "msgs_per_s"),
            ("msgs/s, 16 sockets, echo loop", "c16", "msgs_per_s"),
            ("MB/s, 1 MiB messages, echo", "1mib", "MB_per_s"),
            ("1 MiB echoes slower than 1 s (all reps)", "1mib", "stalled")]
    head = ["load", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, load, key in rows:
        cells = [label]
        base = None
        for name in names:
            vals = [s[key] for s in results.get(name, {}).get(load, [])]
            if not vals:
                cells.append("-")
                continue
            if key == "stalled":
                cells.append(f"{sum(vals):.0f} of {sum(x['messages'] for x in results[name][load]):.0f}")
                continue
            m = _med(vals)
            base = m if base is None else base
            ratio = f" ({m / base:.2f}x)" if name != names[0] and base else ""
            cells.append(f"{m:,.0f}{_spread(vals)}{ratio}" if m >= 10 else f"{m:.2g}{_spread(vals)}{ratio}")
        lines.append("| " + " | ".join(cells) + " |")
    if idle:
        lines += ["", "| idle sockets | " + " | ".join(n for n in names if n in idle) + " |",
                  "|" + "---|" * (1 + len([n for n in names if n in idle]))]
        for label, key, fmt in (("sockets", "sockets", "{:.0f}"),
                                ("app RSS before (MiB)", "app_rss_before_mib", "{:.1f}"),
                                ("app RSS after (MiB)", "app_rss_after_mib", "{:.1f}"),
                                ("app KiB per socket", "app_kib_per_socket", "{:.0f}"),
                                ("front proxy KiB per socket", "front_kib_per_socket", "{:.0f}"),
                                ("app threads", "app_threads", "{:.0f}"), ("time to open all (s)", "open_s", "{:.1f}")):
            lines.append("| " + label + " | " + " | ".join(fmt.format(idle[n][key]) for n in names if n in idle) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="WebSocket echo through our proxy and HAProxy vs gunicorn direct.")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--idle", type=int, default=None, help="idle sockets for the memory figure (default 1000)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--haproxy", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    idle_n = args.idle if args.idle is not None else (200 if args.quick else 1000)
    scale = 4 if args.quick else 1
    loads: dict[str, Callable[[str], dict[str, float]]] = {
        "rtt": lambda u: load_rtt(u, 2000 // scale),
        "pipe": lambda u: load_pipe(u, 20000 // scale),
        "c16": lambda u: load_concurrent(u, 16, 400 // scale),
        "1mib": lambda u: load_big(u, 64 // scale),
    }
    wanted = [s for s in args.systems.split(",") if s]
    haproxy_bin = find_haproxy(args.haproxy) if "haproxy" in wanted else None
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    idle: dict[str, dict[str, float]] = {}
    with lab_dir(args.keep) as d:
        lab = Lab(d, idle_n, haproxy_bin)
        systems: list[System] = []
        try:
            for name in wanted:
                log(f"starting {name}")
                s = getattr(lab, name)()
                if s is None:
                    log(f"{name}: not available, skipped")
                    continue
                systems.append(s)
            for rep in range(args.reps):
                for load, fn in loads.items():
                    for s in systems:
                        r = fn(s.url)
                        results.setdefault(s.name, {}).setdefault(load, []).append(r)
                        log(f"rep {rep + 1} {load:5s} {s.name:9s} " + " ".join(f"{k}={v:,.1f}" for k, v in r.items()))
            for s in systems:
                log(f"idle: {idle_n} sockets on {s.name}")
                idle[s.name] = measure_idle(s, idle_n)
                log(f"  {idle[s.name]}")
        finally:
            for s in systems:
                s.stop()
    names = [s.name for s in systems]
    print(f"\nWebSocket echo (flask-sock example app), {args.reps} reps, median ± half the spread; "
          f"ratio to {names[0] if names else '-'}:\n")
    print(report(results, idle, names))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "idle": idle}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
