"""The worker's environ names the real client and the request: ``REMOTE_ADDR`` from the proxy's
``X-Forwarded-For``, ``REMOTE_PORT`` never the tunnel's, ``rhttp.request_id`` (``wsgi.build_environ``).

A stand-in channel carries the request's fields, as in ``test_environ.py``.  Over real
tunnels (our proxy, HAProxy): ``tests/integration/test_access_log.py``,
``tests/interop/test_haproxy_access_log.py``.
"""

from __future__ import annotations

import threading
import types
from typing import Any

import pytest

from rhttp_wsgi import wsgi
from rhttp_wsgi.accesslog import request_id

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")]
PROXY = "10.0.0.1"


def _environ(extra: list[tuple[bytes, bytes]], **ctx_kw: Any) -> dict[str, Any]:
    ch: Any = types.SimpleNamespace(headers=BASE + extra, stream_id=1, cancelled=threading.Event(), trailers=None)
    ctx_kw.setdefault("remote_addr", PROXY)
    ctx_kw.setdefault("remote_port", None)
    return wsgi.build_environ(ch, wsgi.WSGIContext(lambda e, s: [], **ctx_kw))


def _addr(env: dict[str, Any]) -> tuple[str, str]:
    return env["REMOTE_ADDR"], env["REMOTE_PORT"]


XFF3 = [(b"x-forwarded-for", b"203.0.113.9, 198.51.100.1"), (b"x-forwarded-for", b"192.0.2.7")]


@pytest.mark.parametrize(("trusted", "client"), [
    (0, PROXY),             # forwarded_for off: the proxy's address
    (1, "192.0.2.7"),       # the default: the proxy's own entry (the last)
    (2, "198.51.100.1"),    # forwarded_for_hops=1: one more trusted proxy in front
    (3, "203.0.113.9"),
    (4, PROXY),             # fewer entries than trusted hops: the request skipped a proxy; keep the peer
])
def test_remote_addr_is_the_trusted_th_forwarded_for_entry_from_the_right(trusted: int, client: str) -> None:
    env = _environ(XFF3, forwarded_for=trusted)
    assert _addr(env) == (client, "")
    assert env["HTTP_X_FORWARDED_FOR"] == "203.0.113.9, 198.51.100.1, 192.0.2.7"  # the header itself is kept


def test_without_forwarded_for_the_peer_is_the_remote_address() -> None:
    assert _addr(_environ([])) == (PROXY, "")


def test_remote_port_is_never_the_tunnels() -> None:
    # A context given the tunnel's port (as before this rule) still drops it once a client is named.
    env = _environ([(b"x-forwarded-for", b"192.0.2.7")], remote_port=8443)
    assert _addr(env) == ("192.0.2.7", "")
    ctx = wsgi.WSGIContext(lambda e, s: [], remote_addr=PROXY, remote_port=None)
    assert ctx.remote_port is None and ctx.static_environ["REMOTE_PORT"] == ""


def test_the_proxys_request_id_is_in_the_environ() -> None:
    env = _environ([(b"x-request-id", b"4f1c9a0e2b-1a")])
    assert env["rhttp.request_id"] == env["HTTP_X_REQUEST_ID"] == "4f1c9a0e2b-1a"


@pytest.mark.parametrize("value", [None, b"has space", b"x" * 201])
def test_a_missing_or_invalid_request_id_is_replaced_by_the_workers_own(value: bytes | None) -> None:
    env = _environ([] if value is None else [(b"x-request-id", value)])
    rid = env["rhttp.request_id"]
    assert rid and request_id(rid) == rid and rid != (value or b"").decode()
    assert _environ([])["rhttp.request_id"] != rid  # one per request
