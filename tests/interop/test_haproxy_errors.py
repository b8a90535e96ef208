"""Through HAProxy (``rhttp@``, the recommended config): a worker whose certificate HAProxy refuses says so.

HAProxy's ``verify required`` with ``ca-file`` answers a certificate from
another CA with OpenSSL's alert; the worker's line must name it as a refusal of
*our* certificate, point at ``ca-file`` / ``--workers-ca``, and be an ERROR
(retrying cannot fix it), while the slot keeps retrying with backoff.
"""

from __future__ import annotations

import logging
import time

import pytest

from .haproxy_fixtures import Lab


def hello(environ, start_response):  # type: ignore[no-untyped-def]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def test_a_certificate_haproxy_does_not_trust_is_an_error_naming_ca_file(lab: Lab,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "rhttp_wsgi.worker")
    _hp, tunnel_port, _public_port = lab.start_recommended(allowed=("worker",))
    cert = lab.foreign_worker_cert("worker")  # allowed CN, another CA
    bad = lab.worker(hello, tunnel_port, cert=cert, wait=False, connections=1, reconnect_min=0.05,
                     reconnect_max=0.2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len([r for r in caplog.records if r.levelno == logging.ERROR]) < 2:
        time.sleep(0.05)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) >= 2, [r.getMessage() for r in caplog.records]  # an ERROR per attempt, still retrying
    assert "the proxy rejected our client certificate (subject CN=worker, issuer CN=rhttp-wsgi demo CA;" \
           f" --cert {cert[0]})" in errors[0], errors[0]
    assert "HAProxy: `ca-file`" in errors[0] and "retry in" in errors[0], errors[0]
    assert bad.tunnels()[0].last_error and not bad.tunnels()[0].connected
    assert bad.shutdown(3.0)
