"""WebSockets through the forwarder mounted in third-party WSGI servers (the examples, as users run them).

gunicorn (gthread) and werkzeug offer their client socket (``gunicorn.socket`` /
``werkzeug.socket``): the forwarder takes it over, answers 101 and relays; waitress offers none,
so an upgrade gets a clear 501 there and plain requests keep working.  Same subprocesses and
worker as ``test_proxy_in_servers.py``; the worker's app is a simple-websocket echo.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rhttp_wsgi.pki import DemoPKI
from rhttp_wsgi.worker import WorkerPool

from .test_proxy_in_servers import SERVERS, WAIT, ServerProcess

ws_client = pytest.importorskip("websockets.sync.client", reason="needs the websockets package (test extra)")
ws_exceptions = pytest.importorskip("websockets.exceptions", reason="needs the websockets package (test extra)")
simple_websocket = pytest.importorskip("simple_websocket", reason="needs simple-websocket (test extra)")

pytestmark = pytest.mark.timeout(60)


def echo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"plain " + environ["PATH_INFO"].encode()]
    ws = simple_websocket.Server(environ, max_message_size=None)
    try:
        while (msg := ws.receive(timeout=4 * WAIT)) is not None:
            ws.send(msg)
    except simple_websocket.ConnectionClosed:
        pass
    return []


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, int]]:
    kind: str = request.param
    pytest.importorskip(kind)
    pki = DemoPKI.create(tmp_path / "pki", worker_names=("worker",))
    proc = ServerProcess(kind, pki, tmp_path / f"{kind}.log")
    pool: WorkerPool | None = None
    try:
        proc.start()
        cert, key = pki.workers["worker"]
        pool = WorkerPool(echo_app, proxy=f"127.0.0.1:{proc.tunnel_port}", cert=str(cert), key=str(key),
                          ca=str(pki.ca_cert), connections=1, threads=4, reconnect_min=0.05, reconnect_max=0.5)
        pool.start()
        assert pool.wait_ready(WAIT), pool.tunnels()
        deadline = time.monotonic() + WAIT
        while get(proc.public_port, "/ready")[0] != 200:  # attached once its SETTINGS arrived
            assert time.monotonic() < deadline, "the proxy never forwarded to the worker"
            time.sleep(0.02)
        yield kind, proc.public_port
    finally:
        try:
            if pool is not None:
                pool.shutdown(WAIT)
        finally:
            rc = proc.stop()
            print(f"----- {kind} output (exit code {rc}) -----\n{proc.log_text()}")


def get(port: int, path: str) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def test_websocket_through_the_mounted_forwarder(server: tuple[str, int]) -> None:
    kind, port = server
    url = f"ws://127.0.0.1:{port}/ws"
    if kind == "waitress":
        with pytest.raises(ws_exceptions.InvalidStatus) as info:
            with ws_client.connect(url, open_timeout=WAIT):
                pass
        assert info.value.response.status_code == 501
        assert b"take over the client connection" in info.value.response.body
    else:
        for round_ in range(2):  # the server's connection handling survives a relayed socket
            with ws_client.connect(url, open_timeout=WAIT, max_size=None) as c:
                for i in range(20):
                    c.send(f"{kind} {round_} {i}")
                assert [c.recv(WAIT) for _ in range(20)] == [f"{kind} {round_} {i}" for i in range(20)]
                blob = bytes(range(256)) * 1024
                c.send(blob)
                assert c.recv(WAIT) == blob
    assert get(port, "/after") == (200, b"plain /after")
