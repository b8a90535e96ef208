"""A fast HPACK (RFC 7541) codec: the header compression of our HTTP/2 core (``_h2core``).

It does what ``hpack`` 4.2 does for the core, faster (bytes in, bytes out: the core never
needs ``str`` fields).  ``hpack``'s decoder walks a header block through several method calls per field, slices a
``memoryview`` per field and makes a ``log.debug`` call per field; its encoder searches the dynamic
table linearly.  Here:

* :class:`Decoder` decodes a block in one loop over local variables.  Static and dynamic entries
  live in one list (``[unused] + 61 static entries + dynamic entries, newest first``), so an
  indexed field — which is every field of a steady-state request from HAProxy — is one list
  lookup, one size addition and one ``append`` of a tuple that is shared with the table (tuples
  are immutable: sharing is safe).  A block made only of indexed fields (a load test's identical
  requests) is remembered while the dynamic table is unchanged, and so is the all-indexed start of a
  block whose literals leave the table as it is (the same request plus its request id).
* :class:`Encoder` finds exact and name matches with dicts (the dynamic table is indexed by
  insertion sequence number, so no entry has to be renumbered when another is inserted), and
  caches whole encoded blocks that consist of indexed representations only, for as long as the
  dynamic table does not change.  A field whose value is new on every request (``_http.PER_REQUEST``:
  the request id) is sent as a literal without indexing, so it neither churns the table nor keeps
  the rest of its block from repeating.

Errors are ``hpack``'s own exception classes, raised where ``hpack`` 4.2 raises them
(``tests/unit/test_hpack_fast.py`` checks both libraries side by side).  Huffman coding reuses
``hpack``'s tables.  Differences from ``hpack`` are listed in the class docstrings.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import HUFFMAN_COMPLETE, HUFFMAN_EMIT_SYMBOL, HUFFMAN_FAIL, HUFFMAN_TABLE
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple
from hpack.table import HeaderTable

from ._http import NEVER_INDEXED, PER_REQUEST, SHORT_COOKIE

__all__ = ["DEFAULT_MAX_HEADER_LIST_SIZE", "DEFAULT_TABLE_SIZE", "Decoder", "Encoder"]

#: hpack's default for :attr:`Decoder.max_header_list_size` (64 KiB).
DEFAULT_MAX_HEADER_LIST_SIZE = 1 << 16
#: RFC 7540 §6.5.2 initial SETTINGS_HEADER_TABLE_SIZE.
DEFAULT_TABLE_SIZE = 4096

#: Continuation octets accepted after a full prefix, as ``hpack.hpack.decode_integer`` (its
#: ``VARINT_MAX_LENGTH`` check): a sixth one is a decoding error, so no integer exceeds 2**35 + 255.
_MAX_CONTINUATION = 5

_STATIC: tuple[tuple[bytes, bytes], ...] = tuple((n, v) for n, v in HeaderTable.STATIC_TABLE)
_STATIC_LEN = len(_STATIC)  # 61
_FIRST_DYNAMIC = _STATIC_LEN + 1  # index 62 = newest dynamic entry

# Encoder look-ups: exact (name, value) -> static index; name -> lowest static index.
_STATIC_FULL: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, _entry in enumerate(_STATIC, 1):
    _STATIC_FULL.setdefault(_entry, _i)
    _STATIC_NAME.setdefault(_entry[0], _i)
del _i, _entry

_HUFF_CODES: list[int] = list(REQUEST_CODES)
_HUFF_LENGTHS: list[int] = list(REQUEST_CODES_LENGTH)

Header = tuple[bytes, bytes] | HeaderTuple


def _decode_int_tail(data: bytes, pos: int, value: int) -> tuple[int, int]:
    """Finish an integer whose prefix was all ones; ``pos`` is at the first continuation octet.

    Returns ``(value, position after the integer)``.
    """
    end = len(data)
    shift = 0
    count = 0
    while True:
        if pos >= end:
            raise HPACKDecodingError("Unable to decode HPACK integer representation: truncated")
        octet = data[pos]
        pos += 1
        value += (octet & 0x7F) << shift
        if octet < 0x80:
            return value, pos
        count += 1
        if count >= _MAX_CONTINUATION:
            raise HPACKDecodingError("Variable integer representation is too long")
        shift += 7


# Huffman decoding runs hpack's nibble state machine (huffman_table.HUFFMAN_TABLE) a whole octet
# at a time: (state << 8 | octet) -> (next state << 8, emitted bytes, 0 failed / 1 / 2 complete),
# memoised on first use (at most 256 * 256 entries; a few thousand for typical header text).
# Same automaton, so the same strings are accepted and rejected as by hpack.decode_huffman.
_HuffStep = tuple[int, bytes, int]
_HUFF_STEPS: dict[int, _HuffStep] = {}


def _huffman_step(key: int) -> _HuffStep:
    octet = key & 0xFF
    out = bytearray()
    state, flags, symbol = HUFFMAN_TABLE[(key >> 8) * 16 + (octet >> 4)]
    if flags & HUFFMAN_FAIL:
        step: _HuffStep = (0, b"", 0)
    else:
        if flags & HUFFMAN_EMIT_SYMBOL:
            out.append(symbol)
        state, flags, symbol = HUFFMAN_TABLE[state * 16 + (octet & 0x0F)]
        if flags & HUFFMAN_FAIL:
            step = (0, b"", 0)
        else:
            if flags & HUFFMAN_EMIT_SYMBOL:
                out.append(symbol)
            step = (state << 8, bytes(out), 2 if flags & HUFFMAN_COMPLETE else 1)
    _HUFF_STEPS[key] = step
    return step


def huffman_decode(data: bytes) -> bytes:
    """Decode a Huffman-coded string; HPACKDecodingError for EOS or bad padding, like hpack."""
    steps = _HUFF_STEPS
    out = bytearray()
    state = 0
    status = 2  # the empty string is complete
    for octet in data:
        key = state | octet
        try:
            state, emitted, status = steps[key]
        except KeyError:
            state, emitted, status = _huffman_step(key)
        if not status:
            raise HPACKDecodingError("Invalid Huffman string")
        out += emitted
    if status != 2:
        raise HPACKDecodingError("Incomplete Huffman string")
    return bytes(out)


def _decode_string(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    """A string literal (RFC 7541 §5.2) at ``pos``: its octets (Huffman-decoded if flagged) and the next position."""
    if pos >= end:
        raise HPACKDecodingError("Unable to decode HPACK integer representation: truncated")
    octet = data[pos]
    pos += 1
    length = octet & 0x7F
    if length == 0x7F:
        length, pos = _decode_int_tail(data, pos, length)
    stop = pos + length
    if stop > end:
        raise HPACKDecodingError("Truncated header block")
    return (huffman_decode(data[pos:stop]) if octet & 0x80 else data[pos:stop]), stop


def encode_integer(value: int, prefix_bits: int, flags: int = 0) -> bytes:
    """RFC 7541 §5.1 integer with ``flags`` OR-ed into the first octet."""
    if value < 0:
        raise ValueError(f"Can only encode positive integers, got {value}")
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def huffman_encode(data: bytes) -> bytes:
    """Huffman-encode ``data`` (RFC 7541 Appendix B), padded with ones to an octet boundary."""
    acc = 0
    nbits = 0
    codes = _HUFF_CODES
    lengths = _HUFF_LENGTHS
    for octet in data:
        length = lengths[octet]
        acc = (acc << length) | codes[octet]
        nbits += length
    pad = -nbits & 7
    acc = (acc << pad) | ((1 << pad) - 1)
    return acc.to_bytes((nbits + pad) >> 3, "big")


def _encode_string(data: bytes, huffman: bool) -> bytes:
    """A string literal (§5.2): Huffman-coded when asked for and strictly shorter."""
    if huffman and data:
        coded = huffman_encode(data)
        if len(coded) < len(data):
            return encode_integer(len(coded), 7, 0x80) + coded
    return encode_integer(len(data), 7) + data


# Indexed representations (§6.1) of small indexes, precomputed.
_INDEXED: tuple[bytes, ...] = tuple(encode_integer(i, 7, 0x80) for i in range(512))
_INDEXED_LEN = len(_INDEXED)


class Decoder:
    """HPACK decoder (what ``hpack.Decoder(...).decode(block, raw=True)`` does).

    ``decode`` returns a list of plain ``(name, value)`` tuples of ``bytes``, except that a field
    received as a literal *never indexed* (§6.2.3) comes back as
    :class:`hpack.NeverIndexedHeaderTuple`, so the flag can be honoured when a field is forwarded.
    Unlike hpack, other fields are not wrapped in :class:`hpack.HeaderTuple` (they compare equal to
    hpack's result).

    Errors, as hpack 4.2: :class:`hpack.exceptions.HPACKDecodingError` for a truncated integer or
    string, an integer with more than 5 continuation octets, invalid Huffman data (EOS, padding
    longer than 7 bits or not all ones) or a dynamic table size update after a field;
    :class:`~hpack.exceptions.InvalidTableIndex` (a subclass) for index 0 or an index beyond the
    tables; :class:`~hpack.exceptions.InvalidTableSizeError` for a size update above
    :attr:`max_allowed_table_size` or a table still larger than it at the end of the block;
    :class:`~hpack.exceptions.OversizedHeaderListError` as soon as the running list size
    (sum of ``len(name) + len(value) + 32``) exceeds :attr:`max_header_list_size` — the fields
    decoded so far are discarded, so an "HPACK bomb" never expands past the limit.  After any error
    the decoder's state is undefined: the connection must be closed (COMPRESSION_ERROR).

    A block made only of indexed fields (no literal, no size update) is remembered, keyed on its
    bytes, until the dynamic table next changes; decoding it again returns a new list of the same
    tuples after re-checking both limits.  A block of indexed fields followed by literals that do
    not change the table (a request id sent without indexing) has its indexed start remembered the
    same way: a later block that starts with those bytes resumes decoding after them (a prefix of
    complete representations decodes the same whatever follows it).
    """

    __slots__ = ("_cache", "_maxsize", "_prefix_lengths", "_size", "_table", "max_allowed_table_size",
                 "max_header_list_size")

    #: Blocks made only of indexed fields, at most this long, are remembered (at most
    #: ``BLOCK_CACHE_SIZE`` of them) while the dynamic table is unchanged: decoding such a block
    #: again is one dict look-up (a load test's identical requests; health checks).
    BLOCK_CACHE_MAX_LEN = 256
    BLOCK_CACHE_SIZE = 64
    #: How many distinct prefix lengths a block is tried against (see ``decode``).
    PREFIX_LENGTHS = 4

    def __init__(self, max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        #: Largest decoded header list accepted (RFC 7541 §4.1 sizes); exceeding it raises
        #: OversizedHeaderListError mid-block.
        self.max_header_list_size = max_header_list_size
        #: Largest dynamic table size the peer may select (our acknowledged
        #: SETTINGS_HEADER_TABLE_SIZE).
        self.max_allowed_table_size = DEFAULT_TABLE_SIZE
        self._maxsize = DEFAULT_TABLE_SIZE
        self._size = 0
        # [0] is never returned (index 0 is rejected), [1..61] static, [62..] dynamic newest first.
        self._table: list[tuple[bytes, bytes]] = [(b"", b""), *_STATIC]
        # block -> (headers, list size), for all-indexed blocks; emptied whenever the table changes.
        self._cache: dict[bytes, tuple[tuple[tuple[bytes, bytes], ...], int]] = {}
        # Lengths of the all-indexed prefixes in ``_cache`` (blocks whose literals, all after the
        # indexed fields, did not change the table: a request id sent without indexing).
        self._prefix_lengths: list[int] = []

    @property
    def header_table_size(self) -> int:
        """Current maximum size of the dynamic table (settable; shrinking evicts)."""
        return self._maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._resize(int(value))

    @property
    def table_size(self) -> int:
        """Current size of the dynamic table (sum of entry sizes, §4.1)."""
        return self._size

    @property
    def dynamic_table(self) -> list[tuple[bytes, bytes]]:
        """The dynamic table's entries, newest first (index 62 first)."""
        return self._table[_FIRST_DYNAMIC:]

    def _resize(self, maxsize: int) -> None:
        self._cache.clear()
        self._maxsize = maxsize
        if maxsize <= 0:
            del self._table[_FIRST_DYNAMIC:]
            self._size = 0
            return
        table = self._table
        size = self._size
        while size > maxsize:
            name, value = table.pop()
            size -= len(name) + len(value) + 32
        self._size = size

    def decode(self, data: bytes | bytearray | memoryview) -> list[tuple[bytes, bytes]]:
        """Decode one complete header block (all its CONTINUATION fragments joined)."""
        if type(data) is not bytes:
            data = bytes(data)
        hit = self._cache.get(data)
        if (hit is not None and hit[1] <= self.max_header_list_size
                and self._maxsize <= self.max_allowed_table_size):
            # Otherwise decode it again: that raises the right error at the right point.
            return list(hit[0])
        only_indexed = True
        table = self._table
        headers: list[tuple[bytes, bytes]] = []
        limit = self.max_header_list_size
        listsize = 0
        pos = 0
        end = len(data)
        # A block that starts with a remembered all-indexed prefix (the same request, then a
        # literal without indexing: its request id) resumes after the prefix.
        for cut in self._prefix_lengths:
            if cut < end:
                hit = self._cache.get(data[:cut])
                if (hit is not None and hit[1] <= limit
                        and self._maxsize <= self.max_allowed_table_size):
                    headers = list(hit[0])
                    listsize = hit[1]
                    pos = cut
                    only_indexed = False
                    break
        append = headers.append
        # Where the first literal starts (0: none, or the block resumed after a prefix), the fields
        # and list size before it, and whether the block changed the table: what a prefix needs.
        prefix_end = prefix_count = prefix_size = 0
        inserted = False
        while pos < end:
            octet = data[pos]
            pos += 1
            if octet & 0x80:
                # §6.1 indexed header field: the hot path.
                index = octet & 0x7F
                if index == 0x7F:
                    index, pos = _decode_int_tail(data, pos, index)
                elif not index:
                    raise InvalidTableIndex("Invalid table index 0")
                try:
                    header = table[index]
                except IndexError:
                    raise InvalidTableIndex(f"Invalid table index {index}") from None
                listsize += len(header[0]) + len(header[1]) + 32
                if listsize > limit:
                    raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
                append(header)
                continue

            if only_indexed:
                only_indexed = False
                prefix_end = pos - 1
                prefix_count = len(headers)
                prefix_size = listsize
            if octet & 0x40:
                # §6.2.1 literal with incremental indexing, 6-bit name index.
                index = octet & 0x3F
                if index == 0x3F:
                    index, pos = _decode_int_tail(data, pos, index)
                indexing = True
                never = False
            elif octet & 0x20:
                # §6.3 dynamic table size update: only before the first field (§4.2).
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                newsize = octet & 0x1F
                if newsize == 0x1F:
                    newsize, pos = _decode_int_tail(data, pos, newsize)
                if newsize > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self._resize(newsize)
                continue
            else:
                # §6.2.2 without indexing (0000) / §6.2.3 never indexed (0001), 4-bit name index.
                index = octet & 0x0F
                if index == 0x0F:
                    index, pos = _decode_int_tail(data, pos, index)
                indexing = False
                never = bool(octet & 0x10)

            if index:
                try:
                    name = table[index][0]
                except IndexError:
                    raise InvalidTableIndex(f"Invalid table index {index}") from None
            else:
                name, pos = _decode_string(data, pos, end)
            value, pos = _decode_string(data, pos, end)

            entry_size = len(name) + len(value) + 32
            header = NeverIndexedHeaderTuple(name, value) if never else (name, value)
            if indexing:
                inserted = True
                # §4.4: an entry larger than the table empties it and is not added.
                maxsize = self._maxsize
                self._cache.clear()
                if entry_size > maxsize:
                    del table[_FIRST_DYNAMIC:]
                    self._size = 0
                else:
                    table.insert(_FIRST_DYNAMIC, header)
                    size = self._size + entry_size
                    while size > maxsize:
                        old = table.pop()
                        size -= len(old[0]) + len(old[1]) + 32
                    self._size = size
            listsize += entry_size
            if listsize > limit:
                raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
            append(header)

        if self._maxsize > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        if only_indexed and headers and end <= self.BLOCK_CACHE_MAX_LEN:
            cache = self._cache
            if len(cache) >= self.BLOCK_CACHE_SIZE:
                cache.clear()
            cache[data] = (tuple(headers), listsize)
        elif prefix_end and not inserted and prefix_end <= self.BLOCK_CACHE_MAX_LEN:
            # Indexed fields then literals that left the table as it was: remember the prefix.
            cache = self._cache
            if len(cache) >= self.BLOCK_CACHE_SIZE:
                cache.clear()
            cache[data[:prefix_end]] = (tuple(headers[:prefix_count]), prefix_size)
            lengths = self._prefix_lengths
            if prefix_end not in lengths:
                if len(lengths) >= self.PREFIX_LENGTHS:
                    lengths.clear()
                lengths.append(prefix_end)
        return headers


class Encoder:
    """HPACK encoder (what ``hpack.Encoder().encode`` does for lists of bytes fields).

    ``encode`` takes a list (or tuple) of ``(name, value)`` pairs of ``bytes``: plain tuples,
    :class:`hpack.HeaderTuple` or :class:`hpack.NeverIndexedHeaderTuple` (sent as a literal never
    indexed).  Differences from hpack 4.2, all producing blocks any RFC 7541 decoder reads the
    same way:

    * the never-index rule (``_http.NEVER_INDEXED``, h2's ``_secure_headers``) is applied here, to
      every field: ``authorization``, ``proxy-authorization`` and ``cookie`` values shorter than
      ``SHORT_COOKIE`` bytes are sent as literals never indexed.  As in hpack, a field whose exact
      (name, value) is already in a table is still sent as an index.
    * Huffman coding is used only where it is strictly shorter than the raw string.
    * A field too large to ever fit the dynamic table is sent without indexing (hpack sends it
      with incremental indexing, which empties both tables).
    * A field named in ``_http.PER_REQUEST`` (its value is new on every request) is sent as a literal
      without indexing, the value not Huffman-coded (cheaper for the peer to decode); only when its
      name is in no table is it indexed once, so that the next ones can name it by index.  When it
      is the last field, the others are looked up in the block cache without it.
    * Table size changes since the last block are signalled as the minimum then the final size
      (RFC 7541 §4.2) rather than every intermediate value; setting the current value again
      does not cancel a pending change (in hpack it does, leaving a shrink unsignalled).
      A negative size raises ValueError.
    * The dynamic table is searched by dict: exact match: static, then newest dynamic; name match:
      lowest static index, then newest dynamic entry.
    """

    __slots__ = ("_block_cache", "_entries", "_full", "_maxsize", "_names", "_pending_min", "_seq", "_size")

    #: Largest number of cached blocks; the cache is emptied when full.
    BLOCK_CACHE_SIZE = 128

    def __init__(self) -> None:
        self._maxsize = DEFAULT_TABLE_SIZE
        self._size = 0
        # Dynamic entries, oldest on the left: (name, value, entry size).
        self._entries: deque[tuple[bytes, bytes, int]] = deque()
        self._seq = 0  # sequence number of the next inserted entry; newest = _seq - 1 = index 62
        self._full: dict[tuple[bytes, bytes], int] = {}  # (name, value) -> seq of newest such entry
        self._names: dict[bytes, int] = {}  # name -> seq of newest entry with that name
        self._pending_min: int | None = None  # smallest table size set since the last block
        # Blocks made only of indexed representations (and, keyed on a name alone, the start of a
        # per-request field's literal), valid while the dynamic table is unchanged.
        self._block_cache: dict[object, bytes] = {}

    @property
    def header_table_size(self) -> int:
        """Dynamic table size (the peer's SETTINGS_HEADER_TABLE_SIZE). Changing it evicts as
        needed and signals a size update at the start of the next block."""
        return self._maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        value = int(value)
        if value < 0:
            raise ValueError(f"Invalid header table size {value}")
        if value == self._maxsize:
            return
        pending = self._pending_min
        self._pending_min = value if pending is None or value < pending else pending
        self._maxsize = value
        self._evict()
        self._block_cache.clear()

    @property
    def table_size(self) -> int:
        """Current size of the dynamic table (sum of entry sizes, §4.1)."""
        return self._size

    @property
    def dynamic_table(self) -> list[tuple[bytes, bytes]]:
        """The dynamic table's entries, newest first (index 62 first)."""
        return [(n, v) for n, v, _ in reversed(self._entries)]

    def _evict(self) -> None:
        entries = self._entries
        size = self._size
        maxsize = self._maxsize
        full = self._full
        names = self._names
        while size > maxsize:
            seq = self._seq - len(entries)
            name, value, entry_size = entries.popleft()
            size -= entry_size
            key = (name, value)
            if full.get(key) == seq:
                del full[key]
            if names.get(name) == seq:
                del names[name]
        self._size = size

    def encode(self, headers: list[Header] | tuple[Header, ...], huffman: bool = True) -> bytes:
        """Encode one header block. ``huffman`` allows Huffman coding of literal strings."""
        items = headers if type(headers) is tuple else tuple(headers)
        cache = self._block_cache
        pending = self._pending_min
        # A last field whose value is new on every request (the request id) is encoded on its
        # own, after the rest, so the rest can still come from the block cache.
        tail = None
        if items and items[-1][0] in PER_REQUEST:
            tail = items[-1]
            items = items[:-1]
        if pending is None:
            cached = cache.get(items)
            if cached is not None:
                return cached if tail is None else cached + self._encode_tail(tail, huffman)

        parts: list[bytes] = []
        append = parts.append
        if pending is not None:
            if pending < self._maxsize:
                append(encode_integer(pending, 5, 0x20))
            append(encode_integer(self._maxsize, 5, 0x20))
            self._pending_min = None
        static_full = _STATIC_FULL
        dynamic_full = self._full
        indexed = _INDEXED
        only_indexed = True
        seq0 = self._seq
        for header in items:
            index = static_full.get(header)
            if index is None:
                seq = dynamic_full.get(header)
                if seq is not None:
                    index = _STATIC_LEN + self._seq - seq
            if index is not None:
                append(indexed[index] if index < _INDEXED_LEN else encode_integer(index, 7, 0x80))
            else:
                only_indexed = False
                append(self._encode_field(header, huffman))
        block = b"".join(parts)
        if self._seq != seq0:
            cache.clear()
        elif only_indexed and pending is None:
            if len(cache) >= self.BLOCK_CACHE_SIZE:
                cache.clear()
            cache[items] = block
        if tail is not None:
            block += self._encode_tail(tail, huffman)
        return block

    def _encode_tail(self, header: Any, huffman: bool) -> bytes:
        """A per-request field after a (cached) block; an insertion invalidates the cached blocks.

        Its name's representation (a literal without indexing, the name as an index) is
        remembered in the block cache too, under the name alone, while the table is unchanged."""
        cache = self._block_cache
        name: bytes = header[0]
        value: bytes = header[1]
        prefix = cache.get(name)
        if prefix is not None and type(header) is not NeverIndexedHeaderTuple:
            n = len(value)
            return prefix + (bytes((n,)) if n < 0x7F else encode_integer(n, 7)) + value
        seq = self._seq
        out = self._encode_field(header, huffman)
        if self._seq != seq:
            cache.clear()
        elif out[0] & 0xF0 == 0 and out[0] & 0x0F:
            # (a name index, so the value is the rest: remember what precedes it)
            n = len(value)
            cache[name] = out[:len(out) - n - len(encode_integer(n, 7))]
        return out

    def _encode_field(self, header: Any, huffman: bool) -> bytes:
        """The slow path: anything but an exact match in a table."""
        name, value = header
        key = (name, value)
        if type(header) is NeverIndexedHeaderTuple:
            sensitive = True
        else:
            lname = name.lower()
            sensitive = lname in NEVER_INDEXED or (lname == b"cookie" and len(value) < SHORT_COOKIE)
        name_index = _STATIC_NAME.get(name)
        if name_index is None:
            seq = self._names.get(name)
            if seq is not None:
                name_index = _STATIC_LEN + self._seq - seq
        entry_size = len(name) + len(value) + 32
        if sensitive:
            insert = False
            prefix_bits, flags = 4, 0x10
        elif name in PER_REQUEST:
            # Without indexing, the value as is (cheaper for the peer to decode than Huffman); the
            # first such field is indexed so that its name gets a table index for the next ones.
            huffman = False
            insert = name_index is None and entry_size <= self._maxsize
            prefix_bits, flags = (6, 0x40) if insert else (4, 0x00)
        elif entry_size > self._maxsize:
            insert = False
            prefix_bits, flags = 4, 0x00
        else:
            insert = True
            prefix_bits, flags = 6, 0x40
        if name_index is None:
            out = bytes((flags,)) + _encode_string(name, huffman) + _encode_string(value, huffman)
        else:
            out = encode_integer(name_index, prefix_bits, flags) + _encode_string(value, huffman)
        if insert:
            seq = self._seq
            self._seq = seq + 1
            self._entries.append((name, value, entry_size))
            self._full[key] = seq
            self._names[name] = seq
            self._size += entry_size
            if self._size > self._maxsize:
                self._evict()
        return out
