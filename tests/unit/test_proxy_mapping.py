# mypy: disable-error-code="list-item,union-attr,arg-type,operator,comparison-overlap"
"""Forwarder header mapping and selectors, without sockets."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from rhttp_wsgi.balancing import LeastInFlight, RoundRobin, by_common_name, resolve_selector
from rhttp_wsgi.errors import BadGateway, ConfigError
from rhttp_wsgi.forwarder import BadRequest, _response_head, build_request
from rhttp_wsgi.options import ProxyOptions


@pytest.fixture
def options(tmp_path: Path) -> ProxyOptions:
    return ProxyOptions(cert="c", key="k", workers_ca="ca")


def _environ(**kw: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/", "QUERY_STRING": "",
        "SERVER_NAME": "proxy.local", "SERVER_PORT": "8080", "REMOTE_ADDR": "192.0.2.1",
        "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
    }
    env.update(kw)
    return env


def _hdrs(headers: list[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in headers:
        out.setdefault(k.decode(), []).append(v.decode("latin-1"))
    return out


def test_pseudo_headers_from_raw_uri(options: ProxyOptions) -> None:
    method, headers, length = build_request(_environ(
        REQUEST_METHOD="POST", RAW_URI="/a%2Fb?x=%20", PATH_INFO="/a/b", QUERY_STRING="x=%20",
        HTTP_HOST="example.com:8443", CONTENT_LENGTH="12", CONTENT_TYPE="text/plain",
        **{"wsgi.url_scheme": "https"}), options)
    h = _hdrs(headers)
    assert method == "POST" and length == 12
    assert [k for k, _ in headers[:4]] == [b":method", b":scheme", b":authority", b":path"]
    assert h[":path"] == ["/a%2Fb?x=%20"]
    assert h[":scheme"] == ["https"] and h[":authority"] == ["example.com:8443"]
    assert h["content-length"] == ["12"] and h["content-type"] == ["text/plain"]
    assert "host" not in h


def test_path_requoted_without_raw_uri(options: ProxyOptions) -> None:
    _, headers, _ = build_request(_environ(SCRIPT_NAME="/app", PATH_INFO="/caf\u00c3\u00a9 x",
                                           QUERY_STRING="q=1"), options)
    assert _hdrs(headers)[":path"] == ["/app/caf%C3%A9%20x?q=1"]
    _, headers, _ = build_request(_environ(), options)
    assert _hdrs(headers)[":authority"] == ["proxy.local:8080"]


def test_hop_by_hop_and_connection_tokens(options: ProxyOptions) -> None:
    _, headers, _ = build_request(_environ(
        HTTP_CONNECTION="close, X-Hop", HTTP_X_HOP="1", HTTP_KEEP_ALIVE="5", HTTP_TE="trailers",
        HTTP_UPGRADE="h2c", HTTP_HTTP2_SETTINGS="AAA", HTTP_EXPECT="100-continue", HTTP_X_END="ok",
        HTTP_COOKIE="a=1; b=2", HTTP_X_FORWARDED_FOR="6.6.6.6", HTTP_FORWARDED="for=6.6.6.6"), options)
    h = _hdrs(headers)
    for gone in ("connection", "x-hop", "keep-alive", "upgrade", "http2-settings", "expect", "forwarded"):
        assert gone not in h, gone
    assert h["te"] == ["trailers"] and h["x-end"] == ["ok"] and h["cookie"] == ["a=1; b=2"]
    assert h["x-forwarded-for"] == ["192.0.2.1"]
    assert h["x-forwarded-proto"] == ["http"] and h["x-forwarded-host"] == ["proxy.local:8080"]


def test_te_other_than_trailers_dropped(options: ProxyOptions) -> None:
    _, headers, _ = build_request(_environ(HTTP_TE="gzip"), options)
    assert "te" not in _hdrs(headers)


@pytest.mark.parametrize("bad", ["a\r\nb", "a\nb", "a\x00b"])
def test_control_characters_rejected(options: ProxyOptions, bad: str) -> None:
    with pytest.raises(BadRequest) as e:
        build_request(_environ(HTTP_X_BAD=bad), options)
    assert e.value.status == 400


def test_invalid_content_length_and_host(options: ProxyOptions) -> None:
    with pytest.raises(BadRequest):
        build_request(_environ(CONTENT_LENGTH="-1"), options)
    with pytest.raises(BadRequest):
        build_request(_environ(HTTP_HOST="evil/path"), options)
    with pytest.raises(BadRequest):
        build_request(_environ(REQUEST_METHOD="CONNECT"), options)


def test_response_headers_validation() -> None:
    status, headers, block, length = _response_head([(b":status", b"200"), (b"set-cookie", b"a=1"),
                                                     (b"set-cookie", b"b=2"), (b"x-ok", b"v")])
    assert status == 200 and length is None
    assert headers == [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"x-ok", b"v")]
    assert block == b"set-cookie: a=1\r\nset-cookie: b=2\r\nx-ok: v\r\n"
    for bad in ([(b":status", b"20")], [(b":status", b"200"), (b"x", b"a\nb")],
                [(b":status", b"200"), (b"content-length", b"1"), (b"content-length", b"2")],
                [(b":status", b"200"), (b"Bad Name", b"x")], [(b"x", b"y")],
                # values HTTP/1.1 cannot carry (h11 would refuse to write them)
                [(b":status", b"200"), (b"x", b"a\x0bb")], [(b":status", b"200"), (b"x", b"a\x0c")],
                [(b":status", b"200"), (b"content-length", b"\xb2")]):
        with pytest.raises(BadGateway):
            _response_head(bad)


def test_remembered_response_heads_are_the_callers_to_change() -> None:
    """A repeated response's head comes from memory: the same answer each time, a list the caller
    may extend (the forwarder appends a content-length), and bad heads refused every time."""
    resp = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"13")]
    for _ in range(3):
        status, headers, block, length = _response_head(list(resp))
        assert (status, headers, block, length) == (
            200, resp[1:], b"content-type: text/plain\r\ncontent-length: 13\r\n", 13)
        headers.append((b"x-added", b"1"))
    for _ in range(3):
        with pytest.raises(BadGateway):
            _response_head([(b":status", b"200"), (b"x", b"a\x0bb")])


class _Fake:
    def __init__(self, seq: int, cn: str, in_flight: int) -> None:
        self.seq, self.id, self.common_name, self.in_flight = seq, f"w{seq}", cn, in_flight


def _W(seq: int, cn: str, in_flight: int = 0) -> Any:  # a stand-in for WorkerInfo
    return _Fake(seq, cn, in_flight)


def test_least_in_flight_and_round_robin() -> None:
    a, b, c = _W(1, "a", 2), _W(2, "b", 0), _W(3, "c", 1)
    lif = LeastInFlight()
    assert lif({}, [a, b, c]) is b
    b.in_flight = 2
    c.in_flight = 2
    picks = {lif({}, [a, b, c]).id for _ in range(6)}
    assert picks == {"w1", "w2", "w3"}  # ties rotate
    rr = RoundRobin()
    assert [rr({}, [a, b, c]).id for _ in range(4)] == ["w1", "w2", "w3", "w1"]
    assert rr({}, [a, c]).id == "w3"


def test_by_common_name() -> None:
    a, b = _W(1, "tenant-a"), _W(2, "tenant-b")
    sel = by_common_name("X-Tenant", prefix="tenant-")
    assert sel({"HTTP_X_TENANT": "b"}, [a, b]) is b
    assert sel({"HTTP_X_TENANT": "z"}, [a, b]) is None
    assert sel({}, [a, b]) is None
    with_fallback = by_common_name("X-Tenant", fallback=LeastInFlight())
    assert with_fallback({}, [a, b]) in (a, b)


def test_resolve_selector() -> None:
    assert isinstance(resolve_selector(None), LeastInFlight)
    assert isinstance(resolve_selector("round-robin"), RoundRobin)
    assert resolve_selector("cn:X-Tenant")({"HTTP_X_TENANT": "a"}, [_W(1, "a")]).id == "w1"
    with pytest.raises(ConfigError):
        resolve_selector("random")
