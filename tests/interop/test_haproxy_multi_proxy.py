"""A worker attached to HAProxy 3.0 and to our proxy at once (issue 13): either one SIGKILLed under
steady traffic through the other costs that other nothing, and serves again within 3 s of its restart.

HAProxy runs the recommended config (examples/haproxy/haproxy.cfg); our proxy runs as
``rhttp-wsgi proxy`` (a process, so that it can be SIGKILLed); the worker is a ``WorkerPool`` with
both in ``proxy``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from rhttp_wsgi.worker import WorkerPool
from tests.integration.test_multi_proxy import IPS, ProxyProcess, get

from .haproxy_fixtures import Lab, TestApp, http_request

log = logging.getLogger("tests.interop.multi_proxy")

pytestmark = [pytest.mark.haproxy, pytest.mark.timeout(90)]
RecordProperty = Callable[[str, object], None]


class Traffic:
    """GETs in a loop through one front (a fresh connection each), on a thread: every outcome."""

    def __init__(self, request: Callable[[], int]) -> None:
        self.request = request
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-traffic", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self.statuses.append(self.request())
            except OSError as e:
                self.errors.append(repr(e))
            self.stop.wait(0.01)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def serving_after(request: Callable[[], int], since: float, limit: float = 10.0) -> float:
    deadline = since + limit
    while time.monotonic() < deadline:
        try:
            if request() == 200:
                return time.monotonic() - since
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"not serving within {limit}s of accepting again")


@pytest.mark.parametrize("victim", ["haproxy", "ours"])
def test_haproxy_and_our_proxy_one_killed_the_other_loses_nothing(lab: Lab, victim: str,
                                                                  record_property: RecordProperty) -> None:
    # Our proxy on 127.0.0.2 with the lab's certificates (its SANs name localhost: server_name below).
    ours = ProxyProcess(lab.pki, IPS[0])
    ours.start()
    try:
        hp, h_tunnel, h_public = lab.start_recommended()
        cert, key = lab.worker_cert("worker")
        pool = WorkerPool(TestApp("worker"), proxy=[f"127.0.0.1:{h_tunnel}", f"{ours.ip}:{ours.tunnel_port}"],
                          cert=str(cert), key=str(key), ca=str(lab.pki.ca_cert), server_name="localhost",
                          connections=2)
        lab.workers.append(pool)
        pool.start()
        assert pool.wait_ready(10, every=True), pool.tunnels()

        def via_haproxy() -> int:
            return http_request(h_public, "GET", "/hello", headers={"Host": "app.example"}, timeout=5).status

        def via_ours() -> int:
            return get(ours.public, "/hello")

        lab.wait_serving(h_public, "/hello")
        assert via_ours() == 200
        survivor, restarted = (via_ours, via_haproxy) if victim == "haproxy" else (via_haproxy, via_ours)
        with Traffic(survivor) as traffic:
            deadline = time.monotonic() + 10
            while len(traffic.statuses) < 20:
                assert time.monotonic() < deadline, (traffic.statuses, traffic.errors)
                time.sleep(0.01)
            if victim == "haproxy":
                assert hp.proc is not None
                hp.proc.kill()
                hp.proc.wait(5)
            else:
                ours.kill()
            traffic.stop.wait(5.0)  # the outage
            if victim == "haproxy":
                hp.start(wait_ports=(h_tunnel, h_public))
                accepting = time.monotonic()
            else:
                accepting = ours.start()
            recovery = serving_after(restarted, accepting)
            n = len(traffic.statuses)
            deadline = time.monotonic() + 10
            while len(traffic.statuses) < n + 10:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert traffic.errors == [] and set(traffic.statuses) == {200}, (
            f"the surviving proxy failed: {traffic.errors[:3]}, statuses {sorted(set(traffic.statuses))}")
        assert recovery < 3.0, f"{victim} served again {recovery:.2f}s after accepting"
        record_property("recovery_s", round(recovery, 3))
        record_property("survivor_requests", len(traffic.statuses))
        log.info("%s SIGKILLed for 5 s: serving again %.3fs after accepting; the other proxy served %d requests,"
                 " all 200", victim, recovery, len(traffic.statuses))
    finally:
        ours.stop()

