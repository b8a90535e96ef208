"""Proxy edge cases: misbehaving tunnel peers, retries, liveness, the turnkey server's limits."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame

from rhttp_wsgi._protocol import TunnelProtocol
from rhttp_wsgi._tunnel import Tunnel
from rhttp_wsgi.options import TunnelOptions
from rhttp_wsgi.tls import TLSSession, client_context

from .proxy_fixtures import (  # noqa: F401  (fixtures)
    WAIT,
    Env,
    echo_app,
    env_fixture,
    hello_app,
    pki_fixture,
    read_until_close,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)


class FakeWorker:
    """A hand-driven worker tunnel: refuses every stream, or goes silent after its SETTINGS."""

    def __init__(self, env: Env, name: str, mode: str) -> None:
        cert, key = env.pki.workers[name] if name in env.pki.workers else env.pki.issue_worker(name)
        ctx = client_context(str(cert), str(key), str(env.pki.ca_cert))
        self.sock = socket.create_connection(("127.0.0.1", env.tunnel_port), timeout=WAIT)
        self.session = TLSSession(ctx, server_side=False, verify_name="127.0.0.1")
        self.session.handshake(self.sock, WAIT)
        self.thread: threading.Thread | None = None
        self.tunnel: Tunnel | None = None
        if mode == "refuse":
            # no stream policy: the tunnel answers every stream with RST_STREAM(REFUSED_STREAM)
            options = TunnelOptions()
            self.tunnel = Tunnel(self.sock, self.session, TunnelProtocol("server", options), options,
                                 name=f"fake-{name}")
            self.thread = threading.Thread(target=self.tunnel.run, name=f"fake-{name}")
            self.thread.start()
        elif mode == "silent":
            proto = TunnelProtocol("server", TunnelOptions(ping_interval=3600))
            proto.initiate(time.monotonic())
            self.sock.sendall(self.session.encrypt(proto.data_to_send()))
        else:  # pragma: no cover
            raise ValueError(mode)

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
        if self.thread is not None:
            self.thread.join(WAIT)
        self.sock.close()


@pytest.fixture
def fakes(env: Env) -> Iterator[list[FakeWorker]]:
    made: list[FakeWorker] = []
    yield made
    for f in made:
        f.close()


def test_idempotent_request_retried_on_another_worker(env: Env, fakes: list[FakeWorker]) -> None:
    def prefer_refuser(environ: dict[str, Any], workers: list[Any]) -> Any:
        for w in workers:
            if w.common_name == "beta":
                return w
        return workers[0]

    env.start_proxy(selector=prefer_refuser)
    env.start_worker(echo_app, "alpha")
    fakes.append(FakeWorker(env, "beta", "refuse"))
    assert env.proxy.wait_for_workers(2, WAIT)
    status, headers, _, _ = env.request("GET", "/retry-me")
    assert status == 200 and headers["x-echo-path"] == "/retry-me"
    assert fakes[0].tunnel is not None and fakes[0].tunnel.streams_total == 1
    # A request with a body is not replayed: the refusal is a 502.
    status, _, _, _ = env.request("POST", "/no-retry", body=b"data")
    assert status == 502
    assert fakes[0].tunnel.streams_total == 2


def test_refusal_without_other_worker(env: Env, fakes: list[FakeWorker]) -> None:
    env.start_proxy()
    fakes.append(FakeWorker(env, "beta", "refuse"))
    assert env.proxy.wait_for_workers(1, WAIT)
    status, _, _, _ = env.request("GET", "/")
    assert status in (502, 503)


def test_ping_liveness_detaches_dead_tunnel_and_fails_in_flight(env: Env, fakes: list[FakeWorker]) -> None:
    detached = threading.Event()
    env.start_proxy(ping_interval=0.2, ping_timeout=0.3, on_detach=lambda w: detached.set())
    fakes.append(FakeWorker(env, "beta", "silent"))
    assert env.proxy.wait_for_workers(1, WAIT)
    t0 = time.monotonic()
    status, _, _, _ = env.request("GET", "/")  # goes to the silent worker, never answered
    assert status == 502
    assert detached.wait(WAIT)
    assert time.monotonic() - t0 < 3.0
    assert env.proxy.workers() == []


def test_silent_tcp_peer_is_dropped_after_handshake_timeout(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "rhttp_wsgi")
    env.start_proxy(handshake_timeout=0.3)
    s = socket.create_connection(("127.0.0.1", env.tunnel_port), timeout=WAIT)
    env.socks.append(s)
    t0 = time.monotonic()
    assert read_until_close(s) == b""
    assert time.monotonic() - t0 < 3.0
    # The TLS handshake waits on socket timeouts (there is no clock to move): the proxy's log says
    # that its deadline, and nothing else, ended the connection.
    assert wait_until(lambda: "TLS handshake timed out after 0.3s" in caplog.text), caplog.text
    assert wait_until(lambda: not env.proxy._listeners[0].threads())


def _tls_client(env: Env, name: str = "worker") -> tuple[socket.socket, TLSSession]:
    cert, key = env.pki.workers[name]
    ctx = client_context(str(cert), str(key), str(env.pki.ca_cert))
    s = socket.create_connection(("127.0.0.1", env.tunnel_port), timeout=WAIT)
    env.socks.append(s)
    sess = TLSSession(ctx, server_side=False, verify_name="127.0.0.1")
    sess.handshake(s, WAIT)
    return s, sess


def _read_plain_until_close(s: socket.socket, sess: TLSSession) -> bytes:
    out = b""
    s.settimeout(WAIT)
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            return out
        if not data:
            return out
        out += sess.decrypt(data)


def _frames(data: bytes) -> list[Frame]:
    """The HTTP/2 frames in ``data`` (the proxy sends no preface)."""
    out = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


def test_tls_peer_without_preface_is_dropped(env: Env) -> None:
    env.start_proxy(handshake_timeout=0.3)
    s, sess = _tls_client(env)
    t0 = time.monotonic()
    data = _read_plain_until_close(s, sess)  # the proxy's SETTINGS, then GOAWAY, then close
    assert time.monotonic() - t0 < 3.0
    # The proxy's tunnel runs on the real clock here: its GOAWAY says that the SETTINGS deadline,
    # and nothing else, ended the tunnel (the deadline itself, at the exact instant, is proved with
    # an injected clock in tests/tunnel/test_worker_protocol.py).
    goaways = [f for f in _frames(data) if isinstance(f, GoAwayFrame)]
    assert [f.error_code for f in goaways] == [ErrorCodes.SETTINGS_TIMEOUT], data
    assert env.proxy.workers() == []


def test_tls_peer_sending_garbage_is_dropped(env: Env) -> None:
    env.start_proxy(handshake_timeout=5.0)
    s, sess = _tls_client(env)
    t0 = time.monotonic()
    s.sendall(sess.encrypt(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    data = _read_plain_until_close(s, sess)
    assert time.monotonic() - t0 < 2.0  # not the 5 s deadline: closed on the spot
    assert b"\x07" in data[:200] or data  # a GOAWAY frame (type 7) follows the SETTINGS
    assert env.proxy.workers() == []


def test_client_without_certificate_rejected(env: Env) -> None:
    env.start_proxy()
    ctx = ssl.create_default_context(cafile=str(env.pki.ca_cert))
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", env.tunnel_port), timeout=WAIT)
    env.socks.append(raw)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        if not s.recv(100):
            raise ConnectionError("closed")
    assert env.proxy.workers() == []


def test_client_without_alpn_h2_rejected(env: Env) -> None:
    env.start_proxy()
    cert, key = env.pki.workers["worker"]
    ctx = ssl.create_default_context(cafile=str(env.pki.ca_cert))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", env.tunnel_port), timeout=WAIT)
    env.socks.append(raw)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        if not s.recv(100):
            raise ConnectionError("closed")


def test_early_response_stops_upload(env: Env) -> None:
    """The worker answers without reading a large body (RST_STREAM NO_ERROR): the answer gets through."""
    env.start_proxy()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("413 Content Too Large", [("Content-Type", "text/plain")])
        return [b"too big"]

    env.start_worker(app)
    status, _, body, _ = env.request("POST", "/upload", body=os.urandom(3 << 20))
    assert status == 413 and body == b"too big"
    status, _, body, _ = env.request("POST", "/upload", body=b"small")
    assert status == 413


def test_expect_100_continue(env: Env) -> None:
    env.start_proxy()
    env.start_worker(echo_app)
    s = env.raw()
    s.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    s.settimeout(WAIT)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    assert buf.startswith(b"HTTP/1.1 100 ")
    s.sendall(b"hello")
    rest = buf.partition(b"\r\n\r\n")[2]
    while b"hello" not in rest:
        rest += s.recv(4096)
    assert rest.startswith(b"HTTP/1.1 200 ")


def test_malformed_request_400(env: Env) -> None:
    env.start_proxy()
    s = env.raw()
    s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
    assert read_until_close(s).startswith(b"HTTP/1.1 400 ")


def test_oversized_head_431(env: Env) -> None:
    env.start_proxy(max_request_head=4096)
    env.start_worker(hello_app)
    s = env.raw()
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
    assert read_until_close(s).startswith(b"HTTP/1.1 431 ")


def test_body_limit_413(env: Env) -> None:
    env.start_proxy(max_request_body=10)
    env.start_worker(echo_app)
    status, _, _, _ = env.request("POST", "/", body=b"x" * 100)
    assert status == 413
    c = env.conn()
    c.request("POST", "/", body=iter([b"x" * 50, b"y" * 50]), encode_chunked=True)
    assert c.getresponse().status == 413


def test_header_timeout_closes_slow_client(env: Env) -> None:
    env.start_proxy(header_timeout=0.3)
    s = env.raw()
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
    t0 = time.monotonic()
    data = read_until_close(s)
    assert time.monotonic() - t0 < 3.0
    assert data == b"" or data.startswith(b"HTTP/1.1 408 ")


def test_idle_keepalive_timeout(env: Env) -> None:
    env.start_proxy(idle_timeout=1.0)
    env.start_worker(hello_app)
    c = env.conn()
    # The public server waits on socket timeouts (there is no clock to move): that a second
    # request is served on the connection shows it was kept alive after the first response ...
    for _ in range(2):
        c.request("GET", "/")
        r = c.getresponse()
        assert (r.status, r.read()) == (200, b"hello")
    assert c.sock is not None
    t0 = time.monotonic()
    assert read_until_close(c.sock) == b""  # ... and, left idle, the server closes it unasked
    assert time.monotonic() - t0 < 3.0


def test_serve_tunnel_listener_on_prebound_socket(env: Env) -> None:
    proxy = env.start_proxy()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    port = ls.getsockname()[1]
    t = threading.Thread(target=proxy.serve_tunnel_listener, args=(ls,))
    t.start()
    env.tunnel_port = port
    env.start_worker(hello_app)
    assert env.request("GET", "/")[2] == b"hello"
    assert proxy.shutdown(5.0)
    t.join(WAIT)
    assert not t.is_alive()


def test_shutdown_deadline_forces_close(env: Env) -> None:
    proxy = env.start_proxy()
    entered = threading.Event()
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        entered.set()
        release.wait(WAIT)
        start_response("200 OK", [])
        return [b"late"]

    env.start_worker(app)
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", env.request("GET", "/")))
    t.start()
    assert entered.wait(WAIT)
    t0 = time.monotonic()
    assert proxy.shutdown(0.3) is False
    assert time.monotonic() - t0 < 3.0
    t.join(WAIT)
    release.set()
    assert result["r"][0] == 502


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_over_public_tls_with_chunked_upload(env: Env) -> None:
    env.start_proxy(public_cert=str(env.pki.server_cert), public_key=str(env.pki.server_key))
    env.start_worker(echo_app)
    port = env.public[1]
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "5", "--cacert", str(env.pki.ca_cert),
         "-H", "Transfer-Encoding: chunked", "--data-binary", "@-", "-D", "-",
         f"https://localhost:{port}/curl?x=1"],
        input=b"from curl", capture_output=True, timeout=10, check=True,
    ).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"x-echo-scheme: https" in head.lower()
    assert b"x-echo-query: x=1" in head.lower()
    assert body == b"from curl"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_sse(env: Env) -> None:
    env.start_proxy()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        return (f"data: {i}\n\n".encode() for i in range(5))

    env.start_worker(app)
    out = subprocess.run(["curl", "-sSN", "--max-time", "5", f"http://127.0.0.1:{env.public[1]}/events"],
                         capture_output=True, timeout=10, check=True).stdout
    assert out == b"".join(f"data: {i}\n\n".encode() for i in range(5))
