"""Helpers for mounting the proxy's forwarder in a third-party WSGI server.

The forwarder (``Proxy.wsgi_app``) notices a public client that went away
through ``environ["rhttp.client_disconnected"]``, a callable the server may
provide; with it, a quiet stream (a long poll, a silent stretch of SSE) is
cancelled at the worker at once instead of at the next write.  Our turnkey
server provides it; :func:`with_disconnect_probe` adds it for gunicorn,
werkzeug (a socket probe, Linux only) and waitress (its own check).

The forwarder ends a body whose client left by *raising*, so that a client
still there can never mistake a cut-off body for a complete one.  The wrapper
re-raises that as the server's own "client disconnected" exception, so a
routine disconnect is one log line instead of an application traceback.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._io import POLLRDHUP, peer_closed
from .options import ProxyOptions, options_from_environ

__all__ = ["environ_probe", "proxy_options_from_env", "socket_probe", "with_disconnect_probe"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
#: Given a request's environ, a callable answering "has the client gone?" (or None: cannot tell).
Probe = Callable[[dict[str, Any]], "Callable[[], bool] | None"]

def proxy_options_from_env(environ: Mapping[str, str] | None = None) -> ProxyOptions:
    """``ProxyOptions`` from the ``RHTTP_*`` environment variables (the CLI's names)."""
    return ProxyOptions(**options_from_environ(ProxyOptions, environ))


def socket_probe(socket_key: str) -> Probe:
    """Probe the client socket the server puts in ``environ[socket_key]`` (Linux ``POLLRDHUP``)."""

    def probe(environ: dict[str, Any]) -> Callable[[], bool] | None:
        sock = environ.get(socket_key)
        if not POLLRDHUP or not isinstance(sock, socket.socket):
            return None
        return lambda: peer_closed(sock)

    return probe


def environ_probe(key: str) -> Probe:
    """Use a check the server already offers as a callable in ``environ[key]``."""

    def probe(environ: dict[str, Any]) -> Callable[[], bool] | None:
        gone = environ.get(key)
        return gone if callable(gone) else None

    return probe


def _broken_pipe(message: str) -> BaseException:
    return BrokenPipeError(errno.EPIPE, message)


class _DisconnectAware:
    """A streamed body whose failure after a disconnect is re-raised as ``gone_error``."""

    def __init__(self, body: Iterable[bytes], gone: Callable[[], bool],
                 gone_error: Callable[[str], BaseException]) -> None:
        self._body = body
        self._it = iter(body)
        self._gone = gone
        self._gone_error = gone_error

    def __iter__(self) -> _DisconnectAware:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._it)
        except StopIteration:
            raise
        except Exception as e:
            if self._gone():
                raise self._gone_error(f"the client went away ({e})") from e
            raise

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()


def with_disconnect_probe(app: WSGIApp, probe: Probe,
                          gone_error: Callable[[str], BaseException] = _broken_pipe) -> WSGIApp:
    """Give ``app`` (the forwarder) ``rhttp.client_disconnected`` from ``probe``.

    ``gone_error`` builds the exception the server treats as a dropped
    connection (``BrokenPipeError`` by default: gunicorn and werkzeug log it
    quietly; pass ``waitress.channel.ClientDisconnected`` for waitress).
    """

    def probed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        gone = None if "rhttp.client_disconnected" in environ else probe(environ)
        if gone is None:
            return app(environ, start_response)
        environ["rhttp.client_disconnected"] = gone
        body = app(environ, start_response)
        return body if isinstance(body, list) else _DisconnectAware(body, gone, gone_error)

    return probed
