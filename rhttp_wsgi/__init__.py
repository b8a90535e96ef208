"""rhttp-wsgi: Reverse HTTP/2 for WSGI.

A worker dials out to a proxy over mutual TLS and serves a WSGI app as the
HTTP/2 server on the connection it opened; the proxy (ours or HAProxy's
``rhttp@`` backend) pushes public requests down the tunnel.
"""

from __future__ import annotations

import logging

from ._version import __version__
from .errors import (
    BadGateway,
    ConfigError,
    GatewayTimeout,
    MTLSRequiredError,
    NoWorkerAvailable,
    RHTTPError,
    StreamReset,
    TunnelClosed,
)
from .options import ProxyOptions, WorkerOptions

logging.getLogger("rhttp_wsgi").addHandler(logging.NullHandler())

__all__ = [
    "BadGateway",
    "ConfigError",
    "GatewayTimeout",
    "MTLSRequiredError",
    "NoWorkerAvailable",
    "Proxy",
    "ProxyOptions",
    "RHTTPError",
    "StreamReset",
    "TunnelClosed",
    "WorkerOptions",
    "WorkerPool",
    "__version__",
]


def __getattr__(name: str) -> object:
    # Lazy so that `import rhttp_wsgi` stays cheap and import cycles stay impossible.
    if name == "WorkerPool":
        from .worker import WorkerPool

        return WorkerPool
    if name == "Proxy":
        from .proxy import Proxy

        return Proxy
    raise AttributeError(name)
