"""Proxy end to end: real WorkerPool <-> mTLS tunnel <-> Proxy <-> turnkey HTTP/1.1 server <-> http.client."""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import logging
import os
import threading
import time
from typing import Any

import pytest

from rhttp_wsgi.balancing import by_common_name
from tests.h2peer import Request, WorkerPeer

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


def test_round_trip(env: Env) -> None:
    env.start_proxy()
    env.start_worker(echo_app)
    status, headers, body, _ = env.request("GET", "/hello?x=1", headers={"Host": "example.com"})
    assert status == 200
    assert body == b""
    assert headers["x-echo-method"] == "GET"
    assert headers["x-echo-path"] == "/hello"
    assert headers["x-echo-query"] == "x=1"
    assert headers["x-echo-host"] == "example.com"
    assert headers["x-echo-scheme"] == "http"
    assert headers["x-echo-h-x-forwarded-for"] == "127.0.0.1"
    assert headers["x-echo-h-x-forwarded-proto"] == "http"
    assert headers["x-echo-h-x-forwarded-host"] == "example.com"
    [w] = env.proxy.workers()
    assert w.common_name == "worker"
    assert w.total == 1 and w.in_flight == 0
    assert w.remote_addr[0] == "127.0.0.1"
    assert w.max_concurrent_streams == 100
    assert w.certificate.subject.rfc4514_string() == "CN=worker"


def test_keep_alive_many_requests_one_connection(env: Env) -> None:
    env.start_proxy()
    env.start_worker(hello_app)
    c = env.conn()
    for _ in range(20):
        c.request("GET", "/")
        r = c.getresponse()
        assert r.status == 200 and r.read() == b"hello"


def test_post_body(env: Env) -> None:
    env.start_proxy()
    env.start_worker(echo_app)
    status, headers, body, _ = env.request("POST", "/upload", body=b"payload-123",
                                           headers={"Content-Type": "text/plain"})
    assert status == 200
    assert body == b"payload-123"
    assert headers["x-echo-content-length"] == "11"


def test_fifty_concurrent(env: Env) -> None:
    env.start_proxy()
    env.start_worker(echo_app, threads=16, connections=2)

    def one(i: int) -> bytes:
        c = http.client.HTTPConnection(*env.public, timeout=WAIT)
        try:
            c.request("POST", f"/c/{i}", body=f"body-{i}".encode())
            r = c.getresponse()
            assert r.status == 200
            return r.read()
        finally:
            c.close()

    with concurrent.futures.ThreadPoolExecutor(50) as ex:
        results = list(ex.map(one, range(50)))
    assert results == [f"body-{i}".encode() for i in range(50)]
    assert sum(w.total for w in env.proxy.workers()) == 50


def test_no_worker_503_with_retry_after(env: Env) -> None:
    env.start_proxy(retry_after=7)
    status, headers, body, _ = env.request("GET", "/")
    assert status == 503
    assert headers["retry-after"] == "7"
    assert b"no worker" in body


def test_selector_by_common_name(env: Env) -> None:
    env.start_proxy(selector=by_common_name("X-Tenant"))
    env.start_worker(lambda e, s: (s("200 OK", [("X-Who", "alpha")]), [b"alpha"])[1], "alpha")
    env.start_worker(lambda e, s: (s("200 OK", [("X-Who", "beta")]), [b"beta"])[1], "beta")
    assert {w.common_name for w in env.proxy.workers()} == {"alpha", "beta"}
    for tenant in ("alpha", "beta", "beta", "alpha"):
        status, _, body, _ = env.request("GET", "/", headers={"X-Tenant": tenant})
        assert status == 200 and body == tenant.encode()
    status, _, _, _ = env.request("GET", "/", headers={"X-Tenant": "gamma"})
    assert status == 503
    status, _, _, _ = env.request("GET", "/")
    assert status == 503


def test_custom_callable_selector_none_is_503(env: Env) -> None:
    seen: list[int] = []

    def sel(environ: dict[str, Any], workers: list[Any]) -> Any:
        seen.append(len(workers))
        return workers[0] if environ.get("PATH_INFO") == "/ok" else None

    env.start_proxy(selector=sel)
    env.start_worker(hello_app)
    assert env.request("GET", "/ok")[0] == 200
    assert env.request("GET", "/no")[0] == 503
    assert seen == [1, 1]


def test_worker_detach_mid_request_is_502(env: Env) -> None:
    env.start_proxy()
    entered = threading.Event()
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        entered.set()
        release.wait(WAIT)
        start_response("200 OK", [])
        return [b"late"]

    pool = env.start_worker(app)
    result: dict[str, Any] = {}

    def client() -> None:
        status, _, body, _ = env.request("GET", "/slow")
        result["status"], result["body"] = status, body

    t = threading.Thread(target=client)
    t.start()
    assert entered.wait(WAIT)
    t0 = time.monotonic()
    # The worker dies with the request in flight (deadline 0: tunnels closed at once).
    pool.shutdown(0.05)
    t.join(WAIT)
    release.set()
    assert result["status"] == 502
    assert time.monotonic() - t0 < 2.0
    assert wait_until(lambda: env.proxy.workers() == [])


def test_shutdown_drains_in_flight_and_is_idempotent(env: Env) -> None:
    proxy = env.start_proxy()
    entered = threading.Event()
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        entered.set()
        release.wait(WAIT)
        start_response("200 OK", [])
        return [b"finished"]

    env.start_worker(app)
    result: dict[str, Any] = {}

    def client() -> None:
        status, _, body, _ = env.request("GET", "/slow")
        result["status"], result["body"] = status, body

    t = threading.Thread(target=client)
    t.start()
    assert entered.wait(WAIT)
    done: dict[str, bool] = {}
    s = threading.Thread(target=lambda: done.setdefault("ok", proxy.shutdown(5.0)))
    s.start()
    # New connections are refused once the listener is closed.
    assert wait_until(lambda: _refused(env.public))
    release.set()
    t.join(WAIT)
    s.join(WAIT)
    assert result == {"status": 200, "body": b"finished"}
    assert done["ok"] is True
    assert proxy.shutdown(1.0) is True  # idempotent
    assert proxy.workers() == []


def _refused(addr: tuple[str, int]) -> bool:
    import socket

    try:
        s = socket.create_connection(addr, timeout=1.0)
    except OSError:
        return True
    s.close()
    return False


def test_sse_streaming_chunk_by_chunk(env: Env) -> None:
    env.start_proxy()
    gates = [threading.Event() for _ in range(5)]

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])

        def gen() -> Any:
            for i, gate in enumerate(gates):
                yield f"data: tick {i}\n\n".encode()
                # chunk i+1 is produced only after the client has read chunk i
                if not gate.wait(WAIT):
                    raise AssertionError(f"client never confirmed chunk {i}")
        return gen()

    env.start_worker(app)
    s = env.raw()
    s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    buf = b""
    s.settimeout(WAIT)
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    head, _, buf = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in head.lower()
    for i, gate in enumerate(gates):
        want = f"data: tick {i}\n\n".encode()
        while want not in buf:
            data = s.recv(4096)
            assert data, "connection closed early"
            buf += data
        gate.set()
    while not buf.endswith(b"0\r\n\r\n"):
        buf += s.recv(4096)


def test_public_cancel_reaches_worker(env: Env) -> None:
    env.start_proxy()
    cancelled = threading.Event()
    started = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        ev = environ["rhttp.cancelled"]

        def gen() -> Any:
            started.set()
            while not ev.wait(0.02):
                yield b"x" * 1024
            cancelled.set()
        return gen()

    env.start_worker(app)
    s = env.raw()
    s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert started.wait(WAIT)
    assert s.recv(100)
    s.close()
    assert cancelled.wait(WAIT), "the worker never saw the cancellation"
    assert wait_until(lambda: env.proxy.workers()[0].in_flight == 0)


def test_client_gone_while_waiting_for_headers_cancels(env: Env) -> None:
    env.start_proxy()
    cancelled = threading.Event()
    entered = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        entered.set()
        if environ["rhttp.cancelled"].wait(WAIT):
            cancelled.set()
        start_response("200 OK", [])
        return [b""]

    env.start_worker(app)
    s = env.raw()
    s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    assert entered.wait(WAIT)
    s.close()
    assert cancelled.wait(WAIT)


def test_two_mib_response(env: Env) -> None:
    env.start_proxy()
    blob = os.urandom(2 << 20)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Length", str(len(blob)))])
        return [blob]

    env.start_worker(app)
    status, headers, body, _ = env.request("GET", "/big")
    assert status == 200
    assert headers["content-length"] == str(len(blob))
    assert hashlib.sha256(body).digest() == hashlib.sha256(blob).digest()


def test_one_mib_request(env: Env) -> None:
    env.start_proxy()
    env.start_worker(echo_app)
    blob = os.urandom(1 << 20)
    status, headers, body, _ = env.request("PUT", "/up", body=blob)
    assert status == 200
    assert headers["x-echo-length"] == str(len(blob))
    assert body == blob


def test_chunked_upload_through_turnkey_server(env: Env) -> None:
    env.start_proxy()
    env.start_worker(echo_app)
    parts = [os.urandom(1000 + i * 7919) for i in range(20)]
    c = env.conn()
    c.request("POST", "/chunked", body=iter(parts), encode_chunked=True)
    r = c.getresponse()
    body = r.read()
    assert r.status == 200
    assert body == b"".join(parts)
    assert r.getheader("x-echo-content-length") == ""  # streamed with unknown length


def test_public_peer_cancel_mid_response(env: Env) -> None:
    """The client reads part of a large response and hangs up; the proxy recovers."""
    env.start_proxy()
    blob = b"y" * (8 << 20)
    cancelled = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Length", str(len(blob)))])

        def gen() -> Any:
            try:
                for i in range(0, len(blob), 65536):
                    yield blob[i:i + 65536]
            finally:
                if environ["rhttp.cancelled"].is_set():
                    cancelled.set()
        return gen()

    env.start_worker(app)
    s = env.raw()
    s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    got = 0
    while got < 256 * 1024:
        data = s.recv(65536)
        assert data
        got += len(data)
    s.close()
    assert cancelled.wait(WAIT)
    assert wait_until(lambda: env.proxy.workers()[0].in_flight == 0)
    status, _, body, _ = env.request("GET", "/big")
    assert status == 200 and len(body) == len(blob)


def test_hop_by_hop_stripping(env: Env) -> None:
    env.start_proxy()
    env.start_worker(echo_app)
    status, headers, _, _ = env.request("GET", "/", headers={
        "Connection": "keep-alive, X-Secret",
        "X-Secret": "drop-me",
        "Keep-Alive": "timeout=5",
        "TE": "trailers, deflate",
        "Proxy-Authorization": "Basic Zm9v",
        "Upgrade": "websocket",
        "X-Kept": "yes",
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Proto": "https",
    })
    assert status == 200
    assert headers["x-echo-h-x-kept"] == "yes"
    assert headers["x-echo-h-te"] == "trailers"
    for name in ("x-secret", "keep-alive", "proxy-authorization", "upgrade", "connection"):
        assert f"x-echo-h-{name}" not in headers, name
    assert headers["x-echo-h-x-forwarded-for"] == "127.0.0.1"  # client's copy replaced
    assert headers["x-echo-h-x-forwarded-proto"] == "http"


def test_trust_forwarded_appends(env: Env) -> None:
    env.start_proxy(trust_forwarded=True)
    env.start_worker(echo_app)
    _, headers, _, _ = env.request("GET", "/", headers={"X-Forwarded-For": "203.0.113.9",
                                                        "X-Forwarded-Proto": "https"})
    assert headers["x-echo-h-x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert headers["x-echo-h-x-forwarded-proto"] == "https"
    assert headers["x-echo-scheme"] == "https"


def test_host_path_query_passthrough(env: Env) -> None:
    env.start_proxy()
    env.start_worker(echo_app)
    _, headers, _, _ = env.request("GET", "/a%2Fb/caf%C3%A9/x%20y?q=1&r=%2F&s",
                                   headers={"Host": "api.example:8443"})
    assert headers["x-echo-raw-uri"] == "/a%2Fb/caf%C3%A9/x%20y?q=1&r=%2F&s"
    assert headers["x-echo-query"] == "q=1&r=%2F&s"
    assert headers["x-echo-host"] == "api.example:8443"
    assert headers["x-echo-path"] == "/a/b/caf\\xe9/x y"  # app escapes non-ASCII


def test_bad_header_value_is_400(env: Env) -> None:
    env.start_proxy()
    env.start_worker(echo_app)
    # h11 rejects raw CR/LF itself; a NUL is what reaches the forwarder.
    s = env.raw()
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n")
    data = read_until_close(s)
    assert data.startswith(b"HTTP/1.1 400")


def test_round_robin_distribution(env: Env) -> None:
    env.start_proxy(selector="round-robin")

    def named(n: str) -> Any:
        return lambda e, s: (s("200 OK", []), [n.encode()])[1]

    env.start_worker(named("alpha"), "alpha")
    env.start_worker(named("beta"), "beta")
    env.start_worker(named("worker"), "worker")
    bodies = [env.request("GET", "/")[2] for _ in range(9)]
    assert sorted(set(bodies)) == [b"alpha", b"beta", b"worker"]
    assert bodies[0:3] == bodies[3:6] == bodies[6:9]


def test_least_in_flight_distribution(env: Env) -> None:
    env.start_proxy()  # least-in-flight is the default
    release = threading.Event()
    entered: dict[str, threading.Event] = {"alpha": threading.Event(), "beta": threading.Event()}

    def named(n: str) -> Any:
        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            if environ["PATH_INFO"] == "/hold":
                entered[n].set()
                release.wait(WAIT)
            start_response("200 OK", [])
            return [n.encode()]
        return app

    env.start_worker(named("alpha"), "alpha")
    env.start_worker(named("beta"), "beta")
    # Hold one request on some worker; every following request must go to the other.
    t = threading.Thread(target=lambda: env.request("GET", "/hold"))
    t.start()
    assert wait_until(lambda: any(e.is_set() for e in entered.values()))
    busy = "alpha" if entered["alpha"].is_set() else "beta"
    other = "beta" if busy == "alpha" else "alpha"
    for _ in range(5):
        assert env.request("GET", "/")[2] == other.encode()
    release.set()
    t.join(WAIT)
    # Idle again: ties rotate, both get work.
    assert {env.request("GET", "/")[2] for _ in range(4)} == {b"alpha", b"beta"}


def test_response_headers_and_repeated_set_cookie(env: Env) -> None:
    env.start_proxy()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("201 Created", [
            ("Set-Cookie", "a=1; Path=/"),
            ("Set-Cookie", "b=2; HttpOnly"),
            ("X-Custom", "value with spaces"),
            ("Cache-Control", "private"),
            ("Location", "/new/thing"),
        ])
        return [b"made"]

    env.start_worker(app)
    status, _, body, r = env.request("POST", "/make", body=b"")
    assert status == 201 and body == b"made"
    assert r.headers.get_all("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]
    assert r.getheader("X-Custom") == "value with spaces"
    assert r.getheader("Location") == "/new/thing"
    assert r.getheader("Cache-Control") == "private"


def test_head_request(env: Env) -> None:
    env.start_proxy()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "5"), ("Content-Type", "text/plain")])
        return [b"hello"]

    env.start_worker(app)
    c = env.conn()
    c.request("HEAD", "/")
    r = c.getresponse()
    assert r.status == 200 and r.read() == b"" and r.getheader("content-length") == "5"
    c.request("GET", "/")
    r = c.getresponse()
    assert r.read() == b"hello"


def test_gateway_timeout_504(env: Env) -> None:
    env.start_proxy(response_timeout=0.3)
    release = threading.Event()
    cancelled = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["rhttp.cancelled"].wait(WAIT):
            cancelled.set()
        release.wait(WAIT)
        start_response("200 OK", [])
        return [b""]

    env.start_worker(app)
    t0 = time.monotonic()
    status, _, _, _ = env.request("GET", "/slow")
    assert status == 504
    assert time.monotonic() - t0 < 2.0
    assert cancelled.wait(WAIT)  # the worker's stream was reset
    release.set()


def test_truncation_visible_to_http11_client(env: Env) -> None:
    """The worker dies after the headers: no terminating chunk, the connection closes."""
    env.start_proxy()
    sent_first = threading.Event()
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])

        def gen() -> Any:
            yield b"first-part"
            sent_first.set()
            release.wait(WAIT)
            raise RuntimeError("worker app failed mid-body")  # -> RST_STREAM(INTERNAL_ERROR)
        return gen()

    env.start_worker(app)
    s = env.raw()
    s.sendall(b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n")
    buf = b""
    while b"first-part" not in buf:
        data = s.recv(4096)
        assert data
        buf += data
    release.set()
    buf += read_until_close(s)
    head, _, body = buf.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"first-part" in body
    assert not body.endswith(b"0\r\n\r\n"), body


def test_truncation_with_content_length(env: Env) -> None:
    env.start_proxy()
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Length", "100")])

        def gen() -> Any:
            yield b"x" * 10
            release.wait(WAIT)
            raise RuntimeError("boom")
        return gen()

    env.start_worker(app)
    c = env.conn()
    c.request("GET", "/")
    r = c.getresponse()
    assert r.status == 200
    release.set()
    with pytest.raises(http.client.IncompleteRead):
        r.read()


def test_attach_hook_refusal(env: Env) -> None:
    attached: list[str] = []
    detached: list[str] = []
    refused = threading.Event()

    def on_attach(w: Any) -> bool:
        attached.append(w.common_name)
        if w.common_name == "beta":
            refused.set()
            return False
        return True

    env.start_proxy(on_attach=on_attach, on_detach=lambda w: detached.append(w.common_name))
    env.start_worker(hello_app, "alpha")
    env.start_worker(hello_app, "beta", wait=False)
    assert refused.wait(WAIT)
    assert [w.common_name for w in env.proxy.workers()] == ["alpha"]
    for _ in range(3):
        assert env.request("GET", "/")[0] == 200
    assert [w.common_name for w in env.proxy.workers()] == ["alpha"]
    assert "beta" not in detached  # never attached, so never detached


def test_worker_stream_limit_respected(env: Env) -> None:
    env.start_proxy(stream_wait=5.0)
    lock = threading.Lock()
    state = {"now": 0, "max": 0}
    gate = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            if state["now"] == 2:
                gate.set()
        try:
            gate.wait(WAIT)  # hold until the limit is reached at least once
            time.sleep(0.05)
        finally:
            with lock:
                state["now"] -= 1
        start_response("200 OK", [])
        return [b"ok"]

    env.start_worker(app, max_concurrent_streams=2, threads=8)
    assert env.proxy.workers()[0].max_concurrent_streams == 2
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        results = list(ex.map(lambda i: env.request("GET", f"/{i}")[0], range(6)))
    assert results == [200] * 6
    assert state["max"] == 2


def test_stream_limit_wait_then_503(env: Env) -> None:
    env.start_proxy(stream_wait=0.2)
    release = threading.Event()
    entered = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        entered.set()
        release.wait(WAIT)
        start_response("200 OK", [])
        return [b"ok"]

    env.start_worker(app, max_concurrent_streams=1)
    t = threading.Thread(target=lambda: env.request("GET", "/a"))
    t.start()
    assert entered.wait(WAIT)
    status, headers, _, _ = env.request("GET", "/b")
    assert status == 503 and "retry-after" in headers
    release.set()
    t.join(WAIT)


def test_header_list_above_the_workers_limit_is_431_at_the_proxy(env: Env) -> None:
    """The proxy answers 431 itself instead of making the worker drop its tunnel (HPACK)."""
    env.start_proxy()
    pool = env.start_worker(hello_app, max_header_list_size=4096)
    headers = {f"x-h{i}": "v" * 40 for i in range(500)}  # ~38 KiB in RFC 9113 accounting, > 4x the limit
    status, _, _, _ = env.request("GET", "/", headers=headers)
    assert status == 431
    assert env.request("GET", "/")[0] == 200
    assert pool.tunnels()[0].reconnects == 0


@pytest.mark.parametrize("whole", [True, False], ids=["complete-response", "streamed-response"])
def test_response_header_http11_cannot_carry_is_502(env: Env, caplog: pytest.LogCaptureFixture,
                                                     whole: bool) -> None:
    """A value valid in HTTP/2 but not in HTTP/1.1 (VT, FF): the client gets a 502 and the log says why."""
    caplog.set_level(logging.WARNING, "rhttp_wsgi")

    def responder(w: WorkerPeer, sid: int, req: Request) -> None:
        headers = [(b":status", b"200"), (b"x-vt", b"a\x0bb")]
        if whole:
            w.send_frame(w.headers_frame(sid, [*headers, (b"content-length", b"2")]),
                   w.data_frame(sid, b"ok", end_stream=True))
        else:  # headers first, the body later: the streamed path
            w.send_frame(w.headers_frame(sid, headers), w.data_frame(sid, b"o"))

    env.start_proxy()
    cert, key = env.pki.workers["worker"]
    w = WorkerPeer(env.tunnel_port, str(cert), str(key), str(env.pki.ca_cert), responder=responder)
    try:
        assert env.proxy.wait_for_workers(1, WAIT)
        s = env.raw()
        s.sendall(b"GET /vt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = read_until_close(s)
        assert out.startswith(b"HTTP/1.1 502 "), out[:300]
        assert b"\x0b" not in out
        text = " | ".join(r.getMessage() for r in caplog.records)
        assert "cannot be carried by HTTP/1.1" in text and "b'x-vt'" in text, text
        assert "after its headers were sent" not in text, text
    finally:
        w.close()
