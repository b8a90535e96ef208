"""What we take from h2 and hpack beyond their documented API, pinned and checked.

``_hpack.py`` runs hpack's Huffman automaton and static table directly
(``hpack.huffman_table``, ``hpack.huffman_constants``, ``hpack.table``), and
``_h2core.py`` builds ``h2.events`` objects with keyword arguments.  None of
that is promised by those projects, so setup.cfg pins the major versions and
these tests fail loudly, at the floor (``tox -e lowest``, the CI lowest job) and
at the newest release, if a version changes the shape or meaning we rely on.
"""

from __future__ import annotations

import h2.events as ev
import pytest
from h2.errors import ErrorCodes
from h2.settings import ChangedSetting, SettingCodes
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import HUFFMAN_COMPLETE, HUFFMAN_EMIT_SYMBOL, HUFFMAN_FAIL, HUFFMAN_TABLE
from hpack.table import HeaderTable

from rhttp_wsgi._hpack import Decoder, Encoder

# RFC 7541 Appendix B, a few rows: symbol -> (code, bit length).
RFC7541_CODES = {
    ord("0"): (0x0, 5),
    ord("a"): (0x3, 5),
    ord(" "): (0x14, 6),
    ord("%"): (0x15, 6),
    ord(":"): (0x5C, 7),
    ord("X"): (0xFC, 8),
    0: (0x1FF8, 13),
    255: (0x3FFFFEE, 26),
    256: (0x3FFFFFFF, 30),  # EOS
}


def test_huffman_code_table_is_rfc7541_appendix_b() -> None:
    assert len(REQUEST_CODES) == len(REQUEST_CODES_LENGTH) == 257
    for symbol, (code, length) in RFC7541_CODES.items():
        assert (REQUEST_CODES[symbol], REQUEST_CODES_LENGTH[symbol]) == (code, length), symbol


def _walk(data: bytes) -> tuple[bytes, bool]:
    """Decode with hpack's nibble automaton exactly as _hpack._huffman_step reads it."""
    state, out, complete = 0, bytearray(), True
    for octet in data:
        for nibble in (octet >> 4, octet & 0x0F):
            state, flags, symbol = HUFFMAN_TABLE[state * 16 + nibble]
            if flags & HUFFMAN_FAIL:
                raise ValueError("invalid Huffman code")
            if flags & HUFFMAN_EMIT_SYMBOL:
                out.append(symbol)
            complete = bool(flags & HUFFMAN_COMPLETE)
    return bytes(out), complete


def _encode(symbols: bytes) -> bytes:
    bits, n = 0, 0
    for s in symbols:
        bits = (bits << REQUEST_CODES_LENGTH[s]) | REQUEST_CODES[s]
        n += REQUEST_CODES_LENGTH[s]
    pad = -n % 8
    bits = (bits << pad) | ((1 << pad) - 1)  # padded with the EOS prefix (all ones)
    return ((bits).to_bytes((n + pad) // 8, "big")) if n + pad else b""


def test_huffman_automaton_decodes_every_symbol_as_our_decoder_reads_it() -> None:
    # 256 states x 16 nibbles, flags as _hpack uses them (EMIT, COMPLETE, FAIL).
    assert len(HUFFMAN_TABLE) == 256 * 16
    assert (HUFFMAN_COMPLETE, HUFFMAN_EMIT_SYMBOL, HUFFMAN_FAIL) == (1, 2, 4)
    for symbol in range(256):
        for text in (bytes([symbol]), bytes([symbol, ord("a"), symbol])):
            assert _walk(_encode(text)) == (text, True), symbol


def test_huffman_automaton_refuses_an_encoded_eos() -> None:
    with pytest.raises(ValueError):
        _walk(b"\xff\xff\xff\xff")  # 30 ones = EOS inside the string (RFC 7541 5.2)


def test_static_table_is_rfc7541_appendix_a() -> None:
    table = HeaderTable.STATIC_TABLE
    assert len(table) == 61
    assert table[0] == (b":authority", b"")
    assert table[1] == (b":method", b"GET")
    assert table[7] == (b":status", b"200")
    assert table[30] == (b"content-type", b"")  # index 31
    assert table[60] == (b"www-authenticate", b"")


def test_our_codec_round_trips_through_those_tables() -> None:
    fields = [(b":status", b"200"), (b"content-type", b"text/html; charset=utf-8"), (b"x-\xff", b"\x00\x7f\xfe")]
    block = Encoder().encode(fields)
    assert [tuple(f) for f in Decoder().decode(block)] == fields


def test_h2_events_take_the_keyword_arguments_our_core_passes() -> None:
    # h2 < 4.3 takes no constructor arguments: the worker crashed on its first request.
    ended = ev.StreamEnded(stream_id=1)
    req = ev.RequestReceived(stream_id=1, headers=[(b":method", b"GET")], stream_ended=ended)
    assert (req.stream_id, req.stream_ended) == (1, ended)
    assert ev.DataReceived(stream_id=1, data=b"x", flow_controlled_length=3).flow_controlled_length == 3
    assert ev.WindowUpdated(stream_id=0, delta=5).delta == 5
    assert ev.StreamReset(stream_id=3, error_code=ErrorCodes.CANCEL, remote_reset=False).remote_reset is False
    # These two the core builds empty and fills in, as h2 itself does.
    term = ev.ConnectionTerminated()
    term.error_code, term.last_stream_id, term.additional_data = ErrorCodes.NO_ERROR, 7, None
    assert term.last_stream_id == 7
    assert ev.PingReceived(ping_data=b"12345678").ping_data == b"12345678"
    assert ev.PingAckReceived(ping_data=b"12345678").ping_data == b"12345678"
    assert ev.ResponseReceived(stream_id=1, headers=[]).headers == []
    assert ev.InformationalResponseReceived(stream_id=1, headers=[]).stream_id == 1
    assert ev.TrailersReceived(stream_id=1, headers=[]).stream_id == 1
    changed = ChangedSetting(SettingCodes.INITIAL_WINDOW_SIZE, 65535, 1)
    settings = ev.RemoteSettingsChanged()
    settings.changed_settings[changed.setting] = changed
    assert settings.changed_settings[SettingCodes.INITIAL_WINDOW_SIZE].new_value == 1
    assert SettingCodes.ENABLE_CONNECT_PROTOCOL == 8
