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

import datetime
import ipaddress
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from cryptography import x509
from OpenSSL import SSL, crypto

from .certcheck import describe, names
from .errors import ALPNError, ConfigError, TLSSetupError

__all__ = [
    "TLSSession",
    "client_context",
    "describe_certificate_file",
    "peer_common_name",
    "public_context",
    "reload_context",
    "server_context",
]

log = logging.getLogger("rhttp_wsgi.tls")

#: ``SSL_read`` returns one record's plaintext at most, and a record carries at most
#: 2^14 bytes (TLS 1.2 and 1.3): a larger buffer is allocated per call for nothing
#: (pyOpenSSL allocates ``bufsiz`` each time; 1 MiB cost a malloc + page faults per record).
_RECORD_MAX = 1 << 14
#: Up to this much ciphertext, ``decrypt_view`` returns bytes (see there).
_SMALL_READ = 32 * 1024
#: Ciphertext drained from the memory BIO per call: one ``encrypt`` piece and its record
#: overhead fit in one.
_CIPHER_CHUNK = 128 * 1024
#: Largest plaintext handed to OpenSSL at once by ``encrypt`` (see there).
_ENCRYPT_PIECE = 64 * 1024
#: TLS 1.2 suites allowed with HTTP/2: ephemeral key exchange and AEAD only, so
#: none of RFC 9113 §9.2.2 / Appendix A's blocklist can be negotiated.  (TLS 1.3
#: suites are all acceptable and are configured separately by OpenSSL.)
H2_TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
#: TLS 1.3 suites, AES-128-GCM first as Go's crypto/tls and BoringSSL order them (OpenSSL's
#: default puts AES-256 first): TLS 1.3's mandatory suite, and ~20% cheaper to encrypt, which
#: a bulk transfer pays on both ends of a tunnel (benchmarks/RESULTS.md, "Long fat pipe").
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


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
        # What the error line needs: the certificate that failed and, when
        # OpenSSL already has it (client side), the leaf of the chain.
        chain = conn.get_peer_cert_chain()
        leaf = chain[0].to_cryptography() if chain else (cert.to_cryptography() if depth == 0 else None)
        app.setdefault("verify", _VerifyFailure(errno, depth, cert.to_cryptography(), leaf))
        return False
    name = app.get("verify_name")
    if depth == 0 and name is not None:
        leaf = cert.to_cryptography()
        if not _cert_matches(leaf, name):
            app.setdefault("mismatch", leaf)
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


def _mismatch(name: str, cert: x509.Certificate | None) -> str:
    kind = "IP address" if _ip(name) is not None else "hostname"
    if cert is None:
        return f"{kind} mismatch: the proxy's certificate does not match {name!r}"
    return (f"{kind} mismatch: the proxy's certificate ({describe(cert)}) names {', '.join(names(cert)) or 'nothing'},"
            f" not {name!r}, the name we checked (--server-name, else the --proxy host): dial one of its names,"
            f" or pass --server-name with one of them")


class _VerifyFailure(NamedTuple):
    """OpenSSL's verdict on the peer's chain, kept by the verify callback for the error line."""

    errno: int
    depth: int
    cert: x509.Certificate  #: the certificate that failed
    leaf: x509.Certificate | None  #: the peer's own certificate, when known


@dataclass(frozen=True)
class _Files:
    """What a context was built from (its app data), for error lines that name the file and the flag."""

    cert: str
    ca: str | None  #: --ca (worker; None: the system roots) or --workers-ca (proxy)


#: X509_V_ERR_* codes meaning "no trusted CA issued this chain".
_UNTRUSTED = frozenset({2, 18, 19, 20, 21, 27})
_NOT_YET_VALID, _EXPIRED, _PURPOSE = 9, 10, 26

#: The TLS alerts a peer sends when it refuses the certificate we presented
#: (OpenSSL's names, as in its "sslv3 alert bad certificate"), and what each means.
_CERT_ALERTS = {
    "unknown ca": "it does not trust the CA that issued it",
    "bad certificate": "it could not verify it",
    "certificate unknown": "it could not verify it",
    "unsupported certificate": "it is not meant for this use (extended key usage)",
    "certificate expired": "it has expired or is not valid yet",
    "certificate revoked": "it is revoked",
    "access denied": "its identity is not allowed",
    "decrypt error": "a signature did not verify",
    "certificate required": "it wants a certificate and got none",
}
_ALERT = re.compile(r"alert ([a-z ]+)$")


def _own_validity(cert: x509.Certificate | None) -> str:
    if cert is None:
        return ""
    now = datetime.datetime.now(datetime.timezone.utc)
    if now >= cert.not_valid_after_utc:
        return f"; ours expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M UTC}"
    if now < cert.not_valid_before_utc:
        return f"; ours is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M UTC}"
    return ""


def _explain(reason: str, app: dict[str, Any], files: _Files | None, *, server_side: bool,
             own: x509.Certificate | None, verify_name: str | None) -> tuple[str, bool]:
    """Turn an OpenSSL failure into (what is wrong and what to do, retryable).

    ``reason`` is OpenSSL's text; ``app`` what the verify callback kept.
    Retrying does not help when a certificate is refused: someone must
    change a file.  OpenSSL's own words stay at the end, in parentheses.
    """
    peer = "worker" if server_side else "proxy"
    ca_flag = "--workers-ca" if server_side else "--ca"
    failure: _VerifyFailure | None = app.get("verify")
    if failure is not None:
        openssl = f"(OpenSSL: {reason}: {_x509_error_string(failure.errno)})"
        cert = failure.leaf if failure.leaf is not None else failure.cert
        which = f"the {peer}'s certificate ({describe(cert)})"
        if failure.leaf is None and failure.depth > 0:
            which = f"the {peer}'s certificate chain (at depth {failure.depth}: {describe(cert)})"
        if failure.errno in _UNTRUSTED:
            if files is not None and files.ca is not None:
                what = f"{which} is not signed by {ca_flag} {files.ca}: "
                what += ("issue the worker's certificate from that CA, or add the CA that issued it to"
                         f" {ca_flag}" if server_side else f"pass as {ca_flag} the CA that issued it")
            elif server_side:
                what = f"{which} is not signed by a CA this proxy trusts"
            else:
                what = (f"{which} is not signed by a CA of the system trust store (no --ca given): pass --ca FILE"
                        " with the CA that issued it")
        elif failure.errno == _EXPIRED:
            what = f"{which} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M UTC}: the {peer} needs a new one"
        elif failure.errno == _NOT_YET_VALID:
            what = (f"{which} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M UTC}: check the"
                    f" {peer}'s certificate and the clocks of both machines")
        elif failure.errno == _PURPOSE:
            usage = "client (clientAuth)" if server_side else "server (serverAuth)"
            what = f"{which} is not a TLS {usage} certificate (its extended key usage): the {peer} needs one"
        else:
            what = f"{which} failed verification against {ca_flag} {files.ca if files else ''}".rstrip()
        return f"{what} {openssl}", False
    mismatch = app.get("mismatch")
    if mismatch is not None and verify_name is not None:
        return f"{_mismatch(verify_name, mismatch)} (OpenSSL: {reason})", False
    alert = next((m.group(1) for part in reason.split("; ") if (m := _ALERT.search(part))), None)
    if alert in _CERT_ALERTS:
        mine = f"our {'server' if server_side else 'client'} certificate"
        if own is not None:
            mine += f" ({describe(own)}{'' if files is None else f'; --cert {files.cert}'})"
        what = f"the {peer} rejected {mine}: {alert.replace(' ', '_')}, {_CERT_ALERTS[alert]}{_own_validity(own)}"
        if server_side:
            what += "; the worker's --ca must be the CA that issued the proxy's --cert"
        elif alert in ("unknown ca", "bad certificate", "certificate unknown"):
            what += "; the proxy's --workers-ca (HAProxy: `ca-file`) must be the CA that issued our --cert"
        return f"{what} (OpenSSL: {reason})", False
    if server_side and ("did not return a certificate" in reason or "certificate required" in reason):
        return ("the client presented no certificate: workers must present one issued by --workers-ca"
                f" (OpenSSL: {reason})"), True
    if server_side and alert == "internal error":
        # What our worker sends when the proxy's certificate does not name the host it dials
        # (its verify callback refuses the leaf; OpenSSL has no finer alert for that).
        return (f"{reason} (a worker refuses so a proxy certificate that does not carry the name it dials:"
                " its log says which)"), True
    if server_side and "http request" in reason:
        return ("a plain HTTP request arrived on the tunnel port, which speaks TLS to workers: send HTTP"
                f" clients to --public-bind (OpenSSL: {reason})"), True
    if not server_side and "bad extension" in reason:
        # What OpenSSL says when the server selects an ALPN protocol we
        # did not offer (we offer only h2): say so, it is the usual cause.
        return f"{reason} (did the proxy select an ALPN protocol other than h2?)", False
    return reason, True


def client_context(cert: str, key: str, ca: str | None) -> SSL.Context:
    """Context for a worker dialing a proxy: TLS >= 1.2, ALPN h2, verify the proxy, show our cert."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(H2_TLS12_CIPHERS)
    ctx.set_tls13_ciphersuites(TLS13_SUITES)
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
    ctx.set_app_data(_Files(cert, ca))
    return ctx


def server_context(cert: str, key: str, workers_ca: str) -> SSL.Context:
    """Context for the proxy's tunnel port: client certificate required, ALPN h2 only."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(H2_TLS12_CIPHERS)
    ctx.set_tls13_ciphersuites(TLS13_SUITES)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    _load_identity(ctx, cert, key, what="server")
    try:
        ctx.load_verify_locations(workers_ca)
        ctx.load_client_ca(workers_ca.encode())
    except SSL.Error as e:
        raise ConfigError("workers_ca", f"cannot load workers' CA {workers_ca}: {_ssl_reason(e)}") from e
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verify_callback)
    ctx.set_app_data(_Files(cert, workers_ca))

    def select(conn: SSL.Connection, offered: list[bytes]) -> bytes | Any:
        return b"h2" if b"h2" in offered else SSL.NO_OVERLAPPING_PROTOCOLS

    ctx.set_alpn_select_callback(select)
    return ctx


def public_context(cert: str, key: str) -> ssl.SSLContext:
    """Context for the proxy's public HTTPS port (stdlib ``ssl``: the public server's sockets are stdlib's)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError("public_key", f"{key} does not match certificate {cert}") from e
        # ssl does not say which of the two files it could not parse: name both.
        raise ConfigError("public_cert", f"cannot load public certificate {cert} / key {key}:"
                                         f" {e.reason or e}") from e
    except OSError as e:  # a file that cannot be opened: ssl does not say which
        missing = next((p for p in (cert, key) if not os.access(p, os.R_OK)), f"{cert} / {key}")
        raise ConfigError("public_cert", f"cannot read {missing}: {e.strerror or e}") from e
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


_T = TypeVar("_T")


def reload_context(build: Callable[[], _T], install: Callable[[_T], None], *, what: str,
                   certs: tuple[str | None, ...]) -> bool:
    """Replace a TLS context that is serving: ``install(build())``, logged; False if it cannot be built.

    The certificate-reload rule, written once for the worker and the proxy: the
    new context is built whole, from the files as they are now, before anything
    is installed, so a failed reload (a missing file, a key that does not match
    its certificate, a CA bundle that does not parse) changes nothing, and the
    caller keeps serving with the context it has; the one ERROR line names the
    file (the :class:`~rhttp_wsgi.errors.ConfigError` messages of the builders
    do).  The success line is written once the new context is installed, so
    whoever reads it can count on new handshakes using it.
    """
    try:
        ctx = build()
    except (ConfigError, OSError, SSL.Error, ValueError) as e:
        log.error("certificate reload failed, still using the previous %s certificates: %s", what, e)
        return False
    install(ctx)
    log.info("reloaded the %s certificates: %s", what,
             "; ".join(describe_certificate_file(c) for c in certs if c is not None))
    return True


def describe_certificate_file(path: str) -> str:
    """``path (CN=..., serial ..., expires ...)`` for the log line of a (re)load; never raises."""
    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as e:
        return f"{path} (unreadable: {e})"
    expires = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%SZ")
    return f"{path} (CN={peer_common_name(cert)}, serial {cert.serial_number:x}, expires {expires})"


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
        #: decrypt_view's plaintext buffer (reused: one per session, as large as a read needs).
        self._plain = bytearray()
        #: The TLS error that ended this session, once one did (see :meth:`_failure`).
        self.failure: TLSSetupError | None = None

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
                raise self._failure(e, "TLS handshake failed") from e
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

    def _failure(self, e: SSL.Error, prefix: str) -> TLSSetupError:
        """The error for OpenSSL's ``e``: what is wrong and what to do (see :func:`_explain`).

        Also kept as :attr:`failure`: a peer's alert that refuses our
        certificate arrives after our side of a TLS 1.3 handshake finished,
        so the tunnel meets it on its first read, and its owner finds it here.
        """
        files = self._conn.get_context().get_app_data()
        own = self._conn.get_certificate()
        message, retryable = _explain(_ssl_reason(e), self._app, files if isinstance(files, _Files) else None,
                                      server_side=self.server_side,
                                      own=own.to_cryptography() if own is not None else None,
                                      verify_name=self.verify_name)
        self.failure = TLSSetupError(f"{prefix}: {message}", retryable=retryable)
        return self.failure

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
            raise ALPNError(f"the peer did not select ALPN h2 (got {got})", retryable=False)
        if not self.server_side and self.verify_name and not self._app.get("name_verified"):
            # A context whose verify callback is not ours (or no verification
            # at all) did not check the name during the handshake: check it now.
            cert = self.peer_certificate()
            if cert is None or not _cert_matches(cert, self.verify_name):
                raise TLSSetupError(f"TLS handshake failed: {_mismatch(self.verify_name, cert)}", retryable=False)

    # -- data (tunnel lock held) -------------------------------------------

    def decrypt(self, data: bytes) -> bytes:
        """Feed ciphertext; return the plaintext it completes (possibly b'')."""
        self._conn.bio_write(data)
        chunks = []
        recv = self._conn.recv
        while (chunk := self._record(recv, _RECORD_MAX)) is not None:
            chunks.append(chunk)
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def _record(self, read: Callable[..., _T], *args: Any) -> _T | None:
        """One ``SSL_read`` (``read(*args)``): its result, or None once no whole record waits
        (or the peer closed: then ``closed`` is set)."""
        try:
            return read(*args)
        except SSL.WantReadError:
            return None
        except SSL.ZeroReturnError:
            self.closed = True
            return None
        except SSL.Error as e:
            raise self._failure(e, "TLS error") from e

    def decrypt_view(self, data: bytes) -> bytes | memoryview:
        """:meth:`decrypt`; a large read's plaintext comes as a view of this session's own
        buffer, valid until the next call.

        The tunnel's reader hands it straight to the HTTP/2 core, which copies what it keeps
        (each frame's payload): a bulk transfer's records are not each made a bytes object and
        joined first (a copy of every byte, ~5% of the proxy's CPU on a download).  A small
        read (a request, a PING) takes :meth:`decrypt`: a record or two, no buffer to keep.
        """
        if len(data) <= _SMALL_READ:
            if self._plain:  # a bulk transfer's buffer goes at its first small read (an idle tunnel's PING)
                self._plain = bytearray()
            return self.decrypt(data)
        self._conn.bio_write(data)
        # Plaintext <= the ciphertext fed plus what the BIO held (less than one record).
        need = len(data) + _RECORD_MAX + 1024
        buf = self._plain
        if len(buf) < need or len(buf) > 4 * need:
            # (a bulk transfer's reads keep one buffer; a much smaller large read gets a smaller one)
            buf = self._plain = bytearray(need)
        view = memoryview(buf)
        pos = 0
        while True:
            room = len(buf) - pos
            if room == 0:  # (not expected: see need) a larger buffer; the old one may still be viewed
                bigger = bytearray(2 * len(buf))
                bigger[:pos] = view[:pos]
                buf = self._plain = bigger
                view = memoryview(buf)
                room = len(buf) - pos
            n = self._record(self._conn.recv_into, view[pos:], min(room, _RECORD_MAX))
            if n is None:
                break
            pos += n
        return view[:pos]

    def encrypt(self, data: bytes | bytearray) -> bytes:
        """Encrypt ``data``; return all ciphertext now pending (including TLS's own records)."""
        if len(data) <= _ENCRYPT_PIECE:
            if data:
                self._send(data)
            return self.pending_output()
        return b"".join(self.encrypt_parts(data))

    def encrypt_parts(self, data: bytes | bytearray) -> list[bytes]:
        """:meth:`encrypt`, with the ciphertext in pieces (for one ``sendmsg``: not joined)."""
        if len(data) <= _ENCRYPT_PIECE:
            if data:
                self._send(data)
            return [self.pending_output()]
        # Performance (benchmarks/RESULTS.md): feed OpenSSL at most _ENCRYPT_PIECE
        # at a time and drain the memory BIO after each piece.  Handing it a whole
        # writer batch (up to _tunnel.WRITE_BATCH plus frame headers) made the BIO
        # buffer grow by repeated realloc+copy: measured when batches were 1 MiB,
        # 1 MiB took ~1.9 ms to encrypt in one piece versus ~0.55 ms in 64 KiB pieces.
        view = memoryview(data)
        out: list[bytes] = []
        for start in range(0, len(view), _ENCRYPT_PIECE):
            self._send(view[start:start + _ENCRYPT_PIECE])
            out.append(self.pending_output())
        return out

    def _send(self, data: bytes | bytearray | memoryview) -> None:
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
                chunk = self._conn.bio_read(_CIPHER_CHUNK)
            except SSL.WantReadError:
                break
            out.append(chunk)
            if len(chunk) < _CIPHER_CHUNK:
                break  # (a memory BIO hands over all it holds up to the size asked: it is empty)
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

    def buffered_capacity(self) -> int:
        """Bytes held by :meth:`decrypt_view`'s buffer (for tests and memory accounting)."""
        return len(self._plain)

    def cipher(self) -> str:
        """The negotiated cipher suite (e.g. ``TLS_AES_128_GCM_SHA256``), '' before the handshake."""
        return str(self._conn.get_cipher_name() or "")


def peer_common_name(cert: x509.Certificate | None) -> str | None:
    if cert is None:
        return None
    attrs = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
