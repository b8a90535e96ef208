"""The demo app's documents: the path its page shows, the SSE stream's end, the proxy's route log, /ws refusals."""

from __future__ import annotations

import threading
from html.parser import HTMLParser
from types import SimpleNamespace
from typing import Any

import pytest

from rhttp_wsgi.demo_app import DemoApp, Route, RouteLog, render_page, sse_events

HOSTILE = '<script>alert("x")</script>'


def environ(**extra: Any) -> dict[str, Any]:
    env: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.url_scheme": "http",
                           "HTTP_HOST": "demo.test:8080", "REMOTE_ADDR": "203.0.113.9", "rhttp.stream_id": 7,
                           "rhttp.request_id": "abc-1", "rhttp.cancelled": threading.Event()}
    env.update(extra)
    return env


class Hops(HTMLParser):
    """data-hop -> the text of its <dd> values, and every script/style-free text run."""

    def __init__(self) -> None:
        super().__init__()
        self.hops: dict[str, list[str]] = {}
        self._hop: str | None = None
        self._in_dd = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "li" and a.get("data-hop"):
            self._hop = a["data-hop"]
            self.hops[self._hop or ""] = []
        self._in_dd = tag == "dd"

    def handle_endtag(self, tag: str) -> None:
        if tag == "dd":
            self._in_dd = False
        elif tag == "li":
            self._hop = None

    def handle_data(self, data: str) -> None:
        if self._in_dd and self._hop:
            self.hops[self._hop].append(data)


def hops_of(page: bytes) -> dict[str, list[str]]:
    parser = Hops()
    parser.feed(page.decode())
    return parser.hops


def test_page_names_every_hop_with_the_proxys_route_and_the_stream() -> None:
    route = Route("w3", "demo-worker", "127.0.0.1:40312")
    hops = hops_of(render_page(environ(HTTP_X_FORWARDED_HOST="public.test"), route))
    assert list(hops) == ["client", "proxy", "tunnel", "worker"]
    assert hops["client"][0] == "203.0.113.9"
    assert "abc-1" in hops["proxy"]
    assert hops["tunnel"] == ["w3", "127.0.0.1:40312", "HTTP/2 stream 7"]
    assert hops["worker"][0] == "CN=demo-worker"


def test_page_without_a_route_says_what_only_the_worker_knows() -> None:
    hops = hops_of(render_page(environ(), None, worker_name="edge-1"))
    assert hops["tunnel"][0] == "(known to the proxy)" and hops["tunnel"][2] == "HTTP/2 stream 7"
    assert hops["worker"][0] == "CN=edge-1"


def test_page_escapes_what_the_client_sent() -> None:
    page = render_page(environ(HTTP_HOST=HOSTILE, PATH_INFO="/" + HOSTILE)).decode()
    assert HOSTILE not in page and "&lt;script&gt;" in page


def test_sse_stream_ticks_then_says_end_so_the_browser_stops() -> None:
    events = list(sse_events(environ(), ticks=3, interval=0))
    assert [e.split(b" at ")[0] for e in events[:3]] == [b"data: tick 0", b"data: tick 1", b"data: tick 2"]
    assert all(e.endswith(b"(stream 7)\n\n") for e in events[:3])
    assert events[3] == b"event: end\ndata: done\n\n"


def test_sse_stream_stops_when_the_client_is_gone() -> None:
    cancelled = threading.Event()
    cancelled.set()
    assert len(list(sse_events(environ(**{"rhttp.cancelled": cancelled}), ticks=10, interval=5))) == 1


def test_sse_stream_ends_early_when_the_worker_drains() -> None:
    draining = threading.Event()
    draining.set()
    events = list(sse_events(environ(**{"rhttp.draining": draining}), ticks=10, interval=0))
    assert len(events) == 2 and events[-1] == b"event: end\ndata: done\n\n"


def test_route_log_records_the_inner_selectors_choice_per_request_id_and_stays_bounded() -> None:
    workers = [SimpleNamespace(id="w1", common_name="a", remote_addr=("127.0.0.1", 5001)),
               SimpleNamespace(id="w2", common_name="b", remote_addr=("127.0.0.1", 5002))]
    routes = RouteLog(lambda env, ws: ws[-1], size=2)
    for rid in ("r1", "r2", "r3"):
        assert routes({"rhttp.request_id": rid}, workers) is workers[1]
    assert routes.lookup("r3") == Route("w2", "b", "127.0.0.1:5002")
    assert routes.lookup("r1") is None and routes.lookup(None) is None
    none = RouteLog(lambda env, ws: None)
    assert none({"rhttp.request_id": "r"}, workers) is None and none.lookup("r") is None


def call(app: DemoApp, env: dict[str, Any]) -> tuple[str, dict[str, str], bytes]:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app(env, start_response))
    return seen["status"], seen["headers"], body


UPGRADE = {"PATH_INFO": "/ws", "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade",
           "HTTP_SEC_WEBSOCKET_VERSION": "13", "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.mark.parametrize(("extra", "status", "header"), [
    ({"PATH_INFO": "/ws"}, "426 Upgrade Required", ("Upgrade", "websocket")),
    ({**UPGRADE, "HTTP_SEC_WEBSOCKET_VERSION": "8"}, "426 Upgrade Required", ("Sec-WebSocket-Version", "13")),
    ({**UPGRADE, "HTTP_SEC_WEBSOCKET_KEY": "short"}, "400 Bad Request", None),
    (UPGRADE, "501 Not Implemented", None),  # a server that offers no socket
])
def test_ws_refuses_what_it_cannot_upgrade_with_a_clear_status(extra: dict[str, Any], status: str,
                                                               header: tuple[str, str] | None) -> None:
    got, headers, body = call(DemoApp(), environ(**extra))
    assert got == status and body
    if header:
        assert headers[header[0]] == header[1]


def test_echo_and_info_still_answer() -> None:
    import io

    status, _, body = call(DemoApp(), environ(REQUEST_METHOD="POST", PATH_INFO="/echo",
                                              **{"wsgi.input": io.BytesIO(b"ping")}))
    assert (status, body) == ("200 OK", b"ping")
    status, _, body = call(DemoApp(), environ(PATH_INFO="/info"))
    assert status == "200 OK" and b'"rhttp.stream_id": 7' in body
