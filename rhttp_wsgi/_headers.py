"""HTTP header rules shared by both sides (RFC 9113 §8.2, RFC 9110 §5)."""

from __future__ import annotations

import re

__all__ = [
    "CONNECTION_SPECIFIC",
    "HOP_BY_HOP",
    "InvalidHeader",
    "valid_name",
    "valid_value",
]

#: Forbidden in HTTP/2 messages (RFC 9113 §8.2.2); ``te`` is allowed only as "trailers".
CONNECTION_SPECIFIC = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
#: Hop-by-hop headers a proxy must not forward (RFC 9110 §7.6.1).
HOP_BY_HOP = CONNECTION_SPECIFIC | frozenset(
    {"te", "trailer", "proxy-authenticate", "proxy-authorization"}
)

# \Z, not $: "$" also matches before a trailing newline, which let "x-foo\n" pass as a token.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


class InvalidHeader(ValueError):
    """A header name or value that must not go on the wire."""


def valid_name(name: str) -> bool:
    return bool(_TOKEN.match(name))


def valid_value(value: str) -> bool:
    """No CR, LF or NUL (three C-speed scans: ~4x cheaper than a regex search on short values)."""
    return "\n" not in value and "\r" not in value and "\x00" not in value
