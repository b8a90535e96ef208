"""A malicious or broken worker, seen from the proxy.

The worker is :class:`tests.h2peer.WorkerPeer`: real mTLS to the real proxy,
then raw HTTP/2 frames.  The rules checked here:

* a malformed *response* (invalid or missing ``:status``, CR/LF/NUL in a
  value, uppercase or connection-specific header names, pseudo-headers out of
  place, DATA disagreeing with content-length, END_STREAM on a 1xx) is a
  stream error: RST_STREAM(PROTOCOL_ERROR) to the worker, 502 to that public
  request (or a visibly truncated response once the headers went out), and
  every other stream of the tunnel -- one held open across the failure, and a
  fresh one after it -- still works on the same attached worker;
* 1xx responses are consumed, the final response is forwarded;
* PUSH_PROMISE (push is disabled) is a connection error: GOAWAY(PROTOCOL_ERROR),
  the worker is detached, its in-flight requests get 502;
* a PING or SETTINGS flood gets GOAWAY(ENHANCE_YOUR_CALM) and a detach;
* a worker that never answers gives 504 (and a CANCEL), one that resets after
  the headers gives a truncated public response.

(The proxy's flood guard itself, sans I/O: ``tests/unit/test_h2core_limits.py``.)
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import PingFrame, PushPromiseFrame, RstStreamFrame, SettingsFrame

from tests.h2peer import Request, Responder, WorkerPeer, answer_ok

from .proxy_fixtures import (  # noqa: F401  (fixtures)
    WAIT,
    Env,
    env_fixture,
    pki_fixture,
    read_until_close,
)

pytestmark = pytest.mark.timeout(30)

Action = Callable[[WorkerPeer, int, Request], None]


def hold(w: WorkerPeer, sid: int, req: Request) -> None:
    """Leave the stream open: the test answers (or not) later."""


def scripted(actions: dict[str, Action]) -> Responder:
    def responder(w: WorkerPeer, sid: int, req: Request) -> None:
        actions.get(req.path.split("?")[0], answer_ok)(w, sid, req)
    return responder


@pytest.fixture
def make_raw(env: Env) -> Iterator[Callable[..., WorkerPeer]]:
    made: list[WorkerPeer] = []

    def make(responder: Responder = answer_ok, name: str = "worker", **kw: Any) -> WorkerPeer:
        cert, key = env.pki.workers[name]
        before = len(env.proxy.workers())
        w = WorkerPeer(env.tunnel_port, str(cert), str(key), str(env.pki.ca_cert), responder=responder,
                      name=f"raw-{name}", **kw)
        made.append(w)
        assert env.proxy.wait_for_workers(before + 1, WAIT)
        return w

    yield make
    for w in made:
        w.close()


class Background:
    """A public request running in a thread (e.g. one held open across a failure)."""

    def __init__(self, env: Env, method: str, path: str) -> None:
        self.result: dict[str, Any] = {}

        def run() -> None:
            try:
                status, _, body, _ = env.request(method, path)
                self.result.update(status=status, body=body)
            except Exception as e:  # pragma: no cover - reported by the assert below
                self.result["error"] = e

        self.thread = threading.Thread(target=run, name=f"client{path}")
        self.thread.start()

    def join(self) -> dict[str, Any]:
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        return self.result


def assert_tunnel_intact(env: Env, w: WorkerPeer, worker_id: str) -> None:
    """Same worker still attached, no GOAWAY, and a fresh request works on it."""
    assert [x.id for x in env.proxy.workers()] == [worker_id]
    status, _, body, _ = env.request("GET", "/after")
    assert (status, body) == (200, b"ok /after")
    assert w.goaways() == [] and not w.eof


def first_rst_code(w: WorkerPeer, sid: int) -> int:
    return int(w.wait_rst(sid).error_code)


# ---------------------------------------------------------------------------
# Malformed responses: a stream error, the tunnel lives on
# ---------------------------------------------------------------------------

STATUS = (b":status", b"200")
MALFORMED: dict[str, list[tuple[bytes, bytes]]] = {
    "status-abc": [(b":status", b"abc")],
    "status-99": [(b":status", b"99")],
    "status-1000": [(b":status", b"1000")],
    "status-empty": [(b":status", b"")],
    "status-101": [(b":status", b"101")],
    "status-missing": [(b"content-type", b"text/plain")],
    "status-twice": [STATUS, (b":status", b"204")],
    "request-pseudo-header": [STATUS, (b":path", b"/x")],
    "unknown-pseudo-header": [STATUS, (b":foo", b"x")],
    "pseudo-after-regular": [(b"x-a", b"1"), STATUS],
    "crlf-in-value": [STATUS, (b"x-evil", b"a\r\nset-cookie: pwned=1")],
    "lf-in-value": [STATUS, (b"x-evil", b"a\nset-cookie: pwned=1")],
    "nul-in-value": [STATUS, (b"x-evil", b"a\x00b")],
    "space-around-value": [STATUS, (b"x-a", b" padded ")],
    "uppercase-name": [STATUS, (b"X-Upper", b"v")],
    "space-in-name": [STATUS, (b"x bad", b"v")],
    "colon-in-name": [STATUS, (b"x:bad", b"v")],
    "empty-name": [STATUS, (b"", b"v")],
    "connection": [STATUS, (b"connection", b"close")],
    "keep-alive": [STATUS, (b"keep-alive", b"timeout=5")],
    "proxy-connection": [STATUS, (b"proxy-connection", b"keep-alive")],
    "transfer-encoding": [STATUS, (b"transfer-encoding", b"chunked")],
    "upgrade": [STATUS, (b"upgrade", b"h2c")],
    "te-not-trailers": [STATUS, (b"te", b"gzip")],
    "content-length-not-a-number": [STATUS, (b"content-length", b"5x")],
    "content-length-conflict": [STATUS, (b"content-length", b"4"), (b"content-length", b"5")],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_response_is_a_stream_error(env: Env, make_raw: Callable[..., WorkerPeer], case: str) -> None:
    bad = MALFORMED[case]

    def on_headers(w: WorkerPeer, sid: int, req: Request) -> None:
        # the block ends the stream (the stream is closed before h2 validates it)
        w.send_frame(w.headers_frame(sid, bad, end_stream=True))

    def then_body(w: WorkerPeer, sid: int, req: Request) -> None:
        # the block, then a body: DATA arrives on a stream the proxy already reset
        w.send_frame(w.headers_frame(sid, bad), w.data_frame(sid, b"body!", end_stream=True))

    env.start_proxy()
    w = make_raw(scripted({"/hold": hold, "/bad1": on_headers, "/bad2": then_body}))
    worker_id = env.proxy.workers()[0].id
    held = Background(env, "GET", "/hold")
    held_req = w.wait_request("/hold")

    for path in ("/bad1", "/bad2"):
        status, _, body, _ = env.request("GET", path)
        assert status == 502, (path, body)
        assert b"pwned" not in body
        sid = w.wait_request(path).stream_id
        assert first_rst_code(w, sid) == ErrorCodes.PROTOCOL_ERROR

    # the stream held open across both failures completes normally
    w.respond(held_req.stream_id, 200, b"held ok")
    assert held.join() == {"status": 200, "body": b"held ok"}
    assert_tunnel_intact(env, w, worker_id)


def test_informational_responses_skipped_final_forwarded(env: Env, make_raw: Callable[..., WorkerPeer]) -> None:
    def early_hints(w: WorkerPeer, sid: int, req: Request) -> None:
        w.send_frame(w.headers_frame(sid, [(b":status", b"103"), (b"link", b"</s.css>; rel=preload")]),
               w.headers_frame(sid, [(b":status", b"100")]))
        w.respond(sid, 200, b"final", [(b"x-final", b"yes")])

    def informational_end_stream(w: WorkerPeer, sid: int, req: Request) -> None:
        w.send_frame(w.headers_frame(sid, [(b":status", b"103")], end_stream=True))

    env.start_proxy()
    w = make_raw(scripted({"/hints": early_hints, "/bad": informational_end_stream}))
    worker_id = env.proxy.workers()[0].id
    s = env.raw()
    s.sendall(b"GET /hints HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = read_until_close(s)
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    assert out.count(b"HTTP/1.1") == 1 and b"103" not in out and b"</s.css>" not in out
    assert b"x-final: yes" in out.lower() and out.endswith(b"final")
    # END_STREAM on a 1xx is malformed (RFC 9113 §8.1): a stream error
    assert env.request("GET", "/bad")[0] == 502
    assert first_rst_code(w, w.wait_request("/bad").stream_id) == ErrorCodes.PROTOCOL_ERROR
    assert_tunnel_intact(env, w, worker_id)


# ---------------------------------------------------------------------------
# Body length vs content-length
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"0123456789", b"012"], ids=["longer", "shorter"])
def test_body_disagreeing_with_content_length_is_502(env: Env, make_raw: Callable[..., WorkerPeer],
                                                     body: bytes) -> None:
    def lying(w: WorkerPeer, sid: int, req: Request) -> None:
        w.send_frame(w.headers_frame(sid, [STATUS, (b"content-length", b"5")]),
               w.data_frame(sid, body, end_stream=True))

    env.start_proxy()
    w = make_raw(scripted({"/lie": lying}))
    worker_id = env.proxy.workers()[0].id
    status, _, out, _ = env.request("GET", "/lie")
    assert status == 502 and body not in out
    assert first_rst_code(w, w.wait_request("/lie").stream_id) == ErrorCodes.PROTOCOL_ERROR
    assert_tunnel_intact(env, w, worker_id)


def test_body_overrun_after_headers_went_out_truncates(env: Env, make_raw: Callable[..., WorkerPeer]) -> None:
    """Headers and part of the body are already with the client: the overrun is never passed on."""
    env.start_proxy()
    w = make_raw(scripted({"/overrun": hold}))
    worker_id = env.proxy.workers()[0].id
    s = env.raw()
    s.sendall(b"GET /overrun HTTP/1.1\r\nHost: x\r\n\r\n")
    sid = w.wait_request("/overrun").stream_id
    w.send_frame(w.headers_frame(sid, [STATUS, (b"content-length", b"10")]), w.data_frame(sid, b"12345"))
    buf = b""
    s.settimeout(WAIT)
    while not buf.endswith(b"12345"):
        data = s.recv(4096)
        assert data, buf
        buf += data
    w.send_frame(w.data_frame(sid, b"67890-OVERRUN", end_stream=True))  # 18 bytes > content-length 10
    buf += read_until_close(s)
    head, _, body = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 10" in head.lower()
    assert body == b"12345"  # short of the Content-Length, then closed: visibly truncated
    assert first_rst_code(w, sid) == ErrorCodes.PROTOCOL_ERROR
    assert_tunnel_intact(env, w, worker_id)


# ---------------------------------------------------------------------------
# Silence and resets (behaviour that existed; checked against a raw worker)
# ---------------------------------------------------------------------------


def test_worker_that_never_answers_gets_504_and_cancel(env: Env, make_raw: Callable[..., WorkerPeer]) -> None:
    env.start_proxy(response_timeout=0.4)
    w = make_raw(scripted({"/silent": hold}))
    worker_id = env.proxy.workers()[0].id
    t0 = time.monotonic()
    status, _, _, _ = env.request("GET", "/silent")
    assert status == 504 and time.monotonic() - t0 < 2.0
    assert first_rst_code(w, w.wait_request("/silent").stream_id) == ErrorCodes.CANCEL
    assert_tunnel_intact(env, w, worker_id)


def test_reset_after_headers_is_a_visible_truncation(env: Env, make_raw: Callable[..., WorkerPeer]) -> None:
    env.start_proxy()
    w = make_raw(scripted({"/reset": hold}))
    worker_id = env.proxy.workers()[0].id
    c = env.conn()
    c.request("GET", "/reset")
    sid = w.wait_request("/reset").stream_id
    w.send_frame(w.headers_frame(sid, [STATUS]), w.data_frame(sid, b"first-part"))
    r = c.getresponse()
    assert r.status == 200 and r.getheader("transfer-encoding") == "chunked"
    assert r.read1(100) == b"first-part"  # type: ignore[attr-defined]
    rst = RstStreamFrame(sid)
    rst.error_code = ErrorCodes.INTERNAL_ERROR
    w.send_frame(rst)
    with pytest.raises(http.client.IncompleteRead):  # no terminating chunk, connection closed
        r.read()
    assert_tunnel_intact(env, w, worker_id)


# ---------------------------------------------------------------------------
# Connection errors: PUSH_PROMISE, floods
# ---------------------------------------------------------------------------


def _detach_recorder(env: Env, **kw: Any) -> threading.Event:
    detached = threading.Event()
    env.start_proxy(on_detach=lambda worker: detached.set(), **kw)
    return detached


def test_push_promise_is_a_connection_error(env: Env, make_raw: Callable[..., WorkerPeer]) -> None:
    def push(w: WorkerPeer, sid: int, req: Request) -> None:
        pp = PushPromiseFrame(sid, promised_stream_id=2, flags=["END_HEADERS"])
        pp.data = w.encoder.encode([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x"),
                                    (b":path", b"/pushed")])
        w.send_frame(pp)

    detached = _detach_recorder(env)
    w = make_raw(scripted({"/hold": hold, "/push": push}))
    held = Background(env, "POST", "/hold")
    w.wait_request("/hold")
    status, _, _, _ = env.request("GET", "/push")
    assert status == 502
    assert w.wait_goaway().error_code == ErrorCodes.PROTOCOL_ERROR
    assert detached.wait(WAIT) and env.proxy.workers() == []
    assert held.join()["status"] == 502  # in flight on the dead tunnel
    w.wait_closed()
    # the proxy itself is fine: a well-behaved worker attaches and serves
    make_raw(answer_ok, name="alpha")
    assert env.request("GET", "/again")[2] == b"ok /again"


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_control_frame_flood_gets_enhance_your_calm(env: Env, make_raw: Callable[..., WorkerPeer],
                                                    kind: str) -> None:
    detached = _detach_recorder(env, control_frame_burst=200, control_frame_rate=50)
    w = make_raw(scripted({"/hold": hold}))
    held = Background(env, "POST", "/hold")
    w.wait_request("/hold")
    # a few control frames are fine
    for i in range(20):
        w.send_ping(b"ok-%05d" % i)
    w.send_frame(SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 100}))
    w.wait_until(lambda: len([f for f in w.find(PingFrame) if "ACK" in f.flags]) >= 20, what="20 PING ACKs")
    assert env.proxy.workers() and w.goaways() == []
    t0 = time.monotonic()
    if kind == "ping":
        w.send_frame(*[PingFrame(0, opaque_data=b"%08d" % i) for i in range(1000)])
    else:
        w.send_frame(*[SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535 + i}) for i in range(1000)])
    goaway = w.wait_goaway()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert detached.wait(WAIT) and time.monotonic() - t0 < 1.0
    assert env.proxy.workers() == []
    assert held.join()["status"] == 502
    acks = [f for f in w.find(PingFrame if kind == "ping" else SettingsFrame) if "ACK" in f.flags]
    assert len(acks) <= 200 + 25  # never more replies than the burst allows (+ the polite ones)
    w.wait_closed()
