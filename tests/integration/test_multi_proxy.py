"""Several proxies (issue 13): one worker keeps tunnels to every proxy and every address of a name,
recovers one that was killed within 3 s of it accepting again, and the others lose nothing meanwhile.

Real proxies on loopback addresses (127.0.0.2, .3, .4: Linux routes all of 127/8 to lo), real mTLS;
the SIGKILL tests run ``rhttp-wsgi proxy`` and ``rhttp-wsgi worker`` as processes (the CLI path), the
others use the Python API (``Proxy``, ``WorkerPool``).
"""

from __future__ import annotations

import http.client
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rhttp_wsgi.pki import DemoPKI
from rhttp_wsgi.proxy import Proxy
from rhttp_wsgi.worker import WorkerPool
from tests.integration.proxy_fixtures import WAIT, hello_app, wait_until
from tests.integration.test_cli_errors import Command

log = logging.getLogger("rhttp_wsgi.tests.multi_proxy")

IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
RecordProperty = Callable[[str, object], None]


@pytest.fixture(name="pki")
def pki_fixture(tmp_path: Path) -> DemoPKI:
    return DemoPKI.create(tmp_path, worker_names=("worker",), server_sans=("localhost", "127.0.0.1", *IPS))


def free_port(*ips: str) -> int:
    """A port free on every one of ``ips`` (so one name's addresses can share it, as a cluster does)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((ips[0], 0))
            port = int(s.getsockname()[1])
        try:
            for ip in ips:
                with socket.socket() as t:
                    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    t.bind((ip, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no port free on all of {ips}")


class Proxies:
    """In-process proxies (Python API), one per loopback address, shut down at the end."""

    def __init__(self, pki: DemoPKI) -> None:
        self.pki = pki
        self.proxies: dict[str, Proxy] = {}
        self.tunnel: dict[str, tuple[str, int]] = {}
        self.public: dict[str, tuple[str, int]] = {}
        self.pools: list[WorkerPool] = []

    def start(self, ip: str, tunnel_port: int = 0) -> Proxy:
        p = Proxy(cert=str(self.pki.server_cert), key=str(self.pki.server_key), workers_ca=str(self.pki.ca_cert),
                  tunnel_bind=f"{ip}:{tunnel_port}", public_bind=f"{ip}:0", shutdown_timeout=5.0)
        self.proxies[ip] = p
        self.tunnel[ip] = p.start_tunnels()
        self.public[ip] = p.start_public()
        return p

    def worker(self, proxy: list[str] | str, **kw: Any) -> WorkerPool:
        cert, key = self.pki.workers["worker"]
        pool = WorkerPool(hello_app, proxy=proxy, cert=str(cert), key=str(key), ca=str(self.pki.ca_cert), **kw)
        self.pools.append(pool)
        return pool.start()

    def close(self) -> None:
        for p in self.proxies.values():
            p.shutdown(5.0)
        for pool in self.pools:
            pool.shutdown(5.0)


@pytest.fixture(name="proxies")
def proxies_fixture(pki: DemoPKI) -> Iterator[Proxies]:
    env = Proxies(pki)
    try:
        yield env
    finally:
        env.close()


def get(address: tuple[str, int], path: str = "/", timeout: float = WAIT) -> int:
    c = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def test_worker_keeps_tunnels_to_every_proxy_and_each_serves_its_clients(proxies: Proxies) -> None:
    a, b = proxies.start(IPS[0]), proxies.start(IPS[1])
    entries = [f"{ip}:{proxies.tunnel[ip][1]}" for ip in IPS[:2]]
    pool = proxies.worker(entries, connections=2)
    assert pool.wait_ready(WAIT, every=True), pool.tunnels()
    assert a.wait_for_workers(2, WAIT) and b.wait_for_workers(2, WAIT)
    for ip in IPS[:2]:
        assert [get(proxies.public[ip]) for _ in range(5)] == [200] * 5
    rows = pool.tunnels()
    assert sorted((t.proxy, t.address, t.connected) for t in rows) == sorted(
        (e, e, True) for e in entries for _ in range(2))  # connections is per proxy
    assert [t.slot for t in rows] == [0, 1, 2, 3]


def test_one_name_gets_tunnels_to_each_address_and_follows_the_dns_answer(proxies: Proxies) -> None:
    port = free_port(*IPS)
    for ip in IPS:
        proxies.start(ip, port)
    answer = [IPS[0], IPS[1]]
    asked: list[str] = []

    def resolver(host: str, p: int) -> list[tuple[str, int]]:
        asked.append(host)
        return [(ip, p) for ip in answer]

    # The certificate names localhost, not the cluster name: --server-name verifies every address.
    pool = proxies.worker(f"proxies.test:{port}", resolver=resolver, server_name="localhost")
    assert pool.wait_ready(WAIT, every=True)
    first, second, third = (proxies.proxies[ip] for ip in IPS)
    assert first.wait_for_workers(1, WAIT) and second.wait_for_workers(1, WAIT)
    assert third.workers() == []
    assert {(t.proxy, t.address) for t in pool.tunnels()} == {(f"proxies.test:{port}", f"{ip}:{port}")
                                                              for ip in IPS[:2]}
    # The cluster changes: .2 leaves the answer (and restarts), .4 joins.  The reconnect that the
    # restart causes re-resolves the name: .4 gets a tunnel, .2 none any more.
    answer[:] = [IPS[1], IPS[2]]
    first.shutdown(5.0)
    proxies.start(IPS[0], port)
    assert third.wait_for_workers(1, WAIT), pool.tunnels()
    assert wait_until(lambda: {t.address for t in pool.tunnels()} == {f"{ip}:{port}" for ip in IPS[1:]}), \
        pool.tunnels()
    assert proxies.proxies[IPS[0]].workers() == []
    assert [get(proxies.public[ip]) for ip in IPS[1:]] == [200, 200]
    assert set(asked) == {"proxies.test"} and len(asked) >= 2


class Traffic:
    """GETs in a loop on one public address (a fresh connection each), on a thread: every status seen."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-traffic", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 300  # bounded even if nobody stops it
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self.statuses.append(get(self.address))
            except OSError as e:
                self.errors.append(repr(e))
            self.stop.wait(0.01)  # a steady rate, not a flood: the machine is shared

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(WAIT)


class ProxyProcess:
    """``rhttp-wsgi proxy`` on fixed ports of one address, so that it can be SIGKILLed and restarted there."""

    def __init__(self, pki: DemoPKI, ip: str) -> None:
        self.pki, self.ip = pki, ip
        self.tunnel_port, self.public_port = free_port(ip), free_port(ip)
        self.cmd: Command | None = None

    def start(self) -> float:
        """Start it; the time its listeners were up (its startup line)."""
        self.cmd = Command("proxy", "--tunnel-bind", f"{self.ip}:{self.tunnel_port}", "--public-bind",
                           f"{self.ip}:{self.public_port}", "--cert", str(self.pki.server_cert), "--key",
                           str(self.pki.server_key), "--workers-ca", str(self.pki.ca_cert))
        self.cmd.wait_for(r"tunnels on \S+:\d+, public HTTP on")
        return time.monotonic()

    @property
    def public(self) -> tuple[str, int]:
        return self.ip, self.public_port

    def kill(self) -> None:
        assert self.cmd is not None
        self.cmd.send(signal.SIGKILL)
        self.cmd.stop()

    def stop(self) -> None:
        if self.cmd is not None and self.cmd.proc.poll() is None:
            self.cmd.stop()


def serves_again_after(address: tuple[str, int], since: float, limit: float = 10.0) -> float:
    """Seconds from ``since`` until a GET through ``address`` answered 200 (polled every 20 ms)."""
    deadline = since + limit
    while time.monotonic() < deadline:
        try:
            if get(address, timeout=1.0) == 200:
                return time.monotonic() - since
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"{address} did not serve within {limit}s of accepting again")


@pytest.mark.parametrize("outage", [
    5.0,
    pytest.param(60.0, marks=pytest.mark.slow),
], ids=["outage-5s", "outage-60s"])
def test_killed_proxy_costs_the_other_nothing_and_serves_within_3s_of_its_restart(
        pki: DemoPKI, outage: float, record_property: RecordProperty) -> None:
    victim, survivor = ProxyProcess(pki, IPS[0]), ProxyProcess(pki, IPS[1])
    worker: Command | None = None
    cert, key = pki.workers["worker"]
    try:
        victim.start()
        survivor.start()
        assert victim.cmd is not None and survivor.cmd is not None
        worker = Command("worker", "tests.apps.hello:app", "--proxy", f"{victim.ip}:{victim.tunnel_port}",
                         "--proxy", f"{survivor.ip}:{survivor.tunnel_port}", "--connections", "2",
                         "--cert", str(cert), "--key", str(key), "--ca", str(pki.ca_cert))
        for p in (victim, survivor):
            assert p.cmd is not None
            p.cmd.wait_for(r"worker w2 attached")  # w1 and w2: both tunnels of the worker
        with Traffic(survivor.public) as traffic:
            assert wait_until(lambda: len(traffic.statuses) >= 20, 10)
            victim.kill()
            killed_at = time.monotonic()
            traffic.stop.wait(outage)  # the outage itself: traffic keeps flowing to the survivor
            before_restart = len(traffic.statuses)
            accepting = victim.start()
            recovery = serves_again_after(victim.public, accepting)
            n = len(traffic.statuses)
            assert wait_until(lambda: len(traffic.statuses) >= n + 10, 10)
        assert traffic.errors == [] and set(traffic.statuses) == {200}, (
            f"survivor: {len(traffic.errors)} errors {traffic.errors[:3]}, "
            f"statuses {sorted(set(traffic.statuses))}")
        assert recovery < 3.0, f"the restarted proxy served {recovery:.2f}s after accepting"
        assert worker.proc.poll() is None
        figures = {"outage_s": round(accepting - killed_at, 1), "recovery_s": round(recovery, 3),
                   "survivor_requests": len(traffic.statuses), "survivor_requests_during_outage": before_restart}
        for k, v in figures.items():
            record_property(k, v)
        log.info("SIGKILL + restart after %.1fs: serving again %.3fs after accepting; survivor served %d"
                 " requests, all 200", accepting - killed_at, recovery, len(traffic.statuses))
    finally:
        if worker is not None:
            worker.stop()
        victim.stop()
        survivor.stop()
