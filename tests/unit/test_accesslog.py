"""The access log's formats, request ids and the X-Forwarded-For rule (``rhttp_wsgi.accesslog``), without I/O.

A record is filled in by hand as the forwarder or the worker would; the lines are
compared field by field.  End to end (the proxy's and the worker's lines for one
request over a real tunnel): ``tests/integration/test_access_log.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

import pytest

from rhttp_wsgi import accesslog
from rhttp_wsgi.accesslog import (
    ATOMS,
    JSON_FIELDS,
    REQUEST_ID_MAX,
    AccessLog,
    AccessRecord,
    TunnelIdentity,
    check_format,
    format_address,
    forwarded_client,
    new_request_id,
    request_id,
)
from rhttp_wsgi.errors import ConfigError
from rhttp_wsgi.options import ProxyOptions, WorkerOptions, option_fields

PEER = TunnelIdentity("worker-1", "tunnel-0", ("10.0.0.5", 51234))
ENVIRON: dict[str, Any] = {
    "REQUEST_METHOD": "GET", "RAW_URI": "/a%20b?x=1", "PATH_INFO": "/a b", "QUERY_STRING": "x=1",
    "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "192.0.2.7", "HTTP_USER_AGENT": 'curl/8 "quoted"',
    "HTTP_REFERER": "https://ref.example/", "rhttp.request_id": "abc-1", "HTTP_X_CUSTOM": "custom",
}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(name="lines")
def lines_fixture() -> Any:
    logger = logging.getLogger(accesslog.LOGGER)
    handler = _Lines()
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def _line(log: AccessLog, *, status: int | None = 200, sent: int = 12, peer: Any = PEER,
          environ: dict[str, Any] | None = None, duration: float = 0.0123456) -> str:
    rec = AccessRecord(log, ENVIRON if environ is None else environ, peer)
    rec.status, rec.sent = status, sent
    rec.response_headers = [(b":status", b"200"), (b"content-type", b"text/plain")]
    rec.started = 1_700_000_000.25
    return log.format(rec, duration)


def test_combined_line_has_every_field(lines: list[str]) -> None:
    line = _line(AccessLog(side="proxy"))
    m = re.fullmatch(r'192\.0\.2\.7 - - \[(.+?)\] "GET /a%20b\?x=1 HTTP/1\.1" 200 12 "https://ref\.example/"'
                     r' "curl/8 \\"quoted\\"" rt=0\.012346 rid=abc-1 cn=worker-1 tunnel=10\.0\.0\.5:51234', line)
    assert m, line
    assert m.group(1) == time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(1_700_000_000))


def test_missing_values_are_a_dash() -> None:
    line = _line(AccessLog(side="proxy"), status=None, sent=0, peer=None,
                 environ={"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_PROTOCOL": "HTTP/1.1"})
    assert line.startswith('- - - [') and '"GET / HTTP/1.1" - - "-" "-" rt=' in line
    assert line.endswith("rid=- cn=- tunnel=-")


def test_json_line_parses_and_has_every_field() -> None:
    doc = json.loads(_line(AccessLog("json", side="worker")))
    assert tuple(doc) == JSON_FIELDS
    assert doc == {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(1_700_000_000)) + ".250Z", "side": "worker",
        "request_id": "abc-1", "client": "192.0.2.7", "method": "GET", "target": "/a%20b?x=1",
        "protocol": "HTTP/1.1", "status": 200, "bytes": 12, "duration": 0.012346,
        "referer": "https://ref.example/", "user_agent": 'curl/8 "quoted"', "cn": "worker-1",
        "tunnel": "10.0.0.5:51234", "wid": "tunnel-0",
    }
    doc = json.loads(_line(AccessLog("json", side="proxy"), status=None, peer=None, environ={"X": "\x01\u20ac"}))
    assert doc["status"] is None and doc["cn"] is None and doc["client"] is None and doc["target"] == "/"


def test_custom_format_uses_gunicorn_atoms_and_braced_lookups() -> None:
    fmt = ("%(h)s|%(m)s|%(U)s|%(q)s|%(H)s|%(s)s|%(B)s|%(b)s|%(T)s|%(M)s|%(D)s|%(L)s|%(p)s|%(wid)s|%(side)s"
           "|%({x-custom}i)s|%({Content-Type}o)s|%({QUERY_STRING}e)s|%({missing}i)s|100%%")
    line = _line(AccessLog(fmt, side="worker"), sent=0, duration=1.5)
    assert line == (f"192.0.2.7|GET|/a%20b|x=1|HTTP/1.1|200|0|-|1|1500|1500000|1.500000|{os.getpid()}|tunnel-0"
                    "|worker|custom|text/plain|x=1|-|100%")


def test_every_documented_atom_formats() -> None:
    line = _line(AccessLog(" ".join(f"%({name})s" for name in ATOMS), side="proxy"))
    assert len(line.split(" ")) >= len(ATOMS)


@pytest.mark.parametrize("fmt", ["%(nope)s", "%(h)d", "%(h)", "%({x}z)s"])
def test_an_invalid_format_is_refused_naming_the_option(fmt: str) -> None:
    with pytest.raises(ValueError):
        check_format(fmt)
    with pytest.raises(ConfigError, match="access_log_format"):
        ProxyOptions(cert="c", key="k", workers_ca="ca", access_log_format=fmt)


def test_options_defaults_proxy_logs_worker_does_not() -> None:
    proxy = ProxyOptions(cert="c", key="k", workers_ca="ca")
    worker = WorkerOptions(proxy="p:1", cert="c", key="k")
    assert proxy.access_log is True and worker.access_log is False
    assert proxy.access_log_format == worker.access_log_format == "combined"
    assert proxy.trust_request_id is False
    assert worker.forwarded_for is True and worker.forwarded_for_hops == 0
    assert AccessLog.from_options(worker, "worker") is None
    assert isinstance(AccessLog.from_options(proxy, "proxy"), AccessLog)


def test_the_format_help_lists_every_atom() -> None:
    [f] = [f for f in option_fields(ProxyOptions) if f.name == "access_log_format"]
    for name in ATOMS:
        assert f"{name} " in f.metadata["help"]
    for field in JSON_FIELDS:
        assert field in f.metadata["help"]


def test_nothing_is_recorded_when_the_logger_drops_info() -> None:
    logger = logging.getLogger("tests.accesslog.quiet")
    logger.setLevel(logging.WARNING)
    assert AccessLog(side="proxy", logger=logger).start(ENVIRON) is None


def test_a_record_is_written_once(lines: list[str]) -> None:
    rec = AccessLog(side="proxy", background=False).start(ENVIRON, PEER)
    assert rec is not None
    rec.status = 204
    rec.finish()
    rec.finish()
    assert len(lines) == 1 and '" 204 - "' in lines[0]


# -- request ids -------------------------------------------------------------------------------


def test_generated_request_ids_are_short_unique_and_valid() -> None:
    ids = [new_request_id() for _ in range(10000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) <= 20 and request_id(i) == i for i in ids)
    assert len({i.split("-")[0] for i in ids}) == 1  # one prefix per process


def test_a_forked_child_gets_its_own_prefix() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(w, new_request_id().encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    child = os.read(r, 100).decode()
    os.close(r)
    assert child.split("-")[0] != new_request_id().split("-")[0]


@pytest.mark.parametrize("value", ["abc", "7F000001:D8A2_7F000001:1F90_6650A1B2_0001:3A2B", "x" * REQUEST_ID_MAX,
                                   "~!#$%&'()*+,-./:;<=>?@[\\]^_`{|}"])
def test_a_valid_request_id_is_kept(value: str) -> None:
    assert request_id(value) == value


@pytest.mark.parametrize("value", [None, "", "a b", "a\tb", "caf\xe9", "x" * (REQUEST_ID_MAX + 1), "a\x7fb",
                                   'a"b\x00'])
def test_an_invalid_request_id_is_replaced(value: str | None) -> None:
    got = request_id(value)
    assert got != value and request_id(got) == got


# -- the client's address --------------------------------------------------------------------------


@pytest.mark.parametrize(("xff", "trusted", "client"), [
    ("192.0.2.7", 1, "192.0.2.7"),
    ("198.51.100.1, 192.0.2.7", 1, "192.0.2.7"),
    ("198.51.100.1,192.0.2.7 ", 1, "192.0.2.7"),
    ("203.0.113.9, 198.51.100.1, 192.0.2.7", 2, "198.51.100.1"),
    ("203.0.113.9, 198.51.100.1, 192.0.2.7", 3, "203.0.113.9"),
    ("198.51.100.1, 192.0.2.7", 3, None),  # fewer entries than trusted hops: keep the peer's address
    ("192.0.2.7, ", 1, None),
    ("2001:db8::1", 1, "2001:db8::1"),
])
def test_the_client_is_the_trusted_th_entry_from_the_right(xff: str, trusted: int, client: str | None) -> None:
    assert forwarded_client(xff, trusted) == client


def test_a_tunnel_is_named_by_the_workers_address() -> None:
    assert format_address(("10.0.0.5", 51234)) == "10.0.0.5:51234"
    assert format_address(("::1", 51234, 0, 0)) == "[::1]:51234"
    assert format_address(()) == "-"


def test_the_cli_setup_falls_back_to_a_plain_handler_without_a_descriptor() -> None:
    import io

    from rhttp_wsgi.accesslog import LineBatchHandler, access_log_to

    logger = logging.getLogger(accesslog.LOGGER)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers.clear()
    try:
        stream = io.StringIO()
        access_log_to(stream)  # (a replaced sys.stderr has no fileno())
        [handler] = logger.handlers
        assert type(handler) is logging.StreamHandler and not isinstance(handler, LineBatchHandler)
        assert logger.level == logging.INFO and logger.propagate is False
        access_log_to(io.StringIO())  # a second call leaves the first handler alone
        assert logger.handlers == [handler]
        log = AccessLog("%(rid)s", side="proxy", background=False)
        log.emit(AccessRecord(log, ENVIRON, None), 0.0)
        assert stream.getvalue() == "abc-1\n"
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
