"""A hostile public client against the turnkey HTTP/1.1 server.

Each attack gets the right 4xx (or 501 for a transfer coding h11 does not
implement) *and a closed connection* -- read_until_close() only returns at
EOF -- and the worker's tunnel is unaffected: afterwards a normal request
succeeds on the same attached worker, which never reconnected.

The server's deadlines are socket timeouts on the real clock (it takes no
clock to move), so these tests bound how long an attack lasts from above and
read which deadline ended it from the 408's reason; when a deadline falls is
the business of the rule itself (``_io.body_wait``, fed the time, in
``tests/unit/test_http_rules.py``).
"""

from __future__ import annotations

import select
import time
from typing import Any

import pytest

from rhttp_wsgi.worker import WorkerPool

from .proxy_fixtures import (  # noqa: F401  (fixtures)
    WAIT,
    Env,
    echo_app,
    env_fixture,
    pki_fixture,
    read_until_close,
)

pytestmark = pytest.mark.timeout(30)

H = b"Host: x\r\n"

#: name -> (raw request, expected status)
SMUGGLING: dict[str, tuple[bytes, int]] = {
    # RFC 9112 §6.1: both framings -> reject (and close)
    "cl-then-te": (b"POST /s HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "te-then-cl": (b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                   b"0\r\n\r\n", 400),
    "te-in-http10": (b"POST /s HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    # RFC 9112 §6.3: repeated or list-valued Content-Length
    "cl-duplicate-equal": (b"POST /s HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
                           400),
    "cl-list": (b"POST /s HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    "cl-conflicting": (b"POST /s HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                       400),
    "cl-signed": (b"POST /s HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", 400),
    "cl-negative": (b"POST /s HTTP/1.1\r\n" + H + b"Content-Length: -5\r\n\r\nhello", 400),
    "cl-hex": (b"POST /s HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello", 400),
    # RFC 9112 §5.2: obs-fold
    "obs-fold-space": (b"GET /s HTTP/1.1\r\n" + H + b"X-A: one\r\n two\r\n\r\n", 400),
    "obs-fold-tab": (b"GET /s HTTP/1.1\r\n" + H + b"X-A: one\r\n\ttwo\r\n\r\n", 400),
    "obs-fold-transfer-encoding": (b"POST /s HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nX-A: b\r\n"
                                   b" Transfer-Encoding: chunked\r\n\r\nhello", 400),
    "whitespace-before-first-header": (b"GET /s HTTP/1.1\r\n Host: x\r\n\r\n", 400),
    # Transfer-Encoding variants
    "te-space-before-colon": (b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    "te-gzip-chunked": (b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "te-chunked-twice": (b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    "te-xchunked": (b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
    # line endings and control characters
    "bare-cr": (b"GET /s HTTP/1.1\r" + H + b"\r\n", 400),
    "bare-cr-in-value": (b"GET /s HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400),
    "nul-in-value": (b"GET /s HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    "no-host": (b"GET /s HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET /s HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    # invalid chunk sizes (the error surfaces while the body is read)
    "chunk-size-not-hex": (b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                           400),
    "chunk-size-negative": (b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n"
                            b"0\r\n\r\n", 400),
    "chunk-size-overflow": (b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                            b"ffffffffffffffffffffffff\r\nhello\r\n0\r\n\r\n", 400),
    "chunk-size-0x": (b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
                      400),
    "chunk-data-longer-than-size": (b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                                    b"5\r\nhelloXX\r\n0\r\n\r\n", 400),
    "second-chunk-invalid": (b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\nzz\r\n0\r\n\r\n", 400),
}


def start(env: Env, **proxy_kw: Any) -> WorkerPool:
    env.start_proxy(**proxy_kw)
    return env.start_worker(echo_app)


def assert_tunnel_unaffected(env: Env, pool: WorkerPool, worker_id: str) -> None:
    status, _, body, _ = env.request("POST", "/after", body=b"still fine")
    assert (status, body) == (200, b"still fine")
    assert [w.id for w in env.proxy.workers()] == [worker_id]
    assert [t.reconnects for t in pool.tunnels()] == [0]


def exchange(env: Env, data: bytes) -> bytes:
    """Send raw bytes, return everything until the server closes (fails on a timeout)."""
    s = env.raw()
    s.sendall(data)
    return read_until_close(s)


@pytest.mark.parametrize("case", sorted(SMUGGLING))
def test_smuggling_attempt_rejected_and_closed(env: Env, case: str) -> None:
    raw, expected = SMUGGLING[case]
    pool = start(env)
    worker_id = env.proxy.workers()[0].id
    out = exchange(env, raw)
    assert out.startswith(b"HTTP/1.1 %d " % expected), out[:300]
    assert out.count(b"HTTP/1.1 ") == 1  # nothing smuggled behind it was answered
    assert b"connection: close" in out.lower()
    assert_tunnel_unaffected(env, pool, worker_id)


def test_bare_lf_line_endings_parsed_consistently(env: Env) -> None:
    """h11 accepts bare LF (RFC 9112 §2.2 allows it); the request is framed exactly as sent."""
    pool = start(env)
    worker_id = env.proxy.workers()[0].id
    out = exchange(env, b"POST /lf HTTP/1.1\nHost: x\nX-A: b\nContent-Length: 5\nConnection: close\n\nhello")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"hello"
    assert b"x-echo-h-x-a: b\r\n" in head.lower() and b"x-echo-path: /lf\r\n" in head.lower()
    assert_tunnel_unaffected(env, pool, worker_id)


@pytest.mark.parametrize("what", ["one-long-header", "many-headers", "long-target"])
def test_oversized_head_431(env: Env, what: str) -> None:
    pool = start(env, max_request_head=8192)
    worker_id = env.proxy.workers()[0].id
    if what == "one-long-header":
        raw = b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n"
    elif what == "many-headers":
        raw = b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-H%d: v\r\n" % i for i in range(1000)) + b"\r\n"
    else:
        raw = b"GET /" + b"p" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n"
    assert exchange(env, raw).startswith(b"HTTP/1.1 431 ")
    assert_tunnel_unaffected(env, pool, worker_id)


def test_slowloris_head_trickle_408(env: Env) -> None:
    """One byte every 50 ms never extends header_timeout (it runs from the first byte)."""
    pool = start(env, header_timeout=0.5)
    worker_id = env.proxy.workers()[0].id
    s = env.raw()
    t0 = time.monotonic()
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    out = b""
    for i in range(len(head)):
        try:
            s.sendall(head[i:i + 1])
        except OSError:  # closed under us: that is the point
            break
        time.sleep(0.05)
        if time.monotonic() - t0 > 3.0:
            break
    out = read_until_close(s)
    elapsed = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 408 "), out[:200]
    assert b"request head not received in time" in out  # header_timeout ended it (see the docstring)
    assert elapsed < 2.0  # ... and the trickle (10 s of it) did not extend it
    assert_tunnel_unaffected(env, pool, worker_id)


@pytest.mark.parametrize("framing", ["content-length", "chunked", "chunked-bare-lf"])
def test_stalled_body_408_and_close(env: Env, framing: str) -> None:
    pool = start(env, body_timeout=0.5)
    worker_id = env.proxy.workers()[0].id
    s = env.raw()
    if framing == "content-length":
        s.sendall(b"POST /slow HTTP/1.1\r\n" + H + b"Content-Length: 100\r\n\r\n" + b"x" * 10)
    elif framing == "chunked":
        s.sendall(b"POST /slow HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n")
    else:  # h11 wants CRLF after chunk data: bare LF just leaves it waiting for more
        s.sendall(b"POST /slow HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n")
    t0 = time.monotonic()
    out = read_until_close(s)  # returns only once the server closed
    elapsed = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 408 "), out[:300]
    assert b"connection: close" in out.lower()
    # a body deadline ended it (the idle one, or the minimum rate it never reached; see the docstring)
    assert b"no request body data for 0.5s" in out or b"request body slower than" in out, out[:300]
    assert elapsed < 2.0, elapsed
    assert_tunnel_unaffected(env, pool, worker_id)


def test_trickled_body_408_by_min_rate(env: Env) -> None:
    """A byte every 50 ms never stalls a read for body_timeout, but averages far below body_min_rate."""
    pool = start(env, body_timeout=0.5, body_min_rate=100)
    worker_id = env.proxy.workers()[0].id
    s = env.raw()
    s.sendall(b"POST /trickle HTTP/1.1\r\n" + H + b"Content-Length: 1000\r\n\r\n")
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < 5.0 and not select.select([s], [], [], 0)[0]:
        try:
            s.sendall(b"x")
        except OSError:
            break
        sent += 1
        time.sleep(0.05)
    out = read_until_close(s)
    elapsed = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 408 "), out[:300]
    assert b"slower than 100 bytes/s" in out and b"connection: close" in out.lower()
    # allowance = 0.5 s + sent / 100 B/s, i.e. about 0.6 s at 20 B/s (the rate, not the idle timeout,
    # ended it: the reason above)
    assert elapsed < 2.0 and sent < 60, (elapsed, sent)
    assert_tunnel_unaffected(env, pool, worker_id)


def test_keep_alive_pipelined_requests_still_work(env: Env) -> None:
    """The raw-head bookkeeping must follow pipelined requests on one connection."""
    pool = start(env)
    worker_id = env.proxy.workers()[0].id
    out = exchange(env, b"GET /1 HTTP/1.1\r\n" + H + b"\r\nPOST /2 HTTP/1.1\r\n" + H
                   + b"Content-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 ") == 3 and b"abc" in out
    assert_tunnel_unaffected(env, pool, worker_id)



def test_body_timeout_zero_waits_for_a_slow_body(env: Env) -> None:
    """body_timeout 0 (shared with the worker) means "wait forever": no 408, and no rate check either."""
    pool = start(env, body_timeout=0, body_min_rate=100000)
    worker_id = env.proxy.workers()[0].id
    s = env.raw()
    s.sendall(b"POST /slow HTTP/1.1\r\n" + H + b"Content-Length: 10\r\nConnection: close\r\n\r\nhello")
    time.sleep(0.3)  # a pause the server must sit out (no lower bound on anything is asserted)
    s.sendall(b"world")
    out = read_until_close(s)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"helloworld", out[:300]
    assert_tunnel_unaffected(env, pool, worker_id)
