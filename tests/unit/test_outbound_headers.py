"""The worker runs h2 with outbound header normalization/validation OFF (a hot-path saving).

That is only sound because ``wsgi._encode_headers`` already guarantees everything h2's
outbound pass would do or check: these tests prove that h2's pass is the identity on
every header list ``_encode_headers`` accepts (same names, values, order and
never-indexed marks), that what it produces is wire-valid (RFC 9113 §8.2), and that only
the worker (server) role drops the outbound pass while inbound checks stay on.  (What an
app's headers become on the wire: ``tests/tunnel/test_worker_protocol.py``.)
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from h2.utilities import HeaderValidationFlags, normalize_outbound_headers, validate_outbound_headers
from hpack import HeaderTuple, NeverIndexedHeaderTuple

from rhttp_wsgi._http import CONNECTION_SPECIFIC_STR, valid_name
from rhttp_wsgi._protocol import core_config
from rhttp_wsgi.options import TunnelOptions
from rhttp_wsgi.wsgi import _encode_headers

RESPONSE = HeaderValidationFlags(is_client=False, is_trailer=False, is_response_header=True, is_push_promise=False)


def h2_outbound(headers: list[Any]) -> list[Any]:
    """What h2 4.x does to a response header block when its outbound checks are on."""
    return list(validate_outbound_headers(normalize_outbound_headers(headers, RESPONSE, False), RESPONSE))


def same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(
        tuple(x) == tuple(y) and isinstance(x, NeverIndexedHeaderTuple) == isinstance(y, NeverIndexedHeaderTuple)
        for x, y in zip(a, b, strict=True))


CASES: list[list[tuple[str, str]]] = [
    [],
    [("Content-Type", "text/plain"), ("Content-Length", "13")],
    [("X-Mixed-CASE", "  padded value\t")],
    [("X-Vt", "\x0bvalue\x0c")],
    [("Set-Cookie", "a=b; Path=/"), ("Set-Cookie", "c=d")],
    [("Authorization", "Bearer secret"), ("Proxy-Authorization", "Basic x")],
    [("Cookie", "short=1"), ("Cookie", "a-much-longer-cookie=value-here")],
    [("Connection", "close"), ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"),
     ("Upgrade", "h2c"), ("Proxy-Connection", "x"), ("X-Ok", "1")],
    [("TE", "trailers"), ("te", "gzip"), ("TE", " Trailers ")],
    [("X-Latin1", "caf\xe9"), ("X-Empty", ""), ("X-Spaces", "   ")],
    [("Location", "/x?y=1"), ("Cache-Control", "no-cache, no-store")],
]


@pytest.mark.parametrize("headers", CASES)
@pytest.mark.parametrize("status", ["200 OK", "204 No Content", "404 Not Found", "599 Custom"])
def test_h2_outbound_pass_is_identity(status: str, headers: list[tuple[str, str]]) -> None:
    _, out, _ = _encode_headers(status, headers)
    assert same(h2_outbound(out), out)
    assert out[0] == (b":status", status[:3].encode())


def _random_header(rng: random.Random) -> tuple[str, str]:
    names = ["X-A", "content-type", "Connection", "te", "TE", "Authorization", "cookie", "Set-Cookie",
             "x_under", "X-Ünïcode", "bad name", "x:colon", "x-nl\n", "\nx", "", "UPGRADE", "X-Tab\t"]
    alphabet = "ab c\t\x0b\x0c\r\n\x00\x7f\xe9=;:/\"'"
    value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
    if rng.random() < 0.3:
        value = rng.choice(["trailers", " trailers ", "gzip", "12", " 7 ", "x" * 30])
    return rng.choice(names), value


def test_random_header_lists_are_refused_or_h2_identity() -> None:
    rng = random.Random(9113)
    accepted = refused = 0
    for _ in range(3000):
        headers = [_random_header(rng) for _ in range(rng.randint(0, 6))]
        try:
            _, out, _ = _encode_headers("200 OK", headers)
        except (ValueError, TypeError):
            refused += 1
            continue
        accepted += 1
        assert same(h2_outbound(out), out), headers
        for name, value in out[1:]:
            text = name.decode("ascii")
            assert valid_name(text) and text == text.lower(), name
            assert text not in CONNECTION_SPECIFIC_STR
            assert not any(c in value for c in b"\r\n\x00"), value
            assert value == value.strip(), value  # no leading/trailing whitespace (§8.2.1)
            if text == "te":
                assert value.lower() == b"trailers"
    assert accepted > 300 and refused > 300  # both paths really exercised


@pytest.mark.parametrize("name", ["x-foo\n", "x-foo\r", "x foo", "x:foo", "", "x-é"])
def test_non_token_names_are_refused(name: str) -> None:
    assert not valid_name(name)
    with pytest.raises(ValueError):
        _encode_headers("200 OK", [(name, "v")])


def test_credentials_are_never_indexed() -> None:
    _, out, _ = _encode_headers("200 OK", [("Authorization", "x"), ("X-Other", "y")])
    assert isinstance(out[1], NeverIndexedHeaderTuple)
    assert not isinstance(out[2], HeaderTuple)


def test_only_the_worker_role_skips_outbound_checks() -> None:
    assert not core_config("server", TunnelOptions()).validate_outbound
    assert core_config("client", TunnelOptions()).validate_outbound
    # Inbound checks have no switch: every RFC 9113 check runs in both roles.


# -- _encode_headers fast path: the caches never change the result ----------------------------------


def _cold(status: str, headers: list[Any]) -> Any:
    """_encode_headers with empty caches: every header takes the full validation path."""
    from rhttp_wsgi import wsgi

    saved = dict(wsgi._PLAIN_NAMES), dict(wsgi._STATUS_CACHE)
    wsgi._PLAIN_NAMES.clear()
    wsgi._STATUS_CACHE.clear()
    try:
        return _outcome(status, headers)
    finally:
        wsgi._PLAIN_NAMES.update(saved[0])
        wsgi._STATUS_CACHE.update(saved[1])


def _outcome(status: Any, headers: list[Any]) -> Any:
    try:
        code, out, cl = _encode_headers(status, headers)
    except (TypeError, ValueError) as e:
        return type(e)
    return code, [(tuple(h), isinstance(h, NeverIndexedHeaderTuple)) for h in out], cl


def test_cached_path_equals_cold_path() -> None:
    rng = random.Random(3333)
    lists = [list(c) for c in CASES] + [[_random_header(rng) for _ in range(rng.randint(0, 6))]
                                        for _ in range(2000)]
    for headers in lists:
        for status in ("200 OK", "404 Not Found"):
            cold = _cold(status, headers)
            assert _outcome(status, headers) == cold, headers  # caches as the cold run left them
            assert _outcome(status, headers) == cold, headers  # and warm


class _Str(str):
    pass


@pytest.mark.parametrize(("headers", "result"), [
    ([("Content-Length", " 13 ")], 13),
    ([("content-length", "0")], 0),
    ([("Content-Length", "\xa013")], ValueError),  # NBSP: str.strip() removed it, the wire kept it
    ([("Content-Length", "13\x1c")], ValueError),  # a C0 control str.strip() treats as space
    ([("Content-Length", "\xb2")], ValueError),  # SUPERSCRIPT TWO: isdigit(), not a length
    ([("Content-Length", "1 3")], ValueError),
    ([("Content-Length", "")], ValueError),
    ([("Content-Length", "-1")], ValueError),
    ([("\u212a-Foo", "v")], ValueError),  # KELVIN SIGN lowercases to an ASCII "k"
    ([(_Str("X-Sub"), _Str(" v "))], None),
    ([("X-A", "v")] * 3, None),
])
def test_content_length_and_name_rules(headers: list[Any], result: Any) -> None:
    for _ in range(3):  # cold, then through the caches
        if isinstance(result, type):
            with pytest.raises(result):
                _encode_headers("200 OK", headers)
            continue
        _, out, cl = _encode_headers("200 OK", headers)
        assert cl == result
        assert same(h2_outbound(out), out)
        assert all(type(h[0]) is bytes and type(h[1]) is bytes for h in out)


def test_dropped_and_special_names_are_never_cached() -> None:
    from rhttp_wsgi import wsgi

    for _ in range(3):
        _, out, _ = _encode_headers("200 OK", [
            ("Connection", "close"), ("TE", "trailers"), ("te", "gzip"), ("Cookie", "short=1"),
            ("Cookie", "a-much-longer-cookie=value-here"), ("Authorization", "x"), ("X-Ok", "1")])
        assert [tuple(h) for h in out[1:]] == [(b"te", b"trailers"), (b"cookie", b"short=1"),
                                               (b"cookie", b"a-much-longer-cookie=value-here"),
                                               (b"authorization", b"x"), (b"x-ok", b"1")]
        assert [isinstance(h, NeverIndexedHeaderTuple) for h in out[1:]] == [False, True, False, True, False]
    for name in ("Connection", "TE", "te", "Cookie", "Authorization"):
        assert name not in wsgi._PLAIN_NAMES
    assert wsgi._PLAIN_NAMES["X-Ok"] == b"x-ok"


def test_header_caches_are_bounded() -> None:
    from rhttp_wsgi import wsgi

    for i in range(wsgi._CACHE_MAX + 50):
        _, out, _ = _encode_headers(f"{200 + i % 400} R{i}", [(f"X-Gen-{i}", str(i))])
        assert out == [(b":status", str(200 + i % 400).encode()), (f"x-gen-{i}".encode(), str(i).encode())]
    assert len(wsgi._PLAIN_NAMES) <= wsgi._CACHE_MAX
    assert len(wsgi._STATUS_CACHE) <= wsgi._CACHE_MAX


@pytest.mark.parametrize("status", ["200", "200 OK", "599 Custom"])
def test_status_cache(status: str) -> None:
    for _ in range(2):
        code, out, _ = _encode_headers(status, [])
        assert code == int(status[:3]) and out == [(b":status", status[:3].encode())]


@pytest.mark.parametrize("status", ["200OK", "20", "199 Info", "600 X", "999 Max", "1000 X", "abc OK", "٢٠٠ OK",
                                    b"200 OK", _Str("20x")])
def test_bad_status_refused_every_time(status: Any) -> None:
    for _ in range(2):
        with pytest.raises((TypeError, ValueError)):
            _encode_headers(status, [])
