"""Request header validation (RFC 9113 §8.2, §8.3), message framing, and our verdicts against h2's.

The harness (our end, raw frames from the peer, h2 as the reference) is ``h2core_harness.py``.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import h2.events as ev
import h2.exceptions as h2x
import hpack
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes as E
from h2.settings import SettingCodes as S

from rhttp_wsgi._protocol import PREFACE
from tests.unit.h2core_harness import (
    END_HEADERS,
    HEADERS,
    REQ,
    SETTINGS,
    Raw,
    data,
    frame,
    of,
    options,
    parse,
    settings,
)

pytestmark = pytest.mark.timeout(60)


# ===================================================================================================
# §8.2 / §8.3 header validation
# ===================================================================================================

NO_AUTH = REQ[:3]

MALFORMED_REQUESTS: dict[str, list[tuple[bytes, bytes]]] = {
    "uppercase-name": [*REQ, (b"X-Foo", b"1")],
    "name-with-space": [*REQ, (b"x foo", b"1")],
    "name-with-colon": [*REQ, (b"x:foo", b"1")],
    "name-with-del": [*REQ, (b"x\x7ffoo", b"1")],
    "name-non-ascii": [*REQ, (b"x-\xc3\xa9", b"1")],
    "name-with-nul": [*REQ, (b"x\x00", b"1")],
    "name-with-htab": [*REQ, (b"x\tb", b"1")],
    "empty-name": [*REQ, (b"", b"1")],
    "value-with-nul": [*REQ, (b"x-a", b"a\x00b")],
    "value-with-cr": [*REQ, (b"x-a", b"a\rb")],
    "value-with-lf": [*REQ, (b"x-a", b"a\nb")],
    "value-leading-sp": [*REQ, (b"x-a", b" a")],
    "value-leading-htab": [*REQ, (b"x-a", b"\ta")],
    "value-trailing-sp": [*REQ, (b"x-a", b"a ")],
    "value-trailing-htab": [*REQ, (b"x-a", b"a\t")],
    "value-only-sp": [*REQ, (b"x-a", b" ")],
    "connection": [*REQ, (b"connection", b"close")],
    "proxy-connection": [*REQ, (b"proxy-connection", b"keep-alive")],
    "keep-alive": [*REQ, (b"keep-alive", b"timeout=5")],
    "transfer-encoding": [*REQ, (b"transfer-encoding", b"chunked")],
    "upgrade": [*REQ, (b"upgrade", b"h2c")],
    "te-gzip": [*REQ, (b"te", b"gzip")],
    "te-trailers-and-more": [*REQ, (b"te", b"trailers, deflate")],
    "missing-method": REQ[1:],
    "missing-scheme": [REQ[0], REQ[2], REQ[3]],
    "missing-path": [REQ[0], REQ[1], REQ[3]],
    "duplicate-method": [REQ[0], *REQ],
    "duplicate-path": [*REQ, (b":path", b"/x")],
    "duplicate-authority": [*REQ, (b":authority", b"example.com")],
    "unknown-pseudo": [*REQ, (b":foo", b"bar")],
    "uppercase-pseudo": [REQ[0], REQ[1], (b":Path", b"/"), REQ[3]],
    "pseudo-after-regular": [*REQ[:3], (b"x-a", b"1"), REQ[3]],
    "status-in-request": [*REQ, (b":status", b"200")],
    "empty-path": [REQ[0], REQ[1], (b":path", b""), REQ[3]],
    "pseudo-value-with-lf": [REQ[0], REQ[1], (b":path", b"/a\nb"), REQ[3]],
    "pseudo-value-trailing-sp": [REQ[0], REQ[1], REQ[2], (b":authority", b"example.com ")],
    "connect-with-path": [(b":method", b"CONNECT"), (b":authority", b"a:443"), (b":path", b"/")],
    "connect-with-scheme": [(b":method", b"CONNECT"), (b":authority", b"a:443"), (b":scheme", b"https")],
    "protocol-without-connect": [*REQ, (b":protocol", b"websocket")],
    "extended-connect-without-path": [(b":method", b"CONNECT"), (b":protocol", b"websocket"),
                                      (b":scheme", b"https"), (b":authority", b"a")],
    "no-authority-no-host": NO_AUTH,
    "host-authority-mismatch": [*REQ, (b"host", b"other.example")],
    "duplicate-host": [*NO_AUTH, (b"host", b"a"), (b"host", b"a")],
    "conflicting-content-length": [*REQ, (b"content-length", b"1"), (b"content-length", b"2")],
    "non-numeric-content-length": [*REQ, (b"content-length", b"abc")],
    "negative-content-length": [*REQ, (b"content-length", b"-1")],
    "plus-content-length": [*REQ, (b"content-length", b"+1")],
    "empty-content-length": [*REQ, (b"content-length", b"")],
    "list-content-length": [*REQ, (b"content-length", b"1, 1")],
    "empty-method": [(b":method", b""), *REQ[1:]],  # a method is a token (RFC 9110 §9.1)
}
#: RFC 8441: a WebSocket (or any protocol) over one stream, valid once the server advertised
#: SETTINGS_ENABLE_CONNECT_PROTOCOL.
EXTENDED_CONNECT = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
                    (b":path", b"/chat"), (b":authority", b"a")]


def _server(connect: bool, **kw: Any) -> Raw:
    """The worker's end, advertising SETTINGS_ENABLE_CONNECT_PROTOCOL (option ``websockets``) or not."""
    return Raw("server", options("server", websockets=connect, **kw))


@pytest.mark.parametrize("connect", [False, True], ids=["plain", "connect-protocol"])
@pytest.mark.parametrize("case", sorted(MALFORMED_REQUESTS))
def test_malformed_request_is_a_stream_error(case: str, connect: bool) -> None:
    r = _server(connect, max_resets=0)
    events = r.stream_error(r.headers(1, MALFORMED_REQUESTS[case]), 1, E.PROTOCOL_ERROR)
    assert not of(events, ev.RequestReceived)
    r.request_ok(3)  # HPACK and the connection are fine


def test_pseudo_header_fields_seen_valid_are_still_checked_for_place_and_repeats() -> None:
    """The worker remembers pseudo-header fields whose characters passed; an invalid one is refused
    every time it comes, and a remembered one is still refused out of place or repeated."""
    r = _server(False, max_resets=0)
    sid = 1
    bad_path = [*REQ[:2], (b":path", b"/x\x00"), REQ[3]]
    for case in (bad_path, bad_path, REQ, [*REQ, (b"x-a", b"1"), (b":path", b"/")], bad_path,
                 [*REQ, REQ[0]], [(b"x-a", b"1"), *REQ], REQ):
        if case is REQ:
            r.request_ok(sid)
            r.core.reset_stream(sid, E.CANCEL)
            r.out()
        else:
            r.stream_error(r.headers(sid, case), sid, E.PROTOCOL_ERROR)
        sid += 2


def test_extended_connect_is_a_request_only_once_advertised() -> None:
    """RFC 8441 §3, §4: ``:protocol`` is allowed only after we sent SETTINGS_ENABLE_CONNECT_PROTOCOL=1;
    then a CONNECT with :protocol, :scheme, :path and :authority is a request."""
    plain = _server(False)
    assert S.ENABLE_CONNECT_PROTOCOL not in _settings_sent(plain)
    plain.stream_error(plain.headers(1, EXTENDED_CONNECT), 1, E.PROTOCOL_ERROR)
    plain.request_ok(3)
    ws = _server(True)
    assert _settings_sent(ws)[S.ENABLE_CONNECT_PROTOCOL] == 1
    req = ws.request_ok(1, EXTENDED_CONNECT, end=False)
    assert req.headers == EXTENDED_CONNECT
    assert [e.data for e in of(ws.feed(data(1, b"frame")), ev.DataReceived)] == [b"frame"]


def _settings_sent(r: Raw) -> dict[int, int]:
    first = parse(r.initial[len(PREFACE):])[0]
    assert first.type == SETTINGS
    return dict(struct.unpack(">HL", first.payload[i:i + 6]) for i in range(0, len(first.payload), 6))


VALID_REQUESTS: dict[str, list[tuple[bytes, bytes]]] = {
    "te-trailers": [*REQ, (b"te", b"trailers")],
    "te-trailers-any-case": [*REQ, (b"te", b"TraiLers")],
    "host-only": [*NO_AUTH, (b"host", b"example.com")],
    "host-equals-authority": [*REQ, (b"host", b"example.com")],
    "empty-value": [*REQ, (b"x-a", b"")],
    "inner-space-obs-text-del": [*REQ, (b"x-a", b"a b\tc\x80\xff\x7f")],
    "token-chars-in-name": [*REQ, (b"x-!#$%&'*+.^_`|~09", b"1")],
    "connect": [(b":method", b"CONNECT"), (b":authority", b"a:443")],
    "options-asterisk": [(b":method", b"OPTIONS"), (b":scheme", b"https"), (b":path", b"*"), REQ[3]],
    "content-length-zero": [*REQ, (b"content-length", b"0")],
    "same-content-length-twice": [*REQ, (b"content-length", b"0"), (b"content-length", b"0")],
}


@pytest.mark.parametrize("connect", [False, True], ids=["plain", "connect-protocol"])
@pytest.mark.parametrize("case", sorted(VALID_REQUESTS))
def test_valid_request_edge_cases_are_accepted(case: str, connect: bool) -> None:
    r = _server(connect)
    req = r.request_ok(1, VALID_REQUESTS[case], end=True)
    assert req.headers == VALID_REQUESTS[case]
    assert r.out() == []


def test_cookies_are_joined() -> None:
    r = Raw("server")
    req = r.request_ok(1, [*REQ, (b"cookie", b"a=1"), (b"x-a", b"y"), (b"cookie", b"b=2"), (b"cookie", b"c=3")])
    assert req.headers[:5] == [*REQ, (b"x-a", b"y")]
    assert [v for n, v in req.headers if n == b"cookie"] == [b"a=1; b=2; c=3"]


@pytest.mark.parametrize("case", ["too-long", "too-long-in-two", "too-short", "end-stream-on-headers",
                                  "short-then-trailers", "trailers-without-end-stream", "pseudo-in-trailers",
                                  "connection-field-in-trailers", "uppercase-in-trailers"])
def test_malformed_message_body_or_trailers(case: str) -> None:
    r = Raw("server", options("server", max_resets=0))
    cl = [*REQ, (b"content-length", b"3")]
    if case == "end-stream-on-headers":
        r.stream_error(r.headers(1, cl, end=True), 1, E.PROTOCOL_ERROR)
    else:
        r.request_ok(1, cl if case.startswith(("too", "short")) else REQ, end=False)
        trailer = r.headers  # encoded lazily: only the frames sent may touch the peer's HPACK state
        steps = {
            "too-long": lambda: [data(1, b"abcd", end=True)],
            "too-long-in-two": lambda: [data(1, b"ab"), data(1, b"cd")],
            "too-short": lambda: [data(1, b"ab", end=True)],
            "short-then-trailers": lambda: [data(1, b"ab"), trailer(1, [(b"x-t", b"1")], end=True)],
            "trailers-without-end-stream": lambda: [data(1, b"ab"), trailer(1, [(b"x-t", b"1")], end=False)],
            "pseudo-in-trailers": lambda: [trailer(1, [(b":path", b"/")], end=True)],
            "connection-field-in-trailers": lambda: [trailer(1, [(b"connection", b"close")], end=True)],
            "uppercase-in-trailers": lambda: [trailer(1, [(b"X-T", b"1")], end=True)],
        }[case]()
        for step in steps[:-1]:
            assert not of(r.feed(step), ev.StreamReset)
        r.stream_error(steps[-1], 1, E.PROTOCOL_ERROR)
    r.request_ok(3)


def test_body_matching_content_length_with_padding_and_trailers() -> None:
    r = Raw("server")
    r.request_ok(1, [*REQ, (b"content-length", b"5")], end=False)
    events = r.feed(data(1, b"ab", pad=10), data(1, b"cde"), r.headers(1, [(b"x-checksum", b"1")], end=True))
    assert b"".join(e.data for e in of(events, ev.DataReceived)) == b"abcde"
    [t] = of(events, ev.TrailersReceived)
    assert t.headers == [(b"x-checksum", b"1")]
    assert of(events, ev.StreamEnded)
    assert not of(events, ev.StreamReset)


# -- differential: our verdict on random header lists == h2's -------------------------------------------------

_NAMES_OK = [b"x-a", b"accept", b"user-agent", b"x-long-name-with-digits-09"]
_VALUES_OK = [b"1", b"*/*", b"a b", b"", b"\x80\xff", b"a\x7fb", b"v\tw"]


def _random_request(rng: random.Random, extra: random.Random) -> list[tuple[bytes, bytes]]:
    """A request's fields, valid or not.  ``extra`` draws the mutations added since the case set was
    first recorded, so ``rng`` still yields the same 500 lists as before."""
    method = rng.choice([b"GET", b"GET", b"POST", b"CONNECT", b"OPTIONS"])
    pseudo = []
    for name, value in ((b":method", method), (b":scheme", b"https"), (b":path", rng.choice([b"/", b"/x?y", b""])),
                        (b":authority", rng.choice([b"a.example", b"a.example:443"]))):
        if rng.random() < 0.95:
            pseudo.append((name, value))
    if rng.random() < 0.08:
        pseudo.append((b":protocol", b"websocket"))
    if rng.random() < 0.04:
        pseudo.append((b":status", b"200"))
    if rng.random() < 0.04:
        pseudo.append((b":foo", b"x"))
    if pseudo and rng.random() < 0.05:
        pseudo.append(rng.choice(pseudo))
    if pseudo and rng.random() < 0.05:
        n, v = rng.choice(pseudo)
        pseudo.append((n, rng.choice([v + b" ", b"\t" + v, v + b"\n"])))
    regular = []
    for _ in range(rng.randint(0, 4)):
        kind = rng.random()
        if kind < 0.5:
            regular.append((rng.choice(_NAMES_OK), rng.choice(_VALUES_OK)))
        else:
            regular.append(rng.choice([
                (b"cookie", b"a=b"), (b"te", b"trailers"), (b"te", b"gzip"), (b"connection", b"close"),
                (b"transfer-encoding", b"chunked"), (b"upgrade", b"x"), (b"host", b"a.example"),
                (b"host", b"b.example"), (b"content-length", b"5"), (b"content-length", b"6"),
                (b"content-length", b"x5"), (b"keep-alive", b"1"), (b"te", b"Trailers"),
            ]))
    if regular and rng.random() < 0.35:  # break one field
        i = rng.randrange(len(regular))
        name, value = regular[i]
        how = rng.randrange(10)
        if how == 0:
            name = name[:1].upper() + name[1:]
        elif how == 1:
            name = name + b" "
        elif how == 2:
            name = b"x:" + name
        elif how == 3:
            name = name + bytes((rng.choice([0x00, 0x7F, 0x80, 0xE9, 0x22, 0x28]),))
        elif how == 4:
            name = b""
        elif how == 5:
            value = value + rng.choice([b"\x00", b"\r", b"\n"]) + b"z"
        elif how == 6:
            value = rng.choice([b" ", b"\t"]) + value + b"z"
        elif how == 7:
            value = b"z" + value + rng.choice([b" ", b"\t"])
        elif how == 8:
            value = b"z\x01\x1f"  # control characters other than NUL/CR/LF are allowed in values
        else:
            name = name.lower()
        regular[i] = (name, value)
    fields = pseudo + regular
    if len(fields) > 1 and rng.random() < 0.1:
        rng.shuffle(fields)
    if extra.random() < 0.04:
        fields = [(n, b"") if n == b":method" else (n, v) for n, v in fields]
    return fields


def _h2_accepts(fields: list[tuple[bytes, bytes]]) -> bool:
    conn = H2Connection(H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True))
    conn.initiate_connection()
    block = hpack.Encoder().encode(fields)
    try:
        events = conn.receive_data(PREFACE + settings() + frame(HEADERS, END_HEADERS, 1, block))
    except h2x.ProtocolError:
        return False
    assert of(events, ev.RequestReceived)
    return True


@pytest.mark.parametrize("connect", [False, True], ids=["plain", "connect-protocol"])
def test_header_verdicts_match_h2_on_random_lists(connect: bool) -> None:
    """Our accept/reject verdict on 500 seeded random requests equals h2's.  Known intended differences:
    we reject with a stream error (RST_STREAM) where h2 raised a connection error, so only
    accepted vs rejected is compared; and we also refuse what h2 accepts: an empty :method (a
    method is a token, RFC 9110 §9.1) and, unless we advertised SETTINGS_ENABLE_CONNECT_PROTOCOL,
    any :protocol (RFC 8441 §3).  One connection serves all 500 (the validated-field cache
    must never let a bad field through); h2 gets a fresh connection per case."""
    rng = random.Random(20240613)
    extra = random.Random(11)
    r = _server(connect, max_resets=0, max_concurrent_streams=1000)
    accepted = rejected = differ = 0
    for i in range(500):
        fields = _random_request(rng, extra)
        sid = 2 * i + 1
        events = r.feed(frame(HEADERS, END_HEADERS, sid, r.block(fields)))
        ours = bool(of(events, ev.RequestReceived))
        assert ours != bool(of(events, ev.StreamReset)), events
        if ours:
            accepted += 1
            r.core.reset_stream(sid, E.CANCEL)
        else:
            rejected += 1
        r.out()
        h2_verdict = _h2_accepts(fields)
        expected = h2_verdict and (b":method", b"") not in fields and (
            connect or all(n != b":protocol" for n, _ in fields))
        differ += h2_verdict != expected
        assert ours == expected, (i, fields, events)
    assert accepted > 50 and rejected > 50, (accepted, rejected)
    assert differ >= 3, differ  # the intended differences were exercised
