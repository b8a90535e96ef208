"""The demo PKI's certificates in real mutual-TLS handshakes (pyOpenSSL and the stdlib ``ssl``).

Each handshake runs over a ``socket.socketpair()`` in two threads (server and
client) and exchanges one message each way; a certificate the server must
refuse never gets application data through.  (Minting, files and names without
a handshake: ``tests/unit/test_pki.py``.)
"""

from __future__ import annotations

import datetime as dt
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from rhttp_wsgi.pki import DemoPKI

UTC = dt.timezone(dt.timedelta(0))
T = TypeVar("T")

# OpenSSL X509_V_ERR_* codes seen by verify callbacks.
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _wait(sock: socket.socket, for_write: bool, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("TLS exchange timed out")
    rlist, wlist = ([], [sock]) if for_write else ([sock], [])
    select.select(rlist, wlist, [], remaining)


def _pump(sock: socket.socket, action: Callable[[], T], deadline: float) -> T:
    """Run a pyOpenSSL call on a non-blocking socket until it completes."""
    while True:
        try:
            return action()
        except SSL.WantReadError:
            _wait(sock, False, deadline)
        except SSL.WantWriteError:
            _wait(sock, True, deadline)


class Side:
    def __init__(self) -> None:
        self.verify_errors: list[tuple[int, int]] = []  # (errno, depth)
        self.peer_cn: str | None = None
        self.received: bytes | None = None
        self.error: BaseException | None = None

    def verify_cb(self, conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            self.verify_errors.append((errno, depth))
        return bool(ok)


def server_context(demo: DemoPKI, side: Side, max_version: int | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    ctx.use_certificate_file(str(demo.server_cert))
    ctx.use_privatekey_file(str(demo.server_key))
    ctx.check_privatekey()
    ctx.load_verify_locations(str(demo.ca_cert))
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, side.verify_cb)
    return ctx


def client_context(ca_cert: Path, cert: Path, key: Path, side: Side) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate_file(str(cert))
    ctx.use_privatekey_file(str(key))
    ctx.check_privatekey()
    ctx.load_verify_locations(str(ca_cert))
    ctx.set_verify(SSL.VERIFY_PEER, side.verify_cb)
    return ctx


def _peer_cn(conn: SSL.Connection) -> str | None:
    peer = conn.get_peer_certificate(as_cryptography=True)
    if peer is None:
        return None
    value = peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return value if isinstance(value, str) else value.decode()


def run_mtls(server_ctx: SSL.Context, client_ctx: SSL.Context, server: Side, client: Side) -> None:
    """Handshake over a socketpair in two threads, then exchange one message each way."""
    server_sock, client_sock = socket.socketpair()
    server_sock.setblocking(False)
    client_sock.setblocking(False)
    deadline = time.monotonic() + 10

    def serve() -> None:
        try:
            conn = SSL.Connection(server_ctx, server_sock)
            conn.set_accept_state()
            _pump(server_sock, conn.do_handshake, deadline)
            server.peer_cn = _peer_cn(conn)
            server.received = _pump(server_sock, lambda: conn.recv(100), deadline)
            _pump(server_sock, lambda: conn.send(b"pong:" + (server.received or b"")), deadline)
        except (SSL.Error, OSError) as exc:  # recorded for the assertions
            server.error = exc
        finally:
            server_sock.close()

    def connect() -> None:
        try:
            conn = SSL.Connection(client_ctx, client_sock)
            conn.set_connect_state()
            conn.set_tlsext_host_name(b"localhost")
            _pump(client_sock, conn.do_handshake, deadline)
            client.peer_cn = _peer_cn(conn)
            _pump(client_sock, lambda: conn.send(b"ping"), deadline)
            client.received = _pump(client_sock, lambda: conn.recv(100), deadline)
        except (SSL.Error, OSError) as exc:
            client.error = exc
        finally:
            client_sock.close()

    threads = [
        threading.Thread(target=serve, daemon=True),
        threading.Thread(target=connect, daemon=True),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    assert not any(thread.is_alive() for thread in threads), "TLS threads did not finish"


@pytest.fixture
def demo(tmp_path: Path) -> DemoPKI:
    return DemoPKI.create(tmp_path / "pki", worker_names=("worker", "worker-2"))


@pytest.mark.parametrize("max_version", [SSL.TLS1_2_VERSION, None], ids=["tls1.2", "tls1.3"])
def test_demo_pki_mutual_tls_handshake(demo: DemoPKI, max_version: int | None) -> None:
    server, client = Side(), Side()
    cert, key = demo.workers["worker-2"]
    run_mtls(
        server_context(demo, server, max_version),
        client_context(demo.ca_cert, cert, key, client),
        server,
        client,
    )
    assert server.error is None, server.error
    assert client.error is None, client.error
    assert server.verify_errors == [] and client.verify_errors == []
    assert server.peer_cn == "worker-2"  # the server saw the worker's client cert
    assert client.peer_cn == "server"
    assert server.received == b"ping"
    assert client.received == b"pong:ping"


def _assert_rejected_by_server(demo: DemoPKI, cert: Path, key: Path, expected_errno: int) -> None:
    server, client = Side(), Side()
    run_mtls(
        server_context(demo, server),
        client_context(demo.ca_cert, cert, key, client),
        server,
        client,
    )
    assert server.error is not None, "server accepted a bad client certificate"
    assert isinstance(server.error, SSL.Error), repr(server.error)
    assert (expected_errno, 0) in server.verify_errors
    assert server.received is None
    assert client.received is None  # no application data made it through
    assert client.verify_errors == []  # the server's own cert was fine


def test_expired_worker_cert_rejected_by_server(demo: DemoPKI) -> None:
    cert, key = demo.issue_worker(
        "expired", days=30, not_after=dt.datetime.now(UTC) - dt.timedelta(days=1)
    )
    assert load_cert(cert).not_valid_after_utc < dt.datetime.now(UTC)
    _assert_rejected_by_server(demo, cert, key, X509_V_ERR_CERT_HAS_EXPIRED)


def test_not_yet_valid_worker_cert_rejected_by_server(demo: DemoPKI) -> None:
    cert, key = demo.issue_worker("future", not_before=dt.datetime.now(UTC) + dt.timedelta(days=1))
    _assert_rejected_by_server(demo, cert, key, X509_V_ERR_CERT_NOT_YET_VALID)


def test_worker_cert_from_foreign_ca_rejected_by_server(demo: DemoPKI, tmp_path: Path) -> None:
    foreign = DemoPKI.create(tmp_path / "foreign", worker_names=["worker"])
    cert, key = foreign.workers["worker"]
    _assert_rejected_by_server(demo, cert, key, X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY)


@pytest.mark.parametrize(
    ("server_hostname", "ok"),
    [("localhost", True), ("127.0.0.1", True), ("::1", True), ("elsewhere.example", False)],
)
def test_server_sans_pass_stdlib_hostname_check(
    demo: DemoPKI, server_hostname: str, ok: bool
) -> None:
    """The stdlib client (check_hostname=True) accepts exactly the SANs issued."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(demo.server_cert, demo.server_key)
    server_ctx.load_verify_locations(demo.ca_cert)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(demo.ca_cert))
    cert, key = demo.workers["worker"]
    client_ctx.load_cert_chain(cert, key)
    assert client_ctx.check_hostname

    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(10)
    client_sock.settimeout(10)
    results: dict[str, Any] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as tls:
                results["server_peer"] = tls.getpeercert()
                tls.sendall(b"hi")
        except (OSError, ssl.SSLError) as exc:
            results["server_error"] = exc
        finally:
            server_sock.close()

    def connect() -> None:
        try:
            with client_ctx.wrap_socket(client_sock, server_hostname=server_hostname) as tls:
                results["client_got"] = tls.recv(2)
        except (OSError, ssl.SSLError) as exc:
            results["client_error"] = exc
        finally:
            client_sock.close()

    threads = [
        threading.Thread(target=serve, daemon=True),
        threading.Thread(target=connect, daemon=True),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    assert not any(thread.is_alive() for thread in threads)
    if ok:
        assert "client_error" not in results, results
        assert results["client_got"] == b"hi"
        subject = dict(item for rdn in results["server_peer"]["subject"] for item in rdn)
        assert subject["commonName"] == "worker"
    else:
        assert isinstance(results.get("client_error"), ssl.SSLCertVerificationError), results
        assert "client_got" not in results
