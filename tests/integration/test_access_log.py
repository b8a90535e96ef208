"""Access lines, request ids and the real client address, end to end over real mTLS tunnels on 127.0.0.1.

The client connects from 127.0.0.7 (a loopback address that is neither the proxy's nor
the worker's), so a line or an environ that shows it names the real client, not a hop.
The lines are read from a handler on the ``rhttp_wsgi.access`` logger (both sides run
in this process); the app answers with the environ keys it saw.  The CLI, as users run
it, is the last test.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rhttp_wsgi.accesslog import LOGGER, format_address
from rhttp_wsgi.pki import DemoPKI

from .proxy_fixtures import WAIT, Env, env_fixture, pki_fixture, read_until_close, wait_until  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
CLIENT = "127.0.0.7"
KEYS = ("REMOTE_ADDR", "REMOTE_PORT", "HTTP_X_REQUEST_ID", "rhttp.request_id", "HTTP_X_FORWARDED_FOR")
COMBINED = re.compile(r'(?P<h>\S+) - - \[[^\]]+\] "(?P<r>[^"]*)" (?P<s>\S+) (?P<b>\S+) "(?P<f>[^"]*)"'
                      r' "(?P<a>[^"]*)" rt=(?P<rt>[\d.]+) rid=(?P<rid>\S+) cn=(?P<cn>\S+) tunnel=(?P<tunnel>\S+)')


def who_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answers with the environ keys that name the client and the request (JSON); /stream in 3 chunks."""
    if environ["PATH_INFO"] == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"one,", b"two,", b"three"])
    body = json.dumps({k: environ.get(k) for k in KEYS}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


class Lines:
    """The access lines logged so far (a handler on ``rhttp_wsgi.access``, at INFO)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def wait(self, n: int, timeout: float = WAIT) -> list[str]:
        """The first ``n`` lines, once they are there; then checks no other came."""
        assert wait_until(lambda: len(self.lines) >= n, timeout), self.lines
        time.sleep(0.05)
        assert len(self.lines) == n, self.lines
        return list(self.lines)

    def json(self, n: int) -> dict[str, dict[str, Any]]:
        """``n`` JSON lines by side (each side at most once)."""
        docs = [json.loads(line) for line in self.wait(n)]
        by_side = {d["side"]: d for d in docs}
        assert len(by_side) == len(docs)
        return by_side


@pytest.fixture(name="access")
def access_fixture() -> Iterator[Lines]:
    import logging

    got = Lines()

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.lines.append(record.getMessage())

    logger = logging.getLogger(LOGGER)
    handler, old = Handler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield got
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def get(env: Env, path: str = "/", headers: dict[str, str] | None = None,
        source: str = CLIENT) -> tuple[int, bytes]:
    """One request from ``source`` (a loopback address) to the proxy's public port."""
    c = http.client.HTTPConnection(*env.public, timeout=WAIT, source_address=(source, 0))
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def seen(env: Env, headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, body = get(env, "/who", headers)
    assert status == 200, body
    doc: dict[str, Any] = json.loads(body)
    return doc


# -- the proxy's line -------------------------------------------------------------------------


def test_the_proxy_logs_each_request_with_client_status_bytes_worker_and_request_id(env: Env,
                                                                                     access: Lines) -> None:
    env.start_proxy()
    pool = env.start_worker(who_app)
    status, body = get(env, "/who?x=1", {"User-Agent": "probe/1", "Referer": "http://ref.example/"})
    assert status == 200
    [line] = access.wait(1)  # the worker's log is off by default
    m = COMBINED.fullmatch(line)
    assert m, line
    app = json.loads(body)
    [w] = env.proxy.workers()
    assert m["h"] == CLIENT and m["r"] == "GET /who?x=1 HTTP/1.1" and m["s"] == "200"
    assert int(m["b"]) == len(body) and m["f"] == "http://ref.example/" and m["a"] == "probe/1"
    assert 0 < float(m["rt"]) < WAIT
    assert m["rid"] == app["rhttp.request_id"] == app["HTTP_X_REQUEST_ID"]
    assert m["cn"] == "worker"
    # The tunnel's name is the worker's end of the connection: the proxy's peer address for it.
    assert m["tunnel"] == format_address(w.remote_addr)
    assert w.remote_addr[1] != 0 and pool.tunnels()[0].connected


def test_the_proxy_logs_a_streamed_response_when_it_ends(env: Env, access: Lines) -> None:
    env.start_proxy()
    env.start_worker(who_app)
    status, body = get(env, "/stream")
    assert (status, body) == (200, b"one,two,three")
    m = COMBINED.fullmatch(access.wait(1)[0])
    assert m and (m["s"], m["b"]) == ("200", "13")


def test_the_proxy_logs_a_503_without_a_worker(env: Env, access: Lines) -> None:
    env.start_proxy()
    status, _ = get(env, "/nobody")
    assert status == 503
    m = COMBINED.fullmatch(access.wait(1)[0])
    assert m and m["s"] == "503" and m["cn"] == "-" and m["tunnel"] == "-" and m["rid"] != "-"


def test_no_line_when_the_access_log_is_off(env: Env, access: Lines) -> None:
    env.start_proxy(access_log=False)
    env.start_worker(who_app)
    assert get(env, "/who")[0] == 200
    assert access.wait(0) == []


# -- both sides ---------------------------------------------------------------------------------


def test_the_worker_line_names_the_same_request_client_and_tunnel_as_the_proxys(env: Env, access: Lines) -> None:
    env.start_proxy(access_log_format="json")
    env.start_worker(who_app, access_log=True, access_log_format="json")
    app = seen(env, {"User-Agent": "probe/2"})
    lines = access.json(2)
    proxy, worker = lines["proxy"], lines["worker"]
    [w] = env.proxy.workers()
    for doc, protocol in ((proxy, "HTTP/1.1"), (worker, "HTTP/2")):
        assert doc["client"] == CLIENT and doc["method"] == "GET" and doc["target"] == "/who"
        assert doc["protocol"] == protocol and doc["status"] == 200 and doc["user_agent"] == "probe/2"
        assert doc["request_id"] == app["rhttp.request_id"]
        assert doc["cn"] == "worker" and doc["tunnel"] == format_address(w.remote_addr)
        assert 0 <= doc["duration"] < WAIT
    assert proxy["bytes"] == worker["bytes"] > 0
    assert (proxy["wid"], worker["wid"]) == (w.id, "tunnel-0")
    assert worker["duration"] <= proxy["duration"]


def test_a_custom_format_on_both_sides(env: Env, access: Lines) -> None:
    fmt = "%(side)s %(h)s %(m)s %(U)s %(s)s %(rid)s %({x-forwarded-for}i)s %({content-type}o)s"
    env.start_proxy(access_log_format=fmt)
    env.start_worker(who_app, access_log=True, access_log_format=fmt)
    rid = seen(env)["rhttp.request_id"]
    lines = sorted(access.wait(2))
    assert lines == [f"proxy {CLIENT} GET /who 200 {rid} - application/json",
                     f"worker {CLIENT} GET /who 200 {rid} {CLIENT} application/json"]


def test_lines_are_written_by_the_writer_thread_in_order_and_close_flushes_them(access: Lines) -> None:
    import threading

    from rhttp_wsgi.accesslog import AccessLog, AccessRecord

    threads: list[str] = []
    log = AccessLog("%(rid)s", side="proxy")
    original = log.logger.handle

    def handle(record: Any) -> None:
        threads.append(threading.current_thread().name)
        original(record)

    log.logger.handle = handle  # type: ignore[method-assign]
    try:
        for i in range(500):
            AccessRecord(log, {"rhttp.request_id": str(i)}, None).finish()
        log.close()
        assert access.lines == [str(i) for i in range(500)]
        assert set(threads) == {"rhttp-access-log-proxy"}  # never the request's thread
        AccessRecord(log, {"rhttp.request_id": "late"}, None).finish()  # after close: written at once
        assert access.lines[-1] == "late" and threads[-1] == threading.current_thread().name
    finally:
        del log.logger.handle


def test_the_clis_handler_gets_lines_in_whole_pipe_atomic_writes_without_log_records() -> None:
    """The CLI's stderr handler: the writer hands it the lines directly (no LogRecord) and it writes
    them per batch, whole lines and at most PIPE_BUF bytes per write (atomic on a pipe)."""
    import logging

    from rhttp_wsgi.accesslog import AccessLog, AccessRecord, LineBatchHandler

    r, w = os.pipe()
    logger = logging.getLogger("tests.access.batch")
    with os.fdopen(w, "w") as stream:
        handler = LineBatchHandler(stream)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        sizes: list[int] = []
        real_write = handler._write
        handler._write = lambda data: (sizes.append(len(data)), real_write(data))[1]  # type: ignore[method-assign]
        log = AccessLog("%(rid)s", side="proxy", logger=logger)
        made: list[Any] = []
        logger.makeRecord = lambda *a, **k: made.append(a) or logging.Logger.makeRecord(logger, *a, **k)  # type: ignore[method-assign]
        try:
            ids = [f"{i:04d}-" + "x" * 150 for i in range(300)]
            for rid in ids:
                AccessRecord(log, {"rhttp.request_id": rid}, None).finish()
            log.close()
        finally:
            logger.removeHandler(handler)
    with os.fdopen(r, "rb") as out:
        data = out.read()
    assert data.decode().splitlines() == ids
    assert max(sizes) <= 4096 and len(sizes) < len(ids) and all(s % 156 == 0 for s in sizes)
    assert made == []  # the direct path: no LogRecord per line


# -- request ids ----------------------------------------------------------------------------------


def test_the_proxy_makes_a_request_id_per_request_and_ignores_the_clients(env: Env, access: Lines) -> None:
    env.start_proxy()
    env.start_worker(who_app)
    apps = [seen(env, {"X-Request-ID": "client-chosen"}) for _ in range(3)]
    ids = [a["rhttp.request_id"] for a in apps]
    assert len(set(ids)) == 3 and "client-chosen" not in ids
    assert [a["HTTP_X_REQUEST_ID"] for a in apps] == ids  # forwarded as x-request-id, one value
    assert sorted(COMBINED.fullmatch(line)["rid"] for line in access.wait(3)) == sorted(ids)  # type: ignore[index]


@pytest.mark.parametrize(("sent", "kept"), [("edge-4f1c", True), ("two words", False), ("x" * 201, False)])
def test_a_trusted_request_id_is_kept_when_valid(env: Env, access: Lines, sent: str, kept: bool) -> None:
    env.start_proxy(trust_request_id=True)
    env.start_worker(who_app, access_log=True)
    rid = seen(env, {"X-Request-ID": sent})["rhttp.request_id"]
    assert (rid == sent) is kept
    assert all(COMBINED.fullmatch(line)["rid"] == rid for line in access.wait(2))  # type: ignore[index]


# -- the client's address on the worker ---------------------------------------------------------------


def test_remote_addr_is_the_client_and_remote_port_never_the_tunnels(env: Env) -> None:
    env.start_proxy()
    env.start_worker(who_app)
    app = seen(env)
    assert app["REMOTE_ADDR"] == CLIENT and app["REMOTE_PORT"] == ""
    assert app["HTTP_X_FORWARDED_FOR"] == CLIENT


def test_remote_addr_is_the_proxy_with_forwarded_for_off(env: Env) -> None:
    env.start_proxy()
    env.start_worker(who_app, forwarded_for=False)
    app = seen(env)
    assert app["REMOTE_ADDR"] == "127.0.0.1" and app["REMOTE_PORT"] == ""  # the tunnel's peer, not its port


@pytest.mark.parametrize(("hops", "client"), [(0, CLIENT), (1, "203.0.113.9"), (2, "198.51.100.3"),
                                              (3, "127.0.0.1")])
def test_remote_addr_trusts_n_further_hops(env: Env, hops: int, client: str) -> None:
    # A front proxy (trusted by ours) said the request came from 203.0.113.9, which claimed
    # 198.51.100.3 before it: each trusted hop moves one entry further left.
    env.start_proxy(trust_forwarded=True)
    env.start_worker(who_app, forwarded_for_hops=hops)
    app = seen(env, {"X-Forwarded-For": "198.51.100.3, 203.0.113.9"})
    assert app["HTTP_X_FORWARDED_FOR"] == f"198.51.100.3, 203.0.113.9, {CLIENT}"
    assert app["REMOTE_ADDR"] == client and app["REMOTE_PORT"] == ""


# -- requests the public server refuses itself ------------------------------------------------------


def refused(env: Env, raw: bytes, *, wait: float = 0.0) -> bytes:
    """Send ``raw`` from CLIENT on a fresh connection (then wait ``wait`` s, the connection open); the
    whole answer, read until the server closes."""
    s = socket.create_connection(env.public, timeout=WAIT, source_address=(CLIENT, 0))
    try:
        s.sendall(raw)
        time.sleep(wait)
        return read_until_close(s)
    finally:
        s.close()


def refused_line(access: Lines) -> re.Match[str]:
    """The one line of a refused request: the client, no worker, a request id of ours."""
    [line] = access.wait(1)
    m = COMBINED.fullmatch(line)
    assert m, line
    assert m["h"] == CLIENT and m["cn"] == "-" and m["tunnel"] == "-" and m["rid"] != "-"
    assert int(m["b"]) > 0 and 0 <= float(m["rt"]) < WAIT
    return m


@pytest.mark.parametrize(("raw", "line"), [
    (b"GARBAGE\r\n\r\n", "- - -"),  # no request line to show
    (b"GET /x HTTP/1.1\r\nHost: a\r\nBad Name: v\r\n\r\n", "GET /x HTTP/1.1"),  # h11 refused a header
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
     "POST /x HTTP/1.1"),  # ambiguous framing: parsed, then refused
])
def test_the_public_server_logs_a_malformed_request_it_refuses_400(env: Env, access: Lines, raw: bytes,
                                                                  line: str) -> None:
    env.start_proxy()
    assert refused(env, raw).startswith(b"HTTP/1.1 400 ")
    m = refused_line(access)
    assert (m["r"], m["s"]) == (line, "400")


@pytest.mark.parametrize("split", [False, True])
def test_the_public_server_logs_an_oversized_head_431(env: Env, access: Lines, split: bool) -> None:
    env.start_proxy(max_request_head=1024)
    raw = b"GET /big HTTP/1.1\r\nHost: a\r\nUser-Agent: probe/3\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n"
    if split:  # h11 sees an incomplete head grow past the limit
        raw = raw[:3000]
    assert refused(env, raw).startswith(b"HTTP/1.1 431 ")
    m = refused_line(access)
    assert (m["r"], m["s"]) == ("GET /big HTTP/1.1", "431")


def test_the_public_server_logs_a_body_over_max_request_body_413(env: Env, access: Lines) -> None:
    env.start_proxy(max_request_body=10, access_log_format="json")
    out = refused(env, b"POST /up?q=1 HTTP/1.1\r\nHost: a\r\nUser-Agent: probe/4\r\nContent-Length: 100\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413 ")
    [doc] = access.json(1).values()
    assert doc["side"] == "proxy" and doc["client"] == CLIENT and doc["status"] == 413
    assert (doc["method"], doc["target"], doc["protocol"]) == ("POST", "/up?q=1", "HTTP/1.1")
    assert doc["user_agent"] == "probe/4" and doc["request_id"] and doc["bytes"] == len(out.partition(b"\r\n\r\n")[2])
    assert doc["cn"] is None and doc["tunnel"] is None and doc["wid"] is None


def test_a_chunked_body_over_max_request_body_is_logged_once_by_the_forwarder(env: Env, access: Lines) -> None:
    env.start_proxy(max_request_body=10)
    out = refused(env, b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"20\r\n" + b"x" * 32 + b"\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413 ")
    m = refused_line(access)  # (exactly one line: the public server leaves it to the app that read the body)
    assert (m["r"], m["s"]) == ("POST /up HTTP/1.1", "413")


def test_the_public_server_logs_a_stalled_head_408(env: Env, access: Lines) -> None:
    env.start_proxy(header_timeout=0.3)
    t0 = time.monotonic()
    out = refused(env, b"GET /slow HTTP/1.1\r\nHost: a\r\n")
    assert out.startswith(b"HTTP/1.1 408 ")
    m = refused_line(access)
    assert (m["r"], m["s"]) == ("GET /slow HTTP/1.1", "408")
    assert 0 < float(m["rt"]) <= time.monotonic() - t0  # measured within the connection's life


def test_no_line_for_a_connection_that_sent_nothing(env: Env, access: Lines) -> None:
    env.start_proxy(header_timeout=0.2)
    assert refused(env, b"") == b""  # timed out with nothing sent: closed without an answer
    s = socket.create_connection(env.public, timeout=WAIT, source_address=(CLIENT, 0))
    s.close()  # closed without a request
    assert refused(env, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")  # (a line, so the others are known missing)
    assert COMBINED.fullmatch(access.wait(1)[0])


def test_no_line_for_a_refused_request_when_the_access_log_is_off(env: Env, access: Lines) -> None:
    env.start_proxy(access_log=False, header_timeout=0.3, max_request_body=10)
    assert refused(env, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert refused(env, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n").startswith(b"HTTP/1.1 413 ")
    assert refused(env, b"GET / HTTP/1.1\r\n").startswith(b"HTTP/1.1 408 ")
    assert access.wait(0) == []


# -- the CLI ---------------------------------------------------------------------------------------------


def _read_until(proc: subprocess.Popen[str], pattern: str, lines: list[str], timeout: float = 20) -> re.Match[str]:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(lines))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_the_cli_writes_bare_access_lines_whatever_the_log_level(pki: DemoPKI) -> None:
    """`rhttp-wsgi proxy` (access log on by default) and `rhttp-wsgi worker --access-log`, both at
    --log-level warning: each request is one bare line on stderr on each side, the same id in both."""
    cert, key = pki.workers["worker"]
    common = ["--log-level", "warning"]
    tport, pport = _free_ports(2)
    public = ("127.0.0.1", pport)
    proxy = subprocess.Popen(
        [sys.executable, "-m", "rhttp_wsgi", *common, "proxy", "--tunnel-bind", f"127.0.0.1:{tport}",
         "--public-bind", f"127.0.0.1:{pport}", "--cert", str(pki.server_cert), "--key", str(pki.server_key),
         "--workers-ca", str(pki.ca_cert)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [proxy]
    plines: list[str] = []
    wlines: list[str] = []
    try:
        worker = subprocess.Popen(
            [sys.executable, "-m", "rhttp_wsgi", *common, "worker", "tests.apps.hello:app",
             "--proxy", f"127.0.0.1:{tport}", "--server-name", "localhost", "--cert", str(cert), "--key", str(key),
             "--ca", str(pki.ca_cert), "--access-log", "--access-log-format", "json"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)))
        procs.append(worker)
        status = 0
        deadline = time.monotonic() + 20
        body = b""
        while status != 200 and time.monotonic() < deadline:  # until the proxy listens and the worker attached
            c = http.client.HTTPConnection(*public, timeout=WAIT, source_address=(CLIENT, 0))
            try:
                c.request("GET", "/cli?q=1")
                r = c.getresponse()
                status, body = r.status, r.read()
            except OSError:
                pass
            finally:
                c.close()
            if status != 200:
                time.sleep(0.1)
        assert status == 200 and body == b"hello from cli"
        pm = COMBINED.fullmatch(_read_until(proxy, r' 200 \d+ ', plines).string.rstrip("\n"))
        wline = _read_until(worker, r'^\{"time"', wlines).string
        doc = json.loads(wline)
        assert pm and pm["h"] == CLIENT and pm["r"] == "GET /cli?q=1 HTTP/1.1"
        assert doc["client"] == CLIENT and doc["target"] == "/cli?q=1" and doc["status"] == 200
        assert doc["request_id"] == pm["rid"] and doc["tunnel"] == pm["tunnel"] and doc["cn"] == pm["cn"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
