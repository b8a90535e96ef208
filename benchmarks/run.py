"""One command, one table: rhttp-wsgi against gunicorn, every comparison measured in the same run.

    python benchmarks/run.py            # the full run (~12 minutes on 2 cores)
    python benchmarks/run.py --quick    # a ~2 minute subset
    python benchmarks/run.py --only hello,micro --json out.json
    python benchmarks/run.py --only hello --loads hello-c64 --systems proxy,proxy-nolog   # access log cost

Systems (each a set of subprocesses with its own throwaway PKI and free loopback ports):

* ``gunicorn``  — baseline: ``gunicorn -k gthread --threads T`` serving ``benchmarks.apps:app``
  directly over HTTP/1.1 (one worker process);
* ``proxy``     — our ``rhttp-wsgi proxy`` (turnkey HTTP/1.1 server) → tunnel → ``rhttp-wsgi worker``;
  its access log is on (the default), one line per request to its log file;
* ``proxy-nolog`` — the same with ``--no-access-log`` (only with ``--systems``): the access log's cost;
* ``haproxy``   — HAProxy 3.x (``rhttp@``, when installed) → tunnel → ``rhttp-wsgi worker``,
  loaded over HTTP/1.1 and, as ``haproxy-h2c``, over cleartext HTTP/2.

CPU placement (2 cores; printed with the results): the app server — gunicorn's worker or our
worker — runs alone on CPU 1 (``taskset -c 1``); the load generator (h2load), our proxy and
HAProxy share CPU 0.  So every configuration gets exactly one core for the app server, and the
front proxy competes with the load generator, never with the app.

Every load runs against every system in turn, three times (``--reps``), interleaved
(rep 1: gunicorn, proxy, haproxy; rep 2: ...), so background noise hits them alike; the
table shows the median and the spread (max-min, as % of the median).  Worker CPU per request
comes from ``/proc/PID/stat`` (utime+stime, all threads) before and after each measured run.

Nothing here is asserted: it prints numbers.  Stops every process it started, by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PY = sys.executable
CPU_APP = "1"  # gunicorn's worker / our worker
CPU_FRONT = "0"  # h2load, our proxy, HAProxy
HAPROXY_DEFAULT = "/opt/rhttp-haproxy/bin/haproxy"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------


def _pdeathsig() -> None:  # pragma: no cover - runs in the child
    # If this script dies, the kernel stops its servers too.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE // 1024


def thread_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


class Proc:
    """One server subprocess pinned to a CPU; output in a log file; stopped by PID."""

    def __init__(self, name: str, argv: list[str], cpu: str, logdir: Path, env: dict[str, str] | None = None,
                 root: Path = ROOT):
        self.name = name
        self.root = root  # the source tree it runs (cwd and PYTHONPATH)
        self.argv = argv
        self.cpu = cpu
        self.log_path = logdir / f"{name}.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.root) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.env or {})
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(["taskset", "-c", self.cpu, *self.argv], cwd=self.root, env=env,
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         preexec_fn=_pdeathsig)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[int]:
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def stop(self, timeout: float = 15.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def http_get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
            return int(r.status)
    except Exception:
        return 0


def wait_ready(url: str, procs: list[Proc], timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200 (twice in a row), failing fast if a process died."""
    deadline = time.monotonic() + timeout
    ok = 0
    while ok < 2:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited early:\n{p.tail()}")
        if http_get(url) == 200:
            ok += 1
            continue
        ok = 0
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready within {timeout:g}s:\n" + "\n".join(p.tail(10) for p in procs))
        time.sleep(0.1)


# ---------------------------------------------------------------------------
# systems under test
# ---------------------------------------------------------------------------


@dataclass
class System:
    name: str
    base: str  # http://127.0.0.1:PORT
    procs: list[Proc]
    app_proc: Proc  # the process that runs the app (gunicorn master: measure its child)
    front_proc: Proc | None = None
    h2c: bool = False  # also load it over cleartext HTTP/2
    label: str = ""

    @property
    def app_pid(self) -> int:
        if self.name == "gunicorn":
            kids = self.app_proc.children()
            if len(kids) != 1:
                raise RuntimeError(f"gunicorn has {len(kids)} worker processes, expected 1")
            return kids[0]
        return self.app_proc.pid

    @property
    def front_pid(self) -> int | None:
        return self.front_proc.pid if self.front_proc is not None else None

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@dataclass
class Lab:
    dir: Path
    threads: int
    haproxy_bin: str | None
    systems: list[System] = field(default_factory=list)

    def __post_init__(self) -> None:
        from rhttp_wsgi.pki import DemoPKI

        self.pki = DemoPKI.create(self.dir / "pki", worker_names=("bench-worker",))
        self.worker_cert, self.worker_key = self.pki.workers["bench-worker"]
        self.server_pem = self.dir / "pki" / "server.pem"
        self.server_pem.write_bytes(self.pki.server_cert.read_bytes() + self.pki.server_key.read_bytes())
        self.server_pem.chmod(0o600)
        (self.dir / "logs").mkdir(exist_ok=True)

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    def worker(self, name: str, tunnel_port: int, *, threads: int, mcs: int, connections: int = 1,
               profile: Path | None = None, root: Path = ROOT) -> Proc:
        return Proc(name, [*_cli(profile, name), "--log-level", "warning", "worker", "benchmarks.apps:app",
                           "--proxy", f"127.0.0.1:{tunnel_port}", "--server-name", "localhost",
                           "--cert", str(self.worker_cert), "--key", str(self.worker_key),
                           "--ca", str(self.pki.ca_cert), "--threads", str(threads),
                           "--max-concurrent-streams", str(mcs), "--connections", str(connections)],
                    CPU_APP, self.logs, root=root)

    def start_gunicorn(self, tag: str, threads: int) -> System:
        (port,) = free_ports(1)
        g = Proc(f"gunicorn{tag}", [PY, "-m", "gunicorn", "-k", "gthread", "-w", "1", "--threads", str(threads),
                                     "--worker-connections", "4000", "--backlog", "4096", "--keep-alive", "60",
                                     "--timeout", "120", "--log-level", "warning", "-b", f"127.0.0.1:{port}",
                                     "benchmarks.apps:app"], CPU_APP, self.logs).start()
        s = System("gunicorn", f"http://127.0.0.1:{port}", [g], g, None, label="gunicorn gthread direct")
        wait_ready(s.base + "/", [g])
        return s

    def start_proxy(self, tag: str, threads: int, mcs: int, connections: int = 1,
                    profile: Path | None = None, profile_front: Path | None = None,
                    tree: tuple[str, Path] | None = None, access_log: bool = True) -> System:
        root = tree[1] if tree else ROOT
        suffix = f"[{tree[0]}]" if tree else ""
        if not access_log:
            # (the proxy's access log is on by default and writes a line per request to its log
            # file, --log-level or not: this variant measures what that costs)
            suffix += "-nolog"
        tport, pport = free_ports(2)
        p = Proc(f"proxy{tag}{suffix}", [*_cli(profile_front, "proxy"), "--log-level", "warning", "proxy",
                                 "--tunnel-bind", f"127.0.0.1:{tport}", "--public-bind", f"127.0.0.1:{pport}",
                                 "--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key),
                                 "--workers-ca", str(self.pki.ca_cert), "--max-connections", "4000",
                                 "--max-concurrent-streams", str(mcs),
                                 *([] if access_log else ["--no-access-log"])],
                 CPU_FRONT, self.logs, root=root).start()
        _wait_port(tport, [p])
        w = self.worker(f"worker-proxy{tag}{suffix}", tport, threads=threads, mcs=mcs, connections=connections,
                        profile=profile, root=root).start()
        s = System("proxy" + suffix, f"http://127.0.0.1:{pport}", [p, w], w, p, label="our proxy -> worker")
        wait_ready(s.base + "/", [p, w])
        return s

    def start_haproxy(self, tag: str, threads: int, mcs: int, profile: Path | None = None,
                      tree: tuple[str, Path] | None = None) -> System | None:
        if not self.haproxy_bin:
            return None
        root = tree[1] if tree else ROOT
        suffix = f"[{tree[0]}]" if tree else ""
        tport, pport = free_ports(2)
        cfg = self.dir / f"haproxy{tag}.cfg"
        cfg.write_text(HAPROXY_CFG.format(tport=tport, pport=pport, pem=self.server_pem, ca=self.pki.ca_cert,
                                          mcs=mcs))
        h = Proc(f"haproxy{tag}", [self.haproxy_bin, "-db", "-f", str(cfg)], CPU_FRONT, self.logs).start()
        _wait_port(tport, [h])
        w = self.worker(f"worker-haproxy{tag}{suffix}", tport, threads=threads, mcs=mcs, profile=profile,
                        root=root).start()
        s = System("haproxy" + suffix, f"http://127.0.0.1:{pport}", [h, w], w, h, h2c=not tree,
                   label="HAProxy -> worker")
        wait_ready(s.base + "/", [h, w])
        return s


def _cli(profile: Path | None, title: str) -> list[str]:
    """``python -m rhttp_wsgi``, or the same CLI under benchmarks/profile_worker.py."""
    if profile is None:
        return [PY, "-m", "rhttp_wsgi"]
    return [PY, str(ROOT / "benchmarks" / "profile_worker.py"), "--out", str(profile), "--limit", "25",
            "--title", title, "--"]


# HAProxy: the recommended example (examples/haproxy/haproxy.cfg) reduced to what a benchmark
# needs: one thread (it is pinned to one CPU anyway), no logging, no X-Forwarded-* rewriting;
# plus one tuning line.  A reverse tunnel arrives on a *frontend*, so the window HAProxy grants
# the worker for response bodies is tune.h2.fe.initial-window-size (64 KiB by default): the
# worker then waits for a WINDOW_UPDATE every few DATA frames.  1 MiB measured 95 -> 283 MB/s
# on a 100 MiB download and -43% worker CPU per byte (benchmarks/RESULTS.md).
HAPROXY_CFG = """\
global
    expose-experimental-directives
    nbthread 1
    maxconn 9000
    tune.h2.fe.max-concurrent-streams {mcs}
    tune.h2.fe.initial-window-size 1048576
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-request 10s
    timeout http-keep-alive 60s
frontend fe_tunnels
    bind 127.0.0.1:{tport} ssl crt {pem} ca-file {ca} verify required alpn h2
    tcp-request session attach-srv be_workers/workers
frontend fe_public
    bind 127.0.0.1:{pport}
    default_backend be_workers
backend be_workers
    http-reuse always
    server workers rhttp@ pool-purge-delay 24h
"""


def _wait_port(port: int, procs: list[Proc], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited early:\n{p.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {port} not open within {timeout:g}s") from None
            time.sleep(0.05)


# ---------------------------------------------------------------------------
# load generation (h2load) and measurement
# ---------------------------------------------------------------------------


@dataclass
class Load:
    key: str  # "hello-c16"
    title: str
    path: str
    clients: int
    duration: float | None = None  # -D seconds, or ...
    requests: int | None = None  # ... -n requests
    streams: int = 1  # -m (h2c: streams per connection)
    data: Path | None = None  # upload body
    body_bytes: int = 0  # expected response (download) or request (upload) body size
    kind: str = "rps"  # rps | bytes | sse
    events: int = 0  # sse: events per stream
    warmup: int = 200


@dataclass
class Sample:
    system: str
    load: str
    rep: int
    ok: int
    failed: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    mb_s: float
    app_cpu_us: float  # per request (per event for SSE)
    front_cpu_us: float | None
    app_rss_peak_kib: int = 0
    front_rss_peak_kib: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


_FINISHED = re.compile(r"finished in ([\d.]+)(m?s)")
_REQS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                   r"(\d+) errored, (\d+) timeout")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


class RSSSampler:
    """Samples the RSS of some PIDs every ``interval`` seconds in a thread; keeps min/max/series."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.pids = {k: v for k, v in pids.items() if v}
        self.interval = interval
        self.series: dict[str, list[int]] = {k: [] for k in self.pids}
        self.threads: dict[str, int] = dict.fromkeys(self.pids, 0)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, pid in self.pids.items():
                with contextlib.suppress(OSError):
                    self.series[k].append(rss_kib(pid))
                    self.threads[k] = max(self.threads[k], thread_count(pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def peak(self, k: str) -> int:
        return max(self.series.get(k) or [0])

    def low(self, k: str) -> int:
        return min(self.series.get(k) or [0])


def h2load_argv(url: str, load: Load, *, h2c: bool, logfile: Path | None, requests: int | None = None) -> list[str]:
    argv = ["taskset", "-c", CPU_FRONT, "h2load", "-t", "1", "-c", str(load.clients),
            "-m", str(load.streams if h2c else 1)]
    if not h2c:
        argv.append("--h1")
    if requests is not None:
        argv += ["-n", str(requests)]
    elif load.duration is not None:
        argv += ["-D", f"{load.duration:g}"]
    else:
        argv += ["-n", str(load.requests)]
    if load.data is not None:
        argv += ["-d", str(load.data)]
    if logfile is not None:
        argv += ["--log-file", str(logfile)]
    argv.append(url)
    return argv


def run_h2load(argv: list[str], timeout: float) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 and "finished in" not in r.stdout:
        raise RuntimeError(f"h2load failed ({r.returncode}): {r.stdout[-800:]} {r.stderr[-800:]}")
    return r.stdout


def percentiles(logfile: Path) -> tuple[float, float, float, int]:
    """p50, p99, max (ms) of 2xx requests from h2load's --log-file; and their count."""
    lat = []
    with open(logfile) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1].startswith("2"):
                lat.append(int(parts[2]))
    if not lat:
        return 0.0, 0.0, 0.0, 0
    lat.sort()
    n = len(lat)
    return lat[n // 2] / 1000, lat[min(n - 1, int(n * 0.99))] / 1000, lat[-1] / 1000, n


def measure(system: System, load: Load, rep: int, tmp: Path, *, h2c: bool = False) -> Sample:
    url = system.base + load.path
    name = system.name + ("-h2c" if h2c else "")
    timeout = (load.duration or 0) * 3 + 300
    if rep == 0 and load.warmup:
        run_h2load(h2load_argv(url, load, h2c=h2c, logfile=None, requests=load.warmup), timeout)
    logfile = tmp / f"h2load-{name}-{load.key}-{rep}.log"
    app_pid, front_pid = system.app_pid, system.front_pid
    a0 = cpu_ticks(app_pid)
    f0 = cpu_ticks(front_pid) if front_pid else 0
    with RSSSampler({"app": app_pid, "front": front_pid or 0}, 0.1) as rss:
        out = run_h2load(h2load_argv(url, load, h2c=h2c, logfile=logfile), timeout)
    a1 = cpu_ticks(app_pid)
    f1 = cpu_ticks(front_pid) if front_pid else 0
    m = _FINISHED.search(out)
    secs = float(m.group(1)) / (1000 if m and m.group(2) == "ms" else 1) if m else 0.0
    rq = _REQS.search(out)
    st = _STATUS.search(out)
    succeeded = int(rq.group(4)) if rq else 0
    ok = int(st.group(1)) if st else succeeded
    # failed/errored/timed-out requests, plus any non-2xx answer
    failed = sum(int(rq.group(i)) for i in (5, 6, 7)) if rq else 0
    failed += sum(int(st.group(i)) for i in (2, 3, 4)) if st else 0
    p50, p99, mx, _n = percentiles(logfile)
    with contextlib.suppress(OSError):
        logfile.unlink()
    units = ok * max(load.events, 1) if load.kind == "sse" else ok
    app_us = (a1 - a0) / CLK_TCK * 1e6 / units if units else 0.0
    front_us = (f1 - f0) / CLK_TCK * 1e6 / units if (units and front_pid) else None
    mb_s = ok * load.body_bytes / secs / 1e6 if secs and load.body_bytes else 0.0
    return Sample(name, load.key, rep, ok, failed, secs, ok / secs if secs else 0.0, p50, p99, mx, mb_s,
                  app_us, front_us, rss.peak("app"), rss.peak("front") if front_pid else 0)


# ---------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------


def hello_loads(quick: bool) -> list[Load]:
    d = 2.0 if quick else 8.0
    conns = (1, 64) if quick else (1, 16, 64)
    return [Load(f"hello-c{c}", f"hello GET, {c} conn", "/", c, duration=d, warmup=300) for c in conns]


def body_loads(quick: bool, files: dict[int, Path]) -> list[Load]:
    loads = [
        Load("down-1m", "download 1 MiB, 4 conn", f"/download?n={MIB}", 4, duration=2.0 if quick else 5.0,
             body_bytes=MIB, kind="bytes", warmup=20),
        Load("up-1m", "upload 1 MiB, 4 conn", "/upload", 4, duration=2.0 if quick else 5.0, data=files[MIB],
             body_bytes=MIB, kind="bytes", warmup=20),
    ]
    if not quick:
        loads += [
            Load("down-100m", "download 100 MiB, 1 conn", f"/download?n={100 * MIB}", 1, requests=5,
                 body_bytes=100 * MIB, kind="bytes", warmup=1),
            Load("up-100m", "upload 100 MiB, 1 conn", "/upload", 1, requests=5, data=files[100 * MIB],
                 body_bytes=100 * MIB, kind="bytes", warmup=1),
        ]
    return loads


def sse_load(n_streams: int, events: int, interval: float, h2c: bool = False) -> Load:
    return Load(f"sse-{n_streams}" + ("-h2c" if h2c else ""), f"{n_streams} concurrent SSE streams "
                f"({events} events, {interval:g}s apart)", f"/sse?n={events}&interval={interval:g}",
                1 if h2c else n_streams, requests=n_streams, streams=n_streams if h2c else 1, kind="sse",
                events=events, warmup=0)


def interleaved(systems: list[System], loads: list[Load], reps: int, tmp: Path,
                samples: list[Sample], h2c_too: bool = False) -> None:
    for load in loads:
        for rep in range(reps):
            for s in systems:
                variants = [False, True] if (h2c_too and s.h2c) else [False]
                for h2c in variants:
                    sm = measure(s, load, rep, tmp, h2c=h2c)
                    samples.append(sm)
                    log(f"{load.key:10} rep {rep + 1} {sm.system:12} {sm.rps:9.1f} req/s  p50 {sm.p50_ms:7.2f} ms"
                        f"  p99 {sm.p99_ms:7.2f} ms  {sm.mb_s:7.1f} MB/s  app {sm.app_cpu_us:7.1f} us"
                        f"  ok {sm.ok} failed {sm.failed}")


def rss_now(pid: int | None) -> int:
    return rss_kib(pid) if pid else 0


def run_micro(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n = "1000" if args.quick else "5000"
    for key, extra in (("inline", []), ("inline-tls", ["--tls"]),
                       ("threads-c1", ["--mode", "threads"]),
                       ("threads-c16", ["--mode", "threads", "--concurrency", "16"])):
        r = subprocess.run(["taskset", "-c", CPU_APP, PY, str(ROOT / "benchmarks" / "micro_core.py"), "--json",
                            "--requests", n, "--repeat", "3" if args.quick else "5", *extra],
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"micro_core failed: {r.stderr[-2000:]}")
        out[key] = json.loads(r.stdout.strip().splitlines()[-1])
        log(f"micro {key}: {out[key]}")
    return out


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    m = statistics.median(values)
    return f"±{(max(values) - min(values)) / 2 / m * 100:.0f}%" if m else "-"


def summarize(samples: list[Sample]) -> dict[tuple[str, str], dict[str, Any]]:
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.load, s.system), []).append(s)
    out = {}
    for key, ss in groups.items():
        out[key] = {
            "n": len(ss),
            "rps": _med([s.rps for s in ss]), "rps_spread": _spread([s.rps for s in ss]),
            "p50": _med([s.p50_ms for s in ss]), "p99": _med([s.p99_ms for s in ss]),
            "max": _med([s.max_ms for s in ss]),
            "mb_s": _med([s.mb_s for s in ss]), "mb_spread": _spread([s.mb_s for s in ss]),
            "app_us": _med([s.app_cpu_us for s in ss]),
            "app_us_spread": _spread([s.app_cpu_us for s in ss]),
            "front_us": _med([s.front_cpu_us for s in ss if s.front_cpu_us is not None]) if any(
                s.front_cpu_us is not None for s in ss) else None,
            "failed": sum(s.failed for s in ss), "ok": sum(s.ok for s in ss),
            "app_rss": max(s.app_rss_peak_kib for s in ss), "front_rss": max(s.front_rss_peak_kib for s in ss),
        }
    return out


def fmt_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def _ratio(v: float, base: float) -> str:
    return f"{v / base:.2f}x" if base else "-"


def report(samples: list[Sample], loads: list[Load], extra: dict[str, Any], meta: dict[str, Any]) -> str:
    summ = summarize(samples)
    names = {s.system for s in samples}
    order = ["gunicorn", "proxy", "proxy-nolog", *sorted(n for n in names if n.startswith("proxy[")), "haproxy",
             *sorted(n for n in names if n.startswith("haproxy[")), "haproxy-h2c"]
    parts = [f"rhttp-wsgi benchmark — {meta['when']} — {meta['mode']} run, median of {meta['reps']}"
             f" (spread = ±half the max-min range, % of median)",
             f"CPU placement: app server (gunicorn worker / rhttp worker) on CPU {CPU_APP}; "
             f"h2load + our proxy / HAProxy on CPU {CPU_FRONT}. threads={meta['threads']} (gunicorn gthread and"
             f" worker alike). load average at start: {meta['loadavg']}", ""]
    rows = []
    for load in loads:
        if load.kind != "rps":
            continue
        base = summ.get((load.key, "gunicorn"))
        for sysname in order:
            r = summ.get((load.key, sysname))
            if r is None:
                continue
            rows.append([
                load.title, sysname, f"{r['rps']:.0f}", r["rps_spread"],
                _ratio(r["rps"], base["rps"]) if base else "-",
                f"{r['p50']:.2f}", f"{r['p99']:.2f}",
                f"{r['p50'] - base['p50']:+.2f}" if base else "-",
                f"{r['app_us']:.0f}", r["app_us_spread"], _ratio(r["app_us"], base["app_us"]) if base else "-",
                "-" if r["front_us"] is None else f"{r['front_us']:.0f}", str(r["failed"]),
            ])
    if rows:
        parts.append(fmt_table(["load", "system", "req/s", "spread", "vs gunicorn", "p50 ms", "p99 ms",
                                "p50 added ms", "app CPU µs/req", "spread", "vs gunicorn", "front CPU µs/req",
                                "errors"], rows))
        parts.append("")
    rows = []
    for load in loads:
        if load.kind != "bytes":
            continue
        base = summ.get((load.key, "gunicorn"))
        for sysname in order:
            r = summ.get((load.key, sysname))
            if r is None:
                continue
            rows.append([load.title, sysname, f"{r['mb_s']:.0f}", r["mb_spread"],
                         _ratio(r["mb_s"], base["mb_s"]) if base else "-", f"{r['p50']:.1f}",
                         f"{r['app_us']:.0f}", "-" if r["front_us"] is None else f"{r['front_us']:.0f}",
                         f"{r['app_rss'] / 1024:.0f}", f"{r['front_rss'] / 1024:.0f}" if r["front_rss"] else "-",
                         str(r["failed"])])
    if rows:
        parts.append(fmt_table(["load", "system", "MB/s", "spread", "vs gunicorn", "p50 ms/req",
                                "app CPU µs/req", "front CPU µs/req", "app RSS peak MiB", "front RSS peak MiB",
                                "errors"], rows))
        parts.append("")
    rows = []
    for load in loads:
        if load.kind != "sse":
            continue
        base = summ.get((load.key, "gunicorn"))
        for sysname in order:
            r = summ.get((load.key, sysname))
            if r is None:
                continue
            rows.append([load.title, sysname, f"{r['ok'] // max(r['n'], 1)}", f"{r['p50'] / 1000:.3f}",
                         f"{r['max'] / 1000:.3f}", f"{r['app_us']:.0f}",
                         _ratio(r["app_us"], base["app_us"]) if base else "-",
                         f"{r['app_rss'] / 1024:.0f}", f"{r['front_rss'] / 1024:.0f}" if r["front_rss"] else "-",
                         str(r["failed"])])
    if rows:
        parts.append(fmt_table(["load", "system", "streams ok/rep", "stream p50 s", "stream max s",
                                "app CPU µs/event", "vs gunicorn", "app RSS peak MiB", "front RSS peak MiB",
                                "errors"], rows))
        parts.append("")
    if extra.get("rss"):
        rows = [[k, *v] for k, v in extra["rss"].items()]
        parts.append(fmt_table(["memory (RSS)", "gunicorn", "worker (our proxy)", "our proxy",
                                "worker (HAProxy)", "HAProxy"], rows))
        parts.append("")
    if extra.get("flat"):
        rows = [[k, *v] for k, v in extra["flat"].items()]
        parts.append(fmt_table(["1 GiB through one tunnel", "MB/s", "worker RSS start→peak→end MiB",
                                "front RSS start→peak→end MiB"], rows))
        parts.append("")
    if extra.get("micro"):
        m = extra["micro"]
        rows = []
        for k, v in m.items():
            if v["mode"] == "inline":
                rows.append([k, f"{v['worker_us_per_req']:.1f}", f"{v['worker_us_min']:.1f}-{v['worker_us_max']:.1f}",
                             "-", "-"])
            else:
                rows.append([k, f"{v['worker_cpu_us_per_req']:.1f}",
                             f"{v['worker_cpu_us_min']:.1f}-{v['worker_cpu_us_max']:.1f}",
                             f"{v['wall_us_per_req']:.1f}", f"{v['wall_us_min']:.1f}-{v['wall_us_max']:.1f}"])
        parts.append(fmt_table(["micro_core (no sockets, hello)", "worker µs/req", "range", "wall µs/req",
                                "range"], rows))
        parts.append("")
    if extra.get("targets"):
        parts.append(fmt_table(["target", "goal", "measured", "met"], extra["targets"]))
        parts.append("")
    for title, text in (extra.get("profiles") or {}).items():
        parts.append(f"Profile — {title}")
        parts.append(text)
    return "\n".join(parts)


def targets(samples: list[Sample], extra: dict[str, Any]) -> list[list[str]]:
    summ = summarize(samples)
    rows: list[list[str]] = []

    def get(load: str, system: str, key: str) -> float | None:
        r = summ.get((load, system))
        return None if r is None else r[key]

    def ok(flag: bool | None) -> str:
        return "-" if flag is None else ("yes" if flag else "NO")

    cpu = [v for v in (get("hello-c16", "haproxy", "app_us"), get("hello-c16", "proxy", "app_us")) if v]
    if not cpu:
        cpu = [v for v in (get("hello-c64", "haproxy", "app_us"), get("hello-c64", "proxy", "app_us")) if v]
    if cpu:
        rows.append(["worker CPU per hello request through a tunnel", "<= 100 µs",
                     " / ".join(f"{v:.0f} µs" for v in cpu) + " (HAProxy / our proxy)", ok(max(cpu) <= 100)])
    for load in ("hello-c16", "hello-c64"):
        g = get(load, "gunicorn", "rps")
        if not g:
            continue
        for system, goal in (("haproxy", 1.0), ("haproxy-h2c", 1.0), ("proxy", 0.5)):
            v = get(load, system, "rps")
            if v is not None:
                rows.append([f"{system} req/s vs gunicorn ({load})", f">= {goal:.1f}x", f"{v / g:.2f}x",
                             ok(v / g >= goal)])
    for load in ("hello-c16", "hello-c64"):
        on, off = get(load, "proxy", "rps"), get(load, "proxy-nolog", "rps")
        if on and off:
            rows.append([f"access log on vs off, our proxy req/s ({load})", ">= 0.90x", f"{on / off:.2f}x",
                         ok(on / off >= 0.90)])
    for system in ("proxy", "haproxy"):
        v, b = get("hello-c1", system, "p50"), get("hello-c1", "gunicorn", "p50")
        if v is not None and b is not None:
            rows.append([f"p50 latency added at 1 conn ({system})", "<= 0.5 ms", f"{v - b:+.2f} ms",
                         ok(v - b <= 0.5)])
    for load, goal in (("down-100m", 300), ("down-1m", 300), ("up-100m", 150), ("up-1m", 150)):
        for system in ("proxy", "haproxy"):
            v = get(load, system, "mb_s")
            if v is not None:
                rows.append([f"{load} MB/s through one tunnel ({system})", f">= {goal} MB/s", f"{v:.0f} MB/s",
                             ok(v >= goal)])
    for k, v in (extra.get("flat_raw") or {}).items():
        rows.append([f"worker RSS flat, {k}", "flat", f"+{v:.1f} MiB start→peak", ok(v < 16)])
    for k, v in (extra.get("sse1000_raw") or {}).items():
        rows.append([f"1,000 SSE streams, worker RSS ({k})", "< 200 MB", f"{v / 1024:.0f} MiB",
                     ok(v * 1024 < 200e6)])
    return rows


# ---------------------------------------------------------------------------
# memory experiments
# ---------------------------------------------------------------------------


def memory_experiments(lab: Lab, args: argparse.Namespace, tmp: Path, samples: list[Sample],
                       extra: dict[str, Any]) -> None:
    """Idle RSS, per tunnel, per in-flight stream, after 1,000 SSE streams; 1 GiB flatness."""
    n_sse = 1000
    threads = n_sse + 64
    rss: dict[str, list[str]] = {}

    def mib(k: int) -> str:
        return f"{k / 1024:.1f}"

    systems = [lab.start_gunicorn("-mem", threads), lab.start_proxy("-mem", threads, threads)]
    hp = lab.start_haproxy("-mem", threads, threads)
    if hp is not None:
        systems.append(hp)
    try:
        time.sleep(1.0)
        idle = {s.name: (rss_now(s.app_pid), rss_now(s.front_pid)) for s in systems}

        def row(values: dict[str, tuple[int, int]], fmt: Callable[[int], str] = mib) -> list[str]:
            g = values.get("gunicorn", (0, 0))
            p = values.get("proxy", (0, 0))
            h = values.get("haproxy")
            return [fmt(g[0]), fmt(p[0]), fmt(p[1]), fmt(h[0]) if h else "-", fmt(h[1]) if h else "-"]

        rss["idle, 1 tunnel, after startup + warm-up (MiB)"] = row(idle)
        # 1,000 concurrent SSE streams (HTTP/1.1 clients: one public connection each).
        load = sse_load(n_sse, events=5, interval=1.0)
        peak: dict[str, tuple[int, int]] = {}
        after: dict[str, tuple[int, int]] = {}
        for s in systems:
            sm = measure(s, load, 0, tmp)
            samples.append(sm)
            log(f"sse-1000 {s.name}: ok {sm.ok} failed {sm.failed} p50 {sm.p50_ms:.0f} ms max {sm.max_ms:.0f} ms "
                f"app peak {sm.app_rss_peak_kib / 1024:.1f} MiB front peak {sm.front_rss_peak_kib / 1024:.1f} MiB")
            peak[s.name] = (sm.app_rss_peak_kib, sm.front_rss_peak_kib)
            time.sleep(1.0)
            after[s.name] = (rss_now(s.app_pid), rss_now(s.front_pid))
        rss[f"peak with {n_sse} concurrent SSE streams (MiB)"] = row(peak)
        rss[f"after the {n_sse} SSE streams ended (MiB)"] = row(after)
        per = {k: ((peak[k][0] - idle[k][0]) * 1024 // n_sse, (peak[k][1] - idle[k][1]) * 1024 // n_sse)
               for k in peak}
        rss["per in-flight stream (KiB, (peak-idle)/1000)"] = row(per, lambda b: f"{b / 1024:.0f}")
        extra["sse1000_raw"] = {k: v[0] for k, v in peak.items() if k != "gunicorn"}
    finally:
        for s in systems:
            s.stop()
    # Per tunnel: the same worker with 1 and 9 tunnels to our proxy.
    per_tunnel = []
    for conns in (1, 9):
        s = lab.start_proxy(f"-tunnels{conns}", 16, 100, connections=conns)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    body = urllib.request.urlopen(s.base + "/", timeout=2).read()
                    if body:
                        break
            time.sleep(1.5)  # let every tunnel attach
            per_tunnel.append((rss_now(s.app_pid), rss_now(s.front_pid)))
        finally:
            s.stop()
    wk = (per_tunnel[1][0] - per_tunnel[0][0]) / 8
    pk = (per_tunnel[1][1] - per_tunnel[0][1]) / 8
    rss["per extra tunnel (KiB, (RSS 9 tunnels - RSS 1)/8)"] = ["-", f"{wk:.0f}", f"{pk:.0f}", "-", "-"]
    extra["rss"] = rss


def flat_experiment(lab: Lab, args: argparse.Namespace, tmp: Path, files: dict[int, Path],
                    extra: dict[str, Any]) -> None:
    """Stream 1 GiB down and up through one tunnel; RSS of worker and front sampled every 50 ms."""
    size = 256 * MIB if args.quick else 1024 * MIB
    label = f"{size // MIB} MiB"
    systems = [lab.start_proxy("-flat", 16, 100)]
    hp = lab.start_haproxy("-flat", 16, 100)
    if hp is not None:
        systems.append(hp)
    flat: dict[str, list[str]] = {}
    raw: dict[str, float] = {}
    try:
        for s in systems:
            for direction in ("download", "upload"):
                if direction == "download":
                    load = Load("flat", "", f"/download?n={size}", 1, requests=1, body_bytes=size, kind="bytes",
                                warmup=0)
                else:
                    load = Load("flat", "", "/upload", 1, requests=1, data=files[size], body_bytes=size,
                                kind="bytes", warmup=0)
                a0, f0 = rss_now(s.app_pid), rss_now(s.front_pid)
                with RSSSampler({"app": s.app_pid, "front": s.front_pid or 0}, 0.05) as rs:
                    t0 = time.monotonic()
                    out = run_h2load(h2load_argv(s.base + load.path, load, h2c=False, logfile=None), 600)
                    secs = time.monotonic() - t0
                a1, f1 = rss_now(s.app_pid), rss_now(s.front_pid)
                ok = "1 succeeded" in out
                key = f"{direction} {label} ({s.name})"
                flat[key] = [f"{size / secs / 1e6:.0f}" + ("" if ok else " (FAILED)"),
                             f"{a0 / 1024:.0f}→{rs.peak('app') / 1024:.0f}→{a1 / 1024:.0f}",
                             f"{f0 / 1024:.0f}→{rs.peak('front') / 1024:.0f}→{f1 / 1024:.0f}"]
                raw[key] = (rs.peak("app") - a0) / 1024
                log(f"flat {key}: {flat[key]}")
    finally:
        for s in systems:
            s.stop()
    extra["flat"] = flat
    extra["flat_raw"] = raw


def profile_experiment(lab: Lab, args: argparse.Namespace, tmp: Path, extra: dict[str, Any]) -> None:
    """CPU profiles (yappi, all threads) of the worker and of our proxy under load; top by tottime."""
    try:
        import yappi  # noqa: F401
    except ImportError:
        log("profile: yappi is not installed (pip install yappi); skipped")
        return
    d = 3.0 if args.quick else 8.0
    hello = Load("prof-hello", "", "/", 16, duration=d, warmup=300)
    down = Load("prof-down", "", f"/download?n={MIB}", 4, duration=d, body_bytes=MIB, kind="bytes", warmup=20)
    front = "haproxy" if lab.haproxy_bin else "proxy"
    cases = [(f"worker behind {front}, hello GET, 16 conn", front, "worker", hello),
             (f"worker behind {front}, download 1 MiB, 4 conn", front, "worker", down),
             ("our proxy (front), hello GET, 16 conn", "proxy", "front", hello)]
    profiles: dict[str, str] = {}
    for i, (title, kind, who, load) in enumerate(cases):
        path = tmp / f"profile-{i}.txt"
        if kind == "haproxy":
            s = lab.start_haproxy(f"-prof{i}", args.threads, 100, profile=path)
            assert s is not None
        elif who == "worker":
            s = lab.start_proxy(f"-prof{i}", args.threads, 100, profile=path)
        else:
            s = lab.start_proxy(f"-prof{i}", args.threads, 100, profile_front=path)
        try:
            sm = measure(s, load, 0, tmp)
            pid = s.app_pid if who == "worker" else s.front_pid
            assert pid is not None
            os.kill(pid, signal.SIGUSR1)
            deadline = time.monotonic() + 30
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
            text = path.read_text() if path.exists() else "(no profile written)"
            profiles[title] = f"under the profiler: {sm.rps:.0f} req/s\n{text}"
            log(f"profile {title}:\n{profiles[title]}")
        finally:
            s.stop()
    extra["profiles"] = profiles


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


SECTIONS = ("hello", "bodies", "sse", "memory", "flat", "micro", "profile")


def find_haproxy(explicit: str | None) -> str | None:
    for cand in (explicit, os.environ.get("HAPROXY_BIN"), shutil.which("haproxy"), HAPROXY_DEFAULT):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def make_files(tmp: Path, sizes: list[int]) -> dict[int, Path]:
    files = {}
    block = os.urandom(MIB)
    for size in sizes:
        p = tmp / f"body-{size}"
        with open(p, "wb") as f:
            for _ in range(size // MIB):
                f.write(block)
        files[size] = p
    return files


@contextlib.contextmanager
def lab_dir(keep: bool) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="rhttp-bench-"))
    try:
        yield d
    finally:
        if keep:
            log(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="rhttp-wsgi vs gunicorn: one table, every comparison in one run.")
    p.add_argument("--quick", action="store_true", help="a ~2 minute subset")
    p.add_argument("--reps", type=int, default=3, help="repetitions per load and system (median reported)")
    p.add_argument("--threads", type=int, default=16, help="app threads, gunicorn gthread and worker alike")
    p.add_argument("--only", default="",
                   help="comma list of sections: hello,bodies,sse,memory,flat,micro,profile")
    p.add_argument("--no-haproxy", action="store_true", help="skip HAProxy even when installed")
    p.add_argument("--haproxy", default=None, help=f"HAProxy binary (default: HAPROXY_BIN, PATH, {HAPROXY_DEFAULT})")
    p.add_argument("--json", default=None, help="also write every sample and the summary to this file")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, configs)")
    p.add_argument("--systems", default="gunicorn,proxy,haproxy",
                   help="comma list of the systems of the hello and bodies sections: gunicorn, proxy,"
                        " proxy-nolog (our proxy with --no-access-log: the access log's cost), haproxy")
    p.add_argument("--loads", default="", help="comma list of load keys to run (e.g. hello-c64); default all")
    p.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                   help="also run proxy+worker and HAProxy+worker from another source tree (a copy of the repo,"
                        " e.g. before an optimisation) in the hello and bodies sections, as 'proxy[NAME]'")
    args = p.parse_args(argv)
    trees = []
    for spec in args.tree:
        name, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "rhttp_wsgi").is_dir() or not (Path(path) / "benchmarks").is_dir():
            p.error(f"--tree {spec!r}: expected NAME=DIR with DIR/rhttp_wsgi and DIR/benchmarks")
        trees.append((name, Path(path).resolve()))
    for tool in ("h2load", "taskset"):
        if shutil.which(tool) is None:
            p.error(f"{tool} not found (apt-get install -y nghttp2-client util-linux)")
    if len(os.sched_getaffinity(0)) < 2:
        log("warning: fewer than 2 CPUs available; placement is meaningless")
    sections = set(filter(None, args.only.split(","))) or set(SECTIONS)
    only_loads = set(filter(None, args.loads.split(",")))
    if args.quick and not args.only:
        sections = {"hello", "bodies", "sse", "micro"}
    haproxy = None if args.no_haproxy else find_haproxy(args.haproxy)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "mode": "quick" if args.quick else "full",
            "reps": args.reps, "threads": args.threads, "loadavg": " ".join(os.getloadavg().__repr__()
                                                                             .strip("()").split(", ")[:3]),
            "haproxy": haproxy, "python": sys.version.split()[0]}
    samples: list[Sample] = []
    loads: list[Load] = []
    extra: dict[str, Any] = {}
    t_start = time.monotonic()
    with lab_dir(args.keep) as tmp:
        lab = Lab(tmp, args.threads, haproxy)
        sizes = [MIB] + ([] if args.quick else [100 * MIB])
        if "flat" in sections:
            sizes.append(256 * MIB if args.quick else 1024 * MIB)
        files = make_files(tmp, sorted(set(sizes)))
        if "micro" in sections:
            log("micro-benchmark of the protocol core (CPU 1)")
            extra["micro"] = run_micro(args)
        if sections & {"hello", "bodies"}:
            systems: list[System] = []
            wanted = set(filter(None, args.systems.split(",")))
            try:
                log(f"starting {', '.join(sorted(wanted))} (throughput configuration)")
                if "gunicorn" in wanted:
                    systems.append(lab.start_gunicorn("", args.threads))
                if "proxy" in wanted:
                    systems.append(lab.start_proxy("", args.threads, 100))
                if "proxy-nolog" in wanted:
                    systems.append(lab.start_proxy("", args.threads, 100, access_log=False))
                hp = lab.start_haproxy("", args.threads, 100) if "haproxy" in wanted else None
                if hp is not None:
                    systems.append(hp)
                for tree in trees:  # the same systems from other source trees (before/after)
                    systems.append(lab.start_proxy("", args.threads, 100, tree=tree))
                    hp = lab.start_haproxy("", args.threads, 100, tree=tree)
                    if hp is not None:
                        systems.append(hp)
                if "hello" in sections:
                    hl = [ld for ld in hello_loads(args.quick) if not only_loads or ld.key in only_loads]
                    loads += hl
                    interleaved(systems, hl, args.reps, tmp, samples, h2c_too=True)
                if "bodies" in sections:
                    bl = [ld for ld in body_loads(args.quick, files) if not only_loads or ld.key in only_loads]
                    loads += bl
                    interleaved(systems, bl, args.reps, tmp, samples)
            finally:
                for s in systems:
                    s.stop()
        if "sse" in sections:
            systems = []
            try:
                n = 200
                log(f"starting the streaming configuration ({n + 64} threads) for {n} SSE streams")
                systems.append(lab.start_gunicorn("-sse", n + 64))
                systems.append(lab.start_proxy("-sse", n + 64, n + 64))
                hp = lab.start_haproxy("-sse", n + 64, n + 64)
                if hp is not None:
                    systems.append(hp)
                sl = [sse_load(n, events=5 if args.quick else 10, interval=0.5)]
                loads += sl
                interleaved(systems, sl, 1 if args.quick else args.reps, tmp, samples)
            finally:
                for s in systems:
                    s.stop()
        if "memory" in sections:
            log("memory: idle, per tunnel, per in-flight stream, 1,000 SSE streams")
            memory_experiments(lab, args, tmp, samples, extra)
            loads.append(sse_load(1000, events=5, interval=1.0))
        if "flat" in sections:
            log("RSS while streaming through one tunnel")
            flat_experiment(lab, args, tmp, files, extra)
        if "profile" in sections:
            log("CPU profiles under load (yappi)")
            profile_experiment(lab, args, tmp, extra)
    extra["targets"] = targets(samples, extra)
    meta["elapsed_s"] = round(time.monotonic() - t_start)
    text = report(samples, loads, extra, meta)
    print(text)
    print(f"(elapsed {meta['elapsed_s']} s; HAProxy: {haproxy or 'not installed'}; Python {meta['python']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "samples": [s.__dict__ for s in samples], "extra": extra,
                       "summary": {f"{k[0]}|{k[1]}": v for k, v in summarize(samples).items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
