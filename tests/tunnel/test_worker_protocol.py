"""Frame-by-frame tests of the worker: a real worker-role Tunnel + run_wsgi against a raw-frame peer.

The peer (``tests.h2peer.ProxyPeer``) plays the proxy over a socketpair (plaintext), so
every test sees exactly what goes on the wire.  These translate the reference
implementation's unit-test list (spec: reverse-http-go README, "Tests") and
the wire facts of the architecture notes (HAProxy's 16 KiB window, 2^31-1
connection window, ``host`` without ``:authority``...).

Synchronisation is always a bounded wait on a condition (a frame arriving, an
Event set by the app, a tunnel event); ``peer.barrier()`` (PING -> ACK) proves
the worker processed everything sent before it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
from typing import Any

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from rhttp_wsgi._protocol import PREFACE
from rhttp_wsgi._tunnel import HIGH_WATER
from rhttp_wsgi.errors import StreamReset, TunnelClosed
from tests.h2peer import DEFAULT_TIMEOUT, S
from tests.tunnel.harness import FakeClock, worker_options

pytestmark = pytest.mark.timeout(60)

MAX_WINDOW = 2**31 - 1


# -- apps --------------------------------------------------------------------------------


def echo_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = environ["wsgi.input"].read()
    start_response("200 OK", [
        ("Content-Type", "application/octet-stream"),
        ("X-Method", environ["REQUEST_METHOD"]),
        ("X-Path", environ["PATH_INFO"]),
        ("X-Query", environ["QUERY_STRING"]),
        ("X-Stream", str(environ["rhttp.stream_id"])),
    ])
    return [body]


def text_app(text: bytes, headers: list[tuple[str, str]] | None = None) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", headers if headers is not None else [("Content-Type", "text/plain")])
        return [text]
    return app


def env_app(*keys: str) -> Any:
    """Answers the repr of the selected environ values."""
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [repr({k: environ.get(k) for k in keys}).encode()]
    return app


def get(h: Any, sid: int, path: str = "/", **kw: Any) -> Any:
    h.peer.request(sid, "GET", path, **kw)
    return h.peer.response(sid)


def is_data(sid: int) -> Any:
    return lambda f: isinstance(f, DataFrame) and f.stream_id == sid


def is_wu(sid: int) -> Any:
    return lambda f: isinstance(f, WindowUpdateFrame) and f.stream_id == sid


# -- connection start ------------------------------------------------------------------------


def test_first_bytes_are_client_preface_then_settings(make_worker: Any) -> None:
    h = make_worker(echo_app, handshake=False)
    p = h.peer
    p.wait_until(lambda: len(p.raw) >= len(PREFACE) + 9, what="preface + a frame header")
    raw = bytes(p.raw)
    assert raw[: len(PREFACE)] == PREFACE
    length = int.from_bytes(raw[24:27], "big")
    ftype, flags, sid = raw[27], raw[28], struct.unpack(">I", raw[29:33])[0]
    assert (ftype, flags, sid) == (0x4, 0, 0), "the first frame must be a non-ACK SETTINGS on stream 0"
    assert length % 6 == 0
    assert isinstance(p.wait_for(lambda f: True), SettingsFrame)
    # the worker must never send a second preface, nor HEADERS of its own
    p.handshake()
    assert p.preface == PREFACE
    assert raw.count(PREFACE) == 1
    assert not p.find(lambda f: isinstance(f, HeadersFrame))


def test_settings_advertise_max_concurrent_streams(make_worker: Any) -> None:
    h = make_worker(echo_app, options=worker_options(max_concurrent_streams=7, max_header_list_size=1 << 20))
    ws = h.peer.remote_settings
    assert ws[S.MAX_CONCURRENT_STREAMS] == 7
    assert ws[S.MAX_HEADER_LIST_SIZE] == 1 << 20
    # a worker never pushes
    assert ws.get(S.ENABLE_PUSH, 0) == 0


@pytest.mark.parametrize("first", ["ping", "settings-ack", "headers", "window-update"])
def test_first_frame_not_settings_is_protocol_error(make_worker: Any, first: str) -> None:
    h = make_worker(echo_app, handshake=False)
    p = h.peer
    p.wait_for(lambda f: isinstance(f, SettingsFrame))  # worker is up
    if first == "ping":
        p.send_ping(b"12345678")
    elif first == "settings-ack":
        p.send_settings(ack=True)
    elif first == "headers":
        p.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x")],
                       end_stream=True)
    else:
        p.send_window_update(0, 1000)
    goaway = p.wait_goaway()
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    h.wait_closed()
    p.wait_closed()
    assert h.dispatched == 0
    assert not h.tunnel.ready.is_set()


def test_peer_never_sends_settings_times_out(make_worker: Any) -> None:
    clock = FakeClock()
    start = clock.t
    h = make_worker(echo_app, handshake=False, options=worker_options(handshake_timeout=0.3),
                    tunnel_kw={"clock": clock})
    h.peer.wait_for(lambda f: isinstance(f, SettingsFrame))  # the deadline runs from here
    clock.set(start + 0.299)  # just before the deadline, as the tunnel sees time ...
    clock.wait_reads(clock.reads + 2)  # (the writer checked its timers at that time, and waits again)
    assert not h.peer.goaways() and not h.tunnel.closing  # ... the worker still waits
    clock.set(start + 0.3)  # at the deadline
    goaway = h.peer.wait_goaway(timeout=5)
    assert goaway.error_code == ErrorCodes.SETTINGS_TIMEOUT
    h.wait_closed()
    assert not h.tunnel.ready.is_set()


@pytest.mark.parametrize("setting,value,code", [
    (S.INITIAL_WINDOW_SIZE, 2**31, ErrorCodes.FLOW_CONTROL_ERROR),
    (S.MAX_FRAME_SIZE, 16383, ErrorCodes.PROTOCOL_ERROR),
    (S.MAX_FRAME_SIZE, 2**24, ErrorCodes.PROTOCOL_ERROR),
    (S.ENABLE_PUSH, 2, ErrorCodes.PROTOCOL_ERROR),
])
def test_out_of_spec_settings_rejected(make_worker: Any, setting: int, value: int, code: int) -> None:
    h = make_worker(echo_app, handshake=False)
    h.peer.send_settings({setting: value})
    assert h.peer.wait_goaway().error_code == code
    h.wait_closed()


# -- round trips and headers ------------------------------------------------------------------


def test_round_trip(make_worker: Any) -> None:
    h = make_worker(echo_app)
    h.peer.request(1, "POST", "/echo/path?x=1&y=2", body=b"hello worker",
                   headers=[("content-type", "text/plain")])
    r = h.peer.response(1)
    assert r.status == 200
    assert r.reset is None and r.ended
    assert r.body == b"hello worker"
    assert r.header("x-method") == "POST"
    assert r.header("x-path") == "/echo/path"
    assert r.header("x-query") == "x=1&y=2"
    assert r.header("x-stream") == "1"
    # a second request on the same tunnel
    r = get(h, 3, "/second")
    assert (r.status, r.header("x-path"), r.body) == (200, "/second", b"")
    h.wait_in_flight(0)
    assert h.tunnel.streams_total == 2


def test_response_header_canonicalisation(make_worker: Any) -> None:
    h = make_worker(text_app(b"ok", [
        ("Content-Type", "text/plain"),
        ("X-Custom-Header", "  padded value\t"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Connection", "close"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("TE", "gzip"),
    ]))
    r = get(h, 1)
    assert r.status == 200 and r.body == b"ok"
    names = r.header_names()
    assert all(n == n.lower() for n in names), names
    for forbidden in ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"):
        assert forbidden not in names
    assert r.header("x-custom-header") == "padded value"
    assert [v for k, v in r.headers if k == "set-cookie"] == ["a=1", "b=2"]
    # pseudo-header first, exactly one
    hf = h.peer.wait_headers(1)
    assert [k for k, _ in hf.decoded if k.startswith(":")] == [":status"]
    assert hf.decoded[0][0] == ":status"


def test_tricky_app_headers_on_the_wire(make_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("X-Mixed-CASE", "  v \t"), ("Connection", "close"), ("TE", "gzip"),
                                  ("Authorization", "secret"), ("Content-Length", "2")])
        return [b"ok"]

    h = make_worker(app)
    h.peer.request(1, "GET", "/")
    r = h.peer.response(1)
    assert r.status == 200 and r.body == b"ok"
    assert ("x-mixed-case", "v") in r.headers
    assert ("authorization", "secret") in r.headers
    assert not {"connection", "te"} & set(r.header_names())
    assert all(n == n.lower() for n in r.header_names())


@pytest.mark.parametrize("bad", [("X-Bad", "a\r\nInjected: 1"), ("X-Bad", "a\nb"), ("X-Bad", "nul\x00"),
                                 ("Bad Name", "v"), ("Bad:Name", "v")])
def test_invalid_response_header_gives_500(make_worker: Any, bad: tuple[str, str]) -> None:
    h = make_worker(text_app(b"never", [("Content-Type", "text/plain"), bad]))
    r = get(h, 1)
    assert r.status == 500
    assert b"never" not in r.body
    assert "injected" not in r.header_names()
    assert get(h, 3).status == 500  # the tunnel keeps serving
    assert not h.peer.find(lambda f: isinstance(f, GoAwayFrame))


def test_request_headers_continuation_reassembly(make_worker: Any) -> None:
    h = make_worker(env_app("HTTP_X_ONE", "HTTP_X_BIG", "PATH_INFO"))
    big = "v" * 40000  # a block larger than one frame
    h.peer.request(1, "GET", "/cont", headers=[("x-one", "1"), ("x-big", big)], split=[3, 20, 16000, 32000])
    r = h.peer.response(1)
    assert r.status == 200
    assert eval(r.body) == {"HTTP_X_ONE": "1", "HTTP_X_BIG": big, "PATH_INFO": "/cont"}
    # the HPACK state survived: a second, dynamic-table-referencing request decodes
    h.peer.request(3, "GET", "/cont", headers=[("x-one", "1"), ("x-big", big)], split=[1])
    assert eval(h.peer.response(3).body)["HTTP_X_BIG"] == big


@pytest.mark.parametrize("intruder", ["ping", "data-other-stream", "headers-other-stream",
                                      "continuation-other-stream", "settings"])
def test_frame_interleaved_in_header_block_is_protocol_error(make_worker: Any, intruder: str) -> None:
    h = make_worker(echo_app)
    p = h.peer
    block = p.encode([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x"),
                      ("x-filler", "y" * 100)])
    p.send_frame(HeadersFrame(1, data=block[:10], flags=["END_STREAM"]))
    if intruder == "ping":
        p.send_ping(b"intruder")
    elif intruder == "data-other-stream":
        p.send_frame(DataFrame(3, data=b"x"))
    elif intruder == "headers-other-stream":
        p.send_frame(HeadersFrame(3, data=p.encode([(":method", "GET")]), flags=["END_HEADERS"]))
    elif intruder == "continuation-other-stream":
        p.send_frame(ContinuationFrame(3, data=block[10:], flags=["END_HEADERS"]))
    else:
        p.send_frame(SettingsFrame(0, settings={}))
    goaway = p.wait_goaway()
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    h.wait_closed()
    assert h.dispatched == 0
    assert not p.find(lambda f: isinstance(f, PingFrame) and f.opaque_data == b"intruder")


@pytest.mark.parametrize("extra", [
    [("X-Upper", "1")],              # uppercase name (§8.2.1)
    [("connection", "close")],       # connection-specific (§8.2.2)
    [("te", "gzip")],                # TE other than "trailers"
    [("x-bad", "a\r\nb")],           # CR/LF in a value
    [(":path", "/again")],           # duplicate pseudo-header
    [(":status", "200")],            # response pseudo-header in a request
    [("content-length", "abc")],     # not a number
    [("content-length", "5")],       # END_STREAM on HEADERS, yet a 5-byte body announced
], ids=["uppercase", "connection", "te-gzip", "crlf", "dup-path", "status-in-request", "bad-content-length",
        "content-length-without-body"])
def test_malformed_request_is_a_stream_error(make_worker: Any, extra: list[tuple[str, str]]) -> None:
    """RFC 9113 §8.1.1: a malformed request is a stream error, not the end of the tunnel."""
    h = make_worker(env_app("HTTP_X_KEEP"))
    p = h.peer
    p.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x"),
                       ("x-keep", "indexed-in-the-bad-block"), *extra], end_stream=True)
    r = p.response(1)
    assert r.status is None and r.reset == ErrorCodes.PROTOCOL_ERROR
    assert h.dispatched == 0, "a malformed request must not reach the app"
    # the tunnel serves on, and HPACK saw the bad block (stream 3 reuses its entries)
    r = get(h, 3, headers=[("x-keep", "indexed-in-the-bad-block")])
    assert (r.status, eval(r.body)) == (200, {"HTTP_X_KEEP": "indexed-in-the-bad-block"})
    assert not p.find(lambda f: isinstance(f, GoAwayFrame))
    assert not h.tunnel.closing


@pytest.mark.parametrize("declared,body,trailers", [(10, b"12345", False), (3, b"12345", False),
                                                    (10, b"12345", True)],
                         ids=["short", "long", "short-then-trailers"])
def test_request_body_disagreeing_with_content_length_is_a_stream_error(
        make_worker: Any, declared: int, body: bytes, trailers: bool) -> None:
    h = make_worker(echo_app)
    p = h.peer
    p.request(1, "POST", "/", headers=[("content-length", str(declared))], body=body, end_stream=not trailers)
    if trailers:
        p.send_headers(1, [("x-trailer", "1")], end_stream=True)
    r = p.response(1)
    assert r.reset == ErrorCodes.PROTOCOL_ERROR and not r.ended
    h.peer.request(3, "POST", "/", headers=[("content-length", "5")], body=b"12345")
    assert h.peer.response(3).body == b"12345"
    assert not p.find(lambda f: isinstance(f, GoAwayFrame))


def test_malformed_trailers_reset_the_stream(make_worker: Any) -> None:
    outcome: dict[str, Any] = {}
    started = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        started.set()
        try:
            environ["wsgi.input"].read()
        except Exception as e:
            outcome["exc"] = e
            raise
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"should not happen"]

    h = make_worker(app)
    p = h.peer
    p.request(1, "POST", "/", body=b"abc", end_stream=False)
    assert started.wait(DEFAULT_TIMEOUT)
    p.send_headers(1, [("X-Bad-Trailer", "1")], end_stream=True)
    assert p.wait_rst(1).error_code == ErrorCodes.PROTOCOL_ERROR
    h.wait_served(1)
    assert isinstance(outcome.get("exc"), StreamReset)
    assert not p.find(lambda f: isinstance(f, GoAwayFrame))


def test_host_header_without_authority(make_worker: Any) -> None:
    # HAProxy sends "host" (not :authority) for HTTP/1.1 public clients.
    h = make_worker(env_app("HTTP_HOST", "SERVER_NAME", "SERVER_PORT", "wsgi.url_scheme"))
    r = get(h, 1, authority=None, headers=[("host", "public.example:8443")])
    assert r.status == 200
    assert eval(r.body) == {"HTTP_HOST": "public.example:8443", "SERVER_NAME": "public.example",
                            "SERVER_PORT": "8443", "wsgi.url_scheme": "https"}


def test_cookies_joined_and_repeated_headers(make_worker: Any) -> None:
    h = make_worker(env_app("HTTP_COOKIE", "HTTP_X_MULTI"))
    r = get(h, 1, headers=[("cookie", "a=1"), ("x-multi", "one"), ("cookie", "b=2"), ("cookie", "c=3"),
                           ("x-multi", "two")])
    assert eval(r.body) == {"HTTP_COOKIE": "a=1; b=2; c=3", "HTTP_X_MULTI": "one, two"}


def test_head_sends_no_body(make_worker: Any) -> None:
    h = make_worker(text_app(b"hello", [("Content-Type", "text/plain"), ("Content-Length", "5")]))
    h.peer.request(1, "HEAD", "/")
    r = h.peer.response(1)
    assert r.status == 200 and r.ended and r.reset is None
    assert r.header("content-length") == "5"
    assert r.body == b""
    assert not [f for f in r.frames if isinstance(f, DataFrame)]
    assert "END_STREAM" in r.frames[0].flags


def test_large_response_header_block_is_split_into_continuation(make_worker: Any) -> None:
    big = os.urandom(20000).hex()  # ~28 KiB after Huffman: more than one 16 KiB frame
    h = make_worker(text_app(b"ok", [("Content-Type", "text/plain"), ("X-Big", big)]))
    r = get(h, 1)
    assert r.status == 200 and r.body == b"ok"
    assert r.header("x-big") == big
    hf = h.peer.wait_headers(1)
    assert "END_HEADERS" not in hf.flags
    assert hf.block_frames >= 2
    assert h.peer.find(lambda f: isinstance(f, ContinuationFrame) and f.stream_id == 1)
    # every frame fits the peer's (default 16 KiB) MAX_FRAME_SIZE: checked by the peer


def test_peer_header_table_size_zero_is_honoured(make_worker: Any) -> None:
    hs = [("Content-Type", "text/plain"), ("X-Repeat", "same-value-every-time")]
    h = make_worker(text_app(b"ok", hs), peer_settings={S.HEADER_TABLE_SIZE: 0})
    for sid in (1, 3, 5):
        r = get(h, sid)
        assert r.status == 200 and r.header("x-repeat") == "same-value-every-time"
    assert h.peer.decoder.header_table_size == 0
    assert len(h.peer.decoder.header_table.dynamic_entries) == 0


def test_request_trailers(make_worker: Any) -> None:
    got: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        got["body"] = environ["wsgi.input"].read()
        got["trailers"] = environ["rhttp.trailers"]()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    h = make_worker(app)
    p = h.peer
    p.request(1, "POST", "/", body=b"part1", end_stream=False, headers=[("te", "trailers")])
    p.send_data(1, b"part2")
    p.send_headers(1, [("x-checksum", "abc"), ("x-count", "2")], end_stream=True)
    r = p.response(1)
    assert r.status == 200 and r.body == b"ok"
    assert got == {"body": b"part1part2", "trailers": [("x-checksum", "abc"), ("x-count", "2")]}


# -- flow control ------------------------------------------------------------------------------------


def test_window_update_returned_as_app_reads_not_on_receipt(make_worker: Any) -> None:
    window = 65535  # the smallest the options allow (RFC 9113's initial window)
    release = threading.Event()
    got: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        assert release.wait(DEFAULT_TIMEOUT)
        data = environ["wsgi.input"].read()
        got["sha"] = hashlib.sha256(data).hexdigest()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(len(data)).encode()]

    h = make_worker(app, options=worker_options(initial_window_size=window))
    p = h.peer
    assert p.remote_settings[S.INITIAL_WINDOW_SIZE] == window
    body = os.urandom(5 * window + 123)
    p.request(1, "POST", "/", end_stream=False)
    p.send_body(1, body[:window], end_stream=False)  # exactly the stream window
    idx = p.barrier()
    # received, not consumed: no credit for the stream yet
    assert not p.find(is_wu(1), end=idx)
    assert p.send_stream_window[1] == 0
    release.set()
    # the rest can only go through if reads give the credit back
    p.send_body(1, body[window:], end_stream=True)
    r = p.response(1)
    assert r.status == 200 and r.body == str(len(body)).encode()
    assert got["sha"] == hashlib.sha256(body).hexdigest()
    credits = sum(f.window_increment for f in p.find(is_wu(1)))
    assert credits >= len(body) - window


def test_window_update_waits_for_a_slow_reader(make_worker: Any) -> None:
    """Credit follows wsgi.input reads chunk by chunk."""
    window = 65535  # the smallest the options allow (RFC 9113's initial window)
    step = threading.Semaphore(0)
    read_sizes: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        inp = environ["wsgi.input"]
        total = 0
        while True:
            assert step.acquire(timeout=DEFAULT_TIMEOUT)
            chunk = inp.read(window)
            if not chunk:
                break
            read_sizes.append(len(chunk))
            total += len(chunk)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(total).encode()]

    # fixed windows: a reader this prompt on a socketpair would grow its window (test_window_tuning.py)
    h = make_worker(app, options=worker_options(initial_window_size=window, max_window_size=window))
    p = h.peer
    p.request(1, "POST", "/", end_stream=False)
    p.send_body(1, b"a" * window, end_stream=False)
    for i in range(3):
        idx = p.barrier()
        assert p.send_stream_window[1] == 0, "credit before the app read"
        assert not p.find(is_wu(1), start=idx)
        step.release()  # the app reads one window's worth
        p.wait_for(is_wu(1), start=idx)
        p.send_body(1, b"b" * window, end_stream=(i == 2))
    for _ in range(3):
        step.release()
    r = p.response(1)
    assert r.body == str(4 * window).encode()


def test_padding_is_credited(make_worker: Any) -> None:
    """Padding counts against the window (RFC 9113 §6.1) and must be given back too."""
    window = 65535  # the smallest the options allow (RFC 9113's initial window)
    h = make_worker(echo_app, options=worker_options(initial_window_size=window))
    body = os.urandom(20 * window)
    h.peer.request(1, "POST", "/", end_stream=False)
    h.peer.send_body(1, body, pad=200)
    r = h.peer.response(1)
    assert r.status == 200 and r.body == body


@pytest.mark.parametrize("peer_window", [10, 16384], ids=["10B", "16KiB-haproxy"])
def test_tiny_peer_initial_window(make_worker: Any, peer_window: int) -> None:
    body = os.urandom(peer_window * 7 + 3)
    h = make_worker(text_app(body), peer_settings={S.INITIAL_WINDOW_SIZE: peer_window}, auto_window=False)
    p = h.peer
    p.request(1)
    p.wait_headers(1)
    received = 0
    granted = peer_window
    conn_granted = 65535
    while True:
        want = min(granted, len(body))
        p.wait_until(lambda want=want: sum(len(f.data) for f in p.find(is_data(1))) >= want,
                     what=f"{want} bytes of DATA")
        idx = p.barrier()
        frames = p.find(is_data(1), end=idx)
        received = sum(len(f.data) for f in frames)
        # the worker stopped exactly at the window it was given
        assert received == min(granted, len(body)), (received, granted)
        assert all(len(f.data) <= peer_window for f in frames)
        if any("END_STREAM" in f.flags for f in frames):
            break
        p.send_window_update(1, peer_window)
        granted += peer_window
        if granted > conn_granted:
            p.send_window_update(0, granted - conn_granted)
            conn_granted = granted
    r = p.response(1)
    assert r.body == body and r.ended


def test_large_response_through_haproxy_window(make_worker: Any) -> None:
    body = os.urandom(3 * 1024 * 1024 + 17)
    h = make_worker(text_app(body), peer_settings={S.INITIAL_WINDOW_SIZE: 16384})
    r = get(h, 1)
    assert r.status == 200
    assert hashlib.sha256(r.body).digest() == hashlib.sha256(body).digest()
    h.wait_in_flight(0)


def test_settings_initial_window_change_unblocks_a_stalled_response(make_worker: Any) -> None:
    """RFC 9113 §6.9.2: a new SETTINGS_INITIAL_WINDOW_SIZE applies to open streams."""
    body = os.urandom(100_000)
    h = make_worker(text_app(body), peer_settings={S.INITIAL_WINDOW_SIZE: 0},
                    peer_conn_window=1 << 20, auto_window=False)
    p = h.peer
    p.request(1)
    p.wait_headers(1)
    p.barrier()
    assert not p.find(is_data(1)), "DATA sent into a zero window"
    p.send_settings({S.INITIAL_WINDOW_SIZE: 200_000})
    r = p.response(1)
    assert r.body == body and r.ended


def test_connection_window_raised_to_exactly_max(make_worker: Any) -> None:
    body = os.urandom(4 * 1024 * 1024)
    h = make_worker(text_app(body), peer_settings={S.INITIAL_WINDOW_SIZE: MAX_WINDOW,
                                                    S.MAX_FRAME_SIZE: 1 << 20},
                    peer_conn_window=MAX_WINDOW, auto_window=False)
    r = get(h, 1)
    assert r.status == 200 and r.body == body
    # no credit was needed: the windows are big enough; and they are still valid
    r = get(h, 3)
    assert r.body == body
    assert not h.peer.find(lambda f: isinstance(f, GoAwayFrame))


def test_connection_window_overflow_is_flow_control_error(make_worker: Any) -> None:
    h = make_worker(echo_app, peer_conn_window=MAX_WINDOW)
    h.peer.send_window_update(0, 1)
    assert h.peer.wait_goaway().error_code == ErrorCodes.FLOW_CONTROL_ERROR
    h.wait_closed()


def test_peer_max_frame_size_is_honoured(make_worker: Any) -> None:
    body = os.urandom(200_000)
    h = make_worker(text_app(body), peer_settings={S.MAX_FRAME_SIZE: 32768})
    r = get(h, 1)
    assert r.body == body
    sizes = [len(f.data) for f in r.frames if isinstance(f, DataFrame)]
    assert max(sizes) <= 32768


@pytest.mark.parametrize("max_frame", [16384, 65536])
def test_oversized_frame_is_frame_size_error(make_worker: Any, max_frame: int) -> None:
    h = make_worker(echo_app, options=worker_options(max_frame_size=max_frame))
    p = h.peer
    p.request(1, "POST", "/", end_stream=False)
    p.send_data(1, b"x" * max_frame)  # the largest frame the worker advertised is fine
    # one byte more is refused from the frame header (the payload need not follow)
    p.send_raw((max_frame + 1).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big") + b"x" * 100)
    assert p.wait_goaway().error_code == ErrorCodes.FRAME_SIZE_ERROR
    h.wait_closed()


def test_unknown_frame_types_and_priority_are_ignored(make_worker: Any) -> None:
    h = make_worker(echo_app)
    p = h.peer
    # RFC 9113 §5.5: unknown frame types are ignored (type 0xfa, flags 0, stream 0 and 1)
    p.send_raw(b"\x00\x00\x03\xfa\x00\x00\x00\x00\x00abc")
    p.send_raw(b"\x00\x00\x00\xfa\x00\x00\x00\x00\x01")
    from hyperframe.frame import PriorityFrame
    p.send_frame(PriorityFrame(3, depends_on=0, stream_weight=200))
    r = get(h, 1, "/after-unknown")
    assert r.status == 200 and r.header("x-path") == "/after-unknown"
    assert get(h, 3, "/after-priority").status == 200
    assert not p.find(lambda f: isinstance(f, GoAwayFrame))


# -- liveness ----------------------------------------------------------------------------------


def test_ping_answered_with_ack(make_worker: Any) -> None:
    h = make_worker(echo_app)
    mark = h.peer.mark()
    h.peer.send_ping(b"abcdefgh")
    ack = h.peer.wait_for(lambda f: isinstance(f, PingFrame) and "ACK" in f.flags, start=mark)
    assert ack.opaque_data == b"abcdefgh"


def test_ping_liveness_timeout(make_worker: Any) -> None:
    h = make_worker(echo_app, options=worker_options(ping_interval=0.2, ping_timeout=0.2),
                    auto_ack_ping=False)
    t0 = time.monotonic()
    ping = h.peer.wait_for(lambda f: isinstance(f, PingFrame) and "ACK" not in f.flags, timeout=2)
    assert len(ping.opaque_data) == 8
    h.wait_closed(timeout=3)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.4 + 1.0, elapsed
    assert "PING" in (h.tunnel.close_reason or "")
    h.peer.wait_closed()


def test_ping_ack_keeps_tunnel_alive(make_worker: Any) -> None:
    h = make_worker(echo_app, options=worker_options(ping_interval=0.2, ping_timeout=0.2),
                    auto_ack_ping=True)
    h.peer.wait_until(
        lambda: len([f for f in h.peer.frames if isinstance(f, PingFrame) and "ACK" not in f.flags]) >= 5,
        timeout=5, what="5 worker PINGs")
    assert not h.tunnel.closing
    assert get(h, 1, "/still-alive").status == 200


# -- peer GOAWAY / RST_STREAM -------------------------------------------------------------------


def test_goaway_from_peer_lets_in_flight_streams_complete(make_worker: Any) -> None:
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        assert release.wait(DEFAULT_TIMEOUT)
        environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"finished " + environ["PATH_INFO"].encode()]

    h = make_worker(app)
    p = h.peer
    p.request(1, "GET", "/one")
    p.request(3, "POST", "/two", end_stream=False)
    p.barrier()
    p.send_goaway(3)
    p.barrier()
    assert not h.tunnel.closing
    p.send_data(3, b"late body", end_stream=True)  # still accepted on an in-flight stream
    release.set()
    assert p.response(1).body == b"finished /one"
    assert p.response(3).body == b"finished /two"
    assert h.tunnel.peer_goaway is not None
    # with nothing left in flight, the worker closes the tunnel
    h.wait_closed()
    p.wait_closed()


def test_rst_stream_from_peer_cancels_app_and_closes_iterable(make_worker: Any) -> None:
    saw_cancel = threading.Event()
    closed = threading.Event()
    second_sent = threading.Event()

    class Body:
        def __init__(self, environ: dict[str, Any]) -> None:
            self.cancelled = environ["rhttp.cancelled"]

        def __iter__(self) -> Any:
            yield b"first"
            if self.cancelled.wait(DEFAULT_TIMEOUT):
                saw_cancel.set()
            second_sent.set()
            yield b"second"

        def close(self) -> None:
            closed.set()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        if environ["PATH_INFO"] == "/next":
            return [b"next"]
        return Body(environ)

    h = make_worker(app)
    p = h.peer
    p.request(1)
    p.wait_for(lambda f: is_data(1)(f) and f.data == b"first")
    p.send_rst(1, ErrorCodes.CANCEL)
    assert saw_cancel.wait(DEFAULT_TIMEOUT)
    assert closed.wait(DEFAULT_TIMEOUT)
    h.wait_served(1)
    h.wait_in_flight(0)
    idx = p.barrier()
    assert not p.find(lambda f: is_data(1)(f) and f.data == b"second", end=idx)
    assert not p.find(lambda f: isinstance(f, RstStreamFrame) and f.stream_id == 1, end=idx)
    assert get(h, 3, "/next").body == b"next"
    assert not p.find(lambda f: isinstance(f, GoAwayFrame))


def test_cancelled_on_connection_close(make_worker: Any) -> None:
    started = threading.Event()
    saw_cancel = threading.Event()
    closed = threading.Event()

    class Body:
        def __iter__(self) -> Any:
            return iter(())

        def close(self) -> None:
            closed.set()

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        started.set()
        if environ["rhttp.cancelled"].wait(DEFAULT_TIMEOUT):
            saw_cancel.set()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    h = make_worker(app)
    h.peer.request(1)
    assert started.wait(DEFAULT_TIMEOUT)
    h.peer.sock.shutdown(2)  # the proxy vanishes
    assert saw_cancel.wait(DEFAULT_TIMEOUT)
    assert closed.wait(DEFAULT_TIMEOUT)
    h.wait_closed()
    h.wait_served(1)


# -- concurrency and registry --------------------------------------------------------------------


def test_concurrent_streams_and_registry_cleanup(make_worker: Any) -> None:
    n = 20
    barrier = threading.Barrier(n, timeout=DEFAULT_TIMEOUT)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read()
        barrier.wait()  # all n requests are in the app at the same time
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body + b"@" + str(environ["rhttp.stream_id"]).encode()]

    h = make_worker(app, threads=n)
    sids = [1 + 2 * i for i in range(n)]
    for sid in sids:
        h.peer.request(sid, "POST", "/", end_stream=False)
    for sid in sids:  # interleave the bodies
        h.peer.send_data(sid, f"body-{sid}".encode(), end_stream=True)
    for sid in sids:
        r = h.peer.response(sid)
        assert r.status == 200
        assert r.body == f"body-{sid}@{sid}".encode()
    h.wait_in_flight(0)
    assert h.tunnel.in_flight == 0
    assert not h.tunnel._ready and not h.tunnel._blocked
    assert h.tunnel.streams_total == n
    assert h.proto.open_inbound_streams() == 0


def test_refused_stream_beyond_max_concurrent_keeps_hpack_in_sync(make_worker: Any) -> None:
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/block":
            assert release.wait(DEFAULT_TIMEOUT)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"{environ.get('HTTP_X_TOKEN')}|{environ.get('HTTP_X_NEW')}".encode()]

    h = make_worker(app, options=worker_options(max_concurrent_streams=2), threads=4)
    p = h.peer
    assert p.remote_settings[S.MAX_CONCURRENT_STREAMS] == 2
    p.request(1, "GET", "/block")
    p.request(3, "GET", "/block")
    p.barrier()
    # stream 5 is one too many; its header block adds entries to the HPACK dynamic table
    p.request(5, "GET", "/refused", headers=[("x-token", "tok-5"), ("x-new", "fresh-value")])
    rst = p.wait_rst(5)
    assert rst.error_code == ErrorCodes.REFUSED_STREAM
    assert not p.find(lambda f: isinstance(f, GoAwayFrame))
    assert h.tunnel.streams_refused == 1
    release.set()
    assert p.response(1).status == 200 and p.response(3).status == 200
    # stream 7's block refers to the dynamic-table entries stream 5 created
    p.request(7, "GET", "/ok", headers=[("x-token", "tok-5"), ("x-new", "fresh-value")])
    r = p.response(7)
    assert (r.status, r.body) == (200, b"tok-5|fresh-value")
    # a refused stream's late DATA is ignored without harming the connection
    p.send_data(5, b"late", end_stream=True)
    assert get(h, 9).status == 200
    assert h.dispatched == 4


def test_unread_request_body_gets_rst_no_error_after_response(make_worker: Any) -> None:
    h = make_worker(text_app(b"early answer"))
    p = h.peer
    p.request(1, "POST", "/upload", end_stream=False)
    p.send_data(1, b"x" * 1000)
    r = p.response(1)
    assert r.status == 200 and r.body == b"early answer" and r.ended
    rst = p.wait_rst(1)
    assert rst.error_code == ErrorCodes.NO_ERROR
    frames = p.stream_frames(1)
    end_idx = next(i for i, f in enumerate(frames) if "END_STREAM" in f.flags)
    assert frames.index(rst) > end_idx, "RST_STREAM(NO_ERROR) must follow the complete response"
    # the proxy may still be sending: that must not hurt the connection
    p.send_data(1, b"y" * 1000, end_stream=True)
    assert get(h, 3).status == 200
    h.wait_in_flight(0)
    assert not p.find(lambda f: isinstance(f, GoAwayFrame))


# -- streaming --------------------------------------------------------------------------------


def test_streaming_chunks_arrive_one_by_one(make_worker: Any) -> None:
    n = 5
    go = [threading.Event() for _ in range(n)]
    timed_out: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
        for i in range(n):
            yield f"data: tick {i}\n\n".encode()
            if not go[i].wait(DEFAULT_TIMEOUT):
                timed_out.append(i)

    h = make_worker(app)
    p = h.peer
    p.request(1, "GET", "/events")
    hf = p.wait_headers(1)
    assert "END_STREAM" not in hf.flags
    for i in range(n):
        f = p.wait_for(lambda f, i=i: is_data(1)(f) and f.data == f"data: tick {i}\n\n".encode())
        assert "END_STREAM" not in f.flags
        go[i].set()
    r = p.response(1)
    assert r.ended and not timed_out
    assert r.body == b"".join(f"data: tick {i}\n\n".encode() for i in range(n))
    assert r.header("content-length") is None


# -- send credit / app blocked in write ------------------------------------------------------------


@pytest.mark.parametrize("how", ["connection-close", "stream-reset"])
def test_send_credit_released_when_stream_dies(make_worker: Any, how: str) -> None:
    in_write = threading.Event()
    outcome: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
        if environ["PATH_INFO"] == "/small":
            return [b"small"]
        in_write.set()
        try:
            write(b"x" * (HIGH_WATER + 65536))  # the peer grants nothing: this blocks
            write(b"y")
        except BaseException as e:
            outcome["exc"] = e
            raise
        outcome["exc"] = None
        return []

    h = make_worker(app, peer_settings={S.INITIAL_WINDOW_SIZE: 0}, auto_window=False)
    p = h.peer
    p.request(1)
    p.wait_headers(1)
    assert in_write.wait(DEFAULT_TIMEOUT)
    p.barrier()
    assert "exc" not in outcome  # still blocked: nothing could be sent
    assert not p.find(is_data(1))
    if how == "connection-close":
        p.sock.shutdown(2)
        h.wait_served(1)
        assert isinstance(outcome["exc"], TunnelClosed)
        h.wait_closed()
    else:
        p.send_rst(1, ErrorCodes.CANCEL)
        h.wait_served(1)  # the app thread is free again
        assert isinstance(outcome["exc"], StreamReset)
        h.wait_in_flight(0)
        # and the tunnel still serves (the next stream gets its own window)
        p.send_settings({S.INITIAL_WINDOW_SIZE: 65535})
        assert get(h, 3, "/small").body == b"small"


# -- app errors ---------------------------------------------------------------------------------------


def test_app_exception_before_headers_gives_500_and_tunnel_serves_on(make_worker: Any,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("kaboom")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"fine"]

    h = make_worker(app)
    with caplog.at_level(logging.ERROR, logger="rhttp_wsgi"):
        r = get(h, 1, "/boom")
        assert r.status == 500 and r.reset is None and r.ended
        assert b"kaboom" not in r.body  # no internals leak to the public
        assert get(h, 3, "/ok").body == b"fine"
    recs = [rec for rec in caplog.records if rec.levelno >= logging.ERROR and "stream 1" in rec.getMessage()]
    assert recs, caplog.text
    assert recs[0].exc_info and isinstance(recs[0].exc_info[1], RuntimeError)
    assert not h.peer.find(lambda f: isinstance(f, GoAwayFrame))


def test_app_exception_after_headers_resets_stream(make_worker: Any,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"partial"
        raise RuntimeError("midway")

    h = make_worker(app)
    with caplog.at_level(logging.ERROR, logger="rhttp_wsgi"):
        h.peer.request(1)
        r = h.peer.response(1)
        h.wait_served(1)
    assert r.status == 200
    # Bytes still queued when the stream is reset may be dropped with it; the
    # proxy must see the reset, never a clean end.
    assert b"partial".startswith(r.body)
    assert r.reset == ErrorCodes.INTERNAL_ERROR and not r.ended
    recs = [rec for rec in caplog.records if rec.levelno >= logging.ERROR and "stream 1" in rec.getMessage()]
    assert recs, caplog.text
    assert get(h, 3).status == 200


@pytest.mark.parametrize("declared,chunks", [
    (10, [b"12345"]),            # short, one chunk (sent with the headers)
    (10, [b"123", b"45"]),       # short, streamed
    (10, [b"x" * 15]),           # long, one chunk
    (10, [b"x" * 8, b"x" * 7]),  # long, streamed
    (10, []),                    # nothing at all
], ids=["short-1", "short-n", "long-1", "long-n", "empty"])
def test_content_length_mismatch_resets_stream(make_worker: Any, declared: int, chunks: list[bytes]) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(declared))])
        if environ["PATH_INFO"] == "/ok":
            return [b"0123456789"]
        return iter(chunks) if len(chunks) != 1 else list(chunks)

    h = make_worker(app)
    r = get(h, 1, "/bad")
    assert r.reset == ErrorCodes.INTERNAL_ERROR
    assert not r.ended, "a body of the wrong length must never end cleanly"
    assert len(r.body) <= declared
    r = get(h, 3, "/ok")
    assert (r.status, r.body) == (200, b"0123456789")
    assert not h.peer.find(lambda f: isinstance(f, GoAwayFrame))


# -- graceful teardown ------------------------------------------------------------------------------


def test_drain_sends_goaway_no_error_and_waits_for_in_flight(make_worker: Any) -> None:
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        assert release.wait(DEFAULT_TIMEOUT)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]

    h = make_worker(app)
    p = h.peer
    p.request(1)
    p.barrier()
    h.tunnel.drain()
    announce = p.wait_goaway()
    assert (announce.error_code, announce.last_stream_id) == (ErrorCodes.NO_ERROR, 2**31 - 1)
    final = p.wait_for(lambda f: isinstance(f, GoAwayFrame) and f.last_stream_id != 2**31 - 1,
                       DEFAULT_TIMEOUT, what="final GOAWAY")
    assert (final.error_code, final.last_stream_id) == (ErrorCodes.NO_ERROR, 1)
    assert not h.tunnel.closing  # stream 1 is still in flight
    # a new stream after the final GOAWAY is refused, not served
    p.request(3)
    assert p.wait_rst(3).error_code == ErrorCodes.REFUSED_STREAM
    release.set()
    r = p.response(1)
    assert (r.status, r.body, r.ended) == (200, b"done", True)
    assert h.wait_closed() == "drained"
    p.wait_closed()
    assert h.dispatched == 1


def test_drain_serves_streams_racing_the_first_goaway(make_worker: Any) -> None:
    """RFC 9113 §6.8: streams the proxy opened before it saw GOAWAY are served, not refused."""
    h = make_worker(echo_app, auto_ack_ping=False)
    p = h.peer
    h.tunnel.drain()
    announce = p.wait_goaway()
    assert announce.last_stream_id == 2**31 - 1
    ping = p.wait_for(lambda f: isinstance(f, PingFrame) and "ACK" not in f.flags, DEFAULT_TIMEOUT,
                      what="drain PING")
    p.request(1)  # in flight when the proxy saw the GOAWAY
    assert p.response(1).status == 200
    p.send_frame(PingFrame(0, opaque_data=ping.opaque_data, flags=["ACK"]))
    final = p.wait_for(lambda f: isinstance(f, GoAwayFrame) and f.last_stream_id != 2**31 - 1,
                       DEFAULT_TIMEOUT, what="final GOAWAY")
    assert final.last_stream_id == 1
    h.wait_closed()
    p.wait_closed()


def test_drain_when_idle_closes_at_once(make_worker: Any) -> None:
    h = make_worker(echo_app)
    h.tunnel.drain()
    final = h.peer.wait_for(lambda f: isinstance(f, GoAwayFrame) and f.last_stream_id != 2**31 - 1,
                            DEFAULT_TIMEOUT, what="final GOAWAY")
    assert (final.error_code, final.last_stream_id) == (ErrorCodes.NO_ERROR, 0)
    h.wait_closed()
    h.peer.wait_closed()
