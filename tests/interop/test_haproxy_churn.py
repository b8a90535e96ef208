"""Tunnels that HAProxy closes or loses: idle purge, timeout server, restart.

These take seconds by nature (HAProxy's idle-pool purge runs every 5 s), so
they live apart from the quick tests and are marked ``slow`` as well.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

import pytest

from .haproxy_fixtures import RECOMMENDED_CFG, Lab, Response, TestApp, http_request

pytestmark = [pytest.mark.haproxy, pytest.mark.slow, pytest.mark.timeout(90)]


def _poll(public_port: int, duration: float, interval: float = 0.5,
          max_requests: int = 200) -> list[tuple[float, int, str]]:
    """One client: a request, then `interval` s of quiet, for `duration` s (bounded in count too)."""
    out: list[tuple[float, int, str]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < duration and len(out) < max_requests:
        t = time.monotonic() - t0
        try:
            r = http_request(public_port, "GET", "/hello", headers={"Host": "app.example"}, timeout=5)
            out.append((t, r.status, r.body[:60].decode("utf-8", "replace")))
        except OSError as e:
            out.append((t, -1, repr(e)))
        time.sleep(interval)
    return out


class _TunnelMonitor:
    """Samples worker.tunnels() every 2 ms on a thread: how long each slot stays down."""

    def __init__(self, worker: object, interval: float = 0.002) -> None:
        self.worker = worker
        self.interval = interval
        self.downtimes: list[float] = []  # per slot, closed -> connected again
        self.all_down: list[float] = []  # periods with no tunnel at all
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tunnel-monitor", daemon=True)

    def __enter__(self) -> _TunnelMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        down_since: dict[int, float] = {}
        all_down_since: float | None = None
        while not self._stop.wait(self.interval):
            infos = self.worker.tunnels()  # type: ignore[attr-defined]
            now = time.monotonic()
            for t in infos:
                if not t.connected:
                    down_since.setdefault(t.slot, now)
                elif t.slot in down_since:
                    self.downtimes.append(now - down_since.pop(t.slot))
            if not any(t.connected for t in infos):
                all_down_since = now if all_down_since is None else all_down_since
            elif all_down_since is not None:
                self.all_down.append(now - all_down_since)
                all_down_since = None


def test_default_purge_no_503(lab: Lab, record_property: Callable[[str, object], None]) -> None:
    """HAProxy's default idle-pool purge (no pool-purge-delay) closes idle tunnels every 5 s
    without GOAWAY.  A client polling every 0.5 s for 20 s never sees a 503, and every closed
    tunnel is replaced within milliseconds."""
    text = RECOMMENDED_CFG.read_text()
    default_cfg, n = re.subn(r" pool-purge-delay \S+", "", text)
    assert n >= 1 and not re.search(r"(?m)^\s*server .*pool-purge-delay", default_cfg)
    _hp, tunnel_port, public_port = lab.start_recommended(cfg_text=default_cfg)
    worker = lab.worker(TestApp("worker"), tunnel_port, connections=4)
    lab.wait_serving(public_port, "/hello")
    with _TunnelMonitor(worker) as mon:
        results = _poll(public_port, duration=20.0)
    assert len(results) >= 35
    bad = [r for r in results if r[1] != 200]
    reconnects = sum(t.reconnects for t in worker.tunnels())
    downs = sorted(mon.downtimes)
    summary = (f"{reconnects} reconnects; per-slot downtime ms: "
               f"{[round(d * 1000, 1) for d in downs]}; no tunnel at all for ms: "
               f"{[round(d * 1000, 1) for d in mon.all_down]}")
    record_property("purge_churn", summary)
    print(summary)
    assert not bad, f"{len(bad)} of {len(results)} requests failed ({summary}): {bad}"
    # The purge really happened (it is why this test exists): HAProxy 3.0 closes
    # most idle tunnels every 5 s.
    if not lab.binary.at_least(3, 4):
        assert reconnects >= 4, f"no idle-pool purge observed: {worker.tunnels()}"
    # ... and each closed tunnel came back fast (about 50 ms of jitter plus a handshake).
    if downs:
        assert downs[len(downs) // 2] < 0.1, summary
        assert downs[-1] < 1.0, summary
    assert all(t.connected for t in worker.tunnels()), worker.tunnels()


def test_recommended_config_keeps_tunnels(lab: Lab) -> None:
    """With the recommended config (long pool-purge-delay) no tunnel is closed across two
    default purge periods, used or idle."""
    _hp, tunnel_port, public_port = lab.start_recommended()
    worker = lab.worker(TestApp("worker"), tunnel_port, connections=2)
    lab.wait_serving(public_port, "/hello")
    results = _poll(public_port, duration=11.5)
    assert all(r[1] == 200 for r in results), results
    infos = worker.tunnels()
    assert [t.reconnects for t in infos] == [0, 0], infos
    assert all(t.connected for t in infos), infos


def test_unused_tunnels_recycled_on_timeout_server(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    """HAProxy 3.0 closes a tunnel that never carried a request after `timeout server`
    (GOAWAY, NO_ERROR); the worker replaces it at once and keeps serving."""
    text = RECOMMENDED_CFG.read_text()
    short, n = re.subn(r"(?m)^    timeout server 60s$", "    timeout server 1s", text)
    assert n == 1
    _hp, tunnel_port, public_port = lab.start_recommended(cfg_text=short)
    worker = lab.worker(TestApp("worker"), tunnel_port, connections=2)
    # No traffic: both tunnels stay unused and HAProxy recycles them after ~1 s.
    deadline = time.monotonic() + 5
    while not all(t.reconnects >= 1 for t in worker.tunnels()):
        if time.monotonic() >= deadline:
            if lab.binary.at_least(3, 4):
                pytest.skip(f"HAProxy {lab.binary.version} does not recycle unused reverse tunnels")
            raise AssertionError(f"unused tunnels were not recycled: {worker.tunnels()}")
        time.sleep(0.02)
    assert any("peer sent GOAWAY" in rec.getMessage() for rec in caplog.records), \
        "expected HAProxy to close the unused tunnels with GOAWAY"
    deadline = time.monotonic() + 2
    while not all(t.connected for t in worker.tunnels()):
        assert time.monotonic() < deadline, worker.tunnels()
        time.sleep(0.01)
    results = _poll(public_port, duration=1.0, interval=0.1)
    assert results and all(r[1] == 200 for r in results), results


@pytest.mark.parametrize("downtime", [0.0, 1.5], ids=["immediate", "down-1.5s"])
def test_haproxy_restart(lab: Lab, downtime: float) -> None:
    """Stop HAProxy, start it again on the same ports (at once, or after 1.5 s during which
    the workers' dials fail and back off): the workers reconnect and requests succeed again
    within 3 s of the restart."""
    hp, tunnel_port, public_port = lab.start_recommended()
    worker = lab.worker(TestApp("worker"), tunnel_port, connections=2)
    lab.wait_serving(public_port, "/hello")
    assert http_request(public_port, "GET", "/hello", headers={"Host": "app.example"}).status == 200
    pid1 = hp.pid
    hp.stop()
    assert not hp.running
    # The workers notice (their tunnels drop) ...
    deadline = time.monotonic() + 5
    while any(t.connected for t in worker.tunnels()):
        assert time.monotonic() < deadline, worker.tunnels()
        time.sleep(0.01)
    time.sleep(downtime)
    hp.start(wait_ports=(tunnel_port, public_port))
    assert hp.pid != pid1
    t_restart = time.monotonic()
    # ... and are back within 3 s.
    last: Response | OSError | None = None
    while True:
        elapsed = time.monotonic() - t_restart
        assert elapsed < 3.0, f"no successful request within 3 s of the restart; last: {last!r}"
        try:
            last = http_request(public_port, "GET", "/hello", headers={"Host": "app.example"}, timeout=2)
        except OSError as e:
            last = e
        else:
            if last.status == 200:
                break
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while not all(t.connected for t in worker.tunnels()):
        assert time.monotonic() < deadline, worker.tunnels()
        time.sleep(0.02)
    assert all(t.reconnects >= 1 for t in worker.tunnels()), worker.tunnels()
    for _ in range(10):
        r = http_request(public_port, "GET", "/hello", headers={"Host": "app.example"})
        assert (r.status, r.body) == (200, b"hello from worker")
