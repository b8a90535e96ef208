"""The sample WSGI app served by ``rhttp-wsgi demo``: a page, an echo endpoint, an SSE stream."""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

PAGE = """<!doctype html>
<title>rhttp-wsgi demo</title>
<h1>Hello from behind the tunnel</h1>
<p>This page was served by a WSGI app in a worker that has no inbound port.
It dialled the proxy over mutual TLS; your request came back down that tunnel as an HTTP/2 stream.</p>
<ul>
<li>Stream id: {stream}</li>
<li>Host: {host}</li>
<li><code>curl -d 'hi' {base}/echo</code> echoes a POST body</li>
<li><code>curl -N {base}/events</code> streams server-sent events</li>
</ul>
"""


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes] | list[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/":
        host = environ.get("HTTP_HOST", "")
        base = f"{environ['wsgi.url_scheme']}://{host}"
        body = PAGE.format(stream=environ.get("rhttp.stream_id"), host=html.escape(host),
                           base=html.escape(base)).encode()
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path == "/echo":
        data = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", environ.get("CONTENT_TYPE") or "application/octet-stream"),
                                  ("Content-Length", str(len(data)))])
        return [data]
    if path == "/events":
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
        return _events(environ)
    if path == "/info":
        info = {k: v for k, v in environ.items() if isinstance(v, (str, int, bool))}
        body = json.dumps(info, indent=1, sort_keys=True).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]


def _events(environ: dict[str, Any]) -> Iterator[bytes]:
    cancelled = environ["rhttp.cancelled"]
    for i in range(10):
        yield f"data: tick {i} at {time.strftime('%H:%M:%S')}\n\n".encode()
        if cancelled.wait(0.5):
            return
