"""Exception hierarchy.

Every exception raised by rhttp-wsgi derives from :class:`RHTTPError`.  Errors
carry their meaning as attributes so catch sites read ``exc.error_code`` (an
HTTP/2 error code) or ``exc.status`` (the HTTP status a proxy answers with)
instead of walking ``isinstance`` ladders.  Configuration errors are also
``ValueError`` and timeouts are also ``TimeoutError``.
"""

from __future__ import annotations

from h2.errors import ErrorCodes

__all__ = [
    "ALPNError",
    "BadGateway",
    "ConfigError",
    "GatewayTimeout",
    "MTLSRequiredError",
    "NoWorkerAvailable",
    "ProtocolViolation",
    "RHTTPError",
    "StreamReset",
    "StreamTimeout",
    "TLSSetupError",
    "TunnelClosed",
    "UpstreamError",
]


class RHTTPError(Exception):
    """Base class of every rhttp-wsgi error."""


class ConfigError(RHTTPError, ValueError):
    """An option has an invalid value; the message names the option."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        #: The text after the option's name: the CLI prints it after the option's flag instead.
        self.message = message


class MTLSRequiredError(ConfigError):
    """Raised when a pool or proxy would run without mutual TLS.

    Without client-certificate authentication a reverse-HTTP proxy port would
    accept traffic from anyone who can reach it, so both sides refuse to start.
    """


class TLSSetupError(RHTTPError):
    """The TLS handshake failed or the peer could not be verified.

    ``retryable`` is False when dialling again cannot succeed until someone
    changes a certificate, a key or a CA file (an untrusted certificate, a name
    mismatch, a rejected client certificate): the worker still retries, with
    backoff, but logs it at ERROR.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class ALPNError(TLSSetupError):
    """The peer did not select the ``h2`` protocol."""


class ProtocolViolation(RHTTPError):
    """The peer broke RFC 9113; ``error_code`` is what goes on the wire."""

    def __init__(self, message: str, error_code: ErrorCodes = ErrorCodes.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.error_code = error_code


class TunnelClosed(RHTTPError, ConnectionError):
    """The tunnel died (or was shut down) while a stream still needed it."""


class StreamReset(RHTTPError, ConnectionError):
    """The stream was reset; ``error_code`` says by which code."""

    def __init__(self, stream_id: int, error_code: int, *, by_peer: bool = True) -> None:
        who = "peer" if by_peer else "local side"
        try:
            name = ErrorCodes(error_code).name
        except ValueError:
            name = str(error_code)
        super().__init__(f"stream {stream_id} reset by {who} ({name})")
        self.stream_id = stream_id
        self.error_code = error_code
        self.by_peer = by_peer


class StreamTimeout(RHTTPError, TimeoutError):
    """A per-stream wait (send credit, body data) ran past its deadline."""


class UpstreamError(RHTTPError):
    """A forward through a tunnel failed; ``status`` is the public answer."""

    status: int = 502

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class NoWorkerAvailable(UpstreamError):
    """No worker tunnel is attached or selectable (503)."""

    status = 503


class BadGateway(UpstreamError):
    """The tunnel died, the stream was reset, or the worker answered badly (502)."""

    status = 502


class GatewayTimeout(UpstreamError, TimeoutError):
    """The worker did not answer within the response-header timeout (504)."""

    status = 504
