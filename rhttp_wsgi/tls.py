"""TLS for tunnels: pyOpenSSL contexts and a memory-BIO session.

OpenSSL forbids ``SSL_read`` and ``SSL_write`` on one connection from two
threads at once (measured here: records corrupted within a fraction of a
second under duplex load).  So the OpenSSL object never sees a socket: a
:class:`TLSSession` works on memory BIOs, and its owner (the tunnel) calls it
only while holding the tunnel lock.  The reader thread ``recv()``s ciphertext
with no lock held and hands it to :meth:`TLSSession.decrypt`; the writer thread
takes :meth:`TLSSession.encrypt`'s ciphertext and ``sendall()``s it with no
lock held.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto

from .errors import ALPNError, ConfigError, TLSSetupError

__all__ = [
    "TLSSession",
    "client_context",
    "peer_common_name",
    "server_context",
]

log = logging.getLogger("rhttp_wsgi.tls")

_READ_CHUNK = 1 << 20
#: Largest plaintext handed to OpenSSL at once by ``encrypt`` (see there).
_ENCRYPT_PIECE = 64 * 1024
#: TLS 1.2 suites allowed with HTTP/2: ephemeral key exchange and AEAD only, so
#: none of RFC 9113 §9.2.2 / Appendix A's blocklist can be negotiated.  (TLS 1.3
#: suites are all acceptable and are configured separately by OpenSSL.)
H2_TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def _load_identity(ctx: SSL.Context, cert: str, key: str, *, what: str) -> None:
    try:
        ctx.use_certificate_chain_file(cert)
    except SSL.Error as e:
        raise ConfigError("cert", f"cannot load {what} certificate {cert}: {_ssl_reason(e)}") from e
    try:
        ctx.use_privatekey_file(key)
    except SSL.Error as e:
        raise ConfigError("key", f"cannot load {what} key {key}: {_ssl_reason(e)}") from e
    try:
        ctx.check_privatekey()
    except SSL.Error as e:
        raise ConfigError("key", f"{key} does not match certificate {cert}") from e


def _ssl_reason(e: BaseException) -> str:
    args = getattr(e, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        parts = [str(x[2]) if isinstance(x, tuple) and len(x) > 2 else str(x) for x in args[0]]
        return "; ".join(p for p in parts if p) or str(e)
    return str(e) or type(e).__name__


def _verify_callback(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    """OpenSSL's verdict on each certificate of the peer's chain, plus our name check on the leaf.

    OpenSSL decides about the chain; this keeps its reason for the log line
    and, on the leaf (depth 0, called after the chain checks), checks the name
    the :class:`TLSSession` expects: a mismatch fails the handshake like any
    verification error (the peer gets an alert).  pyOpenSSL has no public call
    to set OpenSSL's own expected host, hence the check here.
    """
    app = conn.get_app_data()
    if not isinstance(app, dict):
        return bool(ok)
    if not ok:
        app.setdefault("verify_error", f"{crypto.X509StoreContextError.__name__} {errno} at depth {depth}:"
                                        f" {_x509_error_string(errno)}")
        return False
    name = app.get("verify_name")
    if depth == 0 and name is not None:
        if not _cert_matches(cert.to_cryptography(), name):
            app.setdefault("verify_error", _mismatch(name))
            return False
        app["name_verified"] = True
    return True


#: OpenSSL's texts for the X509_V_ERR_* codes a tunnel meets (x509_txt.c; the
#: codes are part of OpenSSL's API).  Only for the log line: other codes are
#: reported by number.
_X509_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    13: "format error in certificate's notBefore field",
    14: "format error in certificate's notAfter field",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    23: "certificate revoked",
    25: "path length constraint exceeded",
    26: "unsuitable certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
    32: "key usage does not include certificate signing",
    34: "unhandled critical extension",
    62: "hostname mismatch",
    64: "IP address mismatch",
    66: "EE certificate key too weak",
    67: "CA certificate key too weak",
    68: "CA signature digest algorithm too weak",
    79: "invalid CA certificate",
}


def _x509_error_string(errno: int) -> str:
    return _X509_ERRORS.get(errno, "certificate verification error")


def _mismatch(name: str) -> str:
    kind = "IP address" if _ip(name) is not None else "hostname"
    return f"{kind} mismatch: the proxy's certificate does not match {name!r}"


def client_context(cert: str, key: str, ca: str | None) -> SSL.Context:
    """Context for a worker dialing a proxy: TLS >= 1.2, ALPN h2, verify the proxy, show our cert."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(H2_TLS12_CIPHERS)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    _load_identity(ctx, cert, key, what="client")
    if ca is not None:
        try:
            ctx.load_verify_locations(ca)
        except SSL.Error as e:
            raise ConfigError("ca", f"cannot load CA bundle {ca}: {_ssl_reason(e)}") from e
    else:
        ctx.set_default_verify_paths()
    ctx.set_verify(SSL.VERIFY_PEER, _verify_callback)
    ctx.set_alpn_protos([b"h2"])
    return ctx


def server_context(cert: str, key: str, workers_ca: str) -> SSL.Context:
    """Context for the proxy's tunnel port: client certificate required, ALPN h2 only."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(H2_TLS12_CIPHERS)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    _load_identity(ctx, cert, key, what="server")
    try:
        ctx.load_verify_locations(workers_ca)
        ctx.load_client_ca(workers_ca.encode())
    except SSL.Error as e:
        raise ConfigError("workers_ca", f"cannot load workers' CA {workers_ca}: {_ssl_reason(e)}") from e
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verify_callback)

    def select(conn: SSL.Connection, offered: list[bytes]) -> bytes | Any:
        return b"h2" if b"h2" in offered else SSL.NO_OVERLAPPING_PROTOCOLS

    ctx.set_alpn_select_callback(select)
    return ctx


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _cert_matches(cert: x509.Certificate, name: str) -> bool:
    """Does ``cert`` name ``name``?  What OpenSSL's X509_check_host/_ip (flags 0) accept.

    An IP literal matches an IP address SAN only.  A host name matches a DNS SAN
    exactly (case-insensitive, trailing dot ignored) or by a wildcard that is
    the whole leftmost label of a name with at least two more labels
    (``*.example.com``: one label, not ``example.com``; partial wildcards such
    as ``w*.example.com`` are refused); the subject CN is used only when the
    certificate has no DNS SAN at all, as OpenSSL does.
    """
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = None
    ip = _ip(name)
    if ip is not None:
        return sans is not None and ip in sans.get_values_for_type(x509.IPAddress)
    host = _normalise(name)
    patterns = sans.get_values_for_type(x509.DNSName) if sans is not None else []
    if not patterns:
        patterns = [v for v in (peer_common_name(cert),) if v is not None]
    for pattern in patterns:
        pattern = _normalise(pattern)
        if pattern == host:
            return True
        if pattern.startswith("*.") and pattern.count(".") >= 2 and "." in host:
            label, rest = host.split(".", 1)
            if label and rest == pattern[2:]:
                return True
    return False


def _normalise(name: str) -> str:
    name = name.rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return name


class TLSSession:
    """A pyOpenSSL connection over memory BIOs.

    Not thread-safe: its owner serialises every call (see the module doc).
    """

    def __init__(self, ctx: SSL.Context, *, server_side: bool, sni: str | None = None,
                 verify_name: str | None = None) -> None:
        self._conn = SSL.Connection(ctx, None)
        self._app: dict[str, Any] = {}
        self._conn.set_app_data(self._app)
        self.server_side = server_side
        self.verify_name = verify_name
        if server_side:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
            if sni:
                self._conn.set_tlsext_host_name(sni.encode("idna"))
            if verify_name:
                # checked on the leaf by _verify_callback, during the handshake
                self._app["verify_name"] = verify_name
        self.closed = False

    # -- handshake (owner thread only, before the tunnel threads start) ----

    def handshake(self, sock: socket.socket, timeout: float) -> None:
        """Run the handshake over ``sock`` (blocking) within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._conn.do_handshake()
                done = True
            except SSL.WantReadError:
                done = False
            except SSL.Error as e:
                self._flush_handshake(sock, deadline)
                raise TLSSetupError(self._handshake_reason(e)) from e
            self._flush_handshake(sock, deadline)
            if done:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TLSSetupError(f"TLS handshake timed out after {timeout:g}s")
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError as e:
                raise TLSSetupError(f"TLS handshake timed out after {timeout:g}s") from e
            except OSError as e:
                raise TLSSetupError(f"connection failed during TLS handshake: {e}") from e
            if not data:
                reason = "peer closed the connection during the TLS handshake"
                if not self.server_side:
                    reason += " (did it reject our client certificate?)"
                raise TLSSetupError(reason)
            self._conn.bio_write(data)
        sock.settimeout(None)
        self._post_handshake_checks()

    def _handshake_reason(self, e: SSL.Error) -> str:
        reason = _ssl_reason(e)
        if not self.server_side and "bad extension" in reason:
            # What OpenSSL says when the server selects an ALPN protocol we
            # did not offer (we offer only h2): say so, it is the usual cause.
            reason += " (did the proxy select an ALPN protocol other than h2?)"
        extra = self._app.get("verify_error")
        if extra:
            reason = f"{reason} ({extra})"
        side = "client" if self.server_side else "proxy"
        return f"TLS handshake failed: {reason}; could not verify the {side}" if extra else \
            f"TLS handshake failed: {reason}"

    def _flush_handshake(self, sock: socket.socket, deadline: float) -> None:
        out = self.pending_output()
        if out:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                sock.sendall(out)
            except OSError as e:
                raise TLSSetupError(f"connection failed during TLS handshake: {e}") from e

    def _post_handshake_checks(self) -> None:
        proto = self._conn.get_alpn_proto_negotiated()
        if proto != b"h2":
            got = proto.decode("ascii", "replace") if proto else "no protocol"
            raise ALPNError(f"the peer did not select ALPN h2 (got {got})")
        if not self.server_side and self.verify_name and not self._app.get("name_verified"):
            # A context whose verify callback is not ours (or no verification
            # at all) did not check the name during the handshake: check it now.
            cert = self.peer_certificate()
            if cert is None or not _cert_matches(cert, self.verify_name):
                raise TLSSetupError(f"TLS handshake failed: {_mismatch(self.verify_name)}")

    # -- data (tunnel lock held) -------------------------------------------

    def decrypt(self, data: bytes) -> bytes:
        """Feed ciphertext; return the plaintext it completes (possibly b'')."""
        self._conn.bio_write(data)
        chunks = []
        while True:
            try:
                chunks.append(self._conn.recv(_READ_CHUNK))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self.closed = True
                break
            except SSL.Error as e:
                raise TLSSetupError(f"TLS error: {_ssl_reason(e)}") from e
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def encrypt(self, data: bytes) -> bytes:
        """Encrypt ``data``; return all ciphertext now pending (including TLS's own records)."""
        if len(data) <= _ENCRYPT_PIECE:
            if data:
                self._send(data)
            return self.pending_output()
        # Performance (benchmarks/RESULTS.md): feed OpenSSL at most _ENCRYPT_PIECE
        # at a time and drain the memory BIO after each piece.  Handing it a whole
        # 1 MiB writer batch made the BIO buffer grow by repeated realloc+copy:
        # 1 MiB took ~1.9 ms to encrypt this way versus ~0.55 ms in 64 KiB pieces.
        view = memoryview(data)
        out: list[bytes] = []
        for start in range(0, len(view), _ENCRYPT_PIECE):
            self._send(view[start:start + _ENCRYPT_PIECE])
            out.append(self.pending_output())
        return b"".join(out)

    def _send(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = self._conn.send(view)
                view = view[n:]
        except SSL.Error as e:
            # e.g. the peer's alert already failed the session
            raise TLSSetupError(f"TLS error while sending: {_ssl_reason(e) or 'session failed'}") from e

    def pending_output(self) -> bytes:
        out = []
        while True:
            try:
                out.append(self._conn.bio_read(_READ_CHUNK))
            except SSL.WantReadError:
                break
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def close_notify(self) -> bytes:
        try:
            self._conn.shutdown()
        except SSL.Error:
            pass
        return self.pending_output()

    # -- identity ------------------------------------------------------------

    def peer_certificate(self) -> x509.Certificate | None:
        cert = self._conn.get_peer_certificate()
        return cert.to_cryptography() if cert is not None else None

    def protocol_version(self) -> str:
        return str(self._conn.get_protocol_version_name())


def peer_common_name(cert: x509.Certificate | None) -> str | None:
    if cert is None:
        return None
    attrs = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
