"""The demo app's WebSocket (its own RFC 6455 codec) through our proxy and a real worker, with a real client."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from rhttp_wsgi._demo_websocket import OP_CLOSE, OP_TEXT, FrameParser, encode_frame
from rhttp_wsgi.balancing import LeastInFlight
from rhttp_wsgi.demo_app import DemoApp, RouteLog

from .proxy_fixtures import (  # noqa: F401  (fixtures)
    WAIT,
    Env,
    env_fixture,
    pki_fixture,
)

ws_client = pytest.importorskip("websockets.sync.client", reason="needs the websockets package (test extra)")
ws_exceptions = pytest.importorskip("websockets.exceptions", reason="needs the websockets package (test extra)")


def start(env: Env) -> str:
    routes = RouteLog(LeastInFlight())
    env.start_proxy(selector=routes)
    env.start_worker(DemoApp(routes=routes, worker_name="worker"), connections=2)
    host, port = env.public
    return f"ws://{host}:{port}/ws"


def next_of(ws: Any, kind: str) -> dict[str, Any]:
    """The next message of ``kind`` (clock ticks arrive in between), within a bounded number of messages."""
    for _ in range(50):
        msg: dict[str, Any] = json.loads(ws.recv(timeout=WAIT))
        if msg["type"] == kind:
            return msg
    raise AssertionError(f"no {kind} message in 50")


def test_demo_websocket_greets_ticks_echoes_and_closes_with_the_clients_code(env: Env) -> None:
    with ws_client.connect(start(env), open_timeout=WAIT, close_timeout=WAIT) as ws:
        hello = next_of(ws, "hello")
        assert isinstance(hello["stream"], int) and re.fullmatch(r"w\d+", hello["tunnel"])
        assert next_of(ws, "clock")["n"] >= 1
        for text in ("one", "twó", "x" * 70_000):
            ws.send(text)
            assert next_of(ws, "echo")["text"] == text
        ws.ping(b"are you there").wait(WAIT)
        ws.close(4000, "bye")
    assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 4000  # the server echoed our code


def test_demo_websocket_refuses_invalid_utf8_with_1007(env: Env) -> None:
    start(env)
    sock = env.raw()
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: demo.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    # a masked text frame whose payload is not UTF-8 (the browser and websockets would refuse to send one)
    sock.sendall(encode_frame(OP_TEXT, b"\xff\xfe", mask=b"\x01\x02\x03\x04"))
    parser = FrameParser(require_mask=False)
    frames = parser.feed(rest)
    for _ in range(100):
        if any(f.opcode == OP_CLOSE for f in frames):
            break
        chunk = sock.recv(65536)
        assert chunk, "the connection ended without a close frame"
        frames += parser.feed(chunk)
    (close,) = [f for f in frames if f.opcode == OP_CLOSE]
    assert close.payload[:2] == (1007).to_bytes(2, "big")


def test_demo_websocket_says_going_away_when_the_worker_drains(env: Env) -> None:
    url = start(env)
    with ws_client.connect(url, open_timeout=WAIT, close_timeout=WAIT) as ws:
        next_of(ws, "hello")
        assert env.pools[0].shutdown(WAIT), "the demo's socket held the worker's drain"
        with pytest.raises(ws_exceptions.ConnectionClosedOK):
            for _ in range(50):
                ws.recv(timeout=WAIT)
    got = ws.protocol.close_rcvd
    assert got is not None and (got.code, got.reason) == (1001, "the demo is stopping")


def test_plain_get_of_the_websocket_path_is_426(env: Env) -> None:
    start(env)
    status, _, body, _ = env.request("GET", "/ws")
    assert (status, body) == (426, b"/ws is a WebSocket\n")  # (Upgrade is hop-by-hop: the proxy drops it)
