"""Several proxies under gunicorn (issue 13): ``gunicorn -k rhttp`` dials every proxy in ``RHTTP_PROXY``.

Two real ``rhttp-wsgi proxy`` processes on their own loopback addresses (so one can be SIGKILLed and
restarted on the same ports), each with its admin endpoint (``/workers``) and the round-robin selector,
and a real gunicorn master with two ``-k rhttp`` processes configured only through the environment
(``RHTTP_PROXY="A,B"``), as users configure it.  The app answers with the serving process's pid, so a
reply says which gunicorn process a proxy reached.  Everything is stopped by pid at teardown.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("gunicorn", reason="gunicorn is in the 'test' extra")

from rhttp_wsgi.pki import DemoPKI
from tests.integration.test_cli_errors import Command
from tests.integration.test_multi_proxy import free_port
from tests.interop.test_gunicorn import ROOT, Gunicorn, wait_until

log = logging.getLogger("rhttp_wsgi.tests.gunicorn_multi_proxy")

# Addresses of their own (Linux routes all of 127/8 to lo), apart from the other multi-proxy tests'.
VICTIM_IP, SURVIVOR_IP = "127.0.0.5", "127.0.0.6"
WAIT = 20.0
RecordProperty = Callable[[str, object], None]


class ProxyProcess:
    """``rhttp-wsgi proxy`` on fixed ports of one address (tunnels, public, admin): it can be killed and
    restarted there."""

    def __init__(self, pki: DemoPKI, ip: str) -> None:
        self.pki, self.ip = pki, ip
        self.tunnel_port, self.public_port, self.admin_port = free_port(ip), free_port(ip), free_port(ip)
        self.cmd: Command | None = None

    def start(self) -> float:
        """Start it; the time its listeners were up (its startup line)."""
        self.cmd = Command("proxy", "--tunnel-bind", f"{self.ip}:{self.tunnel_port}", "--public-bind",
                           f"{self.ip}:{self.public_port}", "--admin-bind", f"{self.ip}:{self.admin_port}",
                           "--selector", "round-robin", "--cert", str(self.pki.server_cert), "--key",
                           str(self.pki.server_key), "--workers-ca", str(self.pki.ca_cert))
        self.cmd.wait_for(r"tunnels on \S+:\d+, public HTTP on")
        return time.monotonic()

    @property
    def entry(self) -> str:
        return f"{self.ip}:{self.tunnel_port}"

    def tunnels_attached(self) -> int:
        """Tunnels attached, from the proxy's own inventory (``GET /workers`` on its admin port)."""
        url = f"http://{self.ip}:{self.admin_port}/workers"
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(json.load(r)["tunnels_attached"])

    def wait_for_tunnels(self, n: int, timeout: float = WAIT) -> bool:
        return wait_until(lambda: self.tunnels_attached() == n, timeout, interval=0.05)

    def get(self, timeout: float = 5.0) -> tuple[int, str]:
        """A GET through its public port on a fresh connection: (status, body: the serving pid)."""
        c = http.client.HTTPConnection(self.ip, self.public_port, timeout=timeout)
        try:
            c.request("GET", "/")
            r = c.getresponse()
            return r.status, r.read().decode()
        finally:
            c.close()

    def kill(self) -> None:
        assert self.cmd is not None
        self.cmd.send(signal.SIGKILL)
        self.cmd.stop()

    def log(self) -> str:
        return self.cmd.text if self.cmd is not None else ""

    def stop(self) -> None:
        if self.cmd is not None and self.cmd.proc.poll() is None:
            self.cmd.stop()


class Traffic:
    """GETs in a loop through one proxy (a fresh connection each), on a thread: every outcome seen."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.results: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-traffic", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 120  # bounded even if nobody stops it
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self.results.append(self.proxy.get())
            except (OSError, http.client.HTTPException) as e:
                self.errors.append(repr(e))
            self.stop.wait(0.01)  # a steady rate, not a flood: the machine is shared

    def attempts(self) -> int:
        return len(self.results) + len(self.errors)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(WAIT)


def pids_through(proxy: ProxyProcess, n: int) -> Counter[str]:
    """Which process served each of ``n`` GETs through ``proxy`` (all must be 200)."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, body = proxy.get()
        assert status == 200, (status, body)
        seen[body] += 1
    return seen


def every_process_serves_after(proxy: ProxyProcess, pids: set[str], since: float, limit: float = 10.0
                               ) -> tuple[float, float]:
    """Seconds from ``since`` until the first 200 through ``proxy``, and until every one of ``pids`` had
    served through it (GETs on fresh connections, one per 20 ms, bounded by ``limit``)."""
    first: float | None = None
    served: set[str] = set()
    deadline = since + limit
    while time.monotonic() < deadline:
        try:
            status, body = proxy.get(timeout=1.0)
        except (OSError, http.client.HTTPException):
            status, body = 0, ""
        if status == 200:
            now = time.monotonic()
            first = now - since if first is None else first
            served.add(body)
            if served >= pids:
                return first, now - since
        time.sleep(0.02)
    raise AssertionError(f"through {proxy.ip}: first 200 after {first}s, processes served {served} of {pids}"
                         f" within {limit}s of accepting again")


@pytest.fixture(name="pki")
def pki_fixture(tmp_path: Path) -> DemoPKI:
    return DemoPKI.create(tmp_path / "pki", worker_names=("gunicorn",))


@pytest.fixture(name="proxies")
def proxies_fixture(pki: DemoPKI) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    victim, survivor = ProxyProcess(pki, VICTIM_IP), ProxyProcess(pki, SURVIVOR_IP)
    try:
        victim.start()
        survivor.start()
        yield victim, survivor
    finally:
        victim.stop()
        survivor.stop()


@pytest.fixture(name="gunicorn")
def gunicorn_fixture(tmp_path: Path, pki: DemoPKI, proxies: tuple[ProxyProcess, ProxyProcess]
                     ) -> Iterator[Gunicorn]:
    cert, key = pki.workers["gunicorn"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RHTTP_", "GUNICORN_"))}
    # Only the environment, as users configure it: one comma-separated list of proxies.
    env.update(RHTTP_PROXY=",".join(p.entry for p in proxies), RHTTP_CERT=str(cert), RHTTP_KEY=str(key),
               RHTTP_CA=str(pki.ca_cert), RHTTP_SERVER_NAME="localhost", RHTTP_CONNECTIONS="1",
               PYTHONPATH=str(ROOT),
               # gunicorn >= 25.1 opens a control socket in $XDG_RUNTIME_DIR (else ~/.gunicorn)
               XDG_RUNTIME_DIR=str(tmp_path))
    g = Gunicorn(tmp_path, env, "--workers", "2", "--threads", "4")
    try:
        yield g
    finally:
        g.stop()


def test_each_gunicorn_process_attaches_to_every_proxy_of_rhttp_proxy(
        proxies: tuple[ProxyProcess, ProxyProcess], gunicorn: Gunicorn) -> None:
    for p in proxies:
        # RHTTP_CONNECTIONS is per proxy: one tunnel from each of the two processes.
        assert p.wait_for_tunnels(2), f"{p.ip}: {p.tunnels_attached()} tunnel(s)\n{gunicorn.log()}\n{p.log()}"
    pids = {str(pid) for pid in gunicorn.booted()}
    assert len(pids) == 2, gunicorn.log()
    for p in proxies:
        seen = pids_through(p, 10)
        # Round-robin over one tunnel of each process: both serve through every proxy, equally.
        assert seen == {pid: 5 for pid in pids}, (p.ip, seen, gunicorn.log())
    dialling = f"rhttp worker: dialling {proxies[0].entry}, {proxies[1].entry} with 1 tunnel(s)"
    assert gunicorn.log().count(dialling) == 2, gunicorn.log()
    gunicorn.signal(signal.SIGTERM)
    assert gunicorn.wait() == 0, gunicorn.log()


def test_killed_proxy_costs_the_other_nothing_and_both_processes_serve_within_3s_of_its_restart(
        proxies: tuple[ProxyProcess, ProxyProcess], gunicorn: Gunicorn, record_property: RecordProperty) -> None:
    victim, survivor = proxies
    for p in proxies:
        assert p.wait_for_tunnels(2), f"{p.ip}: {p.tunnels_attached()} tunnel(s)\n{gunicorn.log()}\n{p.log()}"
    pids = {str(pid) for pid in gunicorn.booted()}
    assert len(pids) == 2, gunicorn.log()
    with Traffic(survivor) as traffic:
        assert wait_until(lambda: len(traffic.results) >= 20, 10)
        victim.kill()
        killed_at = time.monotonic()
        traffic.stop.wait(5.0)  # the outage itself: traffic keeps flowing to the survivor meanwhile
        during_outage = len(traffic.results)
        accepting = victim.start()
        first, every = every_process_serves_after(victim, pids, accepting)
        n = traffic.attempts()
        assert wait_until(lambda: traffic.attempts() >= n + 10, 10)  # still going after the restart
    statuses = Counter(status for status, _ in traffic.results)
    assert traffic.errors == [] and set(statuses) == {200}, (
        f"survivor: {len(traffic.errors)} errors {traffic.errors[:3]}, statuses {statuses}")
    assert {body for _, body in traffic.results} == pids  # both processes kept serving through the survivor
    assert first < 3.0 and every < 3.0, (
        f"the restarted proxy served {first:.2f}s, through both processes {every:.2f}s, after accepting")
    # Losing a proxy is not a reason for gunicorn to replace a process.
    assert gunicorn.proc.poll() is None and len(gunicorn.booted()) == 2, gunicorn.log()
    assert victim.wait_for_tunnels(2) and survivor.tunnels_attached() == 2
    figures = {"outage_s": round(accepting - killed_at, 1), "first_200_s": round(first, 3),
               "every_process_s": round(every, 3), "survivor_requests": len(traffic.results),
               "survivor_requests_during_outage": during_outage}
    for k, v in figures.items():
        record_property(k, v)
    log.info("gunicorn, SIGKILL + restart after %.1fs: first 200 %.3fs and both processes %.3fs after"
             " accepting; survivor served %d requests, all 200", accepting - killed_at, first, every,
             len(traffic.results))
    gunicorn.signal(signal.SIGTERM)
    assert gunicorn.wait() == 0, gunicorn.log()
