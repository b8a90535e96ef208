"""WebSockets under the gunicorn worker class: a real ``gunicorn -k ...RHTTPWorker`` master.

gunicorn (2 processes, 2 app threads each) serves the flask-sock example
(``examples/flask_sock_app``) through our proxy (a real
:class:`~rhttp_wsgi.proxy.Proxy` in this process) and through HAProxy 3.0 (the
recommended config); the client is ``websockets``' sync client on the public
port.  Each WebSocket holds a thread of the worker's WebSocket pool
(``max_websockets``), not one of gunicorn's ``--threads``: more sockets than app
threads stay open while plain requests are still answered.  The master and its
workers are stopped by pid (tests/websocket_e2e.py).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("gunicorn", reason="gunicorn is in the 'test' extra")
pytest.importorskip("flask_sock", reason="flask-sock is in the 'test' extra")

from rhttp_wsgi.pki import DemoPKI
from rhttp_wsgi.proxy import Proxy
from tests.websocket_e2e import (
    ALL_CHECKS,
    FLASK_SOCK_APP,
    WAIT,
    ConnectionClosed,
    Endpoint,
    WorkerProcess,
    ws_connect,
)

pytestmark = pytest.mark.timeout(180)

GUNICORN_ARGS = ("--workers", "2", "--threads", "2")
FRONTS = ("ours", pytest.param("haproxy", marks=pytest.mark.haproxy))


@dataclass
class Served:
    endpoint: Endpoint
    gunicorn: WorkerProcess
    tunnels_attached: Callable[[int], bool]


@pytest.fixture(params=FRONTS)
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    """gunicorn with 2 worker processes behind our proxy or behind HAProxy, each with one tunnel."""
    settings = {"connections": "1"}
    if request.param == "ours":
        pki = DemoPKI.create(tmp_path / "pki", worker_names=("worker",))
        proxy = Proxy(cert=str(pki.server_cert), key=str(pki.server_key), workers_ca=str(pki.ca_cert),
                      tunnel_bind="127.0.0.1:0", public_bind="127.0.0.1:0", shutdown_timeout=5.0)
        try:
            tunnel = proxy.start_tunnels()
            endpoint = Endpoint(*proxy.start_public())
            cert, key = pki.workers["worker"]
            g = WorkerProcess(FLASK_SOCK_APP, "gunicorn", tunnel, cert=cert, key=key, ca=pki.ca_cert,
                              log_path=tmp_path / "gunicorn.log", settings=settings, gunicorn_args=GUNICORN_ARGS)
            try:
                yield Served(endpoint, g, lambda n: proxy.wait_for_workers(n, WAIT))
            finally:
                g.close()
        finally:
            proxy.shutdown(5.0)
    else:
        lab = request.getfixturevalue("lab")  # skips (or fails under CI) without HAProxy
        _hp, tunnel_port, public_port = lab.start_recommended()
        cert, key = lab.worker_cert("worker")
        g = WorkerProcess(FLASK_SOCK_APP, "gunicorn", ("127.0.0.1", tunnel_port), cert=cert, key=key,
                          ca=lab.pki.ca_cert, log_path=tmp_path / "gunicorn.log", settings=settings,
                          gunicorn_args=GUNICORN_ARGS)
        try:
            def attached(n: int) -> bool:
                # HAProxy does not say how many tunnels it holds: once gunicorn booted its processes,
                # wait until a request goes through (one tunnel is enough for every test here).
                deadline = time.monotonic() + WAIT
                while len(g.booted()) < n:
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.05)
                lab.wait_serving(public_port, "/hello", timeout=WAIT)
                return True
            yield Served(Endpoint("127.0.0.1", public_port), g, attached)
        finally:
            g.close()


def _ready(s: Served) -> None:
    assert s.tunnels_attached(2), s.gunicorn.log()


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_flask_sock_websocket_under_the_gunicorn_worker_class(served: Served,
                                                             check: Callable[[Endpoint], None]) -> None:
    _ready(served)
    check(served.endpoint)


def test_more_sockets_than_app_threads_leave_plain_requests_served(served: Served) -> None:
    _ready(served)
    sockets = []
    try:
        # 2 processes x 2 app threads; 12 sockets would hold every app thread many times over if
        # sockets ran on the app pool.
        for i in range(12):
            ws = ws_connect(served.endpoint.ws("/echo"))
            sockets.append(ws)
            ws.send(f"socket {i}")
            assert ws.recv(WAIT) == f"socket {i}"
        for _ in range(6):
            assert served.endpoint.get("/hello") == (200, b"hello from flask-sock\n")
        for i, ws in enumerate(sockets):  # every socket still open and echoing
            ws.send(f"again {i}")
            assert ws.recv(WAIT) == f"again {i}"
    finally:
        for ws in sockets:
            ws.close()


def test_sigterm_with_open_websockets_stops_gunicorn_and_closes_them(served: Served) -> None:
    _ready(served)
    sockets = [ws_connect(served.endpoint.ws("/echo")) for _ in range(4)]
    try:
        for ws in sockets:
            ws.send("open")
            assert ws.recv(WAIT) == "open"
        served.gunicorn.proc.send_signal(signal.SIGTERM)
        # An open socket may hold the drain up to --graceful-timeout (5 s), never longer.
        assert served.gunicorn.proc.wait(WAIT) == 0, served.gunicorn.log()
        for ws in sockets:  # every client learns its socket ended (no socket left hanging open)
            with pytest.raises(ConnectionClosed):
                ws.recv(WAIT)
    finally:
        for ws in sockets:
            ws.close()
