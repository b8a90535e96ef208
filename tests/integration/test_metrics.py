"""Prometheus metrics of the proxy and the worker, scraped over HTTP like Prometheus would."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rhttp_wsgi.metrics import ProxyMetrics, WorkerMetrics
from rhttp_wsgi.pki import DemoPKI
from rhttp_wsgi.proxy import Proxy
from rhttp_wsgi.worker import WorkerPool

prometheus_client = pytest.importorskip("prometheus_client", reason="prometheus_client (the 'prometheus' extra)")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("boom")
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok:" + body]


def scrape(addr: tuple[str, int]) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_proxy_and_worker_metrics(tmp_path: Path) -> None:
    pki = DemoPKI.create(tmp_path, worker_names=("worker",))
    proxy = Proxy(cert=str(pki.server_cert), key=str(pki.server_key), workers_ca=str(pki.ca_cert),
                  tunnel_bind="127.0.0.1:0", public_bind="127.0.0.1:0")
    pmetrics = ProxyMetrics(proxy)
    cert, key = pki.workers["worker"]
    _, tport = proxy.start_tunnels()
    host, port = proxy.start_public()
    pool = WorkerPool(app, proxy=f"127.0.0.1:{tport}", cert=str(cert), key=str(key), ca=str(pki.ca_cert),
                      connections=2)
    wmetrics = WorkerMetrics(pool)
    try:
        pool.start()
        assert pool.wait_ready(5) and proxy.wait_for_workers(2, 5)
        paddr = pmetrics.start_server("127.0.0.1:0")
        waddr = wmetrics.start_server("127.0.0.1:0")
        for _ in range(5):
            req = urllib.request.Request(f"http://{host}:{port}/x", data=b"12345", method="POST")
            with urllib.request.urlopen(req, timeout=5) as r:
                assert r.read() == b"ok:12345"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://{host}:{port}/boom", timeout=5)
        assert info.value.code == 500
        p = scrape(paddr)
        w = scrape(waddr)
    finally:
        pmetrics.stop_server()
        wmetrics.stop_server()
        pool.shutdown(5)
        proxy.shutdown(5)
    assert p['rhttp_proxy_forwards_total{status="200"}'] == 5
    assert p['rhttp_proxy_forwards_total{status="500"}'] == 1
    assert p["rhttp_proxy_workers_attached"] == 2
    assert p['rhttp_proxy_body_bytes_total{direction="request"}'] == 25
    assert p['rhttp_proxy_body_bytes_total{direction="response"}'] >= 40
    assert p["rhttp_proxy_forward_seconds_count"] == 6
    assert w['rhttp_worker_streams_total{outcome="ok"}'] == 5
    assert w['rhttp_worker_streams_total{outcome="error"}'] == 1
    assert w["rhttp_worker_tunnels_up"] == 2
    assert w['rhttp_worker_reconnects_total{slot="0"}'] == 0
