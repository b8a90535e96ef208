"""Micro-benchmark: rhttp_wsgi._hpack vs the hpack library, µs per header block, same run.

Blocks:

``request``  the request HAProxy sends for h2load (:method GET, :scheme https, :path /, host,
             user-agent h2load nghttp2/1.52.0, accept */*, x-forwarded-for).
             *steady*: the second and later identical blocks (all indexed: 7 bytes);
             *first*: the first block on a connection (literals with incremental indexing).
``response`` :status 200, content-type text/plain, content-length 13 (steady and first).

Decoding times both decoders on the same bytes (encoded by hpack, Huffman on). Encoding times each
encoder on its own state; "first" uses a fresh encoder per block, created outside the timed loop;
"steady, no block cache" empties our decoder's / encoder's block cache before each block (the
per-field path: what a steady stream of requests that differ in one indexed field costs).
Each figure is the median of ``--reps`` runs of ``--number`` blocks, measured with the thread's CPU
clock (``time.thread_time_ns``), so time other processes take from the core is not counted.

    python benchmarks/micro_hpack.py
    python benchmarks/micro_hpack.py --number 50000 --reps 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import hpack  # noqa: E402

from rhttp_wsgi import _hpack  # noqa: E402

REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":path", b"/"),
    (b"host", b"127.0.0.1:8080"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
    (b"accept", b"*/*"),
    (b"x-forwarded-for", b"127.0.0.1"),
]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"13")]


def measure(make_loop: Callable[[int], Callable[[], None]], number: int, reps: int) -> float:
    """Median µs per block; ``make_loop(number)`` returns a closure running ``number`` blocks."""
    samples = []
    for _ in range(reps):
        loop = make_loop(number)
        start = time.thread_time_ns()
        loop()
        samples.append((time.thread_time_ns() - start) / number / 1000)
    return statistics.median(samples)


def decode_loop(decoder: hpack.Decoder | _hpack.Decoder, block: bytes,
                clear_cache: bool = False) -> Callable[[int], Callable[[], None]]:
    def make(number: int) -> Callable[[], None]:
        if isinstance(decoder, _hpack.Decoder):  # bytes out, always
            ours = decoder.decode
            if clear_cache:
                cache = decoder._cache

                def run_uncached() -> None:
                    for _ in range(number):
                        cache.clear()
                        ours(block)

                return run_uncached

            def run_ours() -> None:
                for _ in range(number):
                    ours(block)

            return run_ours
        theirs = decoder.decode

        def run() -> None:
            for _ in range(number):
                theirs(block, raw=True)

        return run

    return make


def encode_loop(encoder: hpack.Encoder | _hpack.Encoder, headers: list[tuple[bytes, bytes]],
                clear_cache: bool = False) -> Callable[[int], Callable[[], None]]:
    encode = encoder.encode

    def make(number: int) -> Callable[[], None]:
        if clear_cache:
            assert isinstance(encoder, _hpack.Encoder)
            cache = encoder._block_cache

            def run_uncached() -> None:
                for _ in range(number):
                    cache.clear()
                    encode(headers)

            return run_uncached

        def run() -> None:
            for _ in range(number):
                encode(headers)

        return run

    return make


def first_encode_loop(factory: Callable[[], hpack.Encoder | _hpack.Encoder],
                      headers: list[tuple[bytes, bytes]]) -> Callable[[int], Callable[[], None]]:
    def make(number: int) -> Callable[[], None]:
        encoders = [factory() for _ in range(number)]

        def run() -> None:
            for encoder in encoders:
                encoder.encode(headers)

        return run

    return make


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--number", type=int, default=20000, help="blocks per rep (default 20000)")
    parser.add_argument("--reps", type=int, default=5, help="reps, the median is reported (default 5)")
    args = parser.parse_args(argv)
    number, reps = args.number, args.reps
    first_number = max(1, number // 4)

    rows: list[tuple[str, float, float]] = []
    for label, headers in (("request", REQUEST), ("response", RESPONSE)):
        reference = hpack.Encoder()
        first = reference.encode(headers)
        steady = reference.encode(headers)
        for kind, block, n in (("steady", steady, number), ("first", first, first_number)):
            ours_dec = _hpack.Decoder()
            theirs_dec = hpack.Decoder()
            ours_dec.decode(first)
            theirs_dec.decode(first, raw=True)
            assert ours_dec.decode(block) == [tuple(h) for h in theirs_dec.decode(block, raw=True)] == headers
            rows.append((f"decode {label} {kind} ({len(block)} B)",
                         measure(decode_loop(ours_dec, block), n, reps),
                         measure(decode_loop(theirs_dec, block), n, reps)))
            if kind == "steady":
                rows.append((f"decode {label} {kind}, no block cache",
                             measure(decode_loop(ours_dec, block, clear_cache=True), n, reps),
                             measure(decode_loop(theirs_dec, block), n, reps)))

        ours_enc = _hpack.Encoder()
        theirs_enc = hpack.Encoder()
        ours_enc.encode(headers)
        theirs_enc.encode(headers)
        rows.append((f"encode {label} steady",
                     measure(encode_loop(ours_enc, headers), number, reps),
                     measure(encode_loop(theirs_enc, headers), number, reps)))
        rows.append((f"encode {label} steady, no block cache",
                     measure(encode_loop(ours_enc, headers, clear_cache=True), number, reps),
                     measure(encode_loop(theirs_enc, headers), number, reps)))
        rows.append((f"encode {label} first",
                     measure(first_encode_loop(_hpack.Encoder, headers), first_number, reps),
                     measure(first_encode_loop(hpack.Encoder, headers), first_number, reps)))

    print(f"µs per header block, median of {reps} reps (thread CPU time); Python {sys.version.split()[0]}, "
          f"hpack {hpack.__version__}")
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'ours':>8}  {'hpack':>8}  {'hpack/ours':>10}")
    for name, ours, theirs in rows:
        print(f"{name:{width}}  {ours:8.2f}  {theirs:8.2f}  {theirs / ours:9.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
