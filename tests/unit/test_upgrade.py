"""The proxy's WebSocket handshake rules (rhttp_wsgi.upgrade), without sockets."""

from __future__ import annotations

from typing import Any

import pytest

from rhttp_wsgi.forwarder import build_request
from rhttp_wsgi.options import ProxyOptions
from rhttp_wsgi.upgrade import (
    HandshakeError,
    WebSocketStats,
    accept_token,
    client_offer,
    connect_headers,
    handshake_key,
    response_head,
    wants_websocket,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def environ(**extra: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1", "PATH_INFO": "/chat", "QUERY_STRING": "a=1",
        "SERVER_NAME": "x", "SERVER_PORT": "80", "wsgi.url_scheme": "https", "HTTP_HOST": "app.example",
        "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "keep-alive, Upgrade", "HTTP_SEC_WEBSOCKET_KEY": KEY,
        "HTTP_SEC_WEBSOCKET_VERSION": "13", "HTTP_SEC_WEBSOCKET_PROTOCOL": "chat", "HTTP_ORIGIN": "https://o",
        "REMOTE_ADDR": "192.0.2.1", "rhttp.request_id": "rid-1",
    }
    env.update(extra)
    return env


def test_rfc6455_worked_example_accept() -> None:
    assert accept_token(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3


@pytest.mark.parametrize(("upgrade", "connection", "wanted"), [
    ("websocket", "Upgrade", True), ("WebSocket", "keep-alive, upgrade", True), ("h2c", "Upgrade", False),
    ("websocket", "keep-alive", False), (None, "Upgrade", False),
])
def test_what_counts_as_a_websocket_upgrade(upgrade: str | None, connection: str, wanted: bool) -> None:
    env = environ(HTTP_CONNECTION=connection)
    if upgrade is None:
        del env["HTTP_UPGRADE"]
    else:
        env["HTTP_UPGRADE"] = upgrade
    assert wants_websocket(env) is wanted


@pytest.mark.parametrize(("change", "status"), [
    ({"REQUEST_METHOD": "POST"}, 400), ({"SERVER_PROTOCOL": "HTTP/1.0"}, 400),
    ({"HTTP_SEC_WEBSOCKET_VERSION": "8"}, 426), ({"HTTP_SEC_WEBSOCKET_VERSION": ""}, 426),
    ({"HTTP_SEC_WEBSOCKET_KEY": "c2hvcnQ="}, 400), ({"HTTP_SEC_WEBSOCKET_KEY": "!" * 22 + "=="}, 400),
])
def test_invalid_handshakes_are_refused_with_their_status(change: dict[str, str], status: int) -> None:
    with pytest.raises(HandshakeError) as info:
        handshake_key(environ(**change))
    assert info.value.status == status
    if status == 426:
        assert info.value.headers == [("Sec-WebSocket-Version", "13")]


def test_a_valid_handshake_gives_its_key() -> None:
    assert handshake_key(environ(HTTP_SEC_WEBSOCKET_VERSION="13, 8")) == KEY


def test_the_get_becomes_an_extended_connect() -> None:
    _, headers, _ = build_request(environ(), ProxyOptions(cert="c", key="k", workers_ca="ca"))
    out = connect_headers(headers)
    assert out[:5] == [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
                       (b":authority", b"app.example"), (b":path", b"/chat?a=1")]
    fields = dict(out)
    assert fields[b"sec-websocket-version"] == b"13" and fields[b"sec-websocket-protocol"] == b"chat"
    assert fields[b"origin"] == b"https://o" and fields[b"x-request-id"] == b"rid-1"
    for gone in (b"sec-websocket-key", b"upgrade", b"connection", b"host"):
        assert gone not in fields


def test_the_101_carries_the_accept_and_the_workers_choices_only() -> None:
    worker = [(b"sec-websocket-protocol", b"chat"), (b"content-length", b"0"), (b"sec-websocket-accept", b"x"),
              (b"set-cookie", b"a=b")]
    assert response_head(KEY, worker) == [
        (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        (b"sec-websocket-protocol", b"chat"), (b"set-cookie", b"a=b")]


def test_no_socket_offered_means_no_offer() -> None:
    assert client_offer(environ()) is None
    assert client_offer(environ(**{"werkzeug.socket": "not a socket"})) is None
    sentinel = object()
    assert client_offer(environ(**{"rhttp.upgrade": sentinel})) is sentinel


def test_stats_bound_what_is_under_way() -> None:
    stats = WebSocketStats()
    assert stats.reserve(2) and stats.reserve(2) and not stats.reserve(2)
    stats.release()
    assert stats.reserve(2)
    stats.opened()
    stats.moved(up=3, down=5)
    assert stats.snapshot() == {"open": 1, "total": 1, "bytes_up": 3, "bytes_down": 5}
    stats.closed()
    assert stats.snapshot()["open"] == 0 and stats.reserve(0)  # 0: no limit
