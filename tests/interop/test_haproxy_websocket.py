"""WebSockets through a real HAProxy 3.0 (recommended config) to our worker, end to end.

A public HTTP/1.1 ``Upgrade: websocket`` reaches HAProxy, which sends an RFC 8441
extended CONNECT (``:protocol websocket``) down a reverse tunnel once the worker
advertised SETTINGS_ENABLE_CONNECT_PROTOCOL, and answers the client ``101`` with
its own ``Sec-WebSocket-Accept`` when the worker answers ``200``.  The app is the
flask-sock example (``examples/flask_sock_app``), unchanged, in an in-process
WorkerPool; the client is ``websockets``' sync client.

Because HAProxy makes a ``101`` of any ``200``, the worker must never answer 200 for
an app that did not upgrade: the test with a plain-200 app proves the client gets an
error status instead of a WebSocket of garbage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest

pytest.importorskip("flask_sock", reason="flask-sock is in the 'test' extra")

from examples.flask_sock_app.app import app as flask_sock_app
from tests.websocket_e2e import (
    ALL_CHECKS,
    WAIT,
    ConnectionClosed,
    Endpoint,
    InvalidStatus,
    ws_connect,
)

from .haproxy_fixtures import RECOMMENDED_CFG, Lab, http_request

pytestmark = [pytest.mark.haproxy, pytest.mark.timeout(120)]

PLAIN_200 = "/answers-200-without-upgrading"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The flask-sock example, plus one route that answers an upgrade with an ordinary 200."""
    if environ["PATH_INFO"] == PLAIN_200:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "15")])
        return [b"not a websocket"]
    return flask_sock_app(environ, start_response)  # type: ignore[no-any-return]


def _serve(lab: Lab, cfg_text: str | None = None) -> tuple[Endpoint, Any]:
    _hp, tunnel_port, public_port = lab.start_recommended(cfg_text=cfg_text)
    worker = lab.worker(app, tunnel_port, connections=2)
    lab.wait_serving(public_port, "/hello")
    return Endpoint("127.0.0.1", public_port), worker


def _tunnels_never_dropped(worker: Any) -> None:
    tunnels = worker.tunnels()
    assert all(t.connected for t in tunnels), tunnels
    assert [t.reconnects for t in tunnels] == [0] * len(tunnels), tunnels


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_flask_sock_websocket_through_haproxy(lab: Lab, check: Callable[[Endpoint], None]) -> None:
    endpoint, worker = _serve(lab)
    check(endpoint)
    _tunnels_never_dropped(worker)


def test_an_upgrade_the_app_answers_with_200_never_becomes_a_websocket(lab: Lab) -> None:
    endpoint, worker = _serve(lab)
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(endpoint.ws(PLAIN_200))
    # A 5xx (HAProxy may retry it on another tunnel first: retry-on), never 101 and never the body.
    assert 500 <= refused.value.response.status_code <= 599, refused.value.response
    assert b"not a websocket" not in (refused.value.response.body or b"")
    r = http_request(endpoint.port, "GET", "/hello", headers={"Host": "app.example"})
    assert (r.status, r.body) == (200, b"hello from flask-sock\n")
    _tunnels_never_dropped(worker)


def test_timeout_tunnel_closes_an_idle_websocket_and_the_app_sees_it(lab: Lab) -> None:
    recommended = RECOMMENDED_CFG.read_text()
    assert "    timeout tunnel 1h\n" in recommended  # the recommended file bounds idle sockets
    endpoint, _worker = _serve(lab, cfg_text=recommended.replace("    timeout tunnel 1h\n",
                                                                  "    timeout tunnel 1s\n"))
    seen_before = endpoint.server_close_count()
    with ws_connect(endpoint.ws("/echo")) as ws:
        ws.send("still here")
        assert ws.recv(WAIT) == "still here"
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed):
            ws.recv(WAIT)  # nothing more is sent either way: HAProxy cuts the socket after 1 s
        assert time.monotonic() - t0 < WAIT
    # The app's receive() ended too (the worker cancelled the stream and its reads returned EOF).
    deadline = time.monotonic() + WAIT
    while endpoint.server_close_count() <= seen_before:
        assert time.monotonic() < deadline, "the app never saw the idle socket go"
        time.sleep(0.02)
