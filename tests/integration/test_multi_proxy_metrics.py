"""``rhttp_worker_proxy_tunnels_up{proxy,address}`` (issue 13): which proxy the worker's tunnels belong to.

Scraped over HTTP like Prometheus would, from a worker (Python API, ``WorkerMetrics``) dialling two
real proxies on their own loopback addresses: ``rhttp-wsgi proxy`` processes, so that one can be
SIGKILLed and restarted on its port; and a proxy name that resolves to two addresses (in-process
proxies, an injected resolver), where the ``proxy`` and ``address`` labels differ.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from rhttp_wsgi.pki import DemoPKI
from tests.integration.proxy_fixtures import WAIT, hello_app, wait_until
from tests.integration.test_multi_proxy import Proxies, ProxyProcess, free_port, get

prometheus_client = pytest.importorskip("prometheus_client", reason="prometheus_client (the 'prometheus' extra)")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from rhttp_wsgi.metrics import WorkerMetrics  # noqa: E402
from rhttp_wsgi.worker import WorkerPool  # noqa: E402

# Addresses of their own (Linux routes all of 127/8 to lo), apart from the other multi-proxy tests'.
IPS = ("127.0.0.7", "127.0.0.8")
PER_PROXY = "rhttp_worker_proxy_tunnels_up"
Scrape = Callable[[], dict[tuple[str, str], float]]


@pytest.fixture(name="pki")
def pki_fixture(tmp_path: Path) -> DemoPKI:
    return DemoPKI.create(tmp_path, worker_names=("worker",), server_sans=("localhost", "127.0.0.1", *IPS))


def scrape_all(address: tuple[str, int]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the worker's /metrics, by metric name: (labels, value)."""
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def per_proxy(address: tuple[str, int]) -> dict[tuple[str, str], float]:
    """``rhttp_worker_proxy_tunnels_up`` by (proxy, address); checks it adds up to ``rhttp_worker_tunnels_up``."""
    samples = scrape_all(address)
    rows = {(labels["proxy"], labels["address"]): value for labels, value in samples[PER_PROXY]}
    assert len(rows) == len(samples[PER_PROXY]), samples[PER_PROXY]  # one sample per proxy and address
    [(_, total)] = samples["rhttp_worker_tunnels_up"]
    assert sum(rows.values()) == total, (rows, total)
    return rows


def test_tunnels_up_per_proxy_counts_each_proxy_and_drops_to_0_for_a_killed_one(pki: DemoPKI) -> None:
    victim, survivor = ProxyProcess(pki, IPS[0]), ProxyProcess(pki, IPS[1])
    cert, key = pki.workers["worker"]
    entries = [f"{p.ip}:{p.tunnel_port}" for p in (victim, survivor)]
    pool = WorkerPool(hello_app, proxy=entries, cert=str(cert), key=str(key), ca=str(pki.ca_cert), connections=2)
    metrics = WorkerMetrics(pool)
    try:
        victim.start()
        survivor.start()
        pool.start()
        assert pool.wait_ready(WAIT, every=True), pool.tunnels()
        address = metrics.start_server("127.0.0.1:0")
        both_up = {(e, e): 2.0 for e in entries}  # connections is per proxy
        assert wait_until(lambda: per_proxy(address) == both_up), per_proxy(address)
        assert [get(p.public) for p in (victim, survivor)] == [200, 200]

        victim.kill()
        victim_down = {(entries[0], entries[0]): 0.0, (entries[1], entries[1]): 2.0}
        # The killed proxy keeps its row (at 0: an alert can fire on it), the other keeps its count.
        assert wait_until(lambda: per_proxy(address) == victim_down), per_proxy(address)
        assert get(survivor.public) == 200

        victim.start()  # the same port: the worker's backoff for it (2 s cap) brings it back
        assert wait_until(lambda: per_proxy(address) == both_up, 10), per_proxy(address)
        assert get(victim.public) == 200
    finally:
        metrics.stop_server()
        pool.shutdown(5)
        victim.stop()
        survivor.stop()


def test_tunnels_up_per_proxy_has_a_row_for_each_address_of_one_proxy_name(pki: DemoPKI) -> None:
    proxies = Proxies(pki)
    metrics: WorkerMetrics | None = None
    try:
        port = free_port(*IPS)
        first, second = (proxies.start(ip, port) for ip in IPS)
        cert, key = pki.workers["worker"]
        pool = WorkerPool(hello_app, proxy=f"proxies.test:{port}", cert=str(cert), key=str(key),
                          ca=str(pki.ca_cert), connections=3, server_name="localhost",
                          resolver=lambda host, p: [(ip, p) for ip in IPS])
        proxies.pools.append(pool)
        metrics = WorkerMetrics(pool)
        pool.start()
        assert pool.wait_ready(WAIT, every=True), pool.tunnels()
        assert first.wait_for_workers(3, WAIT) and second.wait_for_workers(3, WAIT)
        address = metrics.start_server("127.0.0.1:0")
        name = f"proxies.test:{port}"
        assert per_proxy(address) == {(name, f"{ip}:{port}"): 3.0 for ip in IPS}

        first.shutdown(5.0)  # one proxy of the cluster goes away: only its address drops to 0
        expected = {(name, f"{IPS[0]}:{port}"): 0.0, (name, f"{IPS[1]}:{port}"): 3.0}
        assert wait_until(lambda: per_proxy(address) == expected), per_proxy(address)
    finally:
        if metrics is not None:
            metrics.stop_server()
        proxies.close()
