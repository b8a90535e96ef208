"""The worker over real mutual TLS on 127.0.0.1 against a minimal test proxy."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rhttp_wsgi import WorkerPool
from rhttp_wsgi.pki import DemoPKI

from .minimal_proxy import MiniProxy


def hello_app(environ, start_response):  # type: ignore[no-untyped-def]
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Host", environ.get("HTTP_HOST", ""))])
    return [b"hello:" + body]


@pytest.fixture()
def pki(tmp_path: Path) -> DemoPKI:
    return DemoPKI.create(tmp_path, worker_names=("worker",))


@pytest.fixture()
def proxy(pki: DemoPKI) -> Iterator[MiniProxy]:
    p = MiniProxy(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert))
    p.start()
    yield p
    p.close()


def make_pool(pki: DemoPKI, port: int, host: str = "127.0.0.1", **kw):  # type: ignore[no-untyped-def]
    cert, key = pki.workers["worker"]
    kw.setdefault("ca", str(pki.ca_cert))
    kw.setdefault("reconnect_min", 0.05)
    kw.setdefault("reconnect_max", 0.2)
    return WorkerPool(hello_app, proxy=f"{host}:{port}", cert=str(cert), key=str(key), **kw)


def test_round_trip_over_mtls(pki: DemoPKI, proxy: MiniProxy) -> None:
    with make_pool(pki, proxy.port, connections=2) as pool:
        assert pool.wait_ready(5)
        tunnels = proxy.wait_tunnels(2)
        r = proxy.request("POST", "/x", body=b"abc", tunnel=tunnels[1])
        assert (r.status, r.body, r.header("x-host")) == (200, b"hello:abc", "example.test")
        cert = tunnels[0].tls.peer_certificate() if tunnels[0].tls else None
        assert cert is not None and "worker" in cert.subject.rfc4514_string()


def test_sni_derived_from_host_and_absent_for_ip(pki: DemoPKI, proxy: MiniProxy) -> None:
    with make_pool(pki, proxy.port, host="localhost") as pool:
        assert pool.wait_ready(5)
    with make_pool(pki, proxy.port, host="127.0.0.1") as pool:
        assert pool.wait_ready(5)
    assert proxy.sni_seen[:2] == ["localhost", None]


def test_sni_override(pki: DemoPKI, proxy: MiniProxy) -> None:
    with make_pool(pki, proxy.port, host="127.0.0.1", server_name="localhost") as pool:
        assert pool.wait_ready(5)
    assert proxy.sni_seen == ["localhost"]


def test_wrong_server_name_is_refused_and_retried(pki: DemoPKI, proxy: MiniProxy,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "rhttp_wsgi")
    pool = make_pool(pki, proxy.port, server_name="not-the-proxy.example")
    pool.start()
    try:
        assert not pool.wait_ready(0.5)
        assert proxy.wait_for(lambda: proxy.accepted >= 2, 5), "the slot must keep retrying"
    finally:
        t0 = time.monotonic()
        assert pool.shutdown(5)
        assert time.monotonic() - t0 < 5
    assert any("TLS handshake failed" in r.getMessage() for r in caplog.records)
    assert pool.tunnels()[0].last_error


def test_wrong_ca_is_refused(pki: DemoPKI, proxy: MiniProxy, tmp_path: Path) -> None:
    other = DemoPKI.create(tmp_path / "other", worker_names=("x",))
    pool = make_pool(pki, proxy.port, ca=str(other.ca_cert))
    pool.start()
    try:
        assert not pool.wait_ready(0.5)
        assert proxy.wait_for(lambda: proxy.accepted >= 2, 5)
        assert "certificate verify failed" in (pool.tunnels()[0].last_error or "")
    finally:
        assert pool.shutdown(5)


def test_worker_cert_from_unknown_ca_is_refused_by_the_proxy(pki: DemoPKI, proxy: MiniProxy,
                                                             tmp_path: Path) -> None:
    other = DemoPKI.create(tmp_path / "other", worker_names=("intruder",))
    cert, key = other.workers["intruder"]
    pool = WorkerPool(hello_app, proxy=f"127.0.0.1:{proxy.port}", cert=str(cert), key=str(key),
                      ca=str(pki.ca_cert), reconnect_min=0.05, reconnect_max=0.2)
    pool.start()
    try:
        assert not pool.wait_ready(0.5)
        assert proxy.wait_for(lambda: len(proxy.handshake_errors) >= 1, 5)
        assert "verify" in proxy.handshake_errors[0]
    finally:
        assert pool.shutdown(5)


def test_client_without_certificate_is_refused_by_tls(pki: DemoPKI, proxy: MiniProxy) -> None:
    import socket

    from OpenSSL import SSL

    from rhttp_wsgi.errors import TLSSetupError
    from rhttp_wsgi.tls import TLSSession

    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.load_verify_locations(str(pki.ca_cert))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *a: bool(a[-1]))
    ctx.set_alpn_protos([b"h2"])
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        sess = TLSSession(ctx, server_side=False)
        with pytest.raises(TLSSetupError):
            sess.handshake(s, 5)
            # TLS 1.3: the refusal arrives after the client's Finished
            s.settimeout(5)
            data = s.recv(65536)
            sess.decrypt(data)
            if not data:
                raise TLSSetupError("closed")
    assert proxy.wait_for(lambda: len(proxy.handshake_errors) >= 1, 5)


@pytest.mark.parametrize("bad", ["close", "silent", "no-settings", "no-h2"])
def test_handshake_failures_are_retried(pki: DemoPKI, bad: str, caplog: pytest.LogCaptureFixture) -> None:
    """The Go library hangs forever when the first handshake fails; here the slot retries."""
    caplog.set_level(logging.WARNING, "rhttp_wsgi")
    p = MiniProxy(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert),
                  behaviour=lambda i: bad if i < 2 else "ok")
    p.start()
    try:
        with make_pool(pki, p.port, handshake_timeout=0.3) as pool:
            assert pool.wait_ready(10), pool.tunnels()
            assert p.accepted >= 3
            assert p.request("GET", "/").status == 200
    finally:
        p.close()
    text = " ".join(r.getMessage() for r in caplog.records)
    expected = {"close": ("closed", "reset"), "silent": ("timed out",), "no-settings": ("SETTINGS",),
                "no-h2": ("ALPN h2",)}[bad]
    assert any(e in text for e in expected), text


def test_healthy_tunnel_closed_without_goaway_is_replaced_fast(pki: DemoPKI, proxy: MiniProxy) -> None:
    with make_pool(pki, proxy.port) as pool:
        assert pool.wait_ready(5)
        first = proxy.wait_tunnels(1)[0]
        t0 = time.monotonic()
        first.sock.shutdown(2)  # like HAProxy's idle purge: TCP close, no GOAWAY
        assert proxy.wait_for(lambda: any(t is not first for t in proxy.live()), 5)
        elapsed = time.monotonic() - t0
        assert elapsed < 1.0, f"replacement took {elapsed:.3f}s"
        assert proxy.request("GET", "/", tunnel=next(t for t in proxy.live() if t is not first)).status == 200
        assert pool.tunnels()[0].reconnects == 1


def test_goaway_from_proxy_finishes_in_flight_and_opens_new_tunnel(pki: DemoPKI, proxy: MiniProxy) -> None:
    release = threading.Event()
    started = threading.Event()

    def slow_app(environ, start_response):  # type: ignore[no-untyped-def]
        started.set()
        assert release.wait(5)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"late"]

    cert, key = pki.workers["worker"]
    with WorkerPool(slow_app, proxy=f"127.0.0.1:{proxy.port}", cert=str(cert), key=str(key),
                    ca=str(pki.ca_cert)) as pool:
        assert pool.wait_ready(5)
        old = proxy.wait_tunnels(1)[0]
        result: list[object] = []
        th = threading.Thread(target=lambda: result.append(proxy.request("GET", "/slow", tunnel=old)))
        th.start()
        assert started.wait(5)
        old.drain()  # proxy sends GOAWAY(NO_ERROR)
        assert proxy.wait_for(lambda: any(t is not old for t in proxy.live()), 5), "no replacement tunnel"
        release.set()
        th.join(5)
        assert result and result[0].status == 200 and result[0].body == b"late"  # type: ignore[attr-defined]


def test_shutdown_drains_in_flight_and_is_idempotent(pki: DemoPKI, proxy: MiniProxy) -> None:
    release = threading.Event()
    started = threading.Event()
    seen: dict[str, bool] = {}

    def slow_app(environ, start_response):  # type: ignore[no-untyped-def]
        started.set()
        release.wait(5)
        seen["draining"] = environ["rhttp.draining"].is_set()
        start_response("200 OK", [])
        return [b"done"]

    cert, key = pki.workers["worker"]
    pool = WorkerPool(slow_app, proxy=f"127.0.0.1:{proxy.port}", cert=str(cert), key=str(key),
                      ca=str(pki.ca_cert)).start()
    assert pool.wait_ready(5)
    tunnel = proxy.wait_tunnels(1)[0]
    result: list[object] = []
    stopped: list[bool] = []
    th = threading.Thread(target=lambda: result.append(proxy.request("GET", "/", tunnel=tunnel)))
    th.start()
    assert started.wait(5)
    stopper = threading.Thread(target=lambda: stopped.append(pool.shutdown(5)))
    stopper.start()
    assert proxy.wait_for(lambda: tunnel.peer_goaway is not None, 5), "GOAWAY must go out first"
    release.set()
    th.join(5)
    stopper.join(10)
    assert result[0].status == 200 and result[0].body == b"done"  # type: ignore[attr-defined]
    assert stopped == [True]
    assert seen["draining"] is True
    assert pool.shutdown(1) is True  # idempotent


def test_shutdown_deadline_cancels_stuck_requests(pki: DemoPKI, proxy: MiniProxy) -> None:
    started = threading.Event()
    cancelled: list[bool] = []

    def stuck_app(environ, start_response):  # type: ignore[no-untyped-def]
        started.set()
        cancelled.append(environ["rhttp.cancelled"].wait(10))
        start_response("200 OK", [])
        return [b""]

    cert, key = pki.workers["worker"]
    pool = WorkerPool(stuck_app, proxy=f"127.0.0.1:{proxy.port}", cert=str(cert), key=str(key),
                      ca=str(pki.ca_cert)).start()
    assert pool.wait_ready(5)
    tunnel = proxy.wait_tunnels(1)[0]
    errors: list[BaseException] = []

    def client() -> None:
        try:
            proxy.request("GET", "/", tunnel=tunnel)
        except Exception as e:
            errors.append(e)

    th = threading.Thread(target=client)
    th.start()
    assert started.wait(5)
    t0 = time.monotonic()
    assert pool.shutdown(0.5) is False
    assert time.monotonic() - t0 < 4
    th.join(5)
    assert cancelled == [True]
    assert errors, "the proxy side must see the stream fail"


def test_refused_by_proxy_goaway_backs_off(pki: DemoPKI, proxy: MiniProxy,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """A proxy that accepts the handshake, then GOAWAYs with an error, must not be hammered."""
    from h2.errors import ErrorCodes

    caplog.set_level(logging.WARNING, "rhttp_wsgi")
    # the jitter source fixed at its middle: each delay is exactly 3/4 of its (doubling) step
    with make_pool(pki, proxy.port, reconnect_min=0.2, reconnect_max=5, rng=lambda: 0.5) as pool:
        assert pool.wait_ready(5)
        for i in range(3):
            t = proxy.wait_tunnels(1)[0]
            t.close("refused by test", code=ErrorCodes.INADEQUATE_SECURITY)
            assert proxy.wait_for(lambda n=i: proxy.accepted >= n + 2, 10)
    delays = [float(r.getMessage().rsplit("retry in ", 1)[1].rstrip("s)"))
              for r in caplog.records if "GOAWAY(INADEQUATE_SECURITY)" in r.getMessage()]
    assert len(delays) >= 3, [r.getMessage() for r in caplog.records]
    assert delays[:3] == [0.15, 0.3, 0.6], delays  # steps of 0.2, 0.4, 0.8 s: backing off, not hammering


def test_tls12_blocklisted_cipher_is_refused(pki: DemoPKI, proxy: MiniProxy) -> None:
    """RFC 9113 §9.2.2: a TLS 1.2 peer limited to a blocklisted (CBC) suite is refused."""
    import socket

    from OpenSSL import SSL

    from rhttp_wsgi.errors import TLSSetupError
    from rhttp_wsgi.tls import TLSSession

    cert, key = pki.workers["worker"]
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(b"ECDHE-ECDSA-AES128-SHA")
    ctx.use_certificate_chain_file(str(cert))
    ctx.use_privatekey_file(str(key))
    ctx.set_alpn_protos([b"h2"])
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        with pytest.raises(TLSSetupError):
            TLSSession(ctx, server_side=False).handshake(s, 5)


# -- the proxy's name (checked on the leaf during the handshake, with public pyOpenSSL/cryptography API) --


def _handshake(pki: DemoPKI, port: int, verify_name: str, ca: str | None = None) -> None:
    import socket

    from rhttp_wsgi.tls import TLSSession, client_context

    cert, key = pki.workers["worker"]
    ctx = client_context(str(cert), str(key), ca or str(pki.ca_cert))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        TLSSession(ctx, server_side=False, verify_name=verify_name).handshake(s, 5)


@pytest.mark.parametrize("name,reason", [
    ("not-the-proxy.example", "hostname mismatch"),
    ("127.0.0.2", "IP address mismatch"),
    ("::2", "IP address mismatch"),
])
def test_a_name_the_proxy_certificate_does_not_carry_fails_the_handshake(
        pki: DemoPKI, proxy: MiniProxy, name: str, reason: str) -> None:
    from rhttp_wsgi.errors import TLSSetupError

    with pytest.raises(TLSSetupError, match=f"TLS handshake failed.*{reason}.*{name!r}"):
        _handshake(pki, proxy.port, name)
    # the proxy saw the refusal as a failed handshake (the worker's alert), not a tunnel
    assert proxy.wait_for(lambda: len(proxy.handshake_errors) >= 1, 5)
    assert not proxy.tunnels


@pytest.mark.parametrize("name", ["localhost", "LOCALHOST.", "127.0.0.1", "::1"])
def test_names_the_proxy_certificate_carries_pass(pki: DemoPKI, proxy: MiniProxy, name: str) -> None:
    _handshake(pki, proxy.port, name)


def _server_cert(tmp_path: Path, pki: DemoPKI, *, sans: list[str], cn: str = "proxy") -> MiniProxy:
    """A MiniProxy whose certificate (from a CA of its own) has exactly these DNS SANs (none: no SAN)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "name-test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]),
                                        critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    (tmp_path / "name-ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "name.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "name.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    p = MiniProxy(str(tmp_path / "name.crt"), str(tmp_path / "name.key"), str(pki.ca_cert))
    p.start()
    return p


@pytest.mark.parametrize("sans,cn,name,ok", [
    (["*.example.test"], "proxy", "a.example.test", True),
    (["*.example.test"], "proxy", "example.test", False),  # a wildcard is exactly one label
    (["*.example.test"], "proxy", "a.b.example.test", False),
    (["*.test"], "proxy", "example.test", False),  # not across a whole top-level domain
    (["w*.example.test"], "proxy", "www.example.test", False),  # partial wildcards are refused
    ([], "proxy.example.test", "proxy.example.test", True),  # no DNS SAN: the CN, as OpenSSL does
    (["other.example.test"], "proxy.example.test", "proxy.example.test", False),  # a SAN: never the CN
], ids=["wildcard", "wildcard-not-the-apex", "wildcard-one-label", "wildcard-tld", "partial-wildcard",
        "cn-without-san", "cn-ignored-with-san"])
def test_name_matching_rules(tmp_path: Path, pki: DemoPKI, sans: list[str], cn: str, name: str, ok: bool) -> None:
    from rhttp_wsgi.errors import TLSSetupError

    p = _server_cert(tmp_path, pki, sans=sans, cn=cn)
    try:
        if ok:
            _handshake(pki, p.port, name, ca=str(tmp_path / "name-ca.crt"))
        else:
            with pytest.raises(TLSSetupError, match="hostname mismatch"):
                _handshake(pki, p.port, name, ca=str(tmp_path / "name-ca.crt"))
    finally:
        p.close()
