"""The startup check of our own certificate and key, and the words of TLS failures (no handshake here).

Through the CLI, with exit statuses: ``tests/integration/test_cli_errors.py``.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rhttp_wsgi.certcheck import check_identity, describe, names
from rhttp_wsgi.errors import ConfigError
from rhttp_wsgi.pki import CertificateAuthority, generate_certs
from rhttp_wsgi.tls import _explain, _Files

NOW = dt.datetime.now(dt.timezone.utc)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("unit CA")


def write(tmp_path: Path, name: str, pair: tuple[bytes, bytes]) -> tuple[str, str]:
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert.write_bytes(pair[0])
    key.write_bytes(pair[1])
    return str(cert), str(key)


def test_a_good_pair_passes_and_is_returned(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert, key = write(tmp_path, "w", ca.issue_client("w"))
    assert check_identity(cert, key, role="client").subject.rfc4514_string() == "CN=w"


@pytest.mark.parametrize(("kind", "role", "usage"), [("client", "server", "clientAuth"),
                                                     ("server", "client", "serverAuth")])
def test_a_certificate_for_the_other_role_names_its_usage_and_the_fix(ca: CertificateAuthority, tmp_path: Path,
                                                                      kind: str, role: str, usage: str) -> None:
    pair = ca.issue_client("w") if kind == "client" else ca.issue_server("proxy.test")
    cert, key = write(tmp_path, kind, pair)
    with pytest.raises(ConfigError) as e:
        check_identity(cert, key, role=role)  # type: ignore[arg-type]
    assert e.value.option == "cert"
    assert e.value.message.startswith(f"{cert} (subject CN=") and f"extended key usage is {usage}" in e.value.message
    assert "rhttp-wsgi certs" in e.value.message


def _self_signed(tmp_path: Path, eku: list[x509.ObjectIdentifier] | None) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "any")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(NOW - dt.timedelta(days=1))
               .not_valid_after(NOW + dt.timedelta(days=90)))
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    pem = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    return write(tmp_path, "any", (pem, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption())))


@pytest.mark.parametrize("eku", [None, [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE],
                                 [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]],
                         ids=["no-eku", "any", "both"])
def test_a_certificate_without_a_usage_restriction_serves_both_roles(tmp_path: Path,
                                                                     eku: list[x509.ObjectIdentifier] | None) -> None:
    cert, key = _self_signed(tmp_path, eku)
    check_identity(cert, key, role="client")
    check_identity(cert, key, role="server")


@pytest.mark.parametrize(("validity", "needle"), [
    ({"not_after": NOW - dt.timedelta(hours=1)}, "expired on"),
    ({"not_before": NOW + dt.timedelta(hours=1)}, "is not valid before"),
])
def test_a_certificate_out_of_its_validity_is_refused(ca: CertificateAuthority, tmp_path: Path,
                                                      validity: dict[str, dt.datetime], needle: str) -> None:
    cert, key = write(tmp_path, "w", ca.issue_client("w", **validity))
    with pytest.raises(ConfigError, match=f"^cert: {cert} .*{needle}"):
        check_identity(cert, key, role="client")


def test_a_key_of_another_certificate_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert, _ = write(tmp_path, "a", ca.issue_client("a"))
    _, other = write(tmp_path, "b", ca.issue_client("b"))
    with pytest.raises(ConfigError, match=f"^key: {other} is not the key of {cert}"):
        check_identity(cert, other, role="client")


def test_unreadable_files_name_the_option(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert, key = write(tmp_path, "w", ca.issue_client("w"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM\n")
    with pytest.raises(ConfigError, match=r"^cert: .*no readable PEM certificate"):
        check_identity(str(garbage), key, role="client")
    with pytest.raises(ConfigError, match=r"^key: .*no readable PEM private key"):
        check_identity(cert, str(garbage), role="client")
    encrypted = tmp_path / "encrypted.key"
    loaded = serialization.load_pem_private_key(Path(key).read_bytes(), None)
    encrypted.write_bytes(loaded.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match=r"^key: .*is encrypted"):
        check_identity(cert, str(encrypted), role="client")


def test_expiry_within_14_days_is_warned_once_per_file(ca: CertificateAuthority, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    cert, key = write(tmp_path, "soon", ca.issue_client("soon", not_after=NOW + dt.timedelta(days=10)))
    caplog.set_level(logging.WARNING, "rhttp_wsgi.certcheck")
    check_identity(cert, key, role="client", cert_option="public_cert")
    check_identity(cert, key, role="client", cert_option="public_cert")  # the CLI and the pool both check
    assert [r.getMessage() for r in caplog.records] == [
        f"--public-cert {cert} (subject CN=soon, issuer CN=unit CA) expires on"
        f" {(NOW + dt.timedelta(days=10)):%Y-%m-%d %H:%M} UTC, in 10 days: renew it before then"]
    later, _ = write(tmp_path, "later", ca.issue_client("later", not_after=NOW + dt.timedelta(days=15)))
    caplog.clear()
    check_identity(later, str(tmp_path / "later.key"), role="client")
    assert not caplog.records


def test_names_and_describe_say_who_a_certificate_is(ca: CertificateAuthority) -> None:
    server = x509.load_pem_x509_certificate(ca.issue_server("proxy", ["proxy.test", "10.0.0.5"])[0])
    assert names(server) == ["DNS:proxy.test", "IP:10.0.0.5"]
    assert describe(server) == "subject CN=proxy, issuer CN=unit CA"
    client = x509.load_pem_x509_certificate(ca.issue_client("not_a_hostname")[0])
    assert names(client) == ["CN:not_a_hostname"]  # no SAN: the CN is what a name check would use


# -- the worker's words for the proxy's alerts (what TLSSession raises; the handshakes: test_cli_errors.py) --


@pytest.mark.parametrize(("reason", "words"), [
    ("tlsv1 alert unknown ca", "unknown_ca, it does not trust the CA that issued it"),
    ("sslv3 alert bad certificate", "bad_certificate, it could not verify it"),
    ("sslv3 alert certificate unknown", "certificate_unknown, it could not verify it"),
    ("sslv3 alert certificate expired", "certificate_expired, it has expired or is not valid yet"),
    ("sslv3 alert unsupported certificate", "unsupported_certificate, it is not meant for this use"),
    ("tlsv13 alert certificate required", "certificate_required, it wants a certificate and got none"),
])
def test_an_alert_refusing_our_certificate_is_named_with_the_flag(ca: CertificateAuthority, reason: str,
                                                                  words: str) -> None:
    own = x509.load_pem_x509_certificate(ca.issue_client("w")[0])
    message, retryable = _explain(reason, {}, _Files("/etc/w.crt", "/etc/ca.crt"), server_side=False, own=own,
                                  verify_name="proxy.test")
    assert not retryable
    assert message.startswith("the proxy rejected our client certificate (subject CN=w, issuer CN=unit CA;"
                              f" --cert /etc/w.crt): {words}"), message
    assert message.endswith(f"(OpenSSL: {reason})")


def test_our_expired_certificate_is_pointed_out_with_the_alert(ca: CertificateAuthority) -> None:
    own = x509.load_pem_x509_certificate(ca.issue_client("w", not_after=NOW - dt.timedelta(days=1))[0])
    message, _ = _explain("sslv3 alert certificate expired", {}, None, server_side=False, own=own, verify_name=None)
    assert "; ours expired on " in message


@pytest.mark.parametrize("reason", ["unexpected eof while reading", "wrong version number"])
def test_other_failures_keep_openssl_words_and_are_retried_quietly(reason: str) -> None:
    assert _explain(reason, {}, None, server_side=False, own=None, verify_name=None) == (reason, True)


def test_certs_warns_about_a_reused_certificate_with_other_names(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    generate_certs(tmp_path, workers=[], servers=["proxy.test"], server_sans=["proxy.test"])
    caplog.set_level(logging.WARNING, "rhttp_wsgi.pki")
    generate_certs(tmp_path, workers=[], servers=["proxy.test"], server_sans=["proxy.test", "10.1.2.3"])
    assert [r.getMessage() for r in caplog.records] == [
        f"reusing {tmp_path / 'proxy.test.crt'}, which names CN:proxy.test, DNS:proxy.test, not the requested"
        " CN:proxy.test, DNS:proxy.test, IP:10.1.2.3: pass --overwrite to re-issue it"]
    caplog.clear()
    generate_certs(tmp_path, workers=[], servers=["proxy.test"], server_sans=["proxy.test"])
    assert not caplog.records
