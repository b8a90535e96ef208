"""Tests for rhttp_wsgi.pki: CA/worker/server certificate minting."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rhttp_wsgi import pki
from rhttp_wsgi.pki import (
    CertificateAuthority,
    CertificateNameError,
    DemoPKI,
    Issued,
    PKIError,
    ensure_ca,
    generate_certs,
    issue_to_files,
    summarize,
    validate_name,
    write_pem_atomic,
)

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")

UTC = dt.timezone(dt.timedelta(0))
T = TypeVar("T")


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def spki(obj: Any) -> bytes:
    der: bytes = obj.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


# ---------------------------------------------------------------------------
# CA
# ---------------------------------------------------------------------------


def test_ca_created_then_reused(tmp_path: Path) -> None:
    ca1, created1 = ensure_ca(tmp_path)
    ca2, created2 = ensure_ca(tmp_path)
    assert created1 is True
    assert created2 is False
    assert fingerprint(ca1.certificate) == fingerprint(ca2.certificate)
    assert (tmp_path / "workers-ca.crt").read_bytes() == ca1.cert_pem
    # The reused CA can still sign, and what it signs chains to the original.
    cert_pem, _ = ca2.issue_client("w1")
    x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(ca1.certificate)


def test_ca_certificate_extensions() -> None:
    ca = CertificateAuthority.create("Test CA")
    cert = ca.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)  # self-signed
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3649) < lifetime < dt.timedelta(days=3651)


@pytest.mark.parametrize("present", ["crt", "key"])
def test_ensure_ca_refuses_partial_ca(tmp_path: Path, present: str) -> None:
    lone = tmp_path / f"workers-ca.{present}"
    lone.write_bytes(b"precious")
    with pytest.raises(PKIError, match="workers-ca"):
        ensure_ca(tmp_path)
    assert lone.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [lone.name]


def test_ca_save_load_roundtrip_and_mismatch(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    ca.save(tmp_path / "ca.crt", tmp_path / "ca.key")
    loaded = CertificateAuthority.load(tmp_path / "ca.crt", tmp_path / "ca.key")
    assert fingerprint(loaded.certificate) == fingerprint(ca.certificate)
    assert loaded.cert_pem == ca.cert_pem

    other = CertificateAuthority.create()
    other.save(tmp_path / "other.crt", tmp_path / "other.key")
    with pytest.raises(PKIError, match="does not match"):
        CertificateAuthority.load(tmp_path / "ca.crt", tmp_path / "other.key")


def test_leaf_certificate_cannot_be_loaded_as_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    issued = issue_to_files(ca, tmp_path, "w", kind="client")
    with pytest.raises(PKIError, match="not a CA"):
        CertificateAuthority.load(issued.cert_path, issued.key_path)


# ---------------------------------------------------------------------------
# File permissions / atomic writes
# ---------------------------------------------------------------------------


@posix_only
def test_key_files_are_0600_and_directory_0700(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "certs"
    old_umask = os.umask(0)  # the most permissive umask must not widen anything
    try:
        issued = generate_certs(directory, workers=["w1"], servers=["proxy"])
    finally:
        os.umask(old_umask)
    assert mode_of(directory) == 0o700
    assert len(issued) == 3
    for item in issued:
        assert mode_of(item.key_path) == 0o600, item.key_path
        assert mode_of(item.cert_path) == 0o644, item.cert_path
    # No temporary files left behind.
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [
            "workers-ca.crt",
            "workers-ca.key",
            "w1.crt",
            "w1.key",
            "proxy.crt",
            "proxy.key",
        ]
    )


@posix_only
def test_existing_directory_mode_left_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    ensure_ca(tmp_path)
    assert mode_of(tmp_path) == 0o755


@posix_only
def test_write_pem_atomic_never_exposes_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "secret.key"
    target.write_bytes(b"old")
    target.chmod(0o644)
    real_open = os.open
    seen: list[tuple[str, int, int]] = []

    def spying_open(path: Any, flags: int, mode: int = 0o777, *a: Any, **kw: Any) -> int:
        fd = real_open(path, flags, mode, *a, **kw)
        if flags & os.O_CREAT:
            # Right at creation, before any data is written.
            seen.append((os.fspath(path), flags, stat.S_IMODE(os.fstat(fd).st_mode)))
        return fd

    monkeypatch.setattr(os, "open", spying_open)
    old_umask = os.umask(0)
    try:
        write_pem_atomic(target, b"new secret", 0o600)
    finally:
        os.umask(old_umask)
    assert len(seen) == 1
    tmp_name, flags, created_mode = seen[0]
    assert Path(tmp_name).parent == tmp_path  # same directory -> atomic os.replace
    assert Path(tmp_name) != target
    assert flags & os.O_EXCL
    assert created_mode == 0o600
    assert target.read_bytes() == b"new secret"
    assert mode_of(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]


def test_write_pem_atomic_cleans_up_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "x.crt"
    target.write_bytes(b"old")

    def boom(src: Any, dst: Any) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_pem_atomic(target, b"new", 0o644)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.crt"]


# ---------------------------------------------------------------------------
# Leaf certificates
# ---------------------------------------------------------------------------


def test_worker_cert_is_client_auth_and_signed_by_ca(tmp_path: Path) -> None:
    ca, _ = ensure_ca(tmp_path)
    issued = issue_to_files(ca, tmp_path, "worker-1", kind="client")
    assert issued == Issued(
        tmp_path / "worker-1.crt", tmp_path / "worker-1.key", "worker-1", True, "client"
    )
    cert = load_cert(issued.cert_path)
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.issuer == ca.certificate.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "worker-1"

    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["worker-1"]

    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())

    key = serialization.load_pem_private_key(issued.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert spki(key) == spki(cert)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def test_client_cert_without_dns_form_has_no_san() -> None:
    ca = CertificateAuthority.create()
    cert_pem, _ = ca.issue_client("worker_1")  # underscore: valid name, not a hostname
    cert = x509.load_pem_x509_certificate(cert_pem)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_server_cert_sans_dns_and_ip() -> None:
    ca = CertificateAuthority.create()
    cert_pem, key_pem = ca.issue_server(
        "proxy", ["localhost", "127.0.0.1", "::1", "proxy.example.com", "localhost"]
    )
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(ca.certificate)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "proxy.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.IPv4Address("127.0.0.1"),
        ipaddress.IPv6Address("::1"),
    ]
    assert len(list(san)) == 4  # duplicate "localhost" collapsed
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert spki(key) == spki(cert)


def test_server_cert_defaults_san_to_common_name() -> None:
    ca = CertificateAuthority.create()
    cert = x509.load_pem_x509_certificate(ca.issue_server("proxy.internal")[0])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["proxy.internal"]
    cert = x509.load_pem_x509_certificate(ca.issue_server("10.1.2.3")[0])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.IPv4Address("10.1.2.3")]


@pytest.mark.parametrize(
    "bad_san",
    ["*.example.com", "bad host", "-x.example", "x-.example", "a..b", "10.0.0", "fe80::1%eth0", ""],
)
def test_server_cert_rejects_bad_sans(bad_san: str) -> None:
    ca = CertificateAuthority.create()
    with pytest.raises(CertificateNameError, match="SAN"):
        ca.issue_server("proxy", [bad_san])


def test_sans_as_bare_string_is_a_type_error() -> None:
    ca = CertificateAuthority.create()
    with pytest.raises(TypeError):
        ca.issue_server("proxy", "localhost")


def test_validity_overrides() -> None:
    ca = CertificateAuthority.create()
    past = dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    cert = x509.load_pem_x509_certificate(ca.issue_client("old", days=10, not_after=past)[0])
    assert cert.not_valid_after_utc == past
    assert cert.not_valid_before_utc == past - dt.timedelta(days=10)

    future = dt.datetime.now(UTC).replace(microsecond=0) + dt.timedelta(days=2)
    cert = x509.load_pem_x509_certificate(ca.issue_server("s", ["s"], not_before=future)[0])
    assert cert.not_valid_before_utc == future
    assert cert.not_valid_after_utc == future + dt.timedelta(days=825)

    now = dt.datetime.now(UTC)
    cert = x509.load_pem_x509_certificate(ca.issue_client("fresh")[0])
    assert cert.not_valid_before_utc <= now  # back-dated for clock skew
    assert cert.not_valid_after_utc > now + dt.timedelta(days=824)

    with pytest.raises(ValueError, match="after"):
        ca.issue_client("x", not_before=future, not_after=future - dt.timedelta(seconds=1))
    with pytest.raises(ValueError, match="days"):
        ca.issue_client("x", days=0)


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

BAD_NAMES = [
    "../x",
    "a/b",
    "a\\b",
    "CN=x,O=y",
    "-x",
    ".x",
    "",
    "a b",
    "x\n",
    "x\x00",
    "a" * 65,
    "a..b",
    "x;y",
    'a"b',
    "a+b",
    "<x>",
    "#x",
    "*",
    "caf\u00e9",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(CertificateNameError) as excinfo:
        validate_name(name, what="worker name")
    assert "worker name" in str(excinfo.value)
    assert repr(name) in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)

    ca = CertificateAuthority.create()
    with pytest.raises(CertificateNameError):
        ca.issue_client(name)
    with pytest.raises(CertificateNameError):
        issue_to_files(ca, tmp_path / "out", name, kind="client")
    with pytest.raises(CertificateNameError):
        generate_certs(tmp_path / "gen", workers=[name])
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "gen").exists()  # validated before anything is written


@pytest.mark.parametrize("name", ["a", "a" * 64, "worker-1", "w.example_2", "0abc", "A.B-C_D"])
def test_valid_names_accepted(name: str) -> None:
    assert validate_name(name) == name


def test_non_string_name_rejected() -> None:
    with pytest.raises(CertificateNameError):
        validate_name(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# issue_to_files / generate_certs / summarize
# ---------------------------------------------------------------------------


def test_issue_to_files_reuses_unless_overwrite(tmp_path: Path) -> None:
    ca, _ = ensure_ca(tmp_path)
    first = issue_to_files(ca, tmp_path, "w", kind="client")
    cert_bytes = first.cert_path.read_bytes()
    key_bytes = first.key_path.read_bytes()
    second = issue_to_files(ca, tmp_path, "w", kind="client")
    assert first.created is True
    assert second.created is False
    assert second.common_name == "w"
    assert second.cert_path.read_bytes() == cert_bytes
    assert second.key_path.read_bytes() == key_bytes
    third = issue_to_files(ca, tmp_path, "w", kind="client", overwrite=True)
    assert third.created is True
    assert third.cert_path.read_bytes() != cert_bytes
    assert third.key_path.read_bytes() != key_bytes


def test_issue_to_files_refuses_reuse_from_other_ca(tmp_path: Path) -> None:
    old_ca = CertificateAuthority.create()
    issue_to_files(old_ca, tmp_path, "w", kind="client")
    new_ca = CertificateAuthority.create()
    with pytest.raises(PKIError, match="not issued by the current CA"):
        issue_to_files(new_ca, tmp_path, "w", kind="client")
    again = issue_to_files(new_ca, tmp_path, "w", kind="client", overwrite=True)
    load_cert(again.cert_path).verify_directly_issued_by(new_ca.certificate)


def test_issue_to_files_refuses_partial_pair(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    (tmp_path / "w.key").write_bytes(b"lonely")
    with pytest.raises(PKIError, match="refusing"):
        issue_to_files(ca, tmp_path, "w", kind="client")
    assert (tmp_path / "w.key").read_bytes() == b"lonely"
    assert not (tmp_path / "w.crt").exists()


def test_issue_to_files_rejects_sans_for_clients(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    with pytest.raises(ValueError, match="server"):
        issue_to_files(ca, tmp_path, "w", kind="client", sans=["localhost"])


def test_generate_certs_and_rerun(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "certs"
    with caplog.at_level(logging.INFO, logger="rhttp_wsgi.pki"):
        issued = generate_certs(
            directory,
            workers=["w1", "w2"],
            servers=["proxy"],
            server_sans=["proxy.example.com", "192.0.2.7"],
        )
    assert [(i.kind, i.cert_path.name, i.created) for i in issued] == [
        ("ca", "workers-ca.crt", True),
        ("client", "w1.crt", True),
        ("client", "w2.crt", True),
        ("server", "proxy.crt", True),
    ]
    ca_cert = load_cert(issued[0].cert_path)
    for item in issued[1:]:
        load_cert(item.cert_path).verify_directly_issued_by(ca_cert)
    server = load_cert(issued[3].cert_path)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["proxy.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.IPv4Address("192.0.2.7")]
    assert all(r.name == "rhttp_wsgi.pki" for r in caplog.records)
    assert any("workers-ca.key" in r.getMessage() for r in caplog.records)  # summary logged

    rerun = generate_certs(directory, workers=["w1", "w2", "w3"], servers=["proxy"])
    assert [(i.cert_path.name, i.created) for i in rerun] == [
        ("workers-ca.crt", False),
        ("w1.crt", False),
        ("w2.crt", False),
        ("w3.crt", True),
        ("proxy.crt", False),
    ]
    assert load_cert(rerun[0].cert_path) == ca_cert


@pytest.mark.parametrize(
    "kwargs",
    [
        {"workers": ["a", "a"]},
        {"workers": ["a"], "servers": ["a"]},
        {"workers": ["workers-ca"]},
    ],
)
def test_generate_certs_rejects_duplicate_names(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(PKIError, match="duplicate"):
        generate_certs(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d").exists()


def test_generate_certs_rejects_sans_without_servers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="server_sans"):
        generate_certs(tmp_path / "d", server_sans=["localhost"])
    assert not (tmp_path / "d").exists()


def test_summary_mentions_each_file(tmp_path: Path) -> None:
    issued = generate_certs(tmp_path, workers=["alpha", "beta"], servers=["edge-proxy"])
    text = summarize(issued, True, tmp_path)
    for name in [
        "workers-ca.crt",
        "workers-ca.key",
        "alpha.crt",
        "alpha.key",
        "beta.crt",
        "beta.key",
        "edge-proxy.crt",
        "edge-proxy.key",
    ]:
        assert name in text, name
    assert str(tmp_path) in text
    assert "--workers-ca" in text and "ca-file" in text
    assert "OFFLINE" in text
    lines = text.splitlines()
    ca_key_line = next(line for line in lines if "workers-ca.key" in line)
    assert "OFFLINE" in ca_key_line
    alpha_line = next(line for line in lines if "alpha.crt" in line)
    assert "alpha.key" in alpha_line and "worker box" in alpha_line
    assert "new" in alpha_line

    reused = summarize(generate_certs(tmp_path, workers=["alpha"]), False, tmp_path)
    assert "reused" in next(line for line in reused.splitlines() if "alpha.crt" in line)
    # Without a CA entry, the CA file names come from ca_name.
    leaves_only = summarize([i for i in issued if i.kind != "ca"], False, tmp_path, ca_name="my-ca")
    assert "my-ca.crt" in leaves_only and "my-ca.key" in leaves_only


# ---------------------------------------------------------------------------
# DemoPKI (its mutual-TLS handshakes: tests/integration/test_pki_handshakes.py)
# ---------------------------------------------------------------------------


@pytest.fixture
def demo(tmp_path: Path) -> DemoPKI:
    return DemoPKI.create(tmp_path / "pki", worker_names=("worker", "worker-2"))


def test_demo_pki_layout(demo: DemoPKI) -> None:
    assert demo.ca_cert == demo.directory / "ca.crt"
    assert set(demo.workers) == {"worker", "worker-2"}
    ca = load_cert(demo.ca_cert)
    load_cert(demo.server_cert).verify_directly_issued_by(ca)  # ONE CA signs everything
    for cert_path, key_path in demo.workers.values():
        load_cert(cert_path).verify_directly_issued_by(ca)
        assert key_path.exists()
    san = load_cert(demo.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert len(san.value.get_values_for_type(x509.IPAddress)) == 2
    if sys.platform != "win32":
        assert mode_of(demo.server_key) == 0o600
        assert all(mode_of(key) == 0o600 for _, key in demo.workers.values())

    cert, key = demo.issue_worker("late-joiner")
    assert demo.workers["late-joiner"] == (cert, key)
    load_cert(cert).verify_directly_issued_by(ca)
    with pytest.raises(CertificateNameError, match="reserved"):
        demo.issue_worker("server")
    with pytest.raises(CertificateNameError):
        DemoPKI.create(demo.directory / "x", worker_names=["ca"])


def test_module_logger_name() -> None:
    assert pki.logger.name == "rhttp_wsgi.pki"
