"""The proxy's admin listener: /healthz, /workers (JSON) and /status (HTML), with real workers over mTLS."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from rhttp_wsgi.admin import AdminApp, AdminServer

from .proxy_fixtures import WAIT, Env, env_fixture, hello_app, pki_fixture, wait_until  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def admin(env: Env) -> Iterator[Callable[..., str]]:
    """Starts the admin listener for the env's proxy; returns its base URL."""
    servers: list[AdminServer] = []

    def start(**kw: Any) -> str:
        server = AdminServer(AdminApp(env.proxy, **kw), "127.0.0.1:0")
        servers.append(server)
        host, port = server.start()
        return f"http://{host}:{port}"

    yield start
    for s in servers:
        s.stop()


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def cert_of(env: Env, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(env.pki.workers[name][0].read_bytes())


def test_workers_json_describes_two_real_workers(env: Env, admin: Callable[..., str]) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/slow":
            entered.set()
            release.wait(WAIT)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    env.start_proxy()
    env.start_worker(slow_app, "alpha", connections=2)
    env.start_worker(slow_app, "beta")
    base = admin()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(env.request("GET", "/slow")[0]))
    t.start()  # one request held in the app, on whichever tunnel the selector picked
    assert entered.wait(WAIT)
    try:
        status, headers, body = get(base + "/workers")
    finally:
        release.set()
        t.join(WAIT)
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    doc = json.loads(body)
    assert doc["ready"] is True and doc["reason"] == "3 tunnels attached"
    assert doc["shutting_down"] is False and doc["tunnels_attached"] == 3 and doc["tunnels_draining"] == 0
    by_cn = {w["common_name"]: w for w in doc["workers"]}
    assert sorted(by_cn) == ["alpha", "beta"]
    for name, tunnels in (("alpha", 2), ("beta", 1)):
        w, cert = by_cn[name], cert_of(env, name)
        assert w["serial"] == format(cert.serial_number, "x")
        assert w["not_after"] == cert.not_valid_after_utc.isoformat().replace("+00:00", "Z")
        assert 800 < w["expires_in_days"] < 830  # DemoPKI's leaves: 825 days
        assert w["issuer"] == "CN=rhttp-wsgi demo CA" and w["sans"] == [name]
        assert w["draining"] is False and w["attached_for_seconds"] >= 0
        assert w["attached_since"].endswith("Z")
        assert len(w["tunnels"]) == tunnels
        ids = {x.id for x in env.proxy.workers() if x.common_name == name}
        assert {x["id"] for x in w["tunnels"]} == ids
        for x in w["tunnels"]:
            assert x["remote_addr"].startswith("127.0.0.1:") and x["tls_version"] in ("TLSv1.3", "TLSv1.2")
            assert x["max_concurrent_streams"] > 0 and x["draining"] is False
        assert w["in_flight"] == sum(x["in_flight"] for x in w["tunnels"])
    assert result == [200]
    assert by_cn["alpha"]["in_flight"] + by_cn["beta"]["in_flight"] == 1
    assert by_cn["alpha"]["total"] + by_cn["beta"]["total"] == 1


def test_healthz_flips_when_the_last_worker_goes_and_when_the_proxy_shuts_down(
        env: Env, admin: Callable[..., str]) -> None:
    env.start_proxy()
    base = admin()
    assert get(base + "/healthz")[::2] == (503, b"not ready: no worker is attached\n")
    pool = env.start_worker(hello_app, "alpha", connections=2)
    assert get(base + "/healthz")[::2] == (200, b"ready: 2 tunnels attached\n")
    other = env.start_worker(hello_app, "beta")
    other.shutdown(5)
    assert wait_until(lambda: len(env.proxy.workers()) == 2)
    assert get(base + "/healthz")[0] == 200  # one worker of two went: still ready
    pool.shutdown(5)
    assert wait_until(lambda: not env.proxy.workers())
    status, headers, body = get(base + "/healthz")
    assert (status, body) == (503, b"not ready: no worker is attached\n")
    assert headers["content-type"].startswith("text/plain")
    env.start_worker(hello_app, "alpha")
    assert get(base + "/healthz")[0] == 200
    env.proxy.shutdown(5)
    assert get(base + "/healthz")[::2] == (503, b"not ready: the proxy is shutting down\n")
    assert json.loads(get(base + "/workers")[2])["shutting_down"] is True


def test_a_draining_tunnel_is_shown_draining_while_its_request_finishes(env: Env, admin: Callable[..., str]) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        entered.set()
        release.wait(WAIT)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    env.start_proxy()
    env.start_worker(slow_app, "alpha")
    base = admin()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(env.request("GET", "/")[0]))
    t.start()
    try:
        assert entered.wait(WAIT)
        (w,) = env.proxy.workers()
        w.tunnel.drain()
        doc = json.loads(get(base + "/workers")[2])
        tunnels = {x["id"]: x for worker in doc["workers"] for x in worker["tunnels"]}
        assert tunnels[w.id]["draining"] is True and tunnels[w.id]["in_flight"] == 1
        assert doc["tunnels_draining"] >= 1
        page = get(base + "/status")[2].decode()
        assert f'<tr class="tunnel drain" data-tunnel="{w.id}">' in page
    finally:
        release.set()
        t.join(WAIT)
    assert result == [200]


def test_status_page_lists_the_workers_and_refreshes_itself(env: Env, admin: Callable[..., str]) -> None:
    env.start_proxy()
    env.start_worker(hello_app, "alpha", connections=2)
    env.start_worker(hello_app, "beta")
    base = admin()
    status, headers, body = get(base + "/status")
    page = body.decode()
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["content-security-policy"]
    assert '<meta http-equiv="refresh" content="5">' in page
    assert 'READY: 3 tunnels attached' in page
    for name in ("alpha", "beta"):
        serial = format(cert_of(env, name).serial_number, "x")
        assert f'data-cn="{name}" data-serial="{serial}"' in page
    assert page.count('<tr class="tunnel up"') == 3
    assert '<meta http-equiv="refresh" content="1">' in get(base + "/status?refresh=1")[2].decode()
    assert "http-equiv" not in get(base + "/status?refresh=0")[2].decode()
    assert '<meta http-equiv="refresh" content="5">' in get(base + "/status?refresh=x")[2].decode()


def test_paths_methods_and_the_shared_metrics_endpoint(env: Env, admin: Callable[..., str]) -> None:
    env.start_proxy()

    def metrics(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"# metrics\n"]

    base = admin(metrics=metrics)
    assert get(base + "/metrics")[::2] == (200, b"# metrics\n")
    assert get(base + "/nope")[0] == 404
    assert get(base + "/healthz", method="HEAD")[::2] == (503, b"")
    status, headers, _ = get(base + "/healthz", method="POST")
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    host, port = base[len("http://"):].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    c.request("GET", "/")
    r = c.getresponse()
    assert (r.status, r.getheader("Location")) == (302, "status")
    c.close()
    assert get(admin() + "/metrics")[0] == 404  # without a metrics app


def test_cli_proxy_serves_admin_and_metrics_on_one_listener(env: Env) -> None:
    """--admin-bind and --metrics-bind naming the same address share one listener."""
    pytest.importorskip("prometheus_client", reason="prometheus_client (the 'prometheus' extra)")
    root = Path(__file__).resolve().parents[2]
    pki = env.pki
    with socket.socket() as s:  # a free port for the shared address (both flags must name it exactly)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rhttp_wsgi", "proxy", "--tunnel-bind", "127.0.0.1:0", "--public-bind",
         "127.0.0.1:0", "--cert", str(pki.server_cert), "--key", str(pki.server_key), "--workers-ca",
         str(pki.ca_cert), "--admin-bind", addr, "--metrics-bind", addr],
        cwd=root, env=dict(os.environ, PYTHONPATH=str(root)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if re.search(r"tunnels on \S+, public HTTP on", line):
                break
        base = f"http://{addr}"
        assert get(base + "/healthz")[::2] == (503, b"not ready: no worker is attached\n")
        status, _, body = get(base + "/metrics")
        assert status == 200 and b"rhttp_proxy_workers_attached 0.0" in body
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, "".join(lines) + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert any("admin endpoints on http://" in x for x in lines), lines
