"""Certificate minting for rhttp-wsgi's mutual-TLS tunnels.

Workers authenticate to the proxy with client certificates signed by a
private "workers CA".  This module mints that CA, worker (client)
certificates and, optionally, proxy (server) certificates, using
:mod:`cryptography` with EC P-256 keys and SHA-256 signatures.

It backs the ``rhttp-wsgi certs`` command, the self-contained demo and the
test suite (:class:`DemoPKI`).

Private keys are written unencrypted (PKCS#8 PEM) with mode ``0600``; the
file is created with that mode, so it is never world-readable, not even
briefly, and it is put in place atomically with :func:`os.replace`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import RHTTPError

__all__ = [
    "CertificateAuthority",
    "CertificateNameError",
    "DemoPKI",
    "Issued",
    "PKIError",
    "ensure_ca",
    "generate_certs",
    "issue_to_files",
    "parse_san",
    "summarize",
    "validate_name",
    "write_pem_atomic",
]

logger = logging.getLogger("rhttp_wsgi.pki")

#: Default validity of leaf (worker / server) certificates, in days.  825 is
#: the longest validity Apple platforms accept for TLS server certificates.
DEFAULT_LEAF_DAYS = 825
#: Default validity of a CA certificate, in days.
DEFAULT_CA_DAYS = 3650
#: Tolerated clock skew: certificates become valid this long before "now".
CLOCK_SKEW = dt.timedelta(minutes=5)
_UTC = dt.timezone(dt.timedelta(0))  # == timezone.utc; datetime.UTC needs Python 3.11

KEY_FILE_MODE = 0o600
CERT_FILE_MODE = 0o644
DIRECTORY_MODE = 0o700

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MAX_HOSTNAME_LEN = 253
_MAX_CN_LEN = 64  # ub-common-name in RFC 5280

CAPrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
CertKind: TypeAlias = Literal["ca", "client", "server"]


class PKIError(RHTTPError):
    """Base error for certificate minting problems (bad names, inconsistent files)."""


class CertificateNameError(PKIError, ValueError):
    """A certificate / file name or SAN is not acceptable."""


# ---------------------------------------------------------------------------
# Name validation
# ---------------------------------------------------------------------------


def validate_name(name: str, *, what: str = "name") -> str:
    """Return *name* if it is a safe certificate/file name, else raise.

    Accepted: 1 to 64 characters from ``[A-Za-z0-9._-]`` starting with a
    letter or digit and not containing ``..``.  This excludes path separators,
    leading dots/dashes, whitespace, control characters and the characters
    that matter in distinguished names (``,=+<>#;"\\``).  Such a name is used
    both as a file stem (``<name>.crt``/``<name>.key``) and as a common name.
    """
    if not isinstance(name, str):
        raise CertificateNameError(f"invalid {what} {name!r}: expected a string")
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise CertificateNameError(
            f"invalid {what} {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit and without '..'"
        )
    return name


def _is_hostname(value: str) -> bool:
    """True if *value* is a wildcard-free DNS hostname (LDH labels)."""
    if not value or len(value) > _MAX_HOSTNAME_LEN:
        return False
    labels = value.split(".")
    if not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        return False
    # An all-numeric last label (e.g. "10.0.0") is a botched IP address, not a name.
    return not labels[-1].isdigit()


def parse_san(value: str, *, what: str = "subject alternative name") -> x509.GeneralName:
    """Parse a server SAN: an IPv4/IPv6 literal or a wildcard-free DNS hostname."""
    if not isinstance(value, str):
        raise CertificateNameError(f"invalid {what} {value!r}: expected a string")
    if "%" not in value:  # scoped IPv6 addresses (fe80::1%eth0) cannot go in a cert
        with contextlib.suppress(ValueError):
            return x509.IPAddress(ipaddress.ip_address(value))
    if "*" in value:
        raise CertificateNameError(f"invalid {what} {value!r}: wildcards are not supported")
    if not _is_hostname(value):
        raise CertificateNameError(
            f"invalid {what} {value!r}: expected an IP address or a DNS hostname "
            "(labels of A-Z a-z 0-9 -, separated by dots)"
        )
    return x509.DNSName(value)


def _validate_common_name_text(value: str, *, what: str) -> str:
    """Looser check for free-text common names (e.g. a CA's 'rhttp-wsgi workers CA')."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > _MAX_CN_LEN
        or not value.isprintable()
        or value != value.strip()
    ):
        raise CertificateNameError(
            f"invalid {what} {value!r}: expected 1-{_MAX_CN_LEN} printable characters "
            "without leading/trailing whitespace"
        )
    return value


def _as_str_tuple(values: Sequence[str], *, what: str) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of strings, not a single string: {values!r}")
    return tuple(values)


# ---------------------------------------------------------------------------
# File helpers
# ---------------------------------------------------------------------------


def write_pem_atomic(path: Path, data: bytes, mode: int) -> None:
    """Atomically write *data* to *path* with permission bits *mode*.

    The data goes to a temporary file in the same directory, created with
    ``os.open(..., mode)`` (and ``O_EXCL``), so it never has wider permissions
    than *mode*; then it is fsynced and moved over *path* with
    :func:`os.replace`.  The final mode is exactly *mode* regardless of umask.
    """
    path = Path(path)
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = (
        os.O_WRONLY
        | os.O_CREAT
        | os.O_EXCL
        | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_BINARY", 0)
    )
    fd = os.open(tmp, flags, mode)
    try:
        try:
            if sys.platform != "win32":
                os.fchmod(fd, mode)  # umask may have narrowed it; make it exact
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    if sys.platform == "win32":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _ensure_directory(directory: Path) -> None:
    """Create *directory* (mode 0700) if missing; leave existing ones alone."""
    try:
        directory.mkdir(mode=DIRECTORY_MODE, parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise PKIError(f"{directory} exists and is not a directory") from None
        return
    if sys.platform != "win32":
        os.chmod(directory, DIRECTORY_MODE)
    logger.info("created directory %s (mode 0700)", directory)


def _warn_if_key_exposed(key_path: Path) -> None:
    if sys.platform == "win32":
        return
    with contextlib.suppress(OSError):
        mode = key_path.stat().st_mode & 0o777
        if mode & 0o077:
            logger.warning(
                "private key %s is accessible by group/others (mode %04o); consider chmod 600",
                key_path,
                mode,
            )


def _key_pem(key: CAPrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _spki_der(cert_or_key: x509.Certificate | CAPrivateKey) -> bytes:
    public_key = cert_or_key.public_key()
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _common_name(cert: x509.Certificate) -> str | None:
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attributes:
        return None
    value = attributes[0].value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":")


# ---------------------------------------------------------------------------
# Validity periods
# ---------------------------------------------------------------------------


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=_UTC)
    return value.astimezone(_UTC)


def _validity(
    days: int, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    """Work out (not_before, not_after); naive datetimes are taken as UTC.

    With only *not_after* given (e.g. in the past, for an expired test cert),
    the certificate is valid for *days* before it.  With only *not_before*
    given, it is valid for *days* after it.
    """
    if days <= 0:
        raise ValueError(f"days must be positive, got {days!r}")
    span = dt.timedelta(days=days)
    if not_before is None and not_after is None:
        start = dt.datetime.now(_UTC) - CLOCK_SKEW
        end = start + CLOCK_SKEW + span
    elif not_before is None and not_after is not None:
        end = _utc(not_after)
        start = end - span
    elif not_before is not None and not_after is None:
        start = _utc(not_before)
        end = start + span
    else:
        start, end = _utc(not_before), _utc(not_after)  # type: ignore[arg-type]
    if end <= start:
        raise ValueError(
            f"not_after ({end.isoformat()}) must be after not_before ({start.isoformat()})"
        )
    return start, end


# ---------------------------------------------------------------------------
# Certificate authority
# ---------------------------------------------------------------------------


def _ski(key: CAPrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


class CertificateAuthority:
    """A CA certificate and its private key, able to issue leaf certificates."""

    def __init__(self, certificate: x509.Certificate, key: CAPrivateKey) -> None:
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise PKIError(f"unsupported CA key type {type(key).__name__}; expected EC or RSA")
        if _spki_der(certificate) != _spki_der(key):
            raise PKIError("CA private key does not match the CA certificate")
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            raise PKIError("CA certificate has no BasicConstraints extension") from None
        if not constraints.value.ca:
            raise PKIError("certificate is not a CA certificate (BasicConstraints CA=False)")
        self._certificate = certificate
        self._key = key

    # -- construction / persistence --------------------------------------

    @classmethod
    def create(
        cls, common_name: str = "rhttp-wsgi CA", days: int = DEFAULT_CA_DAYS
    ) -> CertificateAuthority:
        """Create a new self-signed CA in memory (not saved; see :meth:`save`)."""
        _validate_common_name_text(common_name, what="CA common name")
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = _validity(days, None, None)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        ski = _ski(key)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        logger.info("created CA %r (sha256 %s)", common_name, _fingerprint(certificate))
        return cls(certificate, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """Load a CA from PEM files (unencrypted key)."""
        cert_path, key_path = Path(cert_path), Path(key_path)
        try:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError as exc:
            raise PKIError(f"cannot parse CA certificate {cert_path}: {exc}") from exc
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise PKIError(f"cannot load CA private key {key_path}: {exc}") from exc
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise PKIError(f"unsupported CA key type in {key_path}; expected EC or RSA")
        _warn_if_key_exposed(key_path)
        try:
            ca = cls(certificate, key)
        except PKIError as exc:
            raise PKIError(f"{cert_path} / {key_path}: {exc}") from exc
        if ca.certificate.not_valid_after_utc <= dt.datetime.now(_UTC):
            logger.warning("CA certificate %s has expired", cert_path)
        return ca

    def save(self, cert_path: Path, key_path: Path) -> None:
        """Write the CA certificate (0644) and key (0600) atomically."""
        write_pem_atomic(Path(key_path), _key_pem(self._key), KEY_FILE_MODE)
        write_pem_atomic(Path(cert_path), self.cert_pem, CERT_FILE_MODE)

    # -- accessors ---------------------------------------------------------

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    @property
    def cert_pem(self) -> bytes:
        return self._certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def common_name(self) -> str | None:
        return _common_name(self._certificate)

    @property
    def fingerprint(self) -> str:
        """SHA-256 fingerprint of the CA certificate, colon-separated hex."""
        return _fingerprint(self._certificate)

    def __repr__(self) -> str:
        return f"<CertificateAuthority {self.common_name!r} sha256={self.fingerprint}>"

    # -- issuing -----------------------------------------------------------

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self._certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)

    def _issue(
        self,
        common_name: str,
        *,
        eku: x509.ObjectIdentifier,
        sans: Sequence[x509.GeneralName],
        days: int,
        not_before: dt.datetime | None,
        not_after: dt.datetime | None,
    ) -> tuple[bytes, bytes]:
        start, end = _validity(days, not_before, not_after)
        if end > self._certificate.not_valid_after_utc:
            logger.warning(
                "certificate %r outlives its CA (%s > %s)",
                common_name,
                end.isoformat(),
                self._certificate.not_valid_after_utc.isoformat(),
            )
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(_ski(key), critical=False)
            .add_extension(self._authority_key_identifier(), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        logger.debug(
            "issued %s certificate %r (sha256 %s, valid %s .. %s)",
            "client" if eku == ExtendedKeyUsageOID.CLIENT_AUTH else "server",
            common_name,
            _fingerprint(certificate),
            start.isoformat(),
            end.isoformat(),
        )
        return certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def issue_client(
        self,
        common_name: str,
        days: int = DEFAULT_LEAF_DAYS,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """Issue a worker (TLS client) certificate; returns (cert PEM, key PEM).

        The certificate carries EKU clientAuth and, when *common_name* is a
        valid DNS hostname, a matching DNSName SAN.
        """
        validate_name(common_name, what="client common name")
        sans: list[x509.GeneralName] = []
        if _is_hostname(common_name):
            sans.append(x509.DNSName(common_name))
        return self._issue(
            common_name,
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
            sans=sans,
            days=days,
            not_before=not_before,
            not_after=not_after,
        )

    def issue_server(
        self,
        common_name: str,
        sans: Sequence[str] = (),
        days: int = DEFAULT_LEAF_DAYS,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """Issue a proxy (TLS server) certificate; returns (cert PEM, key PEM).

        *sans* are DNS hostnames or IP literals (detected automatically).  If
        *sans* is empty, *common_name* is used as the only SAN (clients match
        hostnames against SANs, not the common name).
        """
        validate_name(common_name, what="server common name")
        names = _as_str_tuple(sans, what="sans") or (common_name,)
        general_names: list[x509.GeneralName] = []
        for value in names:
            parsed = parse_san(value, what="server SAN")
            if parsed not in general_names:
                general_names.append(parsed)
        return self._issue(
            common_name,
            eku=ExtendedKeyUsageOID.SERVER_AUTH,
            sans=general_names,
            days=days,
            not_before=not_before,
            not_after=not_after,
        )


# ---------------------------------------------------------------------------
# Files on disk
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A certificate/key pair on disk."""

    cert_path: Path
    key_path: Path
    common_name: str
    created: bool  #: False when existing files were reused
    kind: CertKind = "client"


def _pair_paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.crt", directory / f"{name}.key"


def ensure_ca(
    directory: Path,
    *,
    ca_name: str = "workers-ca",
    common_name: str = "rhttp-wsgi workers CA",
) -> tuple[CertificateAuthority, bool]:
    """Load ``<directory>/<ca_name>.crt``/``.key`` or create and save a new CA.

    Returns ``(ca, created)``.  If only one of the two files exists, raises
    :class:`PKIError` rather than overwriting anything.
    """
    directory = Path(directory)
    validate_name(ca_name, what="CA name")
    cert_path, key_path = _pair_paths(directory, ca_name)
    cert_exists, key_exists = cert_path.exists(), key_path.exists()
    if cert_exists and key_exists:
        ca = CertificateAuthority.load(cert_path, key_path)
        logger.info("reusing CA %s (sha256 %s)", cert_path, ca.fingerprint)
        return ca, False
    if cert_exists or key_exists:
        present, missing = (cert_path, key_path) if cert_exists else (key_path, cert_path)
        raise PKIError(
            f"found {present} but not {missing}; refusing to overwrite a partial CA. "
            "Restore the missing file, or move the existing one away to create a new CA."
        )
    _ensure_directory(directory)
    ca = CertificateAuthority.create(common_name)
    ca.save(cert_path, key_path)
    logger.info("saved new CA to %s (key %s)", cert_path, key_path)
    return ca, True


def _check_reusable(ca: CertificateAuthority, cert_path: Path, key_path: Path) -> str:
    """Validate an existing pair before reuse; returns its common name."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"cannot reuse {cert_path} / {key_path}: {exc}") from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise PKIError(f"cannot reuse {key_path}: unsupported key type")
    if _spki_der(certificate) != _spki_der(key):
        raise PKIError(f"cannot reuse {cert_path}: it does not match the key {key_path}")
    try:
        certificate.verify_directly_issued_by(ca.certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise PKIError(
            f"cannot reuse {cert_path}: it was not issued by the current CA "
            f"({ca.common_name!r}); reissue it (overwrite)"
        ) from None
    if certificate.not_valid_after_utc <= dt.datetime.now(_UTC):
        logger.warning("reusing %s, but it has expired; reissue it (overwrite)", cert_path)
    _warn_if_key_exposed(key_path)
    return _common_name(certificate) or cert_path.stem


def _requested_names(name: str, sans: Sequence[str] | None) -> list[str]:
    """The names :meth:`CertificateAuthority.issue_client` (``sans`` None) or ``issue_server`` would put in."""
    if sans is None:
        return [f"CN:{name}"] + ([f"DNS:{name}"] if _is_hostname(name) else [])
    out = [f"CN:{name}"]
    for value in sans or (name,):
        general = parse_san(value)
        text = f"IP:{general.value}" if isinstance(general, x509.IPAddress) else f"DNS:{general.value}"
        if text not in out:
            out.append(text)
    return out


def _warn_if_names_differ(cert_path: Path, name: str, sans: Sequence[str] | None) -> None:
    """A reused certificate keeps its names: say so when they are not the ones asked for now."""
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    has = [f"CN:{_common_name(certificate)}"]
    try:
        ext = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        has += [f"DNS:{v}" for v in ext.get_values_for_type(x509.DNSName)]
        has += [f"IP:{v}" for v in ext.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    wanted = _requested_names(name, sans)
    if sorted(has) != sorted(wanted):
        logger.warning("reusing %s, which names %s, not the requested %s: pass --overwrite to re-issue it",
                       cert_path, ", ".join(has), ", ".join(wanted))


def issue_to_files(
    ca: CertificateAuthority,
    directory: Path,
    name: str,
    *,
    kind: Literal["client", "server"],
    sans: Sequence[str] = (),
    overwrite: bool = False,
    days: int = DEFAULT_LEAF_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """Issue a certificate for *name* into ``<directory>/<name>.crt``/``.key``.

    *name* is also the common name.  If both files exist and *overwrite* is
    false, they are reused (after checking they belong together and were
    issued by *ca*) and ``created`` is False.  If only one exists, raises
    :class:`PKIError` unless *overwrite*.
    """
    directory = Path(directory)
    validate_name(name, what=f"{kind} name")
    sans = _as_str_tuple(sans, what="sans")
    if kind == "client":
        if sans:
            raise ValueError("sans apply only to server certificates")
    elif kind != "server":
        raise ValueError(f"kind must be 'client' or 'server', got {kind!r}")
    cert_path, key_path = _pair_paths(directory, name)
    if not overwrite:
        cert_exists, key_exists = cert_path.exists(), key_path.exists()
        if cert_exists and key_exists:
            common_name = _check_reusable(ca, cert_path, key_path)
            logger.info("reusing %s certificate %s", kind, cert_path)
            _warn_if_names_differ(cert_path, name, sans if kind == "server" else None)
            return Issued(cert_path, key_path, common_name, created=False, kind=kind)
        if cert_exists or key_exists:
            present = cert_path if cert_exists else key_path
            raise PKIError(
                f"found {present} without its {'key' if cert_exists else 'certificate'}; "
                "refusing to overwrite (remove it or pass overwrite)"
            )
    if kind == "client":
        cert_pem, key_pem = ca.issue_client(name, days, not_before=not_before, not_after=not_after)
    else:
        cert_pem, key_pem = ca.issue_server(
            name, sans, days, not_before=not_before, not_after=not_after
        )
    _ensure_directory(directory)
    write_pem_atomic(key_path, key_pem, KEY_FILE_MODE)
    write_pem_atomic(cert_path, cert_pem, CERT_FILE_MODE)
    logger.info("wrote %s certificate %s (key %s)", kind, cert_path, key_path)
    return Issued(cert_path, key_path, name, created=True, kind=kind)


def generate_certs(
    directory: Path,
    *,
    ca_name: str = "workers-ca",
    ca_common_name: str = "rhttp-wsgi workers CA",
    workers: Sequence[str] = ("rhttp-worker",),
    servers: Sequence[str] = (),
    server_sans: Sequence[str] = (),
    overwrite: bool = False,
) -> list[Issued]:
    """Ensure the workers CA exists and issue worker (and optional proxy) certs.

    Returns the CA pair first (``kind="ca"``; ``created`` tells whether it was
    new), then one :class:`Issued` per worker and per server.  Every server
    gets *server_sans* (or its own name if *server_sans* is empty).  All names
    are validated before anything is written.  *overwrite* reissues leaf
    certificates; the CA is always reused if present.  A summary (see
    :func:`summarize`) is logged at DEBUG level.  A reused certificate whose
    names differ from the ones requested now is reported at WARNING.
    """
    directory = Path(directory)
    worker_names = _as_str_tuple(workers, what="workers")
    server_names = _as_str_tuple(servers, what="servers")
    sans = _as_str_tuple(server_sans, what="server_sans")
    validate_name(ca_name, what="CA name")
    _validate_common_name_text(ca_common_name, what="CA common name")
    for worker in worker_names:
        validate_name(worker, what="worker name")
    for server in server_names:
        validate_name(server, what="server name")
    for san in sans:
        parse_san(san, what="server SAN")
    if sans and not server_names:
        raise ValueError("server_sans given but no servers to issue")
    seen: set[str] = {ca_name}
    for name in (*worker_names, *server_names):
        if name in seen:
            raise PKIError(
                f"duplicate certificate name {name!r} (names must be unique, incl. the CA)"
            )
        seen.add(name)

    ca, ca_created = ensure_ca(directory, ca_name=ca_name, common_name=ca_common_name)
    ca_cert_path, ca_key_path = _pair_paths(directory, ca_name)
    issued = [
        Issued(ca_cert_path, ca_key_path, ca.common_name or ca_name, created=ca_created, kind="ca")
    ]
    for worker in worker_names:
        issued.append(issue_to_files(ca, directory, worker, kind="client", overwrite=overwrite))
    for server in server_names:
        issued.append(
            issue_to_files(ca, directory, server, kind="server", sans=sans, overwrite=overwrite)
        )
    # DEBUG: the CLI prints the summary itself, once, on stdout.
    logger.debug("%s", summarize(issued, ca_created, directory))
    return issued


def summarize(
    issued: Sequence[Issued],
    ca_created: bool,
    directory: Path,
    *,
    ca_name: str = "workers-ca",
) -> str:
    """Human-readable, multi-line account of which file goes to which box.

    *issued* is normally :func:`generate_certs`' result; if it has no
    ``kind="ca"`` entry, the CA files are assumed to be
    ``<directory>/<ca_name>.crt``/``.key``.
    """
    directory = Path(directory)
    ca_entries = [item for item in issued if item.kind == "ca"]
    if ca_entries:
        ca_cert, ca_key = ca_entries[0].cert_path, ca_entries[0].key_path
    else:
        ca_cert, ca_key = _pair_paths(directory, ca_name)
    workers = [item for item in issued if item.kind == "client"]
    servers = [item for item in issued if item.kind == "server"]

    def status(created: bool) -> str:
        return "new" if created else "reused"

    lines = [
        f"Certificates in {directory}:",
        (
            f"  {ca_cert.name} [{status(ca_created)}] -> proxy box: the proxy's --workers-ca"
            " (HAProxy: `ca-file`), to verify worker client certificates"
        ),
        (
            f"  {ca_key.name} [{status(ca_created)}] -> keep OFFLINE (needed only to issue"
            " more certificates); never copy it to the proxy or the workers"
        ),
    ]
    for item in workers:
        lines.append(
            f"  {item.cert_path.name} + {item.key_path.name} [{status(item.created)}]"
            f" -> worker box {item.common_name!r}: the worker's --cert and --key"
        )
    for item in servers:
        lines.append(
            f"  {item.cert_path.name} + {item.key_path.name} [{status(item.created)}]"
            " -> proxy box: the proxy's --cert and --key (HAProxy `crt` wants both"
            " concatenated into one PEM)"
        )
    if servers:
        lines.append(
            f"  {ca_cert.name} -> also each worker box: the worker's --ca, to verify"
            " the proxy certificate (issued by the same CA)"
        )
    lines.append("  Private keys (*.key) are written mode 0600; keep them that way.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Throwaway PKI for the demo and tests
# ---------------------------------------------------------------------------

_DEMO_RESERVED = frozenset({"ca", "server"})


@dataclass(frozen=True)
class DemoPKI:
    """A complete throwaway PKI in one directory (demo and tests only).

    ONE CA (``ca.crt``) signs both the proxy's server certificate
    (``server.crt``) and the workers' client certificates
    (``<worker>.crt``), so a single file serves as trust anchor on both sides.
    """

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    workers: dict[str, tuple[Path, Path]]
    ca: CertificateAuthority = field(repr=False, compare=False)

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        worker_names: Sequence[str] = ("worker",),
        server_sans: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    ) -> DemoPKI:
        """Create (overwriting) a fresh CA, server cert and worker certs in *directory*."""
        directory = Path(directory)
        names = _as_str_tuple(worker_names, what="worker_names")
        sans = _as_str_tuple(server_sans, what="server_sans")
        for name in names:
            cls._check_worker_name(name)
        if len(set(names)) != len(names):
            raise PKIError(f"duplicate worker names in {names!r}")
        _ensure_directory(directory)
        ca = CertificateAuthority.create("rhttp-wsgi demo CA")
        ca_cert, ca_key = _pair_paths(directory, "ca")
        ca.save(ca_cert, ca_key)
        server = issue_to_files(ca, directory, "server", kind="server", sans=sans, overwrite=True)
        pki = cls(
            directory=directory,
            ca_cert=ca_cert,
            ca_key=ca_key,
            server_cert=server.cert_path,
            server_key=server.key_path,
            workers={},
            ca=ca,
        )
        for name in names:
            pki.issue_worker(name)
        logger.info("demo PKI ready in %s (workers: %s)", directory, ", ".join(names) or "none")
        return pki

    @staticmethod
    def _check_worker_name(name: str) -> None:
        validate_name(name, what="worker name")
        if name in _DEMO_RESERVED:
            raise CertificateNameError(f"invalid worker name {name!r}: reserved in DemoPKI")

    def issue_worker(
        self,
        name: str,
        *,
        days: int = DEFAULT_LEAF_DAYS,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> tuple[Path, Path]:
        """Issue (or reissue) worker *name*; returns (cert path, key path).

        Use *not_after* in the past / *not_before* in the future for expired /
        not-yet-valid certificates.
        """
        self._check_worker_name(name)
        issued = issue_to_files(
            self.ca,
            self.directory,
            name,
            kind="client",
            overwrite=True,
            days=days,
            not_before=not_before,
            not_after=not_after,
        )
        self.workers[name] = (issued.cert_path, issued.key_path)
        return issued.cert_path, issued.key_path
