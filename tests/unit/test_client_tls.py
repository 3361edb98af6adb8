"""TLS options reach the session and work against an HTTPS server with a private CA and client certs."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from adapter.client import FhirClient, FhirTransportError, RetryPolicy, SmartBackendAuth
from adapter.errors import ConfigError

from .fault_server import FaultServer, Reply

PATIENT = Reply(200, {"resourceType": "Patient", "id": "1"})


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    issuer_key: Any,
    issuer: x509.Name,
    key: Any,
    *,
    ca: bool = False,
    usage: Any = None,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: Any | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA with a server certificate for 127.0.0.1 and a client certificate."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("test CA", ca_key, _name("test CA"), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        "127.0.0.1",
        ca_key,
        ca.subject,
        server_key,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue("charge-adapter", ca_key, ca.subject, client_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    _write(root / "ca.pem", ca)
    _write(root / "server.pem", server, server_key)
    _write(root / "client.pem", client, client_key)
    combined = root / "client-combined.pem"
    combined.write_bytes((root / "client.pem").read_bytes() + (root / "client.key").read_bytes())
    return {
        "ca": root / "ca.pem",
        "server": root / "server.pem",
        "server_key": root / "server.key",
        "client": root / "client.pem",
        "client_key": root / "client.key",
        "combined": combined,
    }


@pytest.fixture
def https_server(pki: dict[str, Path]) -> Iterator[FaultServer]:
    """An HTTPS server that requires a client certificate issued by the test CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["server"], pki["server_key"])
    context.load_verify_locations(pki["ca"])
    context.verify_mode = ssl.CERT_REQUIRED
    with FaultServer(tls=context) as s:
        s.on("GET", "/fhir/Patient/1", PATIENT)
        yield s


def test_tls_options_reach_the_session(pki: dict[str, Path]) -> None:
    cert = (str(pki["client"]), str(pki["client_key"]))
    client = FhirClient("https://127.0.0.1:9/fhir", verify=str(pki["ca"]), cert=cert)
    assert client.session.verify == str(pki["ca"])
    assert client.session.cert == cert
    combined = FhirClient("https://127.0.0.1:9/fhir", verify=False, cert=str(pki["combined"]))
    assert combined.session.verify is False and combined.session.cert == str(pki["combined"])


def test_mutual_tls_with_private_ca(
    https_server: FaultServer, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests would let this variable override a session-level verify; the client must not.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki["client"]))
    client = FhirClient(https_server.url, verify=str(pki["ca"]), cert=(str(pki["client"]), str(pki["client_key"])))
    assert client.read("Patient", "1")["id"] == "1"
    combined = FhirClient(https_server.url, verify=str(pki["ca"]), cert=str(pki["combined"]))
    assert combined.read("Patient", "1")["id"] == "1"
    assert len(https_server.seen()) == 2


def test_smart_token_requests_use_the_client_tls_settings(https_server: FaultServer, pki: dict[str, Path]) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    https_server.on(
        "GET", "/fhir/.well-known/smart-configuration", Reply(200, {"token_endpoint": f"{https_server.origin}/token"})
    )
    https_server.on("POST", "/token", Reply(200, {"access_token": "t1", "token_type": "bearer", "expires_in": 300}))
    auth = SmartBackendAuth("charge-adapter", key_pem, alg="ES384")
    client = FhirClient(https_server.url, auth=auth, verify=str(pki["ca"]), cert=str(pki["combined"]))
    assert client.read("Patient", "1")["id"] == "1"
    assert [s.path for s in https_server.seen()] == [
        "/fhir/.well-known/smart-configuration",
        "/token",
        "/fhir/Patient/1",
    ]
    assert https_server.seen()[-1].headers["Authorization"] == "Bearer t1"


def test_untrusted_server_certificate_fails_without_retry(
    https_server: FaultServer, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    sleeps: list[float] = []
    client = FhirClient(https_server.url, cert=str(pki["combined"]), retry=RetryPolicy(sleep=sleeps.append))
    with pytest.raises(FhirTransportError, match="TLS error") as caught:
        client.read("Patient", "1")
    assert caught.value.attempts == 1 and sleeps == []
    assert https_server.seen() == []


def test_missing_client_certificate_is_rejected(https_server: FaultServer, pki: dict[str, Path]) -> None:
    client = FhirClient(https_server.url, verify=str(pki["ca"]), retry=RetryPolicy.none())
    with pytest.raises(FhirTransportError):
        client.read("Patient", "1")
    assert https_server.seen() == []


def test_missing_tls_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CA bundle"):
        FhirClient("https://127.0.0.1:9/fhir", verify=str(tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match="client certificate"):
        FhirClient("https://127.0.0.1:9/fhir", cert=(str(tmp_path / "c.pem"), str(tmp_path / "k.pem")))


def test_environment_ca_and_proxy_variables_are_ignored_unless_trust_env(
    https_server: FaultServer, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """REQUESTS_CA_BUNDLE alone must not make the client trust a server (and send it our token); a proxy
    variable must not reroute it. Both apply only when the config opts in with server.trust_env."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki["ca"]))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "")
    strict = FhirClient(https_server.url, cert=str(pki["combined"]), retry=RetryPolicy.none())
    with pytest.raises(FhirTransportError, match="TLS error"):
        strict.read("Patient", "1")
    assert https_server.seen() == []
    monkeypatch.delenv("HTTPS_PROXY")
    trusting = FhirClient(https_server.url, cert=str(pki["combined"]), retry=RetryPolicy.none(), trust_env=True)
    assert trusting.read("Patient", "1")["id"] == "1"
