"""Tunnels that HAProxy closes or loses: idle purge, timeout server, restart.

These take seconds by nature (HAProxy's idle-pool purge runs every 5 s), so
they live apart from the quick tests and are marked ``slow`` as well.
"""

from __future__ import annotations

import re
import time

import pytest

from .haproxy_fixtures import RECOMMENDED_CFG, Lab, TestApp, http_request

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


def test_default_purge_no_503(lab: Lab) -> None:
    """HAProxy's default idle-pool purge (no pool-purge-delay) closes idle tunnels every 5 s
    without GOAWAY; the worker replaces them fast enough that a client polling every 0.5 s
    for 20 s never sees a 503."""
    text = RECOMMENDED_CFG.read_text()
    default_cfg, n = re.subn(r" pool-purge-delay \S+", "", text)
    assert n >= 1 and not re.search(r"(?m)^\s*server .*pool-purge-delay", default_cfg)
    hp, tunnel_port, public_port = lab.start_recommended(cfg_text=default_cfg)
    worker = lab.worker(TestApp("worker"), tunnel_port, connections=2)
    lab.wait_serving(public_port, "/hello")
    results = _poll(public_port, duration=20.0)
    assert len(results) >= 35
    bad = [r for r in results if r[1] != 200]
    reconnects = sum(t.reconnects for t in worker.tunnels())
    assert not bad, f"{len(bad)} of {len(results)} requests failed (tunnel reconnects: {reconnects}): {bad}"
    # The purge really happened (it is why this test exists): on HAProxy 3.0
    # every idle tunnel is closed each 5 s, so both slots reconnected ~4 times.
    if not lab.binary.at_least(3, 4):
        assert reconnects >= 2, f"no idle-pool purge observed: {worker.tunnels()}"
    assert all(t.connected for t in worker.tunnels()), worker.tunnels()


def test_recommended_config_keeps_tunnels(lab: Lab) -> None:
    """With the recommended config (long pool-purge-delay) no tunnel is closed across two
    default purge periods, used or idle."""
    hp, tunnel_port, public_port = lab.start_recommended()
    worker = lab.worker(TestApp("worker"), tunnel_port, connections=2)
    lab.wait_serving(public_port, "/hello")
    results = _poll(public_port, duration=11.5)
    assert all(r[1] == 200 for r in results), results
    infos = worker.tunnels()
    assert [t.reconnects for t in infos] == [0, 0], infos
    assert all(t.connected for t in infos), infos


def test_unused_tunnels_recycled_on_timeout_server(lab: Lab) -> None:
    """HAProxy 3.0 closes a tunnel that never carried a request after `timeout server`
    (GOAWAY, NO_ERROR); the worker replaces it at once and traffic never notices."""
    text = RECOMMENDED_CFG.read_text()
    short, n = re.subn(r"(?m)^    timeout server 60s$", "    timeout server 1s", text)
    assert n == 1
    hp, tunnel_port, public_port = lab.start_recommended(cfg_text=short)
    worker = lab.worker(TestApp("worker"), tunnel_port, connections=3)
    lab.wait_serving(public_port, "/hello")
    results = _poll(public_port, duration=4.0, interval=0.1)
    bad = [r for r in results if r[1] != 200]
    assert not bad, f"{len(bad)} of {len(results)} failed: {bad[:5]} ({worker.tunnels()})"
    # At least one tunnel sat unused long enough to be recycled (and came back).
    assert sum(t.reconnects for t in worker.tunnels()) >= 1, worker.tunnels()
    deadline = time.monotonic() + 2
    while not all(t.connected for t in worker.tunnels()):
        assert time.monotonic() < deadline, worker.tunnels()
        time.sleep(0.01)


def test_haproxy_restart(lab: Lab) -> None:
    """Stop HAProxy, start it again on the same ports: the workers reconnect and requests
    succeed again within 3 s of the restart."""
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
    hp.start(wait_ports=(tunnel_port, public_port))
    assert hp.pid != pid1
    t_restart = time.monotonic()
    # ... and are back within 3 s.
    last = None
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
