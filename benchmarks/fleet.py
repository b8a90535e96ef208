"""What a fleet of workers does to a proxy that goes down and comes back: a simulation of the retry schedule.

Each of ``--workers`` workers keeps ``--connections`` tunnels to one proxy.  At t=0 the proxy dies
(every tunnel drops at once, as after a SIGKILL); it accepts again at t=``--outage``.  The
simulation replays the worker's real retry policy, :class:`rhttp_wsgi.worker.RetrySchedule` (the
same class and the same defaults), and the pool's dial rules (``WorkerPool._await_turn``):

* ``new`` (this version): one schedule per proxy address; while the address fails only one tunnel
  (the probe) dials, at the scheduled time; when a probe's handshake succeeds the other tunnels of
  that worker dial at once (the fast path).  Caps: ``reconnect_max`` 2 s.
* ``old`` (before issue 13): every tunnel on its own schedule, cap 30 s.

It reports, per second of simulated time: dial attempts against the dead proxy (refused SYNs), TLS
handshakes after it is back (the load a recovering proxy takes), and how long after the proxy
accepted again each worker had its first and all its tunnels back.  Virtual time: the figures do
not depend on the machine, and 10,000 workers take a second.

    python benchmarks/fleet.py                              # 1,000 workers, 4 tunnels, 60 s outage
    python benchmarks/fleet.py --policy old --outage 70
    python benchmarks/fleet.py --workers 10000 --json
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

from rhttp_wsgi.options import WorkerOptions
from rhttp_wsgi.worker import RetrySchedule

#: A TLS handshake plus the proxy's SETTINGS, as measured on loopback (the fast path waits for it).
HANDSHAKE = 0.01


@dataclass
class Figures:
    dials_per_s: list[int] = field(default_factory=list)  # attempts during the outage, per second
    handshakes: list[float] = field(default_factory=list)  # times of successful handshakes
    first_back: list[float] = field(default_factory=list)  # per worker: first tunnel up, after the outage
    all_back: list[float] = field(default_factory=list)  # per worker: all its tunnels up


def defaults() -> tuple[float, float, float]:
    fields = WorkerOptions.__dataclass_fields__
    return (fields["reconnect_min"].default, fields["reconnect_max"].default,
            fields["reconnect_refused_max"].default)


def simulate(workers: int, connections: int, outage: float, policy: str, seed: int) -> Figures:
    rng = random.Random(seed)
    lo, hi, refused_hi = defaults()
    if policy == "old":
        hi = refused_hi = 30.0
    figs = Figures(dials_per_s=[0] * (math.ceil(outage) + 1))
    # Event queue: (time, worker, tunnel); the first attempts all happen at t=0 (a healthy close
    # redials at once), each of them refused.
    events: list[tuple[float, int, int]] = []
    up: list[int] = [0] * workers
    schedules = ([RetrySchedule(lo, hi, refused_hi, rng.random) for _ in range(workers)] if policy == "new" else
                 [RetrySchedule(lo, hi, refused_hi, rng.random) for _ in range(workers * connections)])
    for w in range(workers):
        for c in range(connections):
            heapq.heappush(events, (0.0, w, c))
    first: dict[int, float] = {}
    while events:
        t, w, c = heapq.heappop(events)
        if t < outage:
            figs.dials_per_s[int(t)] += 1
            schedule = schedules[w] if policy == "new" else schedules[w * connections + c]
            delay = schedule.failed()
            if policy == "new" and c != 0:
                continue  # the other tunnels wait for worker w's probe (tunnel 0 stands for it)
            heapq.heappush(events, (t + delay, w, c))
            continue
        # the proxy accepts again: this dial's handshake succeeds
        done = t + HANDSHAKE
        figs.handshakes.append(done)
        up[w] += 1
        if w not in first:
            first[w] = done
            if policy == "new":  # the fast path: the waiting tunnels dial now
                for _ in range(1, connections):
                    figs.handshakes.append(done + HANDSHAKE)
                    up[w] += 1
        if up[w] == connections:
            figs.all_back.append((done + (HANDSHAKE if policy == "new" and connections > 1 else 0.0)) - outage)
    figs.first_back = [first[w] - outage for w in range(workers)]
    return figs


def summary(figs: Figures, workers: int, connections: int, outage: float, policy: str) -> dict[str, Any]:
    steady = figs.dials_per_s[3:int(outage)] or figs.dials_per_s
    per_100ms: dict[int, int] = {}
    for t in figs.handshakes:
        per_100ms[int((t - outage) * 10)] = per_100ms.get(int((t - outage) * 10), 0) + 1

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)

    return {
        "policy": policy, "workers": workers, "connections": connections, "outage_s": outage,
        "dials_per_s_at_dead_proxy": {"first_second": figs.dials_per_s[0],
                                      "steady_mean": round(statistics.mean(steady), 1), "steady_max": max(steady)},
        "handshakes_per_s_after_recovery": {
            "peak_100ms_window_x10": max(per_100ms.values()) * 10,
            "mean_first_2s": round(sum(v for k, v in per_100ms.items() if k < 20) / 2, 1)},
        "first_tunnel_back_s": {"p50": pct(figs.first_back, 0.5), "p99": pct(figs.first_back, 0.99),
                                "max": round(max(figs.first_back), 3)},
        "all_tunnels_back_s": {"p50": pct(figs.all_back, 0.5), "p99": pct(figs.all_back, 0.99),
                               "max": round(max(figs.all_back), 3)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--outage", type=float, default=60.0)
    ap.add_argument("--policy", choices=("new", "old", "both"), default="both")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    policies = ("new", "old") if args.policy == "both" else (args.policy,)
    for policy in policies:
        figs = simulate(args.workers, args.connections, args.outage, policy, args.seed)
        s = summary(figs, args.workers, args.connections, args.outage, policy)
        if args.json:
            print(json.dumps(s))
            continue
        d, h = s["dials_per_s_at_dead_proxy"], s["handshakes_per_s_after_recovery"]
        f, a = s["first_tunnel_back_s"], s["all_tunnels_back_s"]
        print(f"{policy}: {args.workers} workers x {args.connections} tunnels, {args.outage:g} s outage")
        print(f"  dials at the dead proxy: {d['first_second']} in the first second, then {d['steady_mean']}/s"
              f" (max {d['steady_max']}/s)")
        print(f"  TLS handshakes once it is back: peak {h['peak_100ms_window_x10']}/s (100 ms window),"
              f" {h['mean_first_2s']}/s over the first 2 s")
        print(f"  first tunnel back after: p50 {f['p50']} s, p99 {f['p99']} s, max {f['max']} s;"
              f" all tunnels: p50 {a['p50']} s, max {a['max']} s")


if __name__ == "__main__":
    main()
