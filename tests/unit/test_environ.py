"""The WSGI environ built from a request's fields (``wsgi.build_environ``), without a tunnel.

The fast paths (the header-key and host-split caches, the context's static
environ) must never change what an app sees: each case is checked cold, then
from the caches.  A stand-in channel carries the fields.  (PEP 3333 over a
real tunnel, checked by ``wsgiref.validate``: ``tests/tunnel/test_pep3333.py``.)
"""

from __future__ import annotations

import threading
import types
from typing import Any

import pytest

from rhttp_wsgi import _http, wsgi


def _fake_channel(headers: list[tuple[bytes, bytes]]) -> Any:
    return types.SimpleNamespace(headers=headers, stream_id=1, cancelled=threading.Event(), trailers=None)


def _reference_http_environ(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The HTTP_* keys PEP 3333 / CGI give for ordinary (non-pseudo) request headers, computed plainly."""
    out: dict[str, str] = {}
    for name_b, value_b in headers:
        name, value = name_b.decode("latin-1"), value_b.decode("latin-1")
        if name.startswith(":") or "_" in name or name in ("content-length", "content-type", "cookie", "host"):
            continue
        key = "HTTP_" + name.upper().replace("-", "_")
        out[key] = out[key] + ", " + value if key in out else value
    return out


def test_header_key_cache_gives_the_same_environ_every_time() -> None:
    ctx = wsgi.WSGIContext(lambda e, s: [], remote_addr="10.0.0.1", remote_port=4321)
    base = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"host", b"h:8080")]
    extra = [(b"x-new-header-7a1", b"1"), (b"accept", b"a"), (b"x-new-header-7a1", b"2"), (b"accept", b"b"),
             (b"x_under", b"dropped"), (b"x-latin1", b"caf\xe9"), (b"cookie", b"a=1"), (b"cookie", b"b=2")]
    environs = [wsgi.build_environ(_fake_channel(base + extra), ctx) for _ in range(3)]  # cold, then cached
    expected = _reference_http_environ(extra)
    for env in environs:
        got = {k: v for k, v in env.items() if k.startswith("HTTP_") and k not in ("HTTP_HOST", "HTTP_COOKIE")}
        assert got == expected
        assert env["HTTP_X_NEW_HEADER_7A1"] == "1, 2" and env["HTTP_ACCEPT"] == "a, b"
        assert env["HTTP_COOKIE"] == "a=1; b=2"
        assert env["HTTP_HOST"] == "h:8080" and (env["SERVER_NAME"], env["SERVER_PORT"]) == ("h", "8080")
        assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("10.0.0.1", "4321")
        assert "HTTP_X_UNDER" not in env
    # each request gets its own dict, wsgi.input and wsgi.errors (nothing shared by the copy)
    assert environs[0] is not environs[1]
    assert environs[0]["wsgi.input"] is not environs[1]["wsgi.input"]
    assert environs[0]["wsgi.errors"] is not environs[1]["wsgi.errors"]
    environs[0]["HTTP_ACCEPT"] = "changed"
    assert wsgi.build_environ(_fake_channel(base + extra), ctx)["HTTP_ACCEPT"] == "a, b"
    assert "HTTP_ACCEPT" not in ctx.static_environ


def test_header_key_cache_is_bounded() -> None:
    ctx = wsgi.WSGIContext(lambda e, s: [])
    base = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")]
    for i in range(_http.HTTP_KEYS_MAX + 50):
        name = f"x-bound-{i}".encode()
        env = wsgi.build_environ(_fake_channel([*base, (name, b"v")]), ctx)
        assert env[f"HTTP_X_BOUND_{i}"] == "v"  # right even once the cache is full
    assert len(_http._HTTP_KEYS) <= _http.HTTP_KEYS_MAX
    for i in range(0, 600, 7):  # host split cache: bounded too, and right past the bound
        env = wsgi.build_environ(_fake_channel([*base, (b"host", f"h{i}:{i}".encode())]), ctx)
        assert (env["SERVER_NAME"], env["SERVER_PORT"]) == (f"h{i}", str(i))
    assert len(_http.HOST_SPLITS) <= _http.HOSTS_MAX


_PSEUDO = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a?b=1"), (b":authority", b"h")]


@pytest.mark.parametrize(("fields", "method", "target", "authority"), [
    ([*_PSEUDO, (b"accept", b"*/*"), (b"x-request-id", b"rid")], None, None, None),
    ([*_PSEUDO, (b"x-request-id", b"first"), (b"accept", b"*/*"), (b"x-request-id", b"rid")], None, None, None),
    ([*_PSEUDO, (b"x-request-id", b"rid"), (b"accept", b"*/*")], None, None, None),
    ([(b"x-request-id", b"rid")], b"GET", b"/", None),
    ([(b"host", b"h:1"), (b"accept", b"a"), (b"x-request-id", b"rid")], b"GET", b"/p?q", None),
    ([(b"host", b"h:1"), (b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"content-length", b"3")], b"POST", b"/",
     "auth:2"),
    ([(b"host", b"h"), (b"content-type", b"a"), (b"content-type", b"b"), (b"x_under", b"1")], b"OPTIONS", b"*", None),
], ids=["id-last", "id-twice", "id-not-last", "id-only", "http11", "cookies", "asterisk-form"])
def test_remembered_request_keys_equal_a_cold_build(fields: list[tuple[bytes, bytes]], method: bytes | None,
                                                    target: bytes | None, authority: str | None) -> None:
    """``request_environ`` remembers what a field list makes, with a last ``x-request-id`` (new on
    every request) left out and added on its own: every call equals a cold build (an iterator of
    the same fields, never remembered), whatever the request id."""
    for i in range(4):
        current = [(n, b"%s-%d" % (v, i)) if n == b"x-request-id" else (n, v) for n, v in fields]
        cold: dict[str, Any] = {"wsgi.url_scheme": "http"}
        cold_result = _http.request_environ(cold, iter(current), method, target, authority)
        warm: dict[str, Any] = {"wsgi.url_scheme": "http"}
        assert _http.request_environ(warm, current, method, target, authority) == cold_result
        assert warm == cold
        warm["HTTP_ACCEPT"] = "changed by the app"  # the app owns its environ: nothing leaks to the next


def test_requests_differing_only_in_the_request_line_are_told_apart() -> None:
    fields = [(b"host", b"h:1"), (b"accept", b"a"), (b"x-request-id", b"r")]
    for _ in range(2):
        for method, target, authority in ((b"GET", b"/a", None), (b"HEAD", b"/a", None), (b"GET", b"/b?x", None),
                                          (b"GET", b"/a", "other:2")):
            env: dict[str, Any] = {}
            _, host = _http.request_environ(env, fields, method, target, authority)
            assert (env["REQUEST_METHOD"], env["RAW_URI"], host) == (
                method.decode(), target.decode(), authority or "h:1")


@pytest.mark.parametrize("fields", [
    [*_PSEUDO, (b"content-length", b"x1")],
    [*_PSEUDO, (b"content-length", b"1"), (b"content-length", b"2"), (b"x-request-id", b"r")],
    [(b":method", b"CONNECT"), (b":authority", b"h:1")],
    [(b":method", b"GET"), (b":path", b"no-slash"), (b"x-request-id", b"r")],
])
def test_bad_requests_are_refused_every_time(fields: list[tuple[bytes, bytes]]) -> None:
    for _ in range(3):
        with pytest.raises(_http.BadRequest):
            _http.request_environ({}, fields)


def test_remembered_request_keys_are_bounded() -> None:
    for i in range(_http.ENVIRONS_MAX + 40):
        env: dict[str, Any] = {}
        _http.request_environ(env, [*_PSEUDO, (b"x-bound", b"%d" % i), (b"x-request-id", b"r")])
        assert env["HTTP_X_BOUND"] == str(i) and env["HTTP_X_REQUEST_ID"] == "r"
        assert len(_http._ENVIRONS) <= _http.ENVIRONS_MAX
    _http._ENVIRONS.clear()
    big = [*_PSEUDO, (b"x-big", b"v" * _http.ENVIRONS_MAX_BYTES)]
    many = [*_PSEUDO, *[(b"x-f%d" % i, b"v") for i in range(_http.ENVIRONS_MAX_FIELDS)]]
    for fields in (big, many):
        env = {}
        _http.request_environ(env, fields)
        assert env["PATH_INFO"] == "/a"
    assert not _http._ENVIRONS  # too large to remember


@pytest.mark.parametrize(("host", "scheme", "name", "port"), [
    ("example.com", "http", "example.com", "80"),
    ("example.com", "https", "example.com", "443"),
    ("example.com:8080", "https", "example.com", "8080"),
    ("[::1]:8443", "http", "[::1]", "8443"),
    ("[::1]", "https", "[::1]", "443"),
    ("[::1]:", "http", "[::1]", "80"),
    ("example.com:", "http", "example.com:", "80"),
    ("example.com:\xb2", "http", "example.com:\xb2", "80"),  # SUPERSCRIPT TWO isdigit(), not a port
    ("example.com:x1", "https", "example.com:x1", "443"),
])
def test_server_name_and_port_from_host(host: str, scheme: str, name: str, port: str) -> None:
    ctx = wsgi.WSGIContext(lambda e, s: [], url_scheme="pseudo")
    for _ in range(2):  # cold, then from the cache: the port default depends on the scheme, not the cache
        for sch, default in (("http", "80"), ("https", "443")):
            headers = [(b":method", b"GET"), (b":scheme", sch.encode()), (b":path", b"/"),
                       (b"host", host.encode("latin-1"))]
            env = wsgi.build_environ(_fake_channel(headers), ctx)
            assert env["SERVER_NAME"] == name
            assert env["SERVER_PORT"] == (port if port not in ("80", "443") else default)
            assert type(env["SERVER_PORT"]) is str
    del scheme


@pytest.mark.parametrize(("path", "path_info", "query"), [
    (b"/plain/path", "/plain/path", ""),
    (b"/a%20b/%2F?x=%20", "/a b//", "x=%20"),
    (b"/caf\xc3\xa9?", "/caf\xc3\xa9", ""),
    (b"/%zz%4", "/%zz%4", ""),  # malformed escapes stay as they are
    (b"/?a?b", "/", "a?b"),
])
def test_path_info_and_query(path: bytes, path_info: str, query: str) -> None:
    ctx = wsgi.WSGIContext(lambda e, s: [])
    env = wsgi.build_environ(_fake_channel([(b":method", b"GET"), (b":scheme", b"https"), (b":path", path)]), ctx)
    assert env["PATH_INFO"] == path_info and env["QUERY_STRING"] == query
    assert env["RAW_URI"] == env["REQUEST_URI"] == path.decode("latin-1")


@pytest.mark.parametrize("value", [b"\xb2", b"1\xb9", b"", b" 1", b"-1", b"0x1"])
def test_content_length_must_be_ascii_digits(value: bytes) -> None:
    ctx = wsgi.WSGIContext(lambda e, s: [])
    headers = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/"), (b"content-length", value)]
    with pytest.raises(wsgi.BadRequest) as e:
        wsgi.build_environ(_fake_channel(headers), ctx)
    assert e.value.status == 400


def test_context_peer_attributes_stay_in_the_environ() -> None:
    draining = threading.Event()
    ctx = wsgi.WSGIContext(lambda e, s: [], remote_addr="192.0.2.1", remote_port=5, peer_certificate="cert",
                           draining=draining, multiprocess=True)
    headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")]
    env = wsgi.build_environ(_fake_channel(headers), ctx)
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("192.0.2.1", "5")
    assert env["rhttp.peer_certificate"] == "cert" and env["rhttp.draining"] is draining
    assert env["wsgi.multiprocess"] is True
    other = threading.Event()
    ctx.remote_addr, ctx.remote_port, ctx.peer_certificate, ctx.draining = "192.0.2.2", 6, None, other
    assert (ctx.remote_addr, ctx.remote_port, ctx.peer_certificate, ctx.draining) == ("192.0.2.2", 6, None, other)
    env = wsgi.build_environ(_fake_channel(headers), ctx)
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("192.0.2.2", "6")
    assert env["rhttp.peer_certificate"] is None and env["rhttp.draining"] is other
