"""PEP 3333, to the letter: apps wrapped in ``wsgiref.validate.validator`` served over a real tunnel.

The validator stays on for every app here: it asserts on the environ, on
``start_response``, on ``wsgi.input``/``wsgi.errors`` and on the iterable (no
iteration after close, ``close()`` must happen).  Its warnings are turned into
errors.  Anything it raises inside the app thread is recorded by
:class:`Checked` and fails the test, so a 500 can never hide a violation.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from typing import Any
from wsgiref.validate import validator

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame

from tests.h2peer import DEFAULT_TIMEOUT

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("error::wsgiref.validate.WSGIWarning"),
]


class _Watch:
    """Wraps the validator's iterator: records what it raises."""

    def __init__(self, it: Any, errors: list[BaseException]) -> None:
        self._it = it
        self._next = iter(it).__next__
        self._errors = errors

    def __iter__(self) -> _Watch:
        return self

    def __next__(self) -> bytes:
        try:
            return self._next()  # type: ignore[no-any-return]
        except StopIteration:
            raise
        except BaseException as e:
            self._errors.append(e)
            raise

    def close(self) -> None:
        try:
            self._it.close()
        except BaseException as e:
            self._errors.append(e)
            raise


class Checked:
    """``validator(app)`` plus a record of every exception raised in the app thread."""

    def __init__(self, app: Any) -> None:
        self._inner = validator(app)
        self.errors: list[BaseException] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> _Watch:
        try:
            result = self._inner(environ, start_response)
        except BaseException as e:
            self.errors.append(e)
            raise
        return _Watch(result, self.errors)

    def assert_clean(self) -> None:
        assert not self.errors, f"the app/validator raised: {self.errors!r}"


class Closing:
    """An iterable whose close() is observable."""

    def __init__(self, chunks: list[bytes], fail_after: int | None = None,
                 wait: threading.Event | None = None) -> None:
        self.chunks = chunks
        self.fail_after = fail_after
        self.wait = wait
        self.closed = threading.Event()
        self.close_calls = 0

    def __iter__(self) -> Any:
        for i, c in enumerate(self.chunks):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("iteration failed")
            yield c
            if self.wait is not None:
                self.wait.wait(DEFAULT_TIMEOUT)

    def close(self) -> None:
        self.close_calls += 1
        self.closed.set()


TEXT = [("Content-Type", "text/plain")]


# -- environ ---------------------------------------------------------------------------------------


def test_environ_keys_and_types(make_worker: Any) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(environ)
        start_response("200 OK", TEXT)
        return [b"ok"]

    checked = Checked(app)
    h = make_worker(checked)
    h.peer.request(1, "GET", "/caf%C3%A9/a%2Fb?q=%20a&b=%C3%A9",
                   headers=[("x-latin1", b"caf\xe9"), ("user-agent", "test/1.0")])
    r = h.peer.response(1)
    assert (r.status, r.body) == (200, b"ok")
    checked.assert_clean()
    # every CGI-style key is a native str (the validator also checks this)
    for k, v in seen.items():
        assert isinstance(k, str)
        if "." not in k:
            assert type(v) is str, (k, v)
    assert seen["REQUEST_METHOD"] == "GET"
    assert seen["SCRIPT_NAME"] == ""
    # PATH_INFO: percent-decoded bytes, as latin-1 text ("é" in UTF-8 is two bytes)
    assert seen["PATH_INFO"] == "/caf\xc3\xa9/a/b"
    assert seen["QUERY_STRING"] == "q=%20a&b=%C3%A9"  # not decoded
    assert seen["HTTP_X_LATIN1"] == "caf\xe9"  # header bytes decoded as latin-1
    assert seen["HTTP_USER_AGENT"] == "test/1.0"
    assert seen["HTTP_HOST"] == "example.com"
    assert seen["SERVER_NAME"] == "example.com"
    assert type(seen["SERVER_PORT"]) is str and seen["SERVER_PORT"] == "443"
    assert seen["SERVER_PROTOCOL"].startswith("HTTP/")
    assert seen["wsgi.version"] == (1, 0)
    assert seen["wsgi.url_scheme"] == "https"
    assert seen["wsgi.input_terminated"] is True
    assert seen["wsgi.multithread"] is True
    assert seen["wsgi.multiprocess"] is False
    assert seen["wsgi.run_once"] is False
    assert "CONTENT_LENGTH" not in seen or seen["CONTENT_LENGTH"] == ""
    assert "CONTENT_TYPE" not in seen
    assert "HTTP_CONTENT_LENGTH" not in seen and "HTTP_CONTENT_TYPE" not in seen
    assert seen["rhttp.stream_id"] == 1
    assert isinstance(seen["rhttp.cancelled"], threading.Event)
    assert not seen["rhttp.cancelled"].is_set()


def test_content_length_and_type_when_known(make_worker: Any) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen["CONTENT_LENGTH"] = environ["CONTENT_LENGTH"]
        seen["CONTENT_TYPE"] = environ["CONTENT_TYPE"]
        body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        start_response("200 OK", TEXT)
        return [body.upper()]

    checked = Checked(app)
    h = make_worker(checked)
    h.peer.request(1, "POST", "/", headers=[("content-length", "11"), ("content-type", "text/plain")],
                   body=b"hello world")
    r = h.peer.response(1)
    assert r.body == b"HELLO WORLD"
    assert seen == {"CONTENT_LENGTH": "11", "CONTENT_TYPE": "text/plain"}
    checked.assert_clean()


def test_input_terminated_body_without_content_length(make_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        assert environ["wsgi.input_terminated"]
        assert not environ.get("CONTENT_LENGTH")
        parts = []
        while True:
            chunk = environ["wsgi.input"].read(1000)  # read to EOF: input_terminated allows it
            if not chunk:
                break
            parts.append(chunk)
        start_response("200 OK", TEXT)
        return [str(sum(map(len, parts))).encode()]

    checked = Checked(app)
    h = make_worker(checked)
    p = h.peer
    p.request(1, "POST", "/", end_stream=False)
    p.send_data(1, b"a" * 3000)
    p.send_data(1, b"b" * 2500)
    p.send_data(1, b"", end_stream=True)
    assert p.response(1).body == b"5500"
    checked.assert_clean()


def test_input_readline_readlines_and_iteration(make_worker: Any) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        inp = environ["wsgi.input"]
        seen["first"] = inp.readline()
        seen["limited"] = inp.readline(3)
        seen["rest_of_line"] = inp.readline()
        seen["two"] = inp.readlines(1)  # a hint: at least one line
        seen["iterated"] = list(inp)
        seen["eof"] = inp.read(10)
        start_response("200 OK", TEXT)
        return [b"ok"]

    checked = Checked(app)
    h = make_worker(checked)
    p = h.peer
    p.request(1, "POST", "/", end_stream=False)
    p.send_data(1, b"line1\nlong-line2\nli")
    p.send_data(1, b"ne3\nline4\nlast")
    p.send_data(1, b"", end_stream=True)
    assert p.response(1).body == b"ok"
    checked.assert_clean()
    assert seen["first"] == b"line1\n"
    assert seen["limited"] == b"lon"
    assert seen["rest_of_line"] == b"g-line2\n"
    assert seen["two"][0] == b"line3\n"
    assert b"".join(seen["two"] + seen["iterated"]) == b"line3\nline4\nlast"
    assert seen["eof"] == b""


def test_underscore_header_dropped_dash_header_kept(make_worker: Any) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update({k: v for k, v in environ.items() if k.startswith("HTTP_X")})
        start_response("200 OK", TEXT)
        return [b"ok"]

    checked = Checked(app)
    h = make_worker(checked)
    h.peer.request(1, headers=[("x_foo", "underscore"), ("x-foo", "dash"), ("x_only", "u")])
    assert h.peer.response(1).status == 200
    checked.assert_clean()
    # x_foo would spoof x-foo in the environ: dropped, as nginx/gunicorn do
    assert seen == {"HTTP_X_FOO": "dash"}


def test_cookies_and_repeated_headers(make_worker: Any) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen["cookie"] = environ["HTTP_COOKIE"]
        seen["accept"] = environ["HTTP_ACCEPT"]
        start_response("200 OK", TEXT)
        return [b"ok"]

    checked = Checked(app)
    h = make_worker(checked)
    h.peer.request(1, headers=[("cookie", "a=1"), ("accept", "text/html"), ("cookie", "b=2"),
                               ("accept", "*/*")])
    assert h.peer.response(1).status == 200
    checked.assert_clean()
    assert seen == {"cookie": "a=1; b=2", "accept": "text/html, */*"}


def test_url_scheme_from_x_forwarded_proto(make_worker: Any) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen["scheme"] = environ["wsgi.url_scheme"]
        seen["port"] = environ["SERVER_PORT"]
        start_response("200 OK", TEXT)
        return [b"ok"]

    checked = Checked(app)
    h = make_worker(checked)
    h.peer.request(1, headers=[("x-forwarded-proto", "http")], authority="site.example")
    assert h.peer.response(1).status == 200
    checked.assert_clean()
    assert seen == {"scheme": "http", "port": "80"}


def test_wsgi_errors_goes_to_the_log(make_worker: Any, caplog: pytest.LogCaptureFixture) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.errors"].write("something odd\n")
        environ["wsgi.errors"].writelines(["partial ", "line"])
        environ["wsgi.errors"].flush()
        start_response("200 OK", TEXT)
        return [b"ok"]

    checked = Checked(app)
    h = make_worker(checked)
    with caplog.at_level(logging.INFO, logger="rhttp_wsgi.app"):
        h.peer.request(1)
        assert h.peer.response(1).status == 200
        h.wait_served(1)
    checked.assert_clean()
    msgs = [r.getMessage() for r in caplog.records if r.name == "rhttp_wsgi.app"]
    assert msgs == ["something odd", "partial line"]


# -- start_response -----------------------------------------------------------------------------------


def test_exc_info_before_headers_replaces_the_response(make_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Stale", "1")])
        try:
            raise ValueError("late failure")
        except ValueError:
            start_response("503 Service Unavailable", [("Content-Type", "text/html")], sys.exc_info())
        return [b"<p>error page</p>"]

    checked = Checked(app)
    h = make_worker(checked)
    h.peer.request(1)
    r = h.peer.response(1)
    checked.assert_clean()
    assert (r.status, r.body, r.ended) == (503, b"<p>error page</p>", True)
    assert r.header("content-type") == "text/html"
    assert r.header("x-stale") is None


def test_exc_info_after_headers_reraises(make_worker: Any) -> None:
    outcome: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", TEXT)
        write(b"partial")  # headers are on the wire now
        try:
            raise ValueError("after headers")
        except ValueError as original:
            try:
                start_response("500 Internal Server Error", TEXT, sys.exc_info())
            except ValueError as e:
                outcome["reraised"] = e is original
                raise
        outcome["reraised"] = False
        return [b"unreachable"]

    checked = Checked(app)
    h = make_worker(checked)
    h.peer.request(1)
    r = h.peer.response(1)
    assert outcome == {"reraised": True}
    assert [type(e) for e in checked.errors] == [ValueError]
    assert r.status == 200 and r.reset == ErrorCodes.INTERNAL_ERROR and not r.ended


def test_start_response_twice_without_exc_info_is_an_error(make_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", TEXT)
        start_response("201 Created", TEXT)
        return [b"no"]

    checked = Checked(app)
    h = make_worker(checked)
    h.peer.request(1)
    r = h.peer.response(1)
    assert r.status == 500
    assert [type(e) for e in checked.errors] == [AssertionError]


def test_app_returning_without_start_response_is_an_error(make_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        return []

    h = make_worker(app)  # the validator itself would reject this app; test the server alone
    h.peer.request(1)
    assert h.peer.response(1).status == 500


# -- the response body ----------------------------------------------------------------------------


def test_write_callable_streams_before_the_app_returns(make_worker: Any) -> None:
    go = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", TEXT)
        write(b"from write()")
        assert go.wait(DEFAULT_TIMEOUT)  # the proxy already has it
        write(b" and more")
        return [b" then iterable"]

    checked = Checked(app)
    h = make_worker(checked)
    h.peer.request(1)
    h.peer.wait_for(lambda f: isinstance(f, DataFrame) and f.stream_id == 1 and f.data == b"from write()")
    go.set()
    r = h.peer.response(1)
    checked.assert_clean()
    assert r.body == b"from write() and more then iterable"
    assert r.ended and r.reset is None


def test_file_wrapper(make_worker: Any) -> None:
    payload = bytes(range(256)) * 1200  # ~300 KiB
    files: list[io.BytesIO] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        f = io.BytesIO(payload)
        files.append(f)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(payload)))])
        return environ["wsgi.file_wrapper"](f, 8192)

    checked = Checked(app)
    h = make_worker(checked)
    h.peer.request(1)
    r = h.peer.response(1)
    checked.assert_clean()
    assert r.body == payload and r.header("content-length") == str(len(payload))
    h.wait_served(1)
    assert files[0].closed, "the file wrapper's close() must close the file"


def test_empty_chunks_are_skipped(make_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", TEXT)
        yield b""
        yield b"a"
        yield b""
        yield b"b"

    checked = Checked(app)
    h = make_worker(checked)
    h.peer.request(1)
    r = h.peer.response(1)
    checked.assert_clean()
    assert r.body == b"ab" and r.ended


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
def test_no_body_statuses(make_worker: Any, status: str) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response(status, [])
        return []

    checked = Checked(app)
    h = make_worker(checked)
    h.peer.request(1)
    r = h.peer.response(1)
    checked.assert_clean()
    assert r.status == int(status[:3]) and r.ended and r.body == b""
    assert not [f for f in r.frames if isinstance(f, DataFrame)]


def test_head_with_a_generator_app(make_worker: Any) -> None:
    body = Closing([b"hello ", b"world"])

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "11")])
        return body

    checked = Checked(app)
    h = make_worker(checked)
    h.peer.request(1, "HEAD", "/")
    r = h.peer.response(1)
    checked.assert_clean()
    assert (r.status, r.body, r.ended) == (200, b"", True)
    assert r.header("content-length") == "11"
    assert body.closed.wait(DEFAULT_TIMEOUT)


# -- close() is always called -----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["normal", "app-error-mid-body", "peer-reset", "head",
                                      "length-mismatch", "tunnel-dies", "write-then-iterable"])
def test_close_always_called(make_worker: Any, scenario: str) -> None:
    gate = threading.Event()
    if scenario == "app-error-mid-body":
        body = Closing([b"a", b"b", b"c"], fail_after=1)
    elif scenario in ("peer-reset", "tunnel-dies"):
        body = Closing([b"first", b"second"], wait=gate)
    else:
        body = Closing([b"abc"])

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        headers = [("Content-Type", "text/plain")]
        if scenario == "length-mismatch":
            headers.append(("Content-Length", "100"))
        write = start_response("200 OK", headers)
        if scenario == "write-then-iterable":
            write(b"w")
        return body

    checked = Checked(app)
    h = make_worker(checked)
    p = h.peer
    p.request(1, "HEAD" if scenario == "head" else "GET", "/")
    if scenario in ("peer-reset", "tunnel-dies"):
        p.wait_for(lambda f: isinstance(f, DataFrame) and f.stream_id == 1 and f.data == b"first")
        if scenario == "peer-reset":
            p.send_rst(1, ErrorCodes.CANCEL)
        else:
            p.sock.shutdown(2)
        gate.set()
    assert body.closed.wait(DEFAULT_TIMEOUT), "close() was not called"
    h.wait_served(1)
    assert body.close_calls == 1
    if scenario == "normal":
        assert p.response(1).body == b"abc"
    elif scenario == "write-then-iterable":
        assert p.response(1).body == b"wabc"
    elif scenario == "app-error-mid-body":
        assert p.response(1).reset == ErrorCodes.INTERNAL_ERROR
        assert [type(e) for e in checked.errors] == [RuntimeError]
        checked.errors.clear()
    elif scenario == "length-mismatch":
        assert p.response(1).reset == ErrorCodes.INTERNAL_ERROR
    checked.assert_clean()


def test_non_str_headers_rejected_by_the_server(make_worker: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [(b"Content-Type", b"text/plain")])  # bytes: not PEP 3333
        return [b"no"]

    h = make_worker(app)  # no validator: it is the server that must refuse
    h.peer.request(1)
    assert h.peer.response(1).status == 500


# -- the environ's caches over a tunnel ------------------------------------------------------------


def test_environ_over_a_tunnel_twice_same_names(make_worker: Any) -> None:
    """The second request hits every cache; the validator checks both environs."""
    seen: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append({k: v for k, v in environ.items() if k.isupper()})
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2"), ("X-Mixed", " v ")])
        return [b"ok"]

    checked = Checked(app)
    h = make_worker(checked)
    for sid in (1, 3):
        h.peer.request(sid, "GET", "/p%41th?q", authority="example.com:8443",
                       headers=[("x-repeat", "a"), ("x-repeat", "b"), ("cookie", "c=1"), ("cookie", "d=2")])
        r = h.peer.response(sid)
        assert (r.status, r.body) == (200, b"ok")
        assert ("x-mixed", "v") in r.headers and ("content-length", "2") in r.headers
    checked.assert_clean()
    assert seen[0] == seen[1]
    assert seen[0]["PATH_INFO"] == "/pAth" and seen[0]["QUERY_STRING"] == "q"
    assert seen[0]["HTTP_X_REPEAT"] == "a, b" and seen[0]["HTTP_COOKIE"] == "c=1; d=2"
    assert (seen[0]["SERVER_NAME"], seen[0]["SERVER_PORT"]) == ("example.com", "8443")
