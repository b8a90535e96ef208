"""The HTTP rules of ``rhttp_wsgi._http`` and the shared helpers of ``rhttp_wsgi._io``, on their own.

(The peer-closed probe on a real socket: ``tests/integration/test_peer_closed_probe.py``.)
"""

from __future__ import annotations

import pytest

from rhttp_wsgi._http import (
    CompleteResponse,
    content_length,
    h1_block,
    h1_problem,
    never_indexed,
    parse_content_length,
    reason_phrase,
)
from rhttp_wsgi._io import body_wait


@pytest.mark.parametrize("value", [b"0", b"007", b"123456789012345678", "42"])
def test_content_length_is_ascii_digits(value: bytes | str) -> None:
    assert parse_content_length(value) == int(value)


@pytest.mark.parametrize("value", [b"", b" 1", b"1 ", b"-1", b"+1", b"0x1", b"1,1", b"\xb2", "\u0661",
                                   b"1234567890123456789"])
def test_content_length_refuses_anything_else(value: bytes | str) -> None:
    with pytest.raises(ValueError):
        parse_content_length(value)


def test_repeated_content_length_must_repeat_the_same_value() -> None:
    assert content_length([(b"a", b"1")]) is None
    assert content_length([(b"content-length", b"5"), (b"x", b"y"), (b"content-length", b"5")]) == 5
    with pytest.raises(ValueError):
        content_length([(b"content-length", b"5"), (b"content-length", b"6")])
    with pytest.raises(ValueError):
        content_length([(b"content-length", b"5"), (b"content-length", b"05")])


def test_h1_block_takes_what_http11_carries() -> None:
    assert h1_block([]) == b""
    assert h1_block([(b"x-a", b"1"), (b"x-empty", b""), (b"x-in", b"a \t b")]) == \
        b"x-a: 1\r\nx-empty: \r\nx-in: a \t b\r\n"
    assert h1_block([(b"x", b"caf\xe9 \x01\x7f")]) is not None  # obs-text and other CTLs: as h11 writes them


@pytest.mark.parametrize("field", [(b"x", b"a\x0bb"), (b"x", b"a\x0c"), (b"x", b"a\x00b"), (b"x", b" lead"),
                                   (b"x", b"trail\t"), (b"x", b"a\r\nx-injected: 1"), (b"x", b"a\nb"),
                                   (b"a(b", b"v"), (b"", b"v"), (b"x y", b"v")])
def test_h1_block_refuses_what_http11_cannot_carry(field: tuple[bytes, bytes]) -> None:
    assert h1_block([(b"ok", b"1"), field]) is None
    assert repr(field[0][:40]) in h1_problem([(b"ok", b"1"), field])


def test_never_indexed_rule() -> None:
    assert never_indexed(b"authorization", b"x") and never_indexed(b"proxy-authorization", b"x" * 100)
    assert never_indexed(b"cookie", b"a" * 19) and not never_indexed(b"cookie", b"a" * 20)
    assert not never_indexed(b"x-token", b"x")


def test_reason_phrases() -> None:
    assert reason_phrase(200) == "OK" and reason_phrase(499) == "Client Closed Request"
    assert reason_phrase(299) == "Unknown"


def test_complete_response_is_a_one_item_iterable_and_closes_once() -> None:
    closed: list[int] = []
    r = CompleteResponse(200, "200 OK", (("content-length", "2"),), b"content-length: 2\r\n", b"hi")
    assert list(r) == [b"hi"] and len(r) == 1
    r.on_close = lambda: closed.append(1)
    r.close()
    r.close()
    assert closed == [1]


def test_body_wait_allowance() -> None:
    # idle bound while the rate is fine: 10 s in, 10000 bytes at min 500 B/s -> 10 + 20 - 10 = 20 s left
    assert body_wait(100.0, 10000, 5.0, 500, 110.0) == 5.0
    # a trickle: 10 s in, 100 bytes -> 5 + 0.2 - 10 < 0: no more waiting
    assert body_wait(100.0, 100, 5.0, 500, 110.0) == 0.0
    # in between: the rate cuts the wait below the idle bound
    assert body_wait(100.0, 500, 5.0, 500, 104.0) == pytest.approx(2.0)
