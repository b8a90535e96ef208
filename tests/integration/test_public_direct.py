"""The turnkey server's one-write responses, and the one request builder behind it.

* ``build_request`` (the forwarder's only request builder, from the neutral
  header list of the environ) gives, for a request the turnkey server parsed,
  exactly what a plain reference computes from h11's header list: hand-picked
  cases plus random header lists.
* A :class:`CompleteResponse` goes out in one write only while the status and
  headers that reached ``start_response`` are the ones it carries: middleware
  that changes them gets its change on the wire.
* Responses written without h11 (``_Response.single``/``write_complete``) keep
  h11's framing: pipelining, keep-alive, ``Connection: close`` for HTTP/1.0 and
  ``Connection: close`` requests, HEAD, 204, and h11's errors for what it
  refuses.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Callable, Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import h11
import pytest

from rhttp_wsgi._http import CompleteResponse, h1_block
from rhttp_wsgi.forwarder import BadRequest, _authority, _content_length, _request_path, build_request
from rhttp_wsgi.options import ProxyOptions
from rhttp_wsgi.public import PublicServer, _Connection, _header_items, _Response

pytestmark = pytest.mark.timeout(60)

OPTIONS = ProxyOptions(cert="c", key="k", workers_ca="ca", header_timeout=5.0, idle_timeout=5.0)


@pytest.fixture
def server() -> Iterator[PublicServer]:
    s = PublicServer(lambda e, sr: [], ("127.0.0.1", 0), options=OPTIONS)
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


_DROP = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"trailer",
         b"proxy-authenticate", b"proxy-authorization", b"host", b"expect", b"http2-settings"}
_FORWARDING = {b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
               b"x-forwarded-prefix", b"x-real-ip"}


def _reference(environ: Mapping[str, Any], items: list[tuple[bytes, bytes]], trusted: bool
               ) -> tuple[str, list[tuple[bytes, bytes]], int | None]:
    """The HTTP/2 request for h11's ``items``, computed plainly (what the turnkey server's own
    mapping gave before the two builders became one)."""
    method = str(environ["REQUEST_METHOD"])
    if method == "CONNECT":
        raise BadRequest(405, "CONNECT is not supported")
    scheme = str(environ.get("wsgi.url_scheme", "http"))
    authority = _authority(environ, scheme)
    path = _request_path(environ)
    length = _content_length(environ)
    # The fields as the environ holds them: repeated ones joined with ", ",
    # Content-Type last wins, names with "_" left out, Cookie joined with "; " and last.
    fields: dict[bytes, bytes] = {}
    cookies: list[bytes] = []
    for name, value in items:
        if name == b"cookie":
            cookies.append(value)
        elif name == b"content-type":
            fields[name] = value
        elif name == b"content-length" or b"_" in name:
            continue
        else:
            prev = fields.get(name)
            fields[name] = value if prev is None else prev + b", " + value
    if cookies:
        fields[b"cookie"] = b"; ".join(cookies)
    conn = fields.get(b"connection")
    tokens = {t.strip().lower() for t in conn.split(b",") if t.strip()} if conn is not None else set()
    te = fields.get(b"te")
    te_trailers = te is not None and b"trailers" in {t.split(b";")[0].strip().lower() for t in te.split(b",")}
    headers = [(b":method", method.encode()), (b":scheme", scheme.encode()), (b":authority", authority),
               (b":path", path)]
    client_xff: bytes | None = None
    client_proto = client_host = False
    for name, value in fields.items():
        if name in _DROP or name in tokens or (name == b"content-type" and not value):
            continue
        if name in _FORWARDING:
            if not trusted:
                continue
            if name == b"x-forwarded-for":
                client_xff = value.strip(b" \t")
                continue
            client_proto = client_proto or name == b"x-forwarded-proto"
            client_host = client_host or name == b"x-forwarded-host"
        headers.append((name, value.strip(b" \t")))
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    if te_trailers:
        headers.append((b"te", b"trailers"))
    addr = str(environ["REMOTE_ADDR"]).encode()
    headers.append((b"x-forwarded-for", client_xff + b", " + addr if client_xff else addr))
    if not client_proto:
        headers.append((b"x-forwarded-proto", scheme.encode()))
    if not client_host:
        headers.append((b"x-forwarded-host", authority))
    return method, headers, length


def _same(server: PublicServer, raw: bytes) -> None:
    try:
        environ, items = _parse(server, raw)
    except BadRequest as e:  # the turnkey server refuses it itself (no environ)
        assert e.status == 400, raw
        return
    for trusted in (False, True):
        opts: Any = SimpleNamespace(trust_forwarded=trusted)  # all the mapping reads
        try:
            want: Any = _reference(environ, items, trusted)
        except BadRequest as e:
            want = ("BadRequest", e.status)
        try:
            got: Any = build_request(environ, opts)
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
def test_build_request_matches_the_reference_mapping(server: PublicServer, raw: bytes) -> None:
    _same(server, raw)


def test_build_request_random(server: PublicServer) -> None:
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


# -- one-write responses, end to end on a generic app -------------------------------------


def _serve(app: Callable[..., Any]) -> Iterator[tuple[str, int]]:
    s = PublicServer(app, ("127.0.0.1", 0), options=OPTIONS)
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


def test_h11_still_refuses_what_it_refuses(addr: tuple[str, int], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "rhttp_wsgi.public")
    # invalid header value / body shorter than its Content-Length: nothing written, connection closed
    assert _exchange(addr, b"GET /bad-value HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    assert _exchange(addr, b"GET /short HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    # ... and the log says so (not that the headers went out)
    text = " | ".join(r.getMessage() for r in caplog.records)
    assert text.count("cannot be written as HTTP/1.1") == 2 and "after its headers were sent" not in text, text


def test_header_with_a_colon_in_its_name_is_not_written_as_another_header(addr: tuple[str, int]) -> None:
    """A name that is no token must not pass the block check as "name: value" of another header."""
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("X-A: injected", "1"), ("X-Nl", "a\r\nX-Injected: 1")])
        return [b"x"]

    for out in (_exchange(a, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") for a in _serve(app)):
        assert b"injected" not in out.lower()


# -- CompleteResponse through middleware ---------------------------------------------------


def _complete_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> CompleteResponse:
    fields = [(b"content-type", b"text/plain"), (b"content-length", b"5")]
    block = h1_block(fields)
    assert block is not None
    headers = [(k.decode(), v.decode()) for k, v in fields]
    result = CompleteResponse(200, "200 OK", tuple(headers), block, b"hello")
    start_response("200 OK", headers)
    return result


def _middleware(app: Callable[..., Any], add: bool) -> Callable[..., Any]:
    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        def sr(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if add:
                headers.append(("X-Added", "yes"))  # in place: a common middleware idiom
            return start_response(status, headers)
        return app(environ, sr)
    return wrapped


@pytest.mark.parametrize("add", [False, True], ids=["passes-through", "adds-a-header"])
def test_complete_response_one_write_only_while_headers_are_unchanged(monkeypatch: pytest.MonkeyPatch,
                                                                       add: bool) -> None:
    taken: list[bool] = []
    original = _Response.write_complete

    def spy(self: _Response, result: CompleteResponse) -> bool:
        ok = original(self, result)
        taken.append(ok)
        return ok

    monkeypatch.setattr(_Response, "write_complete", spy)
    for a in _serve(_middleware(_complete_app, add)):
        out = _exchange(a, b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK\r\n") == 2 and out.endswith(b"hello"), out
    assert out.lower().count(b"content-type: text/plain") == 2
    assert out.lower().count(b"x-added: yes") == (2 if add else 0)
    assert taken == [not add, not add]
