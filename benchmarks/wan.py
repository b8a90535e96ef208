"""A long fat pipe: 64 MiB down and up through the tunnel over a delay line, against plain TCP.

    python benchmarks/wan.py                    # 25 ms each way, 64 MiB, 3 reps
    python benchmarks/wan.py --delay 0.075 --size 32 --reps 5 --haproxy-window 16777216

Every system serves ``benchmarks.apps:app`` (``GET /download?n=N``, ``POST /upload``), and in
each the delay line (``benchmarks/delayline.py``, its own process) sits where the internet would:

* ``gunicorn``      — client → delay line → gunicorn gthread (plain TCP, HTTP/1.1): the baseline;
* ``proxy``         — client → our proxy → delay line → worker (the tunnel crosses the delay line;
                      windows tuned, the defaults);
* ``proxy-fixed``   — the same with ``--max-window-size`` = ``--initial-window-size`` on both ends:
                      the fixed 1 MiB windows of before;
* ``proxy-32m``     — window caps of 32 MiB per stream / 64 MiB per tunnel (the defaults before
                      session 6; only with ``--systems``);
* ``haproxy``       — client → HAProxy 3.x → delay line → worker, with
                      ``tune.h2.fe.initial-window-size`` = ``--haproxy-window`` (the window HAProxy
                      grants the worker's responses: a reverse tunnel is a frontend connection);
* ``haproxy-16k``   — the same window with HAProxy's default ``tune.bufsize`` (16 KiB; only with
                      ``--systems``): what the larger buffers add;
* ``haproxy-1m``    — 1 MiB and the default buffers (the earlier recommended config).

The client is this process (raw sockets, HTTP/1.1, a fresh connection per transfer; for the
proxies it talks to the front on loopback).  Each transfer is timed from the request's first
byte to the response's last.  Systems are interleaved per repetition (rep 1: every system, rep
2: ...), so a busy machine slows them alike; the table shows the median MB/s (10^6 bytes/s),
the spread (max-min), and the ratio to gunicorn's median in the same run.  CPU placement as in
``benchmarks/run.py``: the app server on CPU 1, the front proxy on CPU 0; the delay line and
the client are not pinned.  Stops every process it started, by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import (  # noqa: E402
    CPU_APP,
    CPU_FRONT,
    PY,
    Lab,
    Proc,
    System,
    _wait_port,
    find_haproxy,
    free_ports,
    lab_dir,
    log,
    wait_ready,
)

MIB = 1 << 20
CPU_ANY = "0,1"

HAPROXY_WAN_CFG = """\
global
    expose-experimental-directives
    nbthread 1
    maxconn 1000
    tune.h2.fe.max-concurrent-streams 100
    # The window HAProxy grants a worker's response, per stream (a reverse tunnel is a
    # frontend connection): a download moves at most this per round trip.
    tune.h2.fe.initial-window-size {window}
{bufsize}defaults
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
    option http-no-delay
    server workers rhttp@ pool-purge-delay 24h
"""


# ---------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------


def _read_head(sock: socket.socket, buf: bytearray) -> tuple[int, int, bytes]:
    """Read until the end of the response head; returns (status, content-length, body bytes read)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"connection closed in the response head: {bytes(buf[:200])!r}")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = -1
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length < 0:
        raise RuntimeError(f"no content-length in {head!r}")
    return status, length, rest


def _read_body(sock: socket.socket, length: int, already: bytes) -> int:
    got = len(already)
    view = memoryview(bytearray(MIB))
    while got < length:
        n = sock.recv_into(view, min(MIB, length - got))
        if not n:
            raise RuntimeError(f"connection closed after {got} of {length} body bytes")
        got += n
    return got


def download(base: tuple[str, int], size: int) -> float:
    """GET /download?n=size; returns seconds from the request to the body's last byte."""
    with socket.create_connection(base, timeout=120) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        s.sendall(f"GET /download?n={size} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        status, length, rest = _read_head(s, bytearray())
        if status != 200 or length != size:
            raise RuntimeError(f"download: {status}, {length} bytes")
        _read_body(s, length, rest)
        return time.perf_counter() - t0


_BLOCK = b"u" * MIB


def upload(base: tuple[str, int], size: int) -> float:
    """POST /upload with size bytes; returns seconds from the first byte sent to the answer."""
    with socket.create_connection(base, timeout=120) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        s.sendall(f"POST /upload HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
                  f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n".encode())
        left = size
        while left:
            n = min(left, MIB)
            s.sendall(_BLOCK[:n])
            left -= n
        status, length, rest = _read_head(s, bytearray())
        body = rest
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        if status != 200 or body.strip() != str(size).encode():
            raise RuntimeError(f"upload: {status}, answer {body[:80]!r}")
        return time.perf_counter() - t0


# ---------------------------------------------------------------------------
# systems: each with a delay line where the internet would be
# ---------------------------------------------------------------------------


def delay_line(lab: Lab, name: str, target: int, delay: float, rate: float | None) -> tuple[Proc, int]:
    (port,) = free_ports(1)
    argv = [PY, str(ROOT / "benchmarks" / "delayline.py"), "--listen", f"127.0.0.1:{port}",
            "--to", f"127.0.0.1:{target}", "--delay", str(delay)]
    if rate:
        argv += ["--rate", str(rate)]
    p = Proc(name, argv, CPU_ANY, lab.logs).start()
    _wait_port(port, [p])
    return p, port


def start_gunicorn(lab: Lab, delay: float, rate: float | None) -> System:
    (gport,) = free_ports(1)
    g = Proc("gunicorn", [PY, "-m", "gunicorn", "-k", "gthread", "-w", "1", "--threads", "4",
                          "--timeout", "300", "--log-level", "warning", "-b", f"127.0.0.1:{gport}",
                          "benchmarks.apps:app"], CPU_APP, lab.logs).start()
    wait_ready(f"http://127.0.0.1:{gport}/", [g])
    d, dport = delay_line(lab, "delayline-gunicorn", gport, delay, rate)
    return System("gunicorn", f"http://127.0.0.1:{dport}", [g, d], g, None,
                  label="client -> delay line -> gunicorn gthread (plain TCP)")


def _worker(lab: Lab, name: str, port: int, extra: list[str], root: Path = ROOT) -> Proc:
    w = lab.worker(name, port, threads=4, mcs=100, root=root)
    w.argv += extra
    return w.start()


def start_proxy(lab: Lab, name: str, delay: float, rate: float | None, extra: list[str],
                root: Path = ROOT) -> System:
    tport, pport = free_ports(2)
    p = Proc(name, [PY, "-m", "rhttp_wsgi", "--log-level", "warning", "proxy",
                    "--tunnel-bind", f"127.0.0.1:{tport}", "--public-bind", f"127.0.0.1:{pport}",
                    "--cert", str(lab.pki.server_cert), "--key", str(lab.pki.server_key),
                    "--workers-ca", str(lab.pki.ca_cert), "--no-access-log", *extra], CPU_FRONT, lab.logs,
             root=root).start()
    _wait_port(tport, [p])
    d, dport = delay_line(lab, f"delayline-{name}", tport, delay, rate)
    w = _worker(lab, f"worker-{name}", dport, extra, root)
    s = System(name, f"http://127.0.0.1:{pport}", [p, d, w], w, p,
               label="client -> our proxy -> delay line -> worker"
                     + (f" (source tree {root})" if root != ROOT else ""))
    wait_ready(s.base + "/", [p, d, w], timeout=60)
    return s


def start_haproxy(lab: Lab, name: str, haproxy: str, window: int, bufsize: int | None, delay: float,
                  rate: float | None) -> System:
    tport, pport = free_ports(2)
    cfg = lab.dir / f"{name}.cfg"
    cfg.write_text(HAPROXY_WAN_CFG.format(window=window, tport=tport, pport=pport, pem=lab.server_pem,
                                          ca=lab.pki.ca_cert,
                                          bufsize=f"    tune.bufsize {bufsize}\n" if bufsize else ""))
    h = Proc(name, [haproxy, "-db", "-f", str(cfg)], CPU_FRONT, lab.logs).start()
    _wait_port(tport, [h])
    d, dport = delay_line(lab, f"delayline-{name}", tport, delay, rate)
    w = _worker(lab, f"worker-{name}", dport, [])
    s = System(name, f"http://127.0.0.1:{pport}", [h, d, w], w, h,
               label=f"client -> HAProxy (tune.h2.fe.initial-window-size {window}"
                     f"{f', tune.bufsize {bufsize}' if bufsize else ''}) -> delay line -> worker")
    wait_ready(s.base + "/", [h, d, w], timeout=60)
    return s


def _addr(base: str) -> tuple[str, int]:
    host, _, port = base.removeprefix("http://").rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="64 MiB down and up over a delay line: tunnel vs plain TCP.")
    ap.add_argument("--delay", type=float, default=0.025, help="one-way delay, seconds (default 0.025)")
    ap.add_argument("--rate", type=float, default=None, help="bottleneck bytes/s each way (default: none)")
    ap.add_argument("--size", type=int, default=64, help="MiB per transfer (default 64)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (median reported)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="unmeasured 8 MiB transfers per system and direction before rep 1 (default 0: rep 1 is"
                         " each tunnel's first transfer, reported as 'cold')")
    ap.add_argument("--systems", default="gunicorn,proxy,proxy-fixed,haproxy,haproxy-1m")
    ap.add_argument("--haproxy", default=None, help="HAProxy binary (default: HAPROXY_BIN, PATH, /opt/...)")
    ap.add_argument("--haproxy-window", type=int, default=32 << 20,
                    help="tune.h2.fe.initial-window-size of the 'haproxy' system (default 32 MiB, as in"
                         " examples/haproxy/haproxy.cfg)")
    ap.add_argument("--haproxy-bufsize", type=int, default=65536,
                    help="tune.bufsize of the 'haproxy' system (default 65536; 0: HAProxy's 16 KiB)")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                    help="also run the 'proxy' system from another source tree (a checkout of the repo), as"
                         " 'proxy[NAME]', interleaved with the others: a before/after comparison in one run")
    ap.add_argument("--json", default=None, help="also write the samples here")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, configs)")
    args = ap.parse_args(argv)
    size = args.size * MIB
    wanted = [s for s in args.systems.split(",") if s]
    trees: dict[str, Path] = {}
    for spec in args.tree:
        tname, _, tdir = spec.partition("=")
        if not tname or not (Path(tdir) / "rhttp_wsgi").is_dir():
            ap.error(f"--tree {spec!r}: expected NAME=DIR with DIR/rhttp_wsgi")
        trees[f"proxy[{tname}]"] = Path(tdir).resolve()
        wanted.append(f"proxy[{tname}]")
    haproxy = find_haproxy(args.haproxy)
    samples: dict[tuple[str, str], list[float]] = {}
    labels: dict[str, str] = {}
    with lab_dir(args.keep) as d:
        lab = Lab(d, threads=4, haproxy_bin=haproxy)
        systems: list[System] = []
        try:
            starters: dict[str, Callable[[], System]] = {
                "gunicorn": lambda: start_gunicorn(lab, args.delay, args.rate),
                "proxy": lambda: start_proxy(lab, "proxy", args.delay, args.rate, []),
                "proxy-fixed": lambda: start_proxy(lab, "proxy-fixed", args.delay, args.rate,
                                                   ["--max-window-size", "1048576"]),
                "proxy-32m": lambda: start_proxy(lab, "proxy-32m", args.delay, args.rate,
                                                 ["--max-window-size", str(32 * MIB),
                                                  "--max-connection-window-size", str(64 * MIB)]),
                "haproxy": lambda: start_haproxy(lab, "haproxy", haproxy or "", args.haproxy_window,
                                                 args.haproxy_bufsize or None, args.delay, args.rate),
                "haproxy-16k": lambda: start_haproxy(lab, "haproxy-16k", haproxy or "", args.haproxy_window,
                                                     None, args.delay, args.rate),
                "haproxy-1m": lambda: start_haproxy(lab, "haproxy-1m", haproxy or "", 1 << 20, None,
                                                    args.delay, args.rate),
            }
            for tname, tdir in trees.items():
                starters[tname] = lambda tname=tname, tdir=tdir: start_proxy(lab, tname, args.delay, args.rate, [],
                                                                           root=tdir)
            for name in wanted:
                if name.startswith("haproxy") and not haproxy:
                    log(f"skipping {name}: no HAProxy binary")
                    continue
                log(f"starting {name}")
                s = starters[name]()
                systems.append(s)
                labels[s.name] = s.label
            for s in systems:
                for _ in range(args.warmup):  # (a warm-up makes every rep warm)
                    download(_addr(s.base), min(size, 8 * MIB))
                    upload(_addr(s.base), min(size, 8 * MIB))
            for rep in range(args.reps):
                for direction, fn in (("download", download), ("upload", upload)):
                    for s in systems:
                        secs = fn(_addr(s.base), size)
                        mbps = size / secs / 1e6
                        samples.setdefault((s.name, direction), []).append(mbps)
                        log(f"rep {rep + 1} {direction:8} {s.name:12} {secs * 1000:8.0f} ms {mbps:8.1f} MB/s")
        finally:
            for s in reversed(systems):
                s.stop()
    # rep 1 is each tunnel's first transfer that way ("cold": windows not learned yet);
    # the median and the ratio are over the later reps ("warm"), or all of them with --warmup.
    cold_first = args.warmup == 0 and args.reps > 1
    rows = []
    names = [s for s in wanted if any(k[0] == s for k in samples)]
    for direction in ("download", "upload"):
        base_vals = samples.get(("gunicorn", direction), [])
        base = statistics.median(base_vals[1:] if cold_first else base_vals) if base_vals else None
        for name in names:
            vals = samples.get((name, direction), [])
            if not vals:
                continue
            warm = vals[1:] if cold_first else vals
            med = statistics.median(warm)
            ratio = f"{med / base:.2f}x" if base else "-"
            cold = f"{vals[0]:.1f}" if cold_first else "-"
            cold_ratio = f"{vals[0] / base:.2f}x" if cold_first and base else "-"
            rows.append((direction, name, f"{med:.1f}", f"{min(warm):.1f}-{max(warm):.1f}", ratio, cold,
                         cold_ratio))
    print(f"\n{args.size} MiB transfers, {args.delay * 1000:g} ms each way"
          f"{f', {args.rate / 1e6:g} MB/s bottleneck' if args.rate else ''}, {args.reps} reps; MB/s = 10^6 bytes/s;"
          f" warm = median of reps {'2' if cold_first else '1'}-{args.reps}, cold = rep 1 (the tunnel's first"
          f" transfer); ratios to gunicorn's warm median:\n")
    head = ("direction", "system", "warm MB/s", "range", "vs gunicorn", "cold MB/s", "cold vs gunicorn")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for i, r in enumerate([head, *rows]):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print()
    for name in names:
        print(f"  {name}: {labels.get(name, '')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "samples": {f"{k[0]}/{k[1]}": v
                                                                               for k, v in samples.items()}},
                                              indent=1))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
