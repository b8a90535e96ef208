"""The WSGI apps every benchmark serves, identical for gunicorn and for our worker.

``app`` routes on ``PATH_INFO`` (one string compare per request, the same cost
for every server):

=====================  =====================================================
``GET /``              hello world: 13 bytes, ``Content-Length``, one chunk
``GET /download?n=N``  N bytes (``Content-Length``) in 256 KiB chunks, all
                       slices of one preallocated buffer (the app copies nothing)
``POST /upload``       reads the whole body in 256 KiB reads, answers its length
``GET /sse?n=N&interval=S``
                       ``text/event-stream``: N events, the first at once, then
                       one every S seconds (each yielded chunk must go out at once)
=====================  =====================================================

Each route is also importable on its own (``benchmarks.apps:hello`` ...).
Run with ``gunicorn -k gthread benchmarks.apps:app`` or
``rhttp-wsgi worker benchmarks.apps:app``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["CHUNK", "app", "download", "hello", "sse", "upload"]

#: Body chunk size for downloads and upload reads.
CHUNK = 256 * 1024
_BLOCK = b"x" * CHUNK
_HELLO = b"Hello, world!"
_HELLO_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(_HELLO)))]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]


def _query_int(environ: Environ, name: str, default: int) -> int:
    for part in environ.get("QUERY_STRING", "").split("&"):
        key, _, value = part.partition("=")
        if key == name and value.isdigit():
            return int(value)
    return default


def _query_float(environ: Environ, name: str, default: float) -> float:
    for part in environ.get("QUERY_STRING", "").split("&"):
        key, _, value = part.partition("=")
        if key == name:
            try:
                return float(value)
            except ValueError:
                return default
    return default


def hello(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", list(_HELLO_HEADERS))
    return [_HELLO]


def _chunks(n: int) -> Iterator[bytes]:
    full, rest = divmod(n, CHUNK)
    block = _BLOCK
    for _ in range(full):
        yield block
    if rest:
        yield block[:rest]


def download(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    n = _query_int(environ, "n", 1 << 20)
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(n))])
    return _chunks(n)


def upload(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    remaining = int(length) if length else -1
    total = 0
    while remaining != 0:
        data = stream.read(CHUNK if remaining < 0 else min(CHUNK, remaining))
        if not data:
            break
        total += len(data)
        if remaining > 0:
            remaining -= len(data)
    body = b"%d\n" % total
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def sse(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    n = _query_int(environ, "n", 10)
    interval = _query_float(environ, "interval", 1.0)
    start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])

    def events() -> Iterator[bytes]:
        for i in range(n):
            if i:
                time.sleep(interval)
            yield b"data: event %d\n\n" % i

    return events()


def not_found(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "10")])
    return [b"not found\n"]


_ROUTES: dict[str, Callable[[Environ, StartResponse], Iterable[bytes]]] = {
    "/": hello,
    "/download": download,
    "/upload": upload,
    "/sse": sse,
}


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    return _ROUTES.get(environ.get("PATH_INFO", "/"), not_found)(environ, start_response)


application = app
