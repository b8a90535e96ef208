"""A public WebSocket upgrade through a real HAProxy never costs a tunnel.

HAProxy 3.0 (and 3.5-dev) with a worker that does not advertise
SETTINGS_ENABLE_CONNECT_PROTOCOL (``websockets=False``; with it on, the upgrade is an
extended CONNECT: tests/interop/test_haproxy_websocket.py): for a public ``Upgrade: websocket`` request
HAProxy sends RST_STREAM(INTERNAL_ERROR) on stream ids it never opened (it
tries the upgrade, finds the setting missing, and retries), up to six per
request.  RFC 9113 §6.4 would let the worker treat that as a connection error,
which dropped every tunnel the retries reached (everyone got 503 until the
workers redialled); the worker ignores such frames (as h2 does) and keeps
serving on the same tunnels.  (Frame by frame: tests/unit/test_h2core_limits.py
and tests/tunnel/test_abuse_worker.py, ``test_haproxy_resets_on_streams_it_never_opened_*``.)
"""

from __future__ import annotations

import pytest

from .haproxy_fixtures import Lab, TestApp, http_request

pytestmark = [pytest.mark.haproxy, pytest.mark.timeout(60)]

UPGRADE = {"Host": "app.example", "Connection": "Upgrade", "Upgrade": "websocket",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}


def test_public_websocket_upgrades_leave_every_tunnel_serving(lab: Lab) -> None:
    _hp, tunnel_port, public_port = lab.start_recommended()
    worker = lab.worker(TestApp("worker"), tunnel_port, connections=2, websockets=False)
    lab.wait_serving(public_port, "/hello")
    for _ in range(5):
        try:  # nothing can upgrade through this worker: HAProxy refuses or hangs up
            assert http_request(public_port, "GET", "/hello", headers=UPGRADE).status != 101
        except OSError:
            pass
        r = http_request(public_port, "GET", "/hello", headers={"Host": "app.example"})
        assert (r.status, r.body) == (200, b"hello from worker")
    tunnels = worker.tunnels()
    assert all(t.connected for t in tunnels), tunnels
    assert [t.reconnects for t in tunnels] == [0, 0], tunnels  # no tunnel was dropped
    assert all(t.last_error is None for t in tunnels), tunnels
