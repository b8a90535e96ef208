"""Fixtures and helpers for the proxy integration tests (real mTLS on 127.0.0.1).

Imported by tests/integration/test_proxy*.py.  Everything here waits on events
or conditions with bounded timeouts; nothing sleeps hoping for a state.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rhttp_wsgi.pki import DemoPKI
from rhttp_wsgi.proxy import Proxy
from rhttp_wsgi.worker import WorkerPool

WAIT = 5.0


def wait_until(pred: Callable[[], bool], timeout: float = WAIT, interval: float = 0.01) -> bool:
    """Poll a cheap predicate until it holds (for state with no event to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


@pytest.fixture(name="pki")
def pki_fixture(tmp_path: Path) -> DemoPKI:
    return DemoPKI.create(tmp_path, worker_names=("worker", "alpha", "beta"))


class Env:
    """A proxy with its tunnel listener and turnkey public server, plus workers."""

    def __init__(self, pki: DemoPKI) -> None:
        self.pki = pki
        self._proxy: Proxy | None = None
        self.pools: list[WorkerPool] = []
        self.tunnel_port = 0
        self.public: tuple[str, int] = ("127.0.0.1", 0)
        self.conns: list[http.client.HTTPConnection] = []
        self.socks: list[socket.socket] = []

    @property
    def proxy(self) -> Proxy:
        assert self._proxy is not None, "start_proxy() first"
        return self._proxy

    def start_proxy(self, *, public: bool = True, **kw: Any) -> Proxy:
        opts: dict[str, Any] = dict(cert=str(self.pki.server_cert), key=str(self.pki.server_key),
                                    workers_ca=str(self.pki.ca_cert), tunnel_bind="127.0.0.1:0",
                                    public_bind="127.0.0.1:0", shutdown_timeout=5.0)
        opts.update(kw)
        self._proxy = Proxy(**opts)
        self.tunnel_port = self.proxy.start_tunnels()[1]
        if public:
            self.public = self.proxy.start_public()
        return self.proxy

    def start_worker(self, app: Callable[..., Iterable[bytes]], name: str = "worker", *, wait: bool = True,
                     **kw: Any) -> WorkerPool:
        cert, key = self.pki.workers[name] if name in self.pki.workers else self.pki.issue_worker(name)
        before = len(self.proxy.workers())
        kw.setdefault("connections", 1)
        pool = WorkerPool(app, proxy=f"127.0.0.1:{self.tunnel_port}", cert=str(cert), key=str(key),
                          ca=str(self.pki.ca_cert), **kw)
        self.pools.append(pool)
        pool.start()
        if wait:
            assert pool.wait_ready(WAIT)
            assert self.proxy.wait_for_workers(before + kw["connections"], WAIT)
        return pool

    def conn(self, timeout: float = WAIT) -> http.client.HTTPConnection:
        c = http.client.HTTPConnection(*self.public, timeout=timeout)
        self.conns.append(c)
        return c

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes, Any]:
        c = self.conn()
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data, r

    def raw(self, timeout: float = WAIT) -> socket.socket:
        s = socket.create_connection(self.public, timeout=timeout)
        self.socks.append(s)
        return s

    def close(self) -> None:
        for c in self.conns:
            c.close()
        for s in self.socks:
            s.close()
        if self._proxy is not None:
            self._proxy.shutdown(5.0)
        for p in self.pools:
            p.shutdown(5.0)


@pytest.fixture(name="env")
def env_fixture(pki: DemoPKI) -> Iterator[Env]:
    # Thread leaks are checked by the suite-wide autouse fixture in tests/conftest.py.
    e = Env(pki)
    try:
        yield e
    finally:
        e.close()


def read_until_close(sock: socket.socket, timeout: float = WAIT) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        out += data
    return bytes(out)


# ---------------------------------------------------------------------------
# WSGI test apps (run on the worker)
# ---------------------------------------------------------------------------


def echo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Echoes the request: method, path, query, selected headers in X-Echo-*, body as the body."""
    body = environ["wsgi.input"].read()
    headers = [
        ("Content-Type", "application/octet-stream"),
        ("X-Echo-Method", environ["REQUEST_METHOD"]),
        ("X-Echo-Path", environ["PATH_INFO"].encode("latin-1").decode("utf-8", "replace")
         .encode("ascii", "backslashreplace").decode()),
        ("X-Echo-Raw-Uri", environ.get("RAW_URI", "")),
        ("X-Echo-Query", environ["QUERY_STRING"]),
        ("X-Echo-Host", environ.get("HTTP_HOST", "")),
        ("X-Echo-Scheme", environ["wsgi.url_scheme"]),
        ("X-Echo-Length", str(len(body))),
        ("X-Echo-Content-Length", environ.get("CONTENT_LENGTH", "")),
    ]
    for key in sorted(environ):
        if key.startswith("HTTP_"):
            headers.append(("X-Echo-H-" + key[5:].replace("_", "-"), str(environ[key])))
    start_response("200 OK", headers)
    return [body]


def hello_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]
