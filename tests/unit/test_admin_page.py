"""The admin endpoints' documents, from worker snapshots: readiness, grouping by certificate, the escaped page."""

from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rhttp_wsgi.admin import AdminApp, render_status_page, status_document
from rhttp_wsgi.registry import WorkerInfo

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
HOSTILE = '<script>alert("x")</script>&\'"'


def make_cert(cn: str, serial: int, not_after: dt.datetime) -> x509.Certificate:
    """A self-signed certificate with any CN at all (the demo PKI refuses names like HOSTILE)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(NOW - dt.timedelta(days=10)).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))


def snapshot(cert: x509.Certificate, seq: int, *, draining: bool = False, in_flight: int = 0) -> WorkerInfo:
    w = WorkerInfo(seq, cert, ("192.0.2.7", 40000 + seq), tls_version="TLSv1.3")
    w.tunnel = SimpleNamespace(closing=False, accepting=not draining,  # type: ignore[assignment]
                               proto=SimpleNamespace(peer_max_concurrent_streams=lambda: 100,
                                                     peer_enable_connect_protocol=lambda: False))
    w.attached_at = NOW.timestamp() - 90
    w.in_flight = in_flight
    return w.snapshot()


@pytest.fixture(scope="module")
def certs() -> dict[str, x509.Certificate]:
    return {
        "a": make_cert("alpha", 0xA1, NOW + dt.timedelta(days=300)),
        "soon": make_cert("soon", 0xB2, NOW + dt.timedelta(days=3)),
        "hostile": make_cert(HOSTILE, 0xC3, NOW - dt.timedelta(days=2)),
    }


def test_readiness_reasons() -> None:
    now = NOW.timestamp()
    assert status_document([], shutting_down=False, now=now)["reason"] == "no worker is attached"
    cert = make_cert("alpha", 1, NOW + dt.timedelta(days=30))
    draining = [snapshot(cert, 1, draining=True)]
    doc = status_document(draining, shutting_down=False, now=now)
    assert (doc["ready"], doc["reason"]) == (False, "every attached tunnel is draining (1)")
    up = [snapshot(cert, 1), snapshot(cert, 2, draining=True)]
    doc = status_document(up, shutting_down=False, now=now)
    assert (doc["ready"], doc["reason"], doc["tunnels_draining"]) == (True, "1 tunnel attached", 1)
    doc = status_document(up, shutting_down=True, now=now)
    assert (doc["ready"], doc["reason"]) == (False, "the proxy is shutting down")


def test_tunnels_are_grouped_by_certificate(certs: dict[str, x509.Certificate]) -> None:
    workers = [snapshot(certs["a"], 1, in_flight=2), snapshot(certs["soon"], 2),
               snapshot(certs["a"], 3, draining=True, in_flight=1)]
    doc = status_document(workers, shutting_down=False, now=NOW.timestamp())
    json.dumps(doc)  # all of it is JSON
    alpha, soon = doc["workers"]
    assert (alpha["common_name"], alpha["serial"], alpha["in_flight"], alpha["draining"]) == ("alpha", "a1", 3, False)
    assert [t["id"] for t in alpha["tunnels"]] == ["w1", "w3"]
    assert [t["draining"] for t in alpha["tunnels"]] == [False, True]
    assert alpha["tunnels"][0] == {
        "id": "w1", "remote_addr": "192.0.2.7:40001", "attached_since": "2029-12-31T23:58:30Z",
        "attached_for_seconds": 90.0, "tls_version": "TLSv1.3", "in_flight": 2, "max_concurrent_streams": 100,
        "total": 0, "draining": False,
    }
    assert (alpha["expires_in_days"], soon["expires_in_days"]) == (300.0, 3.0)
    assert alpha["not_after"] == "2030-10-28T00:00:00Z"


def test_status_page_escapes_what_a_certificate_says_and_marks_expiry(certs: dict[str, x509.Certificate]) -> None:
    workers = [snapshot(certs["hostile"], 1), snapshot(certs["soon"], 2), snapshot(certs["a"], 3, draining=True)]
    page = render_status_page(status_document(workers, shutting_down=False, now=NOW.timestamp()), 5)
    assert HOSTILE not in page and "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#x27;&quot;" in page
    assert '<td class="expired">2029-12-30 (expired)</td>' in page
    assert '<td class="warn">2030-01-04 (3 d)</td>' in page
    assert '<tr class="worker drain" data-cn="alpha"' in page
    assert "READY: 2 tunnels attached" in page
    # self-contained: no script, no asset from anywhere else
    assert "src=" not in page and "http://" not in page and "https://" not in page and "@import" not in page


def test_status_page_without_workers_says_so() -> None:
    page = render_status_page(status_document([], shutting_down=False, now=NOW.timestamp()), 0)
    assert "NOT READY: no worker is attached" in page and "http-equiv" not in page
    assert '<td class="empty" colspan="10">no worker is attached</td>' in page


def _call(app: AdminApp, path: str, query: str = "", method: str = "GET") -> tuple[str, dict[str, str], bytes]:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen.update(status=status, headers=dict(headers))

    body = b"".join(app({"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": method}, start_response))
    return seen["status"], seen["headers"], body


def test_admin_app_routes_without_a_server(certs: dict[str, x509.Certificate]) -> None:
    proxy = SimpleNamespace(workers=lambda: [snapshot(certs["a"], 1)], shutting_down=False)
    app = AdminApp(proxy)  # type: ignore[arg-type]
    status, headers, body = _call(app, "/healthz")
    assert (status, body) == ("200 OK", b"ready: 1 tunnel attached\n")
    assert headers["Content-Length"] == str(len(body))
    assert json.loads(_call(app, "/workers")[2])["workers"][0]["common_name"] == "alpha"
    assert _call(app, "/status", "refresh=99999")[2].count(b'content="3600"') == 1
    assert _call(app, "/status", method="HEAD")[2] == b""
    assert _call(app, "/metrics")[0] == "404 Not Found"


def test_a_snapshot_keeps_the_draining_state_it_was_taken_with(certs: dict[str, x509.Certificate]) -> None:
    w = WorkerInfo(1, certs["a"], ("192.0.2.7", 1))
    tunnel = SimpleNamespace(closing=False, accepting=False,
                             proto=SimpleNamespace(peer_max_concurrent_streams=lambda: 1,
                                                   peer_enable_connect_protocol=lambda: False))
    w.tunnel = tunnel  # type: ignore[assignment]
    frozen = w.snapshot()
    tunnel.accepting = True
    assert frozen.draining is True and w.draining is False
    assert frozen.as_dict()["draining"] is True and w.as_dict()["not_after"] == "2030-10-28T00:00:00+00:00"
