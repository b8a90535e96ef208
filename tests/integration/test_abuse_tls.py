"""TLS that must be refused, over real sockets on 127.0.0.1.

Each case: the handshake is refused with a clear log line naming the reason,
the worker's slot keeps retrying (with backoff), and no thread is left behind
once the pool is shut down.  Cases already covered in ``test_worker_tls.py``
are not repeated here: an unknown CA in either direction
(``test_wrong_ca_is_refused``, ``test_worker_cert_from_unknown_ca_is_refused_by_the_proxy``),
a missing client certificate (``test_client_without_certificate_is_refused_by_tls``; and
``tests/unit/test_options.py::test_missing_client_certificate_is_a_dedicated_error``), a wrong host name
(``test_wrong_server_name_is_refused_and_retried``) and no ALPN at all
(``test_handshake_failures_are_retried[no-h2]``).
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from OpenSSL import SSL

from rhttp_wsgi import WorkerPool
from rhttp_wsgi.errors import TLSSetupError
from rhttp_wsgi.pki import DemoPKI, write_pem_atomic
from rhttp_wsgi.streams import StreamPolicy
from rhttp_wsgi.tls import TLSSession, server_context

from .minimal_proxy import MiniProxy

pytestmark = pytest.mark.timeout(60)

NOW = dt.datetime.now(dt.timezone.utc)
PAST = NOW - dt.timedelta(days=2)
FUTURE = NOW + dt.timedelta(days=2)


def hello_app(environ, start_response):  # type: ignore[no-untyped-def]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


@pytest.fixture()
def pki(tmp_path: Path) -> DemoPKI:
    return DemoPKI.create(tmp_path, worker_names=("worker",))


def server_pair(pki: DemoPKI, name: str, **validity: dt.datetime) -> tuple[str, str]:
    """A proxy certificate for 127.0.0.1 with the given validity, from the demo CA."""
    cert_pem, key_pem = pki.ca.issue_server("localhost", sans=["localhost", "127.0.0.1"], **validity)
    cert, key = pki.directory / f"{name}.crt", pki.directory / f"{name}.key"
    write_pem_atomic(cert, cert_pem, 0o644)
    write_pem_atomic(key, key_pem, 0o600)
    return str(cert), str(key)


def rhttp_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("rhttp-") or t.name.startswith("tunnel-")}


def refused_and_retried(pool: WorkerPool, accepted: Callable[[], int],
                        caplog: pytest.LogCaptureFixture) -> str:
    """Start ``pool`` against a proxy that refuses it; returns the worker's log text.

    Asserts it never becomes ready, that its slot retries, and that shutdown
    leaves no worker thread behind.
    """
    before = rhttp_threads()
    pool.start()
    try:
        assert not pool.wait_ready(0.5), "the worker accepted a TLS peer it must refuse"
        deadline = threading.Event()
        for _ in range(500):  # bounded: the slot must dial again (backoff 0.05-0.2 s)
            if accepted() >= 2:
                break
            deadline.wait(0.01)
        assert accepted() >= 2, "the slot must keep retrying"
    finally:
        assert pool.shutdown(5)
    leftover = {t for t in rhttp_threads() - before if t.is_alive()}
    for t in leftover:
        t.join(2)
    assert not {t for t in leftover if t.is_alive()}, f"threads left behind: {leftover}"
    assert pool.tunnels()[0].last_error
    return " | ".join(r.getMessage() for r in caplog.records)


def make_pool(pki: DemoPKI, port: int, cert: str | None = None, key: str | None = None,
              **kw: object) -> WorkerPool:
    wcert, wkey = pki.workers["worker"]
    return WorkerPool(hello_app, proxy=f"127.0.0.1:{port}", cert=cert or str(wcert), key=key or str(wkey),
                      ca=str(pki.ca_cert), reconnect_min=0.05, reconnect_max=0.2, **kw)  # type: ignore[arg-type]


# -- the proxy's certificate -------------------------------------------------------------------------


@pytest.mark.parametrize("validity,reason", [
    ({"not_after": PAST}, "certificate has expired"),
    ({"not_before": FUTURE}, "certificate is not yet valid"),
], ids=["expired", "not-yet-valid"])
def test_proxy_certificate_out_of_its_validity_is_refused(pki: DemoPKI, caplog: pytest.LogCaptureFixture,
                                                          validity: dict[str, dt.datetime], reason: str) -> None:
    caplog.set_level(logging.WARNING, "rhttp_wsgi")
    cert, key = server_pair(pki, "proxy-bad-dates", **validity)
    proxy = MiniProxy(cert, key, str(pki.ca_cert))
    proxy.start()
    try:
        text = refused_and_retried(make_pool(pki, proxy.port), lambda: proxy.accepted, caplog)
    finally:
        proxy.close()
    assert "TLS handshake failed" in text and reason in text, text
    assert not proxy.tunnels


# -- the worker's certificate ------------------------------------------------------------------------


@pytest.mark.parametrize("validity,reason", [
    ({"not_after": PAST}, "expired"),
    ({"not_before": FUTURE}, "not yet valid"),
], ids=["expired", "not-yet-valid"])
def test_worker_certificate_out_of_its_validity_is_refused_by_the_proxy(
        pki: DemoPKI, caplog: pytest.LogCaptureFixture, validity: dict[str, dt.datetime], reason: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.WARNING, "rhttp_wsgi")
    cert, key = pki.issue_worker("stale", **validity)
    # The pool refuses such a certificate at startup (test_cli_errors.py); it can still meet the
    # proxy with one that expired while it ran, which is what this proves the proxy refuses.
    monkeypatch.setattr("rhttp_wsgi.certcheck.check_identity", lambda *a, **k: None)
    proxy = MiniProxy(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert))
    proxy.start()
    try:
        text = refused_and_retried(make_pool(pki, proxy.port, str(cert), str(key)), lambda: proxy.accepted,
                                   caplog)
        assert proxy.wait_for(lambda: len(proxy.handshake_errors) >= 1, 5)
    finally:
        proxy.close()
    assert reason in proxy.handshake_errors[0], proxy.handshake_errors
    assert not proxy.live()
    # the worker's own line: the proxy's alert (TLS 1.3 delivers it after the client's Finished)
    assert "certificate" in text and ("failed" in text or "TLS error" in text), text


# -- a proxy that speaks the wrong protocol ----------------------------------------------------------


class OddTLSServer:
    """Accepts TLS connections with ``ctx`` and records how each handshake ended."""

    def __init__(self, ctx: SSL.Context) -> None:
        self.ctx = ctx
        self.accepted = 0
        self.errors: list[str] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        t = threading.Thread(target=self._accept, name="odd-tls-accept", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(s)
            t = threading.Thread(target=self._serve, args=(s,), name="odd-tls-conn", daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, s: socket.socket) -> None:
        try:
            TLSSession(self.ctx, server_side=True).handshake(s, 5)
            while s.recv(65536):
                pass
        except TLSSetupError as e:
            self.errors.append(str(e))
        except OSError:
            pass
        finally:
            s.close()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for s in self._conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)


@pytest.fixture()
def odd_server() -> Iterator[Callable[[SSL.Context], OddTLSServer]]:
    made: list[OddTLSServer] = []

    def factory(ctx: SSL.Context) -> OddTLSServer:
        made.append(OddTLSServer(ctx))
        return made[-1]

    yield factory
    for s in made:
        s.close()


def plain_server_context(pki: DemoPKI) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(pki.server_cert))
    ctx.use_privatekey_file(str(pki.server_key))
    return ctx


def test_proxy_selecting_http11_instead_of_h2_is_refused(pki: DemoPKI, caplog: pytest.LogCaptureFixture,
                                                         odd_server: Callable[[SSL.Context], OddTLSServer]) -> None:
    caplog.set_level(logging.WARNING, "rhttp_wsgi")
    ctx = plain_server_context(pki)
    ctx.set_alpn_select_callback(lambda conn, offered: b"http/1.1")  # not what the worker offered
    server = odd_server(ctx)
    text = refused_and_retried(make_pool(pki, server.port), lambda: server.accepted, caplog)
    assert "TLS handshake failed" in text and "ALPN" in text, text


def test_proxy_speaking_only_tls11_is_refused(pki: DemoPKI, caplog: pytest.LogCaptureFixture,
                                              odd_server: Callable[[SSL.Context], OddTLSServer]) -> None:
    caplog.set_level(logging.WARNING, "rhttp_wsgi")
    ctx = plain_server_context(pki)
    ctx.set_min_proto_version(SSL.TLS1_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_1_VERSION)
    ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    ctx.set_alpn_select_callback(lambda conn, offered: b"h2")
    server = odd_server(ctx)
    text = refused_and_retried(make_pool(pki, server.port), lambda: server.accepted, caplog)
    assert "TLS handshake failed" in text and "protocol version" in text, text
    assert server.errors and "unsupported protocol" in server.errors[0]


@pytest.mark.parametrize("version", [SSL.TLS1_VERSION, SSL.TLS1_1_VERSION], ids=["tls1.0", "tls1.1"])
def test_tunnel_port_refuses_a_client_offering_only_tls10_or_11(pki: DemoPKI, version: int) -> None:
    """The tunnel listener's context (``tls.server_context``) wants TLS >= 1.2."""
    cert, key = pki.workers["worker"]
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(version)
    ctx.set_max_proto_version(version)
    ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    ctx.use_certificate_chain_file(str(cert))
    ctx.use_privatekey_file(str(key))
    ctx.set_alpn_protos([b"h2"])
    server = OddTLSServer(server_context(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert)))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            with pytest.raises(TLSSetupError, match="protocol version"):
                TLSSession(ctx, server_side=False).handshake(s, 5)
    finally:
        server.close()
    assert server.errors and "unsupported protocol" in server.errors[0]


# -- the limits reach each tunnel (needs a real handshake, hence here) --------------------------------


def test_worker_abuse_limits_reach_each_tunnel(pki: DemoPKI) -> None:
    proxy = MiniProxy(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert))
    proxy.start()
    try:
        pool = make_pool(pki, proxy.port, max_header_count=7, max_body_size=1234, body_timeout=3.5,
                         send_timeout=4.5, request_timeout=5.5, max_resets=9, control_frame_rate=11.0,
                         control_frame_burst=12, max_output_backlog=654321)
        with pool:
            assert pool.wait_ready(5)
            tunnel = pool._slots[0].tunnel
            assert tunnel is not None
            s = tunnel.proto.options
            assert (s.max_header_count, s.max_resets, s.control_frame_rate, s.control_frame_burst,
                    s.max_output_backlog) == (7, 9, 11.0, 12, 654321)
            policy = tunnel.streams
            assert isinstance(policy, StreamPolicy)
            assert (policy.send_timeout, policy.request_timeout, policy.max_body_size) == (4.5, 5.5, 1234)
            ctx = policy.ctx
            assert (ctx.body_timeout, ctx.body_min_rate) == (3.5, 500)
            r = proxy.request("GET", "/")
            assert r.status == 200
            assert pool.tunnels()[0].lingering == 0
    finally:
        proxy.close()
