"""Startup checks of this side's own certificate and key, and how certificates are named in messages.

OpenSSL would load a client certificate as a proxy's server certificate, an
expired certificate, or (with its own message) a key that belongs to another
certificate; the handshake then fails on the *other* machine, with an alert
that names neither the file nor the flag.  So the worker and the proxy check
their own files before dialling or listening (``options.check_files``), and a
problem is one :class:`~rhttp_wsgi.errors.ConfigError` naming the option and
the file, which the CLI prints as one line with exit status 2.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from .errors import ConfigError

__all__ = ["EXPIRY_WARNING", "check_identity", "describe", "names"]

log = logging.getLogger("rhttp_wsgi.certcheck")

#: A certificate that expires sooner than this is reported at WARNING when it is loaded.
EXPIRY_WARNING = dt.timedelta(days=14)

Role = Literal["client", "server"]

_USAGE = {"client": ExtendedKeyUsageOID.CLIENT_AUTH, "server": ExtendedKeyUsageOID.SERVER_AUTH}
_USAGE_NAME = {ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth", ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth"}
_FIX = {
    "client": "a worker presents a TLS client certificate (clientAuth): issue one with"
              " `rhttp-wsgi certs NAME`",
    "server": "the proxy presents a TLS server certificate (serverAuth): issue one with"
              " `rhttp-wsgi certs --server NAME --san NAME`",
}

#: (file, notAfter) already warned about: the CLI and the pool both check the same files.
_warned: set[tuple[str, dt.datetime]] = set()


def describe(cert: x509.Certificate) -> str:
    """``subject CN=w1, issuer CN=rhttp-wsgi workers CA``: who a certificate is and who signed it."""
    return f"subject {cert.subject.rfc4514_string() or '(empty)'}, issuer {cert.issuer.rfc4514_string() or '(empty)'}"


def names(cert: x509.Certificate) -> list[str]:
    """The names a certificate carries for host-name checks: its SANs (``DNS:x``, ``IP:y``), else its CN."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = None
    out = [f"DNS:{n}" for n in sans.get_values_for_type(x509.DNSName)] if sans is not None else []
    if sans is not None:
        out += [f"IP:{ip}" for ip in sans.get_values_for_type(x509.IPAddress)]
    if not out:
        out = [f"CN:{a.value!s}" for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return out


def _date(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


def check_identity(cert_path: str, key_path: str, *, role: Role, cert_option: str = "cert",
                   key_option: str = "key", now: dt.datetime | None = None) -> x509.Certificate:
    """Check the certificate this side presents (the first one of ``cert_path``) and its key.

    Raises :class:`ConfigError` (naming ``cert_option`` or ``key_option``) when
    the certificate cannot be read, is outside its validity period, is not
    meant for ``role`` (extended key usage), or when the key is not its key.
    Logs a WARNING when it expires within :data:`EXPIRY_WARNING`.  Returns it.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    cert = _load_certificate(cert_path, cert_option)
    _check_key(cert_path, key_path, cert, key_option)
    _check_usage(cert_path, cert, role, cert_option)
    if now < cert.not_valid_before_utc:
        raise ConfigError(cert_option, f"{cert_path} ({describe(cert)}) is not valid before"
                                       f" {_date(cert.not_valid_before_utc)}, and this machine's clock says"
                                       f" {_date(now)}: check the clock, or issue a certificate valid now")
    if now >= cert.not_valid_after_utc:
        raise ConfigError(cert_option, f"{cert_path} ({describe(cert)}) expired on"
                                       f" {_date(cert.not_valid_after_utc)}: issue a new one (with rhttp-wsgi's"
                                       f" CA: `rhttp-wsgi certs --overwrite NAME`)")
    left = cert.not_valid_after_utc - now
    if left < EXPIRY_WARNING and (cert_path, cert.not_valid_after_utc) not in _warned:
        _warned.add((cert_path, cert.not_valid_after_utc))
        log.warning("--%s %s (%s) expires on %s, in %s: renew it before then", cert_option.replace("_", "-"),
                    cert_path, describe(cert), _date(cert.not_valid_after_utc), _span(left))
    return cert


def _span(left: dt.timedelta) -> str:
    if left >= dt.timedelta(days=2):
        return f"{round(left / dt.timedelta(days=1))} days"
    hours = max(1, int(left.total_seconds() // 3600))
    return f"{hours} hour{'s' if hours != 1 else ''}"


def _load_certificate(path: str, option: str) -> x509.Certificate:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(option, f"cannot read {path}: {e.strerror or e}") from e
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ConfigError(option, f"{path} holds no readable PEM certificate (-----BEGIN CERTIFICATE-----):"
                                  f" {e}") from e
    return certs[0]


def _check_key(cert_path: str, key_path: str, cert: x509.Certificate, option: str) -> None:
    try:
        with open(key_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(option, f"cannot read {key_path}: {e.strerror or e}") from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # encrypted: no password can be given
        raise ConfigError(option, f"{key_path} is encrypted; give the key unencrypted (PEM, mode 0600)") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(option, f"{key_path} holds no readable PEM private key: {e}") from e
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            != cert.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise ConfigError(option, f"{key_path} is not the key of {cert_path} ({describe(cert)}): pass the key"
                                  " that was created with that certificate")


def _check_usage(path: str, cert: x509.Certificate, role: Role, option: str) -> None:
    try:
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return  # no restriction
    if _USAGE[role] in usages or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages:
        return
    has = ", ".join(_USAGE_NAME.get(u, u.dotted_string) for u in usages) or "none"
    raise ConfigError(option, f"{path} ({describe(cert)}) is not usable here: its extended key usage is {has},"
                              f" but {_FIX[role]}")
