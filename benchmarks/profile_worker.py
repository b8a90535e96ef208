"""Run ``rhttp-wsgi worker`` (or ``proxy``) in-process under a multi-threaded CPU profiler.

cProfile sees only the thread that enabled it and py-spy's ``--gil`` mode samples
unreliably here, so this uses yappi with its CPU clock across *all* threads (reader,
writer, app threads).  On SIGUSR1 it writes the functions sorted by tottime (time in the
function itself) to ``--out`` and exits; otherwise the process is the normal CLI (which owns
SIGTERM/SIGINT).

    python benchmarks/profile_worker.py --out /tmp/worker.prof.txt --limit 25 -- \\
        worker benchmarks.apps:app --proxy 127.0.0.1:8443 --cert ... --key ... --ca ...

``benchmarks/run.py --only profile`` drives it (hello world and 1 MiB downloads through
HAProxy and through our proxy).  Needs ``pip install yappi``.  Profiling slows the
process several-fold: read the *shares*, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        i = path.find(marker)
        if i >= 0:
            rest = path[i + len(marker):]
            return rest.split("/", 1)[1] if marker.startswith("/lib") and "/" in rest else rest
    return path.replace(str(ROOT) + "/", "")


def write_report(out: Path, limit: int, title: str) -> None:
    import yappi

    yappi.stop()
    stats = yappi.get_func_stats()
    rows = [(s.tsub, s.ttot, s.ncall, f"{s.name} ({_short(s.module)}:{s.lineno})") for s in stats]
    total = sum(r[0] for r in rows) or 1.0
    rows.sort(key=lambda r: r[0], reverse=True)
    lines = [f"{title}: yappi CPU clock, all threads; total {total:.2f} s of profiled CPU",
             f"{'tottime%':>8} {'tottime s':>9} {'cumtime s':>9} {'ncalls':>9}  function"]
    for tsub, ttot, ncall, name in rows[:limit]:
        lines.append(f"{100 * tsub / total:8.1f} {tsub:9.3f} {ttot:9.3f} {ncall:9d}  {name}")
    threads = sorted(((t.name, t.ttot) for t in yappi.get_thread_stats()), key=lambda x: -x[1])
    lines.append("")
    lines.append("CPU by thread: " + ", ".join(f"{n} {t:.2f}s" for n, t in threads[:8]))
    out.write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--limit", type=int, default=25)
    p.add_argument("--title", default="worker")
    p.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the rhttp-wsgi arguments")
    args = p.parse_args()
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    import yappi

    from rhttp_wsgi.cli import main as cli_main

    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if done.is_set():
            return
        done.set()
        write_report(args.out, args.limit, args.title)
        os._exit(0)

    yappi.set_clock_type("cpu")
    yappi.start(builtins=True, profile_threads=True)
    signal.signal(signal.SIGUSR1, on_signal)  # the CLI owns SIGTERM/SIGINT
    return cli_main(cli)


if __name__ == "__main__":
    raise SystemExit(main())
