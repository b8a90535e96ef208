"""The client (proxy) role: responses received (RFC 9113 §8.3.2, §8.1.1) and requests sent.

The harness (our end, raw frames from the peer, h2 as the reference) is ``h2core_harness.py``.
"""

from __future__ import annotations

import random

import h2.events as ev
import h2.exceptions as h2x
import hpack
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes as E
from h2.settings import SettingCodes as S

from rhttp_wsgi._http import CONNECTION_SPECIFIC, valid_name, valid_value
from tests.unit.h2core_harness import (
    CONTINUATION,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    MAX_WINDOW,
    REQ,
    RESP,
    ROLES,
    Raw,
    client_with_streams,
    data,
    frame,
    of,
    settings,
)

pytestmark = pytest.mark.timeout(60)


MALFORMED_RESPONSES: dict[str, list[tuple[bytes, bytes]]] = {
    "status-abc": [(b":status", b"abc")],
    "status-99": [(b":status", b"99")],
    "status-600": [(b":status", b"600")],
    "status-101": [(b":status", b"101")],
    "status-2000": [(b":status", b"2000")],
    "status-empty": [(b":status", b"")],
    "status-missing": [(b"x-a", b"1")],
    "status-duplicate": [(b":status", b"200"), (b":status", b"200")],
    "status-after-regular": [(b"x-a", b"1"), (b":status", b"200")],
    "path-in-response": [(b":status", b"200"), (b":path", b"/")],
    "method-in-response": [(b":status", b"200"), (b":method", b"GET")],
    "request-pseudo-instead-of-status": [(b":path", b"200")],
    "uppercase-name": [(b":status", b"200"), (b"X-A", b"1")],
    "value-with-cr": [(b":status", b"200"), (b"x-a", b"a\rb")],
    "connection": [(b":status", b"200"), (b"connection", b"close")],
    "bad-content-length": [(b":status", b"200"), (b"content-length", b"x")],
    "conflicting-content-length": [(b":status", b"200"), (b"content-length", b"1"), (b"content-length", b"2")],
}


@pytest.mark.parametrize("case", sorted(MALFORMED_RESPONSES))
def test_malformed_response_is_a_stream_error(case: str) -> None:
    r = client_with_streams(2)
    # no END_STREAM: a 1xx-looking :status must be refused for itself, not for ending a 1xx
    events = r.stream_error(r.headers(1, MALFORMED_RESPONSES[case]), 1, E.PROTOCOL_ERROR)
    assert not of(events, ev.ResponseReceived)
    events = r.feed(r.headers(3, RESP, end=True))
    assert of(events, ev.ResponseReceived)[0].headers == RESP


def test_end_stream_on_informational_response_is_a_stream_error() -> None:
    r = client_with_streams(2)
    r.stream_error(r.headers(1, [(b":status", b"100")], end=True), 1, E.PROTOCOL_ERROR)
    events = r.feed(r.headers(3, [(b":status", b"103"), (b"link", b"</a>")]), r.headers(3, RESP),
                    data(3, b"ok", end=True))
    [info] = of(events, ev.InformationalResponseReceived)
    assert info.headers == [(b":status", b"103"), (b"link", b"</a>")]
    assert of(events, ev.ResponseReceived)[0].headers == RESP
    assert of(events, ev.StreamEnded)


def test_response_cookies_joined_and_trailers() -> None:
    r = client_with_streams(1)
    events = r.feed(r.headers(1, [*RESP, (b"cookie", b"a=1"), (b"cookie", b"b=2")]), data(1, b"x"),
                    r.headers(1, [(b"grpc-status", b"0")], end=True))
    [resp] = of(events, ev.ResponseReceived)
    assert [v for n, v in resp.headers if n == b"cookie"] == [b"a=1; b=2"]
    assert of(events, ev.TrailersReceived)[0].headers == [(b"grpc-status", b"0")]


@pytest.mark.parametrize("case", ["data-before-response", "response-too-long", "pseudo-in-trailers"])
def test_malformed_response_body(case: str) -> None:
    r = client_with_streams(2)
    if case == "data-before-response":
        r.stream_error(data(1, b"x"), 1, E.PROTOCOL_ERROR)
    elif case == "response-too-long":
        r.feed(r.headers(1, [*RESP, (b"content-length", b"1")]))
        r.stream_error(data(1, b"xy", end=True), 1, E.PROTOCOL_ERROR)
    else:
        r.feed(r.headers(1, RESP))
        r.stream_error(r.headers(1, [(b":status", b"200")], end=True), 1, E.PROTOCOL_ERROR)
    assert of(r.feed(r.headers(3, RESP, end=True)), ev.ResponseReceived)


@pytest.mark.parametrize("method,status", [(b"HEAD", b"200"), (b"GET", b"304"), (b"GET", b"204")])
def test_response_without_content_may_announce_a_content_length(method: bytes, status: bytes) -> None:
    """RFC 9113 §8.1.1: a response defined to have no content (to HEAD; 204, 304) MAY carry a non-zero
    content-length although its DATA frames carry nothing; DATA with bytes in it is still malformed."""
    r = Raw("client")
    r.core.send_headers(1, [(b":method", method), *REQ[1:]], end_stream=True)
    r.core.send_headers(3, [(b":method", method), *REQ[1:]], end_stream=True)
    r.out()
    events = r.feed(r.headers(1, [(b":status", status), (b"content-length", b"100")]), data(1, b"", end=True))
    assert not of(events, ev.StreamReset), events
    assert of(events, ev.ResponseReceived) and of(events, ev.StreamEnded)
    assert r.out() == []
    r.feed(r.headers(3, [(b":status", status), (b"content-length", b"3")]))
    r.stream_error(data(3, b"abc", end=True), 3, E.PROTOCOL_ERROR)


# ===================================================================================================
# outbound, client (proxy) role
# ===================================================================================================


@pytest.mark.parametrize("cl,ok", [(b"5", False), (b"0", True), (None, True)])
def test_end_stream_on_response_headers_with_a_content_length(cl: bytes | None, ok: bool) -> None:
    """RFC 9113 §8.1.1: END_STREAM on the response HEADERS means no content, so a non-zero
    content-length makes the response malformed: a stream error; the tunnel's other streams go on."""
    r = client_with_streams(2)
    fields = RESP + ([(b"content-length", cl)] if cl is not None else [])
    if ok:
        events = r.feed(r.headers(1, fields, end=True))
        assert of(events, ev.ResponseReceived) and of(events, ev.StreamEnded)
        assert r.out() == []
    else:
        events = r.stream_error(r.headers(1, fields, end=True), 1, E.PROTOCOL_ERROR)
        assert not of(events, ev.ResponseReceived)
    assert of(r.feed(r.headers(3, RESP, end=True)), ev.ResponseReceived)


# -- differential: our verdict on random responses == h2's ----------------------------------------------------


def _random_response(rng: random.Random) -> tuple[bytes, list[tuple[bytes, bytes]], bool]:
    """(request method, response fields, END_STREAM on the HEADERS)."""
    method = rng.choice([b"GET", b"GET", b"HEAD"])
    status = rng.choice([b"200", b"200", b"204", b"304", b"404", b"103", b"100", b"101", b"abc", b"99", b"600"])
    fields = [(b":status", status)]
    cl = rng.choice([None, None, b"0", b"5", b"x"])  # one at most: several are covered above
    if cl is not None and status[:1] != b"1":  # a 1xx has no content: its content-length is not checked
        fields.append((b"content-length", cl))
    for _ in range(rng.randint(0, 2)):
        fields.append(rng.choice([(b"x-a", b"1"), (b"cookie", b"a=b"), (b"connection", b"close"), (b"te", b"gzip"),
                                  (b"X-Up", b"1"), (b"x-b", b"a\rb")]))
    return method, fields, rng.random() < 0.5


def _h2_accepts_response(method: bytes, fields: list[tuple[bytes, bytes]], end: bool) -> bool:
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=True))
    conn.initiate_connection()
    conn.send_headers(1, [(b":method", method), *REQ[1:]], end_stream=True)
    conn.data_to_send()
    try:
        conn.receive_data(settings() + frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), 1,
                                             hpack.Encoder().encode(fields)))
    except h2x.ProtocolError:
        return False
    return True


def test_response_verdicts_match_h2_on_random_lists() -> None:
    """Our accept/reject verdict on 400 seeded random responses equals h2's, but for the known
    intended differences: we reject with a stream error where h2 raised a connection error (only
    accepted vs rejected is compared), and we also refuse what h2 accepts -- a :status that is not
    three digits in 100-599 or is 101 (RFC 9110 §15, RFC 9113 §8.6), an invalid content-length
    also on a response to HEAD (h2 skips the field there), and END_STREAM on a response HEADERS
    with a non-zero content-length when the response may have content (RFC 9113 §8.1.1)."""
    rng = random.Random(20250101)
    accepted = rejected = differ = 0
    for _ in range(400):
        method, fields, end = _random_response(rng)
        r = Raw("client")
        r.core.send_headers(1, [(b":method", method), *REQ[1:]], end_stream=True)
        r.out()
        events = r.feed(frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), 1, r.block(fields)))
        ours = bool(of(events, ev.ResponseReceived) or of(events, ev.InformationalResponseReceived))
        assert ours != bool(of(events, ev.StreamReset)), events
        accepted += ours
        rejected += not ours
        status = fields[0][1]
        cls = {n: v for n, v in fields}.get(b"content-length", b"0")
        valid_status = status.isdigit() and len(status) == 3 and b"100" <= status <= b"599" and status != b"101"
        may_have_content = method != b"HEAD" and status not in (b"204", b"304")
        h2_verdict = _h2_accepts_response(method, fields, end)
        expected = h2_verdict and valid_status and cls != b"x" and not (end and may_have_content and cls != b"0")
        differ += h2_verdict != expected
        assert ours == expected, (method, fields, end, events)
    assert accepted > 50 and rejected > 50 and differ > 10, (accepted, rejected, differ)


def test_outbound_normalisation() -> None:
    r = Raw("client")
    r.core.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a"),
                            ("X-Upper", "  padded\t"), ("Connection", "close"), ("keep-alive", "1"),
                            ("Transfer-Encoding", "chunked"), ("upgrade", "x"), ("proxy-connection", "y"),
                            ("TE", "trailers")], end_stream=True)
    got = r.decode(r.out(), 1)
    assert got == [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"a"),
                   (b"x-upper", b"padded"), (b"te", b"trailers")]


@pytest.mark.parametrize("name,value,never", [
    (b"authorization", b"Bearer secret-token-of-some-length", True),
    (b"proxy-authorization", b"Basic abc", True),
    (b"cookie", b"short=1", True),
    (b"cookie", b"long-cookie=0123456789abcdef", False),
    (b"x-custom", b"value", False),
])
def test_credentials_are_never_indexed(name: bytes, value: bytes, never: bool) -> None:
    r = Raw("client")
    # :method/:scheme/:path are one static-table byte each (0x82 0x87 0x84): the 4th byte starts our field
    r.core.send_headers(1, [*REQ[:3], (name, value), (b"host", b"example.com")], end_stream=True)
    frames = r.out()
    block = frames[0].payload
    assert block[:3] == b"\x82\x87\x84"
    if never:
        assert block[3] & 0xF0 == 0x10  # literal header field never indexed (RFC 7541 §6.2.3)
    else:
        assert block[3] & 0xC0 == 0x40  # literal with incremental indexing
    got = r.decode(frames, 1)
    assert got[3] == (name, value)
    assert isinstance(got[3], hpack.NeverIndexedHeaderTuple) == never


@pytest.mark.parametrize("headers", [
    REQ[1:],
    [*REQ, (b"x a", b"1")],
    [*REQ, (b"x-a", b"a\r\nb")],
    [*REQ, (b"x-a", b"a\x00")],
    [*REQ[:3], (b"x-a", b"1"), REQ[3]],
    [*REQ, (b"te", b"gzip")],
    [*REQ[:3], (b"host", b"a"), (b"host", b"a")],
    [*REQ, (b"host", b"other")],
    [REQ[0], REQ[1], (b":path", b""), REQ[3]],
    [*REQ, (b":foo", b"x")],
    [*REQ, (b":status", b"200")],
    [*REQ, (b":method", b"GET")],
    REQ[:3],
    [(b":method", b"CONNECT"), (b":authority", b"a"), (b":path", b"/")],
], ids=lambda h: "-".join(n.decode(errors="replace").strip(":") or "empty" for n, _ in h[-2:]))
def test_invalid_outbound_request_raises(headers: list[tuple[bytes, bytes]]) -> None:
    r = Raw("client")
    with pytest.raises(h2x.ProtocolError):
        r.core.send_headers(1, headers, end_stream=True)
    assert r.out() == [] and not r.core.streams
    r.core.send_headers(1, REQ, end_stream=True)  # the stream id was not consumed, HPACK untouched
    assert r.decode(r.out(), 1) == REQ


def _h2_sends(fields: list[tuple[bytes | str, bytes | str]]) -> bool:
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=True,
                                        normalize_outbound_headers=True))
    conn.initiate_connection()
    try:
        conn.send_headers(1, fields, end_stream=True)
    except h2x.ProtocolError:
        return False
    return True


def _lower(name: bytes | str) -> bytes:
    return (name.encode("latin-1") if isinstance(name, str) else name).lower()


def _field_ok(name: bytes | str, value: bytes | str) -> bool:
    n = name.decode("latin-1") if isinstance(name, bytes) else name
    v = value.decode("latin-1") if isinstance(value, bytes) else value
    return (n[:1] == ":" or valid_name(n.lower())) and valid_value(v)


def test_outbound_fields_remembered_as_valid_change_no_verdict() -> None:
    """The client role remembers the ordinary fields it sent already normalised and valid; on one
    warm connection every request list gets the verdict and the normalised fields that a fresh
    connection gives it (a remembered field never lets a misplaced pseudo-header or a bad
    neighbour through), and h2's client is the oracle for every verdict."""
    rng = random.Random(8113)
    warm = Raw("client")
    names: list[bytes | str] = [b"x-a", b"X-A", "x-a", b"accept", b"te", b"host", b"connection", b"x-request-id",
                                b":path", b":foo", b"x b"]
    values: list[bytes | str] = [b"1", b" 1", "1 ", b"trailers", b"example.com", b"a\r\nb", b"", b"gzip"]
    sid = 1
    accepted = refused = 0
    for i in range(600):
        fields = [*REQ, *[(rng.choice(names), rng.choice(values)) for _ in range(rng.randrange(4))]]
        if rng.random() < 0.15:
            rng.shuffle(fields)
        verdicts = []
        for r, stream in ((warm, sid), (Raw("client"), 1)):
            try:
                r.core.send_headers(stream, fields, end_stream=True)  # type: ignore[arg-type]
            except h2x.ProtocolError:
                verdicts.append(None)
                continue
            verdicts.append(r.decode(r.out(), stream))
        assert verdicts[0] == verdicts[1], (i, fields)
        # The oracle: h2's client accepts the same lists, except that we drop connection-specific
        # fields where h2 refuses them, and h2 does not check a name's token characters or a
        # value's CR/LF/NUL on the way out, which RFC 9113 §8.2.1 makes malformed and we refuse.
        kept = [(n, v) for n, v in fields if _lower(n) not in CONNECTION_SPECIFIC]
        # (and h2 4.4, the floor, lets two host fields through, which later h2 refuses, as we do)
        expected = (_h2_sends(kept) and all(_field_ok(n, v) for n, v in kept)
                    and sum(_lower(n) == b"host" for n, _ in kept) <= 1)
        assert (verdicts[0] is not None) == expected, (i, fields)
        if verdicts[0] is None:
            refused += 1
        else:
            accepted += 1
            warm.core.reset_stream(sid, E.CANCEL)
            warm.out()
            sid += 2
    assert accepted > 100 and refused > 100, (accepted, refused)


def test_too_many_streams_at_peer_limit() -> None:
    r = Raw("client", peer_settings={S.MAX_CONCURRENT_STREAMS: 2})
    r.core.send_headers(1, REQ, end_stream=True)
    r.core.send_headers(3, REQ, end_stream=True)
    with pytest.raises(h2x.TooManyStreamsError):
        r.core.send_headers(5, REQ, end_stream=True)
    r.out()
    r.feed(r.headers(1, RESP, end=True))  # stream 1 closes
    r.core.send_headers(5, REQ, end_stream=True)
    assert r.core.open_outbound_streams == 2


def test_no_available_stream_id() -> None:
    r = Raw("client")
    assert r.core.get_next_available_stream_id() == 1
    r.core.send_headers(MAX_WINDOW - 2, REQ, end_stream=True)
    assert r.core.get_next_available_stream_id() == MAX_WINDOW
    r.core.send_headers(MAX_WINDOW, REQ, end_stream=True)
    with pytest.raises(h2x.NoAvailableStreamIDError):
        r.core.get_next_available_stream_id()
    with pytest.raises(h2x.NoAvailableStreamIDError):
        r.core.send_headers(MAX_WINDOW + 2, REQ, end_stream=True)  # would set the reserved bit (§4.1)
    assert [f.sid for f in r.out()] == [MAX_WINDOW - 2, MAX_WINDOW]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("max_frame", [16384, 20000])
def test_large_header_block_split_into_continuations(role: str, max_frame: int) -> None:
    r = Raw(role, peer_settings={S.MAX_FRAME_SIZE: max_frame})
    rng = random.Random(max_frame)
    # obs-text octets: Huffman would triple them, so a 45 KB value makes a block of 45 KB or more
    big = bytes(rng.randrange(0x80, 0x100) for _ in range(45000))
    if role == "server":
        r.request_ok(1)
        fields = [*RESP, (b"x-big", big)]
    else:
        fields = [*REQ, (b"x-big", big)]
    r.core.send_headers(1, fields, end_stream=True)
    frames = r.out()
    assert [f.type for f in frames] == [HEADERS] + [CONTINUATION] * (len(frames) - 1)
    assert len(frames) == -(-sum(len(f.payload) for f in frames) // max_frame) >= 3
    assert all(len(f.payload) <= max_frame for f in frames)
    assert all(len(f.payload) == max_frame for f in frames[:-1])
    assert frames[0].flags == END_STREAM  # END_STREAM on HEADERS, END_HEADERS only on the last frame
    assert [f.flags for f in frames[1:]] == [0] * (len(frames) - 2) + [END_HEADERS]
    assert r.decode(frames, 1) == fields


def test_worker_cannot_push_or_send_on_unknown_streams() -> None:
    r = Raw("server")
    with pytest.raises(h2x.StreamClosedError):
        r.core.send_headers(2, RESP)
    with pytest.raises(h2x.StreamClosedError):
        r.core.send_data(1, b"x")


def test_trailers_must_end_the_stream() -> None:
    r = Raw("server")
    r.request_ok(1)
    r.core.send_headers(1, RESP)
    with pytest.raises(h2x.ProtocolError):
        r.core.send_headers(1, [(b"x-t", b"1")])
    r.core.send_headers(1, [(b"x-t", b"1")], end_stream=True)
    assert not r.core.streams
    with pytest.raises(h2x.StreamClosedError):
        r.core.send_data(1, b"")


def test_extended_connect_is_sent_only_once_the_peer_advertised_it() -> None:
    """RFC 8441 §3: a client may send ``:protocol`` only after the server's SETTINGS_ENABLE_CONNECT_PROTOCOL=1."""
    ws = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"), (b":path", b"/chat"),
          (b":authority", b"a")]
    r = Raw("client")
    with pytest.raises(h2x.ProtocolError):
        r.core.send_headers(1, ws)
    assert r.out() == [] and not r.core.streams
    [changed] = r.feed(settings({S.ENABLE_CONNECT_PROTOCOL: 1}))
    assert changed.changed_settings[S.ENABLE_CONNECT_PROTOCOL].new_value == 1
    r.out()
    r.core.send_headers(1, ws)
    assert r.decode(r.out(), 1) == ws


@pytest.mark.parametrize("role", ROLES)
def test_settings_enable_connect_protocol_above_1(role: str) -> None:
    Raw(role).conn_error(settings({S.ENABLE_CONNECT_PROTOCOL: 2}), E.PROTOCOL_ERROR)
