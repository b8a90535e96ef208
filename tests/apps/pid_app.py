"""A WSGI app for the gunicorn tests: answers with the serving process's pid.

``/``: the pid.  ``/slow?seconds=S&marker=PATH``: creates ``PATH`` (so the test
knows the request is in the app), sleeps ``S`` seconds, then answers the pid.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if environ["PATH_INFO"] == "/slow":
        if "marker" in query:
            Path(query["marker"]).write_text(str(os.getpid()))
        time.sleep(float(query.get("seconds", "1")))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                              ("X-Multiprocess", str(environ["wsgi.multiprocess"]))])
    return [body]
