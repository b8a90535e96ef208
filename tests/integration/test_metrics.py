"""Prometheus metrics of the proxy and the worker, scraped over HTTP like Prometheus would."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rhttp_wsgi._http import CompleteResponse
from rhttp_wsgi.metrics import InstrumentedApp, ProxyMetrics, WorkerMetrics
from rhttp_wsgi.pki import DemoPKI
from rhttp_wsgi.proxy import Proxy
from rhttp_wsgi.public import _Response
from rhttp_wsgi.worker import WorkerPool

WAIT = 5.0

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


# -- metrics on the forwarder keep its fast path and its streaming ----------------------------


class _Stack:
    """Proxy (turnkey server) with ProxyMetrics around the forwarder, one worker running ``app``."""

    def __init__(self, tmp_path: Path, app: Callable[..., Any]) -> None:
        pki = DemoPKI.create(tmp_path, worker_names=("worker",))
        self.proxy = Proxy(cert=str(pki.server_cert), key=str(pki.server_key), workers_ca=str(pki.ca_cert),
                           tunnel_bind="127.0.0.1:0", public_bind="127.0.0.1:0")
        self.observed: list[tuple[int, int, int]] = []
        self.metrics = ProxyMetrics(self.proxy)
        inner = self.metrics._observe

        def observe(environ: dict[str, Any], status: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
            self.observed.append((status, bytes_in, bytes_out))
            inner(environ, status, seconds, bytes_in, bytes_out)

        assert isinstance(self.proxy.wsgi_app, InstrumentedApp)
        self.proxy.wsgi_app.observe = observe
        cert, key = pki.workers["worker"]
        _, tport = self.proxy.start_tunnels()
        self.public = self.proxy.start_public()
        self.pool = WorkerPool(app, proxy=f"127.0.0.1:{tport}", cert=str(cert), key=str(key),
                               ca=str(pki.ca_cert), connections=1)
        self.pool.start()
        assert self.pool.wait_ready(WAIT) and self.proxy.wait_for_workers(1, WAIT)

    def close(self) -> None:
        self.pool.shutdown(5)
        self.proxy.shutdown(5)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Callable[[Callable[..., Any]], _Stack]]:
    made: list[_Stack] = []

    def make(app: Callable[..., Any]) -> _Stack:
        made.append(_Stack(tmp_path, app))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _read_response(sock: socket.socket) -> bytes:
    sock.settimeout(WAIT)
    out = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return out
        out += data


def test_metrics_keep_the_one_write_complete_response(stack: Callable[..., _Stack],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[bool] = []
    original = _Response.write_complete

    def spy(self: _Response, result: CompleteResponse) -> bool:
        ok = original(self, result)
        taken.append(ok)
        return ok

    monkeypatch.setattr(_Response, "write_complete", spy)
    st = stack(app)
    with socket.create_connection(st.public, timeout=WAIT) as s:
        s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                  b"GET /y HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = _read_response(s)
    assert out.count(b"HTTP/1.1 200 OK\r\n") == 2 and b"ok:abc" in out and out.endswith(b"ok:"), out
    assert taken == [True, True]  # both answers went out in one write, metrics on
    assert st.observed == [(200, 3, 6), (200, 0, 3)]


def test_metrics_keep_a_trickled_upload_streaming(stack: Callable[..., _Stack]) -> None:
    """The worker reads the first chunk while the client has not sent the last one yet."""
    first_seen = threading.Event()

    def upload_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        stream = environ["wsgi.input"]
        head = stream.read(5)
        first_seen.set()
        rest = stream.read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [head + b"+" + rest]

    st = stack(upload_app)
    with socket.create_connection(st.public, timeout=WAIT) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                  b"5\r\nfirst\r\n")
        assert first_seen.wait(WAIT), "the first chunk never reached the worker: the upload did not stream"
        s.sendall(b"4\r\nlast\r\n0\r\n\r\n")
        out = _read_response(s)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"first+last"), out
    assert st.observed == [(200, 9, 10)]
