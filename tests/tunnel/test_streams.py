"""The worker's stream seam (``rhttp_wsgi.streams``): what a new stream becomes, and the limits it answers.

Driven over the wire: a real worker-role tunnel and its ``StreamPolicy`` against the
raw-frame peer of ``tests/h2peer.py``.  (The 431/413/timeout behaviours themselves are proved
in ``test_abuse_worker.py``; here: the routing, and the policy's per-stream limits.)
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, HeadersFrame, RstStreamFrame

from rhttp_wsgi._tunnel import Channel
from rhttp_wsgi.wsgi import WSGIContext
from tests.h2peer import DEFAULT_TIMEOUT
from tests.tunnel.harness import FakeClock, worker_options

pytestmark = pytest.mark.timeout(60)

CONNECT = [(":method", "CONNECT"), (":authority", "db.internal:5432")]


def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello " + environ["REQUEST_METHOD"].encode()]


def echo_tunnel(ch: Channel, ctx: WSGIContext) -> None:
    """A byte-stream handler: 200, then every request byte back until the peer ends."""
    ch.send_headers([(b":status", b"200")])
    while data := ch.read(65536):
        ch.write(data)
    ch.end()


def test_a_connect_goes_to_the_handler_registered_for_it(make_worker: Any) -> None:
    h = make_worker(hello, connect_handlers={None: echo_tunnel})
    p = h.peer
    p.send_headers(1, CONNECT, end_stream=False)
    p.wait_headers(1)
    p.send_data(1, b"ping")
    p.send_data(1, b"pong", end_stream=True)
    r = p.response(1)
    assert (r.status, r.body, r.reset) == (200, b"pingpong", None)
    h.wait_served(1)
    # ordinary requests on the same tunnel still reach the WSGI app
    p.request(3, "GET", "/")
    assert p.response(3).body == b"hello GET"


def test_the_request_limits_do_not_apply_to_a_tunnelled_stream(make_worker: Any) -> None:
    """request_timeout and max_body_size bound requests; a CONNECT stream may outlive and outgrow them."""
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()  # waits for a body that never comes
        return hello(environ, start_response)

    clock = FakeClock()
    h = make_worker(app, connect_handlers={None: echo_tunnel}, tunnel_kw={"clock": clock},
                    options=worker_options(request_timeout=0.2, max_body_size=10))
    p = h.peer
    p.send_headers(1, CONNECT, end_stream=False)
    p.wait_headers(1)
    p.request(3, "POST", "/", end_stream=False)  # a request, with the same limits armed
    p.send_data(1, b"x" * 100)  # 10 times max_body_size
    p.wait_for(lambda f: isinstance(f, DataFrame) and f.stream_id == 1)
    clock.advance(1.0)  # past request_timeout, as the tunnel sees time
    p.barrier()  # (the writer ran its timers before it sent the PING ACK)
    assert p.wait_rst(3).error_code == ErrorCodes.CANCEL  # the request timed out ...
    p.send_data(1, b"y" * 100, end_stream=True)  # ... the tunnelled stream did not
    r = p.response(1)
    assert (r.status, r.body, r.reset) == (200, b"x" * 100 + b"y" * 100, None)


def test_a_connect_without_a_handler_is_501_and_never_reaches_the_app(make_worker: Any) -> None:
    calls: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        calls.append(environ["REQUEST_METHOD"])
        return hello(environ, start_response)

    h = make_worker(app, connect_handlers={"websocket": echo_tunnel})  # not for a plain CONNECT
    h.peer.send_headers(1, CONNECT, end_stream=False)
    r = h.peer.response(1)
    assert (r.status, r.ended) == (501, True)
    assert b"CONNECT is not supported" in r.body
    assert calls == []


def test_a_failing_handler_resets_its_stream_and_frees_its_thread(make_worker: Any) -> None:
    def broken(ch: Channel, ctx: WSGIContext) -> None:
        raise RuntimeError("handler bug")

    h = make_worker(hello, connect_handlers={None: broken})
    p = h.peer
    p.send_headers(1, CONNECT, end_stream=False)
    assert p.wait_rst(1).error_code == ErrorCodes.INTERNAL_ERROR
    h.wait_served(1)
    p.wait_until(lambda: h.tunnel.lingering == 0, what="the handler's slot to be free")
    p.request(3, "GET", "/")
    assert p.response(3).status == 200


def test_a_stream_reset_while_queued_never_runs_its_handler(make_worker: Any) -> None:
    busy, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        ran.append(environ["PATH_INFO"])
        if environ["PATH_INFO"] == "/busy":
            busy.set()
            release.wait(DEFAULT_TIMEOUT)
        return hello(environ, start_response)

    h = make_worker(app, threads=1)
    p = h.peer
    p.request(1, "GET", "/busy")  # holds the only app thread
    assert busy.wait(DEFAULT_TIMEOUT)
    p.request(3, "GET", "/queued")
    p.barrier()
    p.send_rst(3)
    p.barrier()
    release.set()
    assert p.response(1).status == 200
    h.wait_served(2)
    assert ran == ["/busy"]


def test_a_body_over_the_limit_reset_by_the_peer_in_the_same_read_costs_only_its_stream(make_worker: Any) -> None:
    """The 413 finds the stream already reset by the frames after the DATA: nothing to answer, no crash."""
    h = make_worker(hello, options=worker_options(max_body_size=100))
    p = h.peer
    headers = HeadersFrame(1, data=p.encode([(":method", "POST"), (":scheme", "https"), (":path", "/"),
                                             (":authority", "x")]), flags=["END_HEADERS"])
    p.send_raw(headers.serialize() + DataFrame(1, data=b"a" * 101).serialize()
               + RstStreamFrame(1, error_code=ErrorCodes.CANCEL).serialize())
    p.barrier()
    assert not p.find(lambda f: isinstance(f, HeadersFrame) and f.stream_id == 1)  # no 413 after the reset
    assert h.dispatched == 0
    p.request(3, "GET", "/")
    assert p.response(3).status == 200
    assert not h.tunnel.closing


def test_the_policy_sets_each_streams_limits_from_the_options(make_worker: Any) -> None:
    seen: dict[str, Any] = {}
    h = make_worker(hello, options=worker_options(send_timeout=7.0, max_body_size=1000, request_timeout=30.0))
    policy = h.tunnel.streams
    assert (policy.send_timeout, policy.max_body_size, policy.request_timeout) == (7.0, 1000, 30.0)
    opened = policy.opened_locked

    def spy(ch: Channel) -> None:
        opened(ch)
        seen.update(stall=ch.send_stall_limit, body=ch.body_limit)

    h.tunnel.streams = _Spy(policy, spy)  # (before any stream: the reader reads it per stream)
    p = h.peer
    p.request(1, "GET", "/")
    assert p.response(1).status == 200
    assert seen == {"stall": 7.0, "body": 1000}


class _Spy:
    """Forwards to a StreamPolicy, with ``opened_locked`` replaced."""

    def __init__(self, policy: Any, opened: Any) -> None:
        self._policy = policy
        self.opened_locked = opened

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)
