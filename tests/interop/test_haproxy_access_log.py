"""Through HAProxy the worker's access log is the one that matters: it names the real client.

HAProxy runs the recommended ``examples/haproxy/haproxy.cfg`` (``option forwardfor``
after deleting the client's X-Forwarded-For; a ``unique-id`` sent as X-Request-ID and
logged as ``rid=``).  The client connects from 127.0.0.7, an address neither HAProxy
nor the worker has, so a line that shows it names the client and not a hop.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from rhttp_wsgi.accesslog import LOGGER

from .haproxy_fixtures import Lab

pytestmark = [pytest.mark.haproxy, pytest.mark.timeout(60)]

CLIENT = "127.0.0.7"
COMBINED = re.compile(r'(?P<h>\S+) - - \[[^\]]+\] "(?P<r>[^"]*)" (?P<s>\S+) (?P<b>\S+) "[^"]*" "(?P<a>[^"]*)"'
                      r" rt=\S+ rid=(?P<rid>\S+) cn=(?P<cn>\S+) tunnel=(?P<tunnel>\S+)")


def who_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    keys = ("REMOTE_ADDR", "REMOTE_PORT", "HTTP_X_FORWARDED_FOR", "HTTP_X_REQUEST_ID", "rhttp.request_id")
    body = json.dumps({k: environ.get(k) for k in keys}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


@pytest.fixture(name="access")
def access_fixture() -> Iterator[list[str]]:
    lines: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(LOGGER)
    handler, old = Handler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def _wait(pred: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.02)
    return pred()


def test_the_workers_access_line_and_remote_addr_show_the_real_client(lab: Lab, access: list[str]) -> None:
    hp, tunnel_port, public_port = lab.start_recommended()
    lab.worker(who_app, tunnel_port, access_log=True)
    lab.wait_serving(public_port, "/warm-up")
    c = http.client.HTTPConnection("127.0.0.1", public_port, timeout=10, source_address=(CLIENT, 0))
    try:
        # A client's own X-Forwarded-For and X-Request-ID are replaced by HAProxy's.
        c.request("GET", "/who?q=1", headers={"Host": "app.example", "User-Agent": "probe/3",
                                              "X-Forwarded-For": "6.6.6.6", "X-Request-ID": "forged"})
        r = c.getresponse()
        status, app = r.status, json.loads(r.read())
    finally:
        c.close()
    assert status == 200
    assert app["REMOTE_ADDR"] == CLIENT and app["REMOTE_PORT"] == ""
    assert app["HTTP_X_FORWARDED_FOR"] == CLIENT
    rid = app["rhttp.request_id"]
    assert rid == app["HTTP_X_REQUEST_ID"] != "forged"

    def line_of_request() -> re.Match[str] | None:
        for line in access:
            m = COMBINED.fullmatch(line)
            if m and m["rid"] == rid:
                return m
        return None

    m = _wait(line_of_request)
    assert m, access
    assert m["h"] == CLIENT and m["r"] == "GET /who?q=1 HTTP/2" and m["s"] == "200" and m["a"] == "probe/3"
    assert m["cn"] == "worker" and re.fullmatch(r"127\.0\.0\.1:\d+", m["tunnel"])
    # HAProxy's own log line carries the same id (log-format ... rid=%ID): one request, both logs.
    hp_line = _wait(lambda: next((x for x in hp.log_text().splitlines() if f"rid={rid}" in x), None))
    assert hp_line and f"{CLIENT}:" in hp_line and "GET /who?q=1" in hp_line, hp.log_text()[-2000:]
