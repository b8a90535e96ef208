"""rhttp_wsgi._hpack against RFC 7541 Appendix C and, differentially, against the hpack library."""

from __future__ import annotations

import random
from collections.abc import Callable

import hpack
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)

from rhttp_wsgi._hpack import Decoder, Encoder, huffman_decode, huffman_encode

Headers = list[tuple[bytes, bytes]]


def _h(*pairs: str) -> Headers:
    """_h(":method", "GET", ...) -> [(b":method", b"GET"), ...]"""
    it = iter(pairs)
    return [(n.encode(), v.encode()) for n, v in zip(it, it, strict=True)]


def _hpack_table(decoder: hpack.Decoder) -> Headers:
    return [(bytes(n), bytes(v)) for n, v in decoder.header_table.dynamic_entries]


def _hpack_table_size(decoder: hpack.Decoder) -> int:
    return int(decoder.header_table._current_size)


# --------------------------------------------------------------------------- RFC 7541 Appendix C

C2 = [
    # (block, headers, dynamic table after, table size after); each with a fresh decoder
    ("400a637573746f6d2d6b65790d637573746f6d2d686561646572", _h("custom-key", "custom-header"),
     _h("custom-key", "custom-header"), 55),
    ("040c2f73616d706c652f70617468", _h(":path", "/sample/path"), [], 0),
    ("100870617373776f726406736563726574", _h("password", "secret"), [], 0),
    ("82", _h(":method", "GET"), [], 0),
]

_REQ1 = _h(":method", "GET", ":scheme", "http", ":path", "/", ":authority", "www.example.com")
_REQ2 = [*_REQ1, *_h("cache-control", "no-cache")]
_REQ3 = _h(":method", "GET", ":scheme", "https", ":path", "/index.html", ":authority", "www.example.com",
           "custom-key", "custom-value")
_T1 = _h(":authority", "www.example.com")
_T2 = [*_h("cache-control", "no-cache"), *_T1]
_T3 = [*_h("custom-key", "custom-value"), *_T2]

C3 = [
    ("828684410f7777772e6578616d706c652e636f6d", _REQ1, _T1, 57),
    ("828684be58086e6f2d6361636865", _REQ2, _T2, 110),
    ("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565", _REQ3, _T3, 164),
]
C4 = [
    ("828684418cf1e3c2e5f23a6ba0ab90f4ff", _REQ1, _T1, 57),
    ("828684be5886a8eb10649cbf", _REQ2, _T2, 110),
    ("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf", _REQ3, _T3, 164),
]

_DATE1 = "Mon, 21 Oct 2013 20:13:21 GMT"
_DATE2 = "Mon, 21 Oct 2013 20:13:22 GMT"
_COOKIE = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
_RESP1 = _h(":status", "302", "cache-control", "private", "date", _DATE1, "location", "https://www.example.com")
_RESP2 = _h(":status", "307", "cache-control", "private", "date", _DATE1, "location", "https://www.example.com")
_RESP3 = _h(":status", "200", "cache-control", "private", "date", _DATE2, "location", "https://www.example.com",
            "content-encoding", "gzip", "set-cookie", _COOKIE)
_RT1 = _h("location", "https://www.example.com", "date", _DATE1, "cache-control", "private", ":status", "302")
_RT2 = _h(":status", "307", "location", "https://www.example.com", "date", _DATE1, "cache-control", "private")
_RT3 = _h("set-cookie", _COOKIE, "content-encoding", "gzip", "date", _DATE2)

C5 = [
    ("4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d54"
     "6e1768747470733a2f2f7777772e6578616d706c652e636f6d", _RESP1, _RT1, 222),
    ("4803333037c1c0bf", _RESP2, _RT2, 222),
    ("88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a6970773866"
     "6f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d33363030"
     "3b2076657273696f6e3d31", _RESP3, _RT3, 215),
]
C6 = [
    ("488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c7"
     "8f0b97c8e9ae82ae43d3", _RESP1, _RT1, 222),
    ("4883640effc1c0bf", _RESP2, _RT2, 222),
    ("88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335"
     "dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007", _RESP3, _RT3, 215),
]
Vector = tuple[str, Headers, Headers, int]


@pytest.mark.parametrize(("block", "headers", "table", "size"), C2)
def test_c2_single_representations(block: str, headers: Headers, table: Headers, size: int) -> None:
    d = Decoder()
    out = d.decode(bytes.fromhex(block))
    assert out == headers
    assert all(type(n) is bytes and type(v) is bytes for n, v in out)
    assert d.dynamic_table == table
    assert d.table_size == size


def test_c2_3_never_indexed_flag_is_kept() -> None:
    (out,) = Decoder().decode(bytes.fromhex("100870617373776f726406736563726574"))
    assert isinstance(out, NeverIndexedHeaderTuple)
    (out,) = Decoder().decode(bytes.fromhex("040c2f73616d706c652f70617468"))
    assert not isinstance(out, NeverIndexedHeaderTuple)


@pytest.mark.parametrize(("name", "vectors", "table_size"), [("C.3", C3, 4096), ("C.4", C4, 4096),
                                                             ("C.5", C5, 256), ("C.6", C6, 256)])
def test_appendix_c_sequences_decode(name: str, vectors: list[Vector], table_size: int) -> None:
    d = Decoder()
    d.header_table_size = table_size
    for block, headers, table, size in vectors:
        assert d.decode(bytes.fromhex(block)) == headers, name
        assert d.dynamic_table == table, name
        assert d.table_size == size, name


@pytest.mark.parametrize(("name", "vectors", "table_size", "huffman"), [
    ("C.3", C3, 4096, False), ("C.4", C4, 4096, True), ("C.5", C5, 256, False), ("C.6", C6, 256, True)])
def test_appendix_c_sequences_encode(name: str, vectors: list[Vector], table_size: int, huffman: bool) -> None:
    e = Encoder()
    reference = hpack.Decoder()
    ours = Decoder()
    if table_size != 4096:
        e.header_table_size = table_size
    for i, (block, headers, table, size) in enumerate(vectors):
        out = e.encode(headers, huffman=huffman)
        if i == 0 and table_size != 4096:
            assert out.startswith(b"\x3f\xe1\x01")  # size update to 256 opens the first block
            out = out[3:]
            reference.max_allowed_table_size = ours.max_allowed_table_size = 4096
        if name != "C.6":  # C.6.2 Huffman-codes "307" to 3 bytes; we send it raw when not shorter
            assert out.hex() == block, name
        assert e.dynamic_table == table
        assert e.table_size == size
        if i == 0 and table_size != 4096:
            out = b"\x3f\xe1\x01" + out
        assert reference.decode(out, raw=True) == headers
        assert ours.decode(out) == headers
        assert _hpack_table(reference) == table


# --------------------------------------------------------------------------- differential tests

_NAMES = [b":method", b":path", b":authority", b":status", b"accept", b"accept-encoding", b"content-type",
          b"content-length", b"user-agent", b"cookie", b"set-cookie", b"cache-control", b"date", b"host",
          b"x-forwarded-for", b"x-custom", b"x-trace-id", b"etag", b"location", b"vary",
          b"authorization", b"proxy-authorization", "x-\u00e9t\u00e9".encode(), b"x-\xff\x00bin"]
_VALUES = [b"GET", b"POST", b"/", b"/index.html", b"200", b"404", b"gzip, deflate", b"", b"text/plain",
           b"13", b"*/*", b"127.0.0.1", b"h2load nghttp2/1.52.0", b"no-cache", "caf\u00e9".encode(),
           b"\x00\x01\x80\xff", b"a" * 19, b"b" * 20]


def _random_value(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.5:
        return rng.choice(_VALUES)
    if r < 0.7:
        return f"v{rng.randrange(40)}".encode()
    if r < 0.85:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    return bytes(rng.randrange(32, 127) for _ in range(rng.choice([100, 600, 2000, 5000])))  # long


def _random_block(rng: random.Random, sensitive_names: bool = True) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for _ in range(rng.randrange(0, 12)):
        name = rng.choice(_NAMES) if rng.random() < 0.8 else f"x-h{rng.randrange(30)}".encode()
        if not sensitive_names and name in (b"authorization", b"proxy-authorization", b"cookie"):
            name = b"x-custom"
        value = _random_value(rng)
        kind = rng.random()
        if kind < 0.1:
            out.append(NeverIndexedHeaderTuple(name, value))
        elif kind < 0.2:
            out.append(HeaderTuple(name, value))
        else:
            out.append((name, value))
        if out and rng.random() < 0.15:  # repeated field
            out.append(out[-1])
    return out


def test_hpack_encoder_to_our_decoder_matches_hpack_decoder() -> None:
    rng = random.Random(7541)
    enc = hpack.Encoder()
    theirs = hpack.Decoder(max_header_list_size=1 << 20)
    ours = Decoder(max_header_list_size=1 << 20)
    history: list[list[tuple[bytes, bytes]]] = []
    for i in range(2000):
        if rng.random() < 0.03:
            size = rng.choice([0, 64, 256, 1000, 4096, 8192])
            theirs.max_allowed_table_size = ours.max_allowed_table_size = max(size, 4096)
            enc.header_table_size = size
            second = rng.choice([0, 128, 4096])
            if rng.random() < 0.5 and second != size:  # two changes before the next block
                # (not to the same value: hpack's encoder then forgets to signal the first change)
                enc.header_table_size = second
        block = rng.choice(history) if history and rng.random() < 0.3 else _random_block(rng)
        history.append(block)
        data = enc.encode(block, huffman=rng.random() < 0.7)
        expected = theirs.decode(data, raw=True)
        got = ours.decode(data)
        assert got == [tuple(h) for h in expected], i
        assert [isinstance(h, NeverIndexedHeaderTuple) for h in got] == [
            isinstance(h, NeverIndexedHeaderTuple) for h in expected], i
        assert ours.dynamic_table == _hpack_table(theirs), i
        assert ours.table_size == _hpack_table_size(theirs), i
        assert ours.header_table_size == theirs.header_table_size, i


def test_our_encoder_round_trips_through_hpack_decoder() -> None:
    rng = random.Random(9113)
    enc = Encoder()
    theirs = hpack.Decoder(max_header_list_size=1 << 20)
    ours = Decoder(max_header_list_size=1 << 20)
    history: list[list[tuple[bytes, bytes]]] = []
    secret_names = (b"authorization", b"proxy-authorization")
    for i in range(2000):
        if rng.random() < 0.03:
            size = rng.choice([0, 64, 256, 1000, 4096, 8192])
            theirs.max_allowed_table_size = ours.max_allowed_table_size = 8192
            enc.header_table_size = size
            if rng.random() < 0.5:
                enc.header_table_size = rng.choice([0, 128, 4096, size])
        block = rng.choice(history) if history and rng.random() < 0.4 else _random_block(rng, sensitive_names=True)
        history.append(block)
        table_before = _hpack_table(theirs)
        data = enc.encode(block, huffman=rng.random() < 0.7)
        expected = [(bytes(n), bytes(v)) for n, v in block]
        decoded = theirs.decode(data, raw=True)
        assert [tuple(h) for h in decoded] == expected, i
        assert ours.decode(data) == expected, i
        table = _hpack_table(theirs)
        assert enc.dynamic_table == table, i  # encoder and decoder contexts stay in sync
        assert enc.table_size == _hpack_table_size(theirs), i
        assert ours.dynamic_table == table, i
        # A sensitive field is sent never-indexed unless it was an exact match in a table.
        exact = set(hpack.table.HeaderTable.STATIC_TABLE) | set(table_before)
        for header, out in zip(block, decoded, strict=True):
            pair = (bytes(header[0]), bytes(header[1]))
            sensitive = isinstance(header, NeverIndexedHeaderTuple) or pair[0] in secret_names or (
                pair[0] == b"cookie" and len(pair[1]) < 20)
            if sensitive:
                assert isinstance(out, NeverIndexedHeaderTuple) or pair in exact, (i, header)
            else:
                exact.add(pair)
        for name, value in table:
            assert name not in secret_names, i
            assert not (name == b"cookie" and len(value) < 20), i


def test_encoder_never_indexed_wire_form() -> None:
    e = Encoder()
    d = hpack.Decoder()
    out = e.encode([NeverIndexedHeaderTuple(b"x-secret", b"value")])
    assert out[0] == 0x10  # literal never indexed, literal name
    (h,) = d.decode(out, raw=True)
    assert isinstance(h, NeverIndexedHeaderTuple)
    out = e.encode([(b"authorization", b"Bearer abc")])  # h2's _secure_headers rule
    assert out[:2] == b"\x1f\x08"  # never indexed, static name index 23
    out = e.encode([(b"cookie", b"sid=1")])  # short cookie
    assert out[:2] == b"\x1f\x11"  # never indexed, static name index 32
    out = e.encode([(b"cookie", b"sid=0123456789abcdefghij")])  # 20+ bytes: indexed
    assert out[0] == 0x60
    assert e.dynamic_table == [(b"cookie", b"sid=0123456789abcdefghij")]
    assert e.encode([(b"cookie", b"sid=0123456789abcdefghij")]) == b"\xbe"
    for block in ([NeverIndexedHeaderTuple(b"x-secret", b"value")], [(b"authorization", b"Bearer abc")],
                  [(b"cookie", b"sid=1")]):
        assert e.encode(block) == e.encode(block)  # nothing was inserted by the sensitive fields


def test_encoder_accepts_header_tuples() -> None:
    e = Encoder()
    d = hpack.Decoder()
    out = e.encode([(b":status", b"200"), HeaderTuple(b"x-a", b"1"), ("x-\u00e9".encode(), "\u00e9".encode())])
    assert d.decode(out, raw=True) == [(b":status", b"200"), (b"x-a", b"1"), ("x-\u00e9".encode(), "\u00e9".encode())]
    out = e.encode((HeaderTuple(b":status", b"204"), (b"x-b", b"2")))  # a tuple of fields too
    assert d.decode(out, raw=True) == [(b":status", b"204"), (b"x-b", b"2")]


def test_encoder_signals_table_size_changes() -> None:
    e = Encoder()
    d = hpack.Decoder()
    e.encode([(b"x-a", b"1")])
    e.header_table_size = 4096  # unchanged: nothing to signal
    assert e.encode([(b":status", b"200")]) == b"\x88"
    e.header_table_size = 30
    e.header_table_size = 8192
    out = e.encode([(b":status", b"200")])
    assert out == b"\x3e" + b"\x3f\xe1\x3f" + b"\x88"  # minimum, then final (RFC 7541 §4.2)
    d.max_allowed_table_size = 8192
    d.decode(b"\x40\x03x-a\x011", raw=True)
    assert d.decode(out, raw=True) == [(b":status", b"200")]
    assert d.header_table_size == 8192
    assert _hpack_table(d) == []  # the shrink to 30 evicted x-a: 1 on both sides
    assert e.dynamic_table == []
    assert e.encode([(b":status", b"200")]) == b"\x88"
    e.header_table_size = 0
    out = e.encode([(b"x-big", b"v")])
    assert out[:1] == b"\x20" and out[1] == 0x00  # size 0, then literal without indexing
    assert e.dynamic_table == []


def test_encoder_block_cache_follows_the_table() -> None:
    e = Encoder()
    d = hpack.Decoder()
    steady = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"13")]
    first = e.encode(steady)
    assert d.decode(first, raw=True) == steady
    second = e.encode(steady)
    assert second == b"\x88\xbf\xbe"
    assert e.encode(steady) == second
    for i in range(50):  # every insertion shifts the dynamic indexes: the cached block must not be reused
        other = e.encode([(b"x-n", str(i).encode())])
        assert d.decode(other, raw=True) == [(b"x-n", str(i).encode())]
        block = e.encode(steady)
        assert d.decode(block, raw=True) == steady
    assert e.encode(steady) == block


def test_decoder_block_cache_follows_the_table() -> None:
    d = Decoder()
    assert d.decode(b"\x40\x01a\x011") == [(b"a", b"1")]
    first = d.decode(b"\x82\xbe")
    assert first == [(b":method", b"GET"), (b"a", b"1")]
    first.append((b"junk", b""))  # the caller owns the returned list
    assert d.decode(b"\x82\xbe") == [(b":method", b"GET"), (b"a", b"1")]
    assert d.decode(bytearray(b"\x82\xbe")) == [(b":method", b"GET"), (b"a", b"1")]
    assert d.decode(b"\x40\x01a\x012") == [(b"a", b"2")]  # index 62 is now a: 2
    assert d.decode(b"\x82\xbe") == [(b":method", b"GET"), (b"a", b"2")]
    d.max_header_list_size = 60
    with pytest.raises(OversizedHeaderListError):
        d.decode(b"\x82\xbe")
    d.max_header_list_size = 1000
    d.max_allowed_table_size = 10
    with pytest.raises(InvalidTableSizeError):
        d.decode(b"\x82\xbe")
    d = Decoder()
    d.decode(b"\x40\x01a\x011")
    assert d.decode(b"\xbe") == [(b"a", b"1")]
    d.header_table_size = 0
    with pytest.raises(InvalidTableIndex):
        d.decode(b"\xbe")
    d.header_table_size = 4096
    d.decode(b"\x40\x01b\x011")
    assert d.decode(b"\xbe") == [(b"b", b"1")]
    for _ in range(2):  # a block that inserts must insert every time it is received
        d.decode(b"\x82\x40\x01c\x011")
    assert d.dynamic_table == [(b"c", b"1"), (b"c", b"1"), (b"b", b"1")]


def test_encoder_block_cache_dropped_on_resize() -> None:
    e = Encoder()
    d = hpack.Decoder()
    block = [(b"x-a", b"1")]
    for _ in range(3):
        assert d.decode(e.encode(block), raw=True) == block  # cached once it is all indexed
    e.header_table_size = 0  # evicts x-a
    assert d.decode(e.encode([(b":method", b"GET")]), raw=True) == [(b":method", b"GET")]
    e.header_table_size = 4096
    assert d.decode(e.encode([(b":method", b"GET")]), raw=True) == [(b":method", b"GET")]
    assert d.decode(e.encode(block), raw=True) == block


_STEADY_REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"127.0.0.1:8080"),
                   (b":path", b"/"), (b"user-agent", b"h2load nghttp2/1.52.0"), (b"accept", b"*/*"),
                   (b"x-forwarded-for", b"127.0.0.1"), (b"x-forwarded-proto", b"http")]


def test_request_id_is_a_literal_without_indexing_so_the_rest_of_the_block_repeats() -> None:
    """A value new on every request would add a table entry per request (shifting every other
    index, so no block would repeat): after the first, it is sent without indexing, the name as an
    index and the value as it is, after the same bytes as the previous request."""
    e = Encoder()
    d = hpack.Decoder()
    blocks = []
    for i in range(50):
        rid = b"0a1b2c3d4e-%d" % i
        block = e.encode([*_STEADY_REQUEST, (b"x-request-id", rid)])
        assert d.decode(block, raw=True) == [*_STEADY_REQUEST, (b"x-request-id", rid)]
        assert e.dynamic_table == _hpack_table(d)
        blocks.append((block, rid))
    table = e.dynamic_table
    assert len(table) == len(_STEADY_REQUEST) - 3 + 1  # (:method, :scheme, :path: static) + the first id
    for block, rid in blocks[2:]:
        head = block[:len(block) - len(rid) - 1]
        assert block[len(head):] == bytes((len(rid),)) + rid  # not Huffman-coded
        # a literal without indexing, the name as index 62 (15 + 47: the first id's entry, the newest)
        assert head[-2:] == b"\x0f\x2f"
        assert head[:-2] == blocks[2][0][:len(head) - 2]  # the indexed fields: the same bytes each time
        assert all(b & 0x80 for b in head[:-2])
    # A never-indexed id stays never-indexed; a request id in the middle of a block is still not indexed.
    block = e.encode([(b"x-request-id", b"secret"), *_STEADY_REQUEST])
    block2 = e.encode([NeverIndexedHeaderTuple(b"x-request-id", b"n1"), *_STEADY_REQUEST])
    (first, *_) = d.decode(block2, raw=True)
    assert isinstance(first, NeverIndexedHeaderTuple)
    assert d.decode(block, raw=True)[0] == (b"x-request-id", b"secret")
    assert e.dynamic_table == table == _hpack_table(d)


def test_request_id_name_is_indexed_again_once_evicted() -> None:
    e = Encoder()
    d = hpack.Decoder()
    e.header_table_size = 200
    d.max_allowed_table_size = 4096
    for i in range(30):
        fields = [(b"x-big", b"v%d" % i * 20), (b"x-request-id", b"id-%d" % i)]
        assert d.decode(e.encode(fields), raw=True) == fields
        assert e.dynamic_table == _hpack_table(d)
        assert e.table_size <= 200


def test_decoder_resumes_after_a_remembered_indexed_prefix() -> None:
    """Our encoder's blocks with a request id decoded by us and by hpack: the same fields and tables,
    whichever prefix the decoder remembered, including after table changes and size updates."""
    rng = random.Random(14)
    enc = Encoder()
    theirs = hpack.Decoder(max_header_list_size=1 << 20)
    ours = Decoder(max_header_list_size=1 << 20)
    variants = [_STEADY_REQUEST, _STEADY_REQUEST[:5], [*_STEADY_REQUEST, (b"cookie", b"a-long-session-id-0123456789")],
                [(b":status", b"200"), (b"content-type", b"text/plain")]]
    for i in range(1500):
        if rng.random() < 0.02:
            size = rng.choice([0, 100, 1000, 4096])
            enc.header_table_size = size
        base = rng.choice(variants)
        if rng.random() < 0.1:
            base = [*base, (b"x-n", b"%d" % rng.randrange(10))]  # sometimes inserts
        tail: list[tuple[bytes, bytes]] = [(b"x-request-id", b"r-%d" % i)] if rng.random() < 0.8 else []
        if rng.random() < 0.1:
            tail.append(NeverIndexedHeaderTuple(b"authorization", b"Bearer t"))
        fields = [*base, *tail]
        data = enc.encode(fields, huffman=rng.random() < 0.8)
        expected = theirs.decode(data, raw=True)
        got = ours.decode(data)
        assert got == [tuple(h) for h in expected] == fields, i
        assert [isinstance(h, NeverIndexedHeaderTuple) for h in got] == [
            isinstance(h, NeverIndexedHeaderTuple) for h in expected], i
        assert ours.dynamic_table == _hpack_table(theirs) == enc.dynamic_table, i


def test_decoder_prefix_follows_the_table_and_the_limits() -> None:
    d = Decoder()
    d.decode(b"\x40\x01a\x011")  # a: 1 at index 62
    # Indexed :method GET and a: 1, then a literal without indexing (name index 62): remembered prefix
    assert d.decode(b"\x82\xbe\x0f\x2f\x01x") == [(b":method", b"GET"), (b"a", b"1"), (b"a", b"x")]
    got = d.decode(b"\x82\xbe\x0f\x2f\x01y")
    assert got == [(b":method", b"GET"), (b"a", b"1"), (b"a", b"y")]
    got.append((b"junk", b""))  # the caller owns the returned list
    assert d.decode(b"\x82\xbe\x0f\x2f\x01z") == [(b":method", b"GET"), (b"a", b"1"), (b"a", b"z")]
    d.decode(b"\x40\x01a\x012")  # index 62 is now a: 2
    assert d.decode(b"\x82\xbe\x0f\x2f\x01z") == [(b":method", b"GET"), (b"a", b"2"), (b"a", b"z")]
    d.max_header_list_size = 90  # the prefix alone is 72 bytes, with the literal 105
    with pytest.raises(OversizedHeaderListError):
        d.decode(b"\x82\xbe\x0f\x2f\x01z")
    d.max_header_list_size = 60
    with pytest.raises(OversizedHeaderListError):
        d.decode(b"\x82\xbe\x0f\x2f\x01z")
    d.max_header_list_size = 1000
    d.max_allowed_table_size = 10
    with pytest.raises(InvalidTableSizeError):
        d.decode(b"\x82\xbe\x0f\x2f\x01z")
    d = Decoder()
    d.decode(b"\x40\x01a\x011")
    assert d.decode(b"\x82\x0f\x2f\x01x") == [(b":method", b"GET"), (b"a", b"x")]
    with pytest.raises(InvalidTableIndex):  # a remembered prefix, then garbage: still an error
        d.decode(b"\x82\xc5")  # index 69: beyond the table
    d = Decoder()
    d.decode(b"\x40\x01a\x011")
    assert d.decode(b"\x82\x0f\x2f\x01x") == [(b":method", b"GET"), (b"a", b"x")]
    # A block that inserts after the same prefix inserts every time it is received.
    for _ in range(2):
        assert d.decode(b"\x82\x40\x01c\x011") == [(b":method", b"GET"), (b"c", b"1")]
    assert d.dynamic_table == [(b"c", b"1"), (b"c", b"1"), (b"a", b"1")]


def test_encoder_huffman_only_when_shorter() -> None:
    e = Encoder()
    out = e.encode([(b"x-bin", b"\xfe\xff\xfe")], huffman=True)
    assert out.endswith(b"\x03\xfe\xff\xfe")  # raw: Huffman would take 9 bytes
    out = e.encode([(b"x-txt", b"aaaaaaaa")], huffman=True)
    assert out.endswith(b"\x85" + huffman_encode(b"aaaaaaaa"))  # 5 bytes, Huffman-coded
    out = e.encode([(b"x-txt2", b"aaaaaaaa")], huffman=False)
    assert out.endswith(b"\x08aaaaaaaa")


def test_huffman_round_trip() -> None:
    rng = random.Random(5)
    for _ in range(500):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(60)))
        coded = huffman_encode(data)
        assert coded == hpack.huffman.HuffmanEncoder(
            hpack.huffman_constants.REQUEST_CODES, hpack.huffman_constants.REQUEST_CODES_LENGTH).encode(data)
        assert huffman_decode(coded) == data
    for _ in range(2000):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
        try:
            expected: bytes | type[Exception] = hpack.huffman_table.decode_huffman(junk)
        except HPACKDecodingError as err:
            expected = type(err)
        try:
            got: bytes | type[Exception] = huffman_decode(junk)
        except HPACKDecodingError as err:
            got = type(err)
        assert got == expected, junk


# --------------------------------------------------------------------------- errors

_HUFF_A = huffman_encode(b"a")  # 5 bits + 3 bits of padding


def _bad(prefix: bytes, value: bytes) -> bytes:
    return prefix + bytes((0x80 | len(value),)) + value


ERRORS: list[tuple[str, bytes, type[Exception]]] = [
    ("truncated index", b"\xff", HPACKDecodingError),
    ("truncated continuation", b"\xff\x80", HPACKDecodingError),
    ("integer too long", b"\xff" + b"\x80" * 5 + b"\x00", HPACKDecodingError),
    ("huge integer index", b"\xff" + b"\x80" * 4 + b"\x01", InvalidTableIndex),
    ("index 0", b"\x80", InvalidTableIndex),
    ("index 0 after fields", b"\x82\x80", InvalidTableIndex),
    ("dynamic index on empty table", b"\xbe", InvalidTableIndex),
    ("index 62 after one insert", b"\x40\x01a\x01b\xbf", InvalidTableIndex),
    ("name index beyond tables", b"\x7e\x01a", InvalidTableIndex),
    ("multi-byte name index beyond tables", b"\x0f\x30\x01a", InvalidTableIndex),
    ("literal missing name length", b"\x40", HPACKDecodingError),
    ("truncated name", b"\x40\x05ab", HPACKDecodingError),
    ("missing value length", b"\x00\x01a", HPACKDecodingError),
    ("truncated value", b"\x41\x05abc", HPACKDecodingError),
    ("truncated value length integer", b"\x41\x7f", HPACKDecodingError),
    ("size update after a field", b"\x82\x3f\xe1\x1f", HPACKDecodingError),
    ("size update above max", b"\x3f\xe2\x1f", InvalidTableSizeError),
    ("huffman EOS", _bad(b"\x41", b"\xff\xff\xff\xff"), HPACKDecodingError),
    ("huffman padding > 7 bits", _bad(b"\x41", _HUFF_A + b"\xff"), HPACKDecodingError),
    ("huffman padding not ones", _bad(b"\x41", bytes((_HUFF_A[0] & 0xF8,))), HPACKDecodingError),
    ("huffman bad name", b"\x40" + _bad(b"", b"\xff\xff\xff\xff") + b"\x00", HPACKDecodingError),
    ("oversized list", b"\x40\x01a" + b"\x7f\xad\x01" + b"x" * 300 + b"\xbe" * 300, OversizedHeaderListError),
]


@pytest.mark.parametrize(("case", "data", "error"), ERRORS, ids=[c[0] for c in ERRORS])
def test_errors_match_hpack(case: str, data: bytes, error: type[Exception]) -> None:
    theirs = hpack.Decoder(max_header_list_size=16384)
    ours = Decoder(max_header_list_size=16384)
    with pytest.raises(HPACKDecodingError) as their_err:
        theirs.decode(data, raw=True)
    with pytest.raises(HPACKDecodingError) as our_err:
        ours.decode(data)
    assert type(their_err.value) is error, case
    assert type(our_err.value) is error, case


def test_valid_edge_cases_match_hpack() -> None:
    cases = [
        b"\x20\x3f\xe1\x1f\x82",  # two size updates at the start
        b"\x41\x00",  # empty value
        b"\x40\x00\x00",  # empty name and value
        b"\x0f\x80\x80\x80\x80\x00\x01x",  # name index 15 padded with 5 continuation octets
        b"\x3f\x81\x80\x00\x82",  # size update 32, padded
        b"\x40\x01a\x01b\xbe\xbe",  # dynamic references
        b"",
    ]
    for data in cases:
        theirs = hpack.Decoder()
        ours = Decoder()
        assert ours.decode(data) == [tuple(h) for h in theirs.decode(data, raw=True)], data
        assert ours.dynamic_table == _hpack_table(theirs)
        assert ours.header_table_size == theirs.header_table_size


def _decode(d: Decoder | hpack.Decoder, data: bytes) -> list[tuple[bytes, bytes]]:
    """Either decoder, bytes out (ours only returns bytes)."""
    return d.decode(data) if isinstance(d, Decoder) else d.decode(data, raw=True)  # type: ignore[return-value]


def test_table_shrunk_without_update_is_an_error_like_hpack() -> None:
    for make in (lambda: hpack.Decoder(), lambda: Decoder()):
        d = make()
        d.max_allowed_table_size = 100
        with pytest.raises(InvalidTableSizeError):
            _decode(d, b"\x82")
        d = make()
        d.max_allowed_table_size = 100
        assert list(_decode(d, b"\x3f\x45\x82")) == [(b":method", b"GET")]
        assert d.header_table_size == 100


def test_header_table_size_setter_evicts() -> None:
    d = Decoder()
    d.decode(b"\x40\x01a\x01b\x40\x01c\x01d")
    assert d.dynamic_table == [(b"c", b"d"), (b"a", b"b")]
    d.header_table_size = 40
    assert d.dynamic_table == [(b"c", b"d")] and d.table_size == 34
    d.header_table_size = 0
    assert d.dynamic_table == [] and d.table_size == 0


def _bomb(tail: bytes) -> bytes:
    value = b"v" * 4000  # 4000 + 1 + 32 bytes: fits the default 4096-byte table
    literal = b"\x40\x01x" + b"\x7f" + bytes((0x80 | ((4000 - 127) & 0x7F), (4000 - 127) >> 7)) + value
    return literal + b"\xbe" * 1000 + tail


@pytest.mark.parametrize("make", [Decoder, hpack.Decoder], ids=["ours", "hpack"])
def test_bomb_stops_early(make: Callable[[], Decoder | hpack.Decoder]) -> None:
    d = make()
    d.max_header_list_size = 65536
    # The block ends with an invalid index: reaching the end would raise InvalidTableIndex, so an
    # OversizedHeaderListError proves decoding stopped at the limit (after 16 of 1,000 references).
    with pytest.raises(OversizedHeaderListError):
        _decode(d, _bomb(b"\x80"))
    d = make()
    d.max_header_list_size = 1 << 30
    with pytest.raises(InvalidTableIndex):
        _decode(d, _bomb(b"\x80"))
    d = make()
    d.max_header_list_size = 1 << 30
    assert len(list(_decode(d, _bomb(b"")))) == 1001
