"""``TLSSession`` data path: ``decrypt_view`` (the tunnel reader's) and ``encrypt_parts`` (the writer's).

Two real OpenSSL sessions in memory (memory BIOs, a finished mutual-TLS handshake with a demo
PKI); no socket.  The views and parts must carry exactly the bytes ``decrypt``/``encrypt`` do,
whatever the read and record boundaries.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.micro_core import tls_pair
from rhttp_wsgi import tls


@pytest.fixture
def pair() -> Iterator[tuple[Any, Any]]:
    worker, proxy, tmp = tls_pair()
    try:
        yield worker, proxy
    finally:
        tmp.cleanup()


def _cipher(sender: Any, plain: bytes, rng: random.Random) -> bytes:
    """``plain`` encrypted in writes of random sizes (records of every length), as one stream."""
    out = []
    pos = 0
    while pos < len(plain):
        n = rng.choice([1, 100, 5000, 16384, 16385, 70000, 300000])
        out += sender.encrypt_parts(plain[pos:pos + n])
        pos += n
    return b"".join(out)


@pytest.mark.parametrize("seed", range(4))
def test_decrypt_view_carries_every_byte_across_record_and_read_boundaries(pair: tuple[Any, Any],
                                                                           seed: int) -> None:
    worker, proxy = pair
    rng = random.Random(seed)
    plain = rng.randbytes(1_500_000)
    cipher = _cipher(worker, plain, rng)
    got = bytearray()
    pos = 0
    while pos < len(cipher):
        n = rng.choice([1, 5, 21, 1000, 16406, 100_000, 262_144])
        view = proxy.decrypt_view(cipher[pos:pos + n])
        got += view  # (valid until the next call: taken now)
        pos += n
    assert bytes(got) == plain


def test_the_next_call_reuses_the_buffer_so_a_view_is_valid_only_until_then(pair: tuple[Any, Any]) -> None:
    worker, proxy = pair
    first = proxy.decrypt_view(worker.encrypt(b"a" * 100_000))  # (a large read: the buffer path)
    assert bytes(first) == b"a" * 100_000
    second = proxy.decrypt_view(worker.encrypt(b"b" * 100_000))
    assert bytes(second) == b"b" * 100_000
    assert bytes(first) == b"b" * 100_000  # the same memory: the contract the reader relies on


def test_decrypt_view_grows_when_a_read_completes_more_than_it_planned_for(pair: tuple[Any, Any],
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # With a tiny planning margin, a read that completes a record started earlier yields more
    # plaintext than the room planned: the buffer grows (a held view of the old one stays valid).
    monkeypatch.setattr(tls, "_RECORD_MAX", 16)
    worker, proxy = pair
    plain = random.Random(7).randbytes(40_000)
    cipher = worker.encrypt(plain)
    held = proxy.decrypt_view(cipher[:15_000])  # most of the first record: no plaintext yet
    assert bytes(held) == b""
    view = proxy.decrypt_view(cipher[15_000:15_100])  # completes the first record
    rest = bytes(view) + bytes(proxy.decrypt_view(cipher[15_100:]))
    assert rest == plain


def test_encrypt_parts_is_encrypt_in_pieces(pair: tuple[Any, Any]) -> None:
    worker, proxy = pair
    plain = random.Random(3).randbytes(300_000)
    parts = worker.encrypt_parts(plain)
    assert len(parts) > 1  # (over _ENCRYPT_PIECE: one piece of ciphertext per plaintext piece)
    assert proxy.decrypt(b"".join(parts)) == plain
    assert proxy.decrypt(worker.encrypt(plain)) == plain


def test_tunnels_negotiate_aes_128_gcm_first(pair: tuple[Any, Any]) -> None:
    """TLS 1.3 with AES-128-GCM, as Go's crypto/tls would pick: the cheaper suite for bulk data."""
    worker, proxy = pair
    assert worker.protocol_version() == "TLSv1.3"
    assert worker.cipher() == proxy.cipher() == "TLS_AES_128_GCM_SHA256"


def test_small_reads_take_the_plain_path_and_give_a_bulk_buffer_back(pair: tuple[Any, Any]) -> None:
    """A large read fills the session's buffer; the next small one (an idle tunnel's PING) returns
    bytes and drops that buffer, so an idle tunnel does not keep a megabyte per connection."""
    worker, proxy = pair
    big = proxy.decrypt_view(worker.encrypt(b"z" * 500_000))
    assert isinstance(big, memoryview) and len(big) == 500_000
    assert proxy.buffered_capacity() > 500_000
    small = proxy.decrypt_view(worker.encrypt(b"ping"))
    assert small == b"ping" and isinstance(small, bytes)
    assert proxy.buffered_capacity() == 0
