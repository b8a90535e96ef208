"""The turnkey server's fast paths (issue 7): the forwarder's direct entry and one-write responses.

* ``build_request_h11`` (h11's headers -> HTTP/2) must give exactly what
  ``build_request`` gives for the environ ``public.py`` builds from the same
  request: hand-picked cases plus random header lists.
* ``PublicServer`` takes the direct entry only for a bare ``Forwarder``; a
  wrapped one (middleware) gets the plain WSGI call.
* Responses written without h11 (``_Response.single``/``respond``) keep h11's
  framing: pipelining, keep-alive, ``Connection: close`` for HTTP/1.0 and
  ``Connection: close`` requests, HEAD, 204, and h11's errors for what it
  refuses.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import h11
import pytest

from rhttp_wsgi.forwarder import BadRequest, Forwarder, build_request, build_request_h11
from rhttp_wsgi.public import PublicServer, _Connection, _header_items

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server() -> Iterator[PublicServer]:
    s = PublicServer(lambda e, sr: [], ("127.0.0.1", 0))
    try:
        yield s
    finally:
        s.shutdown(0)


def _parse(server: PublicServer, raw: bytes) -> tuple[dict[str, Any], list[tuple[bytes, bytes]]]:
    with socket.create_server(("127.0.0.1", 0)) as lsn:
        b = socket.create_connection(lsn.getsockname())
        a, _ = lsn.accept()
    try:
        c = _Connection(server, a, ("192.0.2.7", 40000))
        c.h11.receive_data(raw)
        ev = c.h11.next_event()
        assert isinstance(ev, h11.Request), ev
        c.request_headers = _header_items(ev.headers)
        return c._environ(ev), c.request_headers
    finally:
        a.close()
        b.close()


def _same(server: PublicServer, raw: bytes) -> None:
    environ, items = _parse(server, raw)
    for trusted in (False, True):
        opts: Any = SimpleNamespace(trust_forwarded=trusted)  # all the mapping reads
        try:
            want: Any = build_request(environ, opts)
        except BadRequest as e:
            want = ("BadRequest", e.status)
        try:
            got: Any = build_request_h11(environ, items, opts)
        except BadRequest as e:
            got = ("BadRequest", e.status)
        assert got == want, (raw, trusted)


CASES = [
    b"GET / HTTP/1.1\r\nHost: a.example\r\nUser-Agent: t\r\n\r\n",
    b"GET /p%2Fq?x=1&y=%20 HTTP/1.1\r\nHost: a.example:8080\r\n\r\n",
    b"GET http://other.example:81/abs?q HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"GET /frag#x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nabc",
    b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTE: trailers, deflate;q=0.5\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Type: \r\nContent-Type: b\r\nX-A: 1\r\nx-a: 2\r\nX-B: 3\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nCookie: a=1\r\nX-Z: z\r\nCookie: b=2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret, cookie\r\nX-Secret: s\r\nCookie: c=1\r\n"
    b"Keep-Alive: 5\r\nUpgrade: h2c\r\nHTTP2-Settings: x\r\nExpect: 100-continue\r\nProxy-Authorization: p\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX_Under: 1\r\nX-Under: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n"
    b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: pub.example\r\nForwarded: for=x\r\nX-Real-IP: 1.2.3.4\r\n"
    b"X-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /p\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-forwarded-for\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Latin: caf\xe9\r\nX-Ctl: a\x01b\r\n\r\n",
]


@pytest.mark.parametrize("raw", CASES, ids=range(len(CASES)))
def test_build_request_h11_matches_build_request(server: PublicServer, raw: bytes) -> None:
    _same(server, raw)


def test_build_request_h11_random(server: PublicServer) -> None:
    rng = random.Random(7)
    names = [b"X-A", b"x-a", b"Cookie", b"Content-Type", b"Connection", b"TE", b"X-Forwarded-For",
             b"X-Forwarded-Proto", b"X-Forwarded-Host", b"Forwarded", b"Keep-Alive", b"Accept", b"X_B",
             b"X-B", b"Upgrade", b"Proxy-Authenticate", b"Expect", b"Trailer", b"Via"]
    values = [b"", b"1", b"a, b", b"x-a", b"close", b"trailers", b"gzip;q=1, trailers", b"X-B, cookie",
              b"\xe9t\xe9", b"a b\tc", b"10.1.2.3"]
    for _ in range(600):
        lines = [b"Host: h.example"]
        for _ in range(rng.randrange(0, 9)):
            lines.append(rng.choice(names) + b": " + rng.choice(values))
        raw = b"GET /r?" + str(rng.random()).encode() + b" HTTP/1.1\r\n" + b"\r\n".join(lines) + b"\r\n\r\n"
        _same(server, raw)


def test_direct_entry_only_for_a_bare_forwarder() -> None:
    fwd = Forwarder(registry=None, options=SimpleNamespace())  # type: ignore[arg-type]
    bare = PublicServer(fwd, ("127.0.0.1", 0))
    wrapped = PublicServer(lambda e, sr: fwd(e, sr), ("127.0.0.1", 0))
    try:
        assert bare.direct is not None and bare.direct == fwd.public_direct
        assert wrapped.direct is None
    finally:
        bare.shutdown(0)
        wrapped.shutdown(0)


# -- one-write responses, end to end on a generic app -------------------------------------


def _serve(app: Callable[..., Any]) -> Iterator[tuple[str, int]]:
    s = PublicServer(app, ("127.0.0.1", 0), idle_timeout=5.0, header_timeout=5.0)
    try:
        yield s.start()
    finally:
        s.shutdown(2.0)


def _exchange(addr: tuple[str, int], raw: bytes) -> bytes:
    with socket.create_connection(addr, timeout=5) as c:
        c.sendall(raw)
        out = b""
        while True:
            d = c.recv(65536)
            if not d:
                return out
            out += d


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    path = environ["PATH_INFO"]
    if path == "/204":
        start_response("204 No Content", [("X-A", "1")])
        return [b""]
    if path == "/bad-value":
        start_response("200 OK", [("X-A", " lead")])
        return [b"x"]
    if path == "/short":
        start_response("200 OK", [("Content-Length", "10")])
        return [b"abc"]
    if path == "/nolength":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello " + environ["REQUEST_METHOD"].encode()]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


@pytest.fixture
def addr() -> Iterator[tuple[str, int]]:
    yield from _serve(_app)


def test_pipelined_keep_alive_then_close(addr: tuple[str, int]) -> None:
    out = _exchange(addr, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /nolength HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"POST /3 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                          b"GET /4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK\r\n") == 4, out
    assert b"content-length: 9\r\n\r\nhello GET" in out
    assert out.lower().count(b"connection: close") == 1 and out.endswith(b"hello")


def test_http10_gets_connection_close(addr: tuple[str, int]) -> None:
    out = _exchange(addr, b"GET / HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close" in out.lower()
    assert out.endswith(b"\r\n\r\nhello")


def test_head_and_204(addr: tuple[str, int]) -> None:
    out = _exchange(addr, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET /204 HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"HEAD /nolength HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head1, rest = out.split(b"\r\n\r\n", 1)
    assert head1.startswith(b"HTTP/1.1 200") and b"content-length: 5" in head1.lower()
    assert rest.startswith(b"HTTP/1.1 204 No Content\r\n")
    head2, rest = rest.split(b"\r\n\r\n", 1)
    assert b"content-length" not in head2.lower()
    # a length-less HEAD answer is framed by h11 (as its GET would be): chunked, no body
    assert rest.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in rest.lower()
    assert rest.endswith(b"\r\n\r\n")


def test_h11_still_refuses_what_it_refuses(addr: tuple[str, int]) -> None:
    # invalid header value / body shorter than its Content-Length: nothing written, connection closed
    assert _exchange(addr, b"GET /bad-value HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    assert _exchange(addr, b"GET /short HTTP/1.1\r\nHost: x\r\n\r\n") == b""
