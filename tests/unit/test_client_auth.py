"""Credentials: static bearer, basic, SMART Backend Services; secrets never leak."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from adapter.client import (
    AuthError,
    BasicAuth,
    BearerTokenAuth,
    FhirClient,
    FhirUnauthorized,
    NoAuth,
    SmartBackendAuth,
    auth_from_settings,
    secret_from,
)
from adapter.client.auth import CLIENT_ASSERTION_TYPE

from .fault_server import FaultServer, Reply, Seen, outcome

CLIENT_ID = "charge-adapter"
SCOPE = "system/Procedure.rs system/ChargeItem.cu"
PATIENT = Reply(200, {"resourceType": "Patient", "id": "1"})


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


def pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "RS384": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES384": ec.generate_private_key(ec.SECP384R1()),
    }


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class TokenEndpoint:
    """Plays a SMART authorization server: checks each assertion and hands out numbered tokens."""

    def __init__(
        self, server: FaultServer, public_key: Any, alg: str, expires_in: int = 300, clock: Any = time.time
    ) -> None:
        self.server, self.public_key, self.alg, self.expires_in = server, public_key, alg, expires_in
        self.clock = clock
        self.url = f"{server.origin}/auth/token"
        self.issued: list[str] = []
        self.jtis: set[str] = set()
        self.headers: list[dict[str, Any]] = []
        server.on(
            "GET",
            "/fhir/.well-known/smart-configuration",
            Reply(
                200,
                {"token_endpoint": self.url, "token_endpoint_auth_methods_supported": ["private_key_jwt"]},
                content_type="application/json",
            ),
        )
        server.on("POST", "/auth/token", self)

    def __call__(self, request: Seen) -> Reply:
        form = request.form()
        assert form["grant_type"] == "client_credentials"
        assert form["scope"] == SCOPE
        assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
        assertion = form["client_assertion"]
        self.headers.append(jwt.get_unverified_header(assertion))
        claims = jwt.decode(
            assertion,
            self.public_key,
            algorithms=[self.alg],
            audience=self.url,
            options={"require": ["iss", "sub", "aud", "exp", "jti"]},
        )
        assert claims["iss"] == claims["sub"] == CLIENT_ID
        assert 0 < claims["exp"] - self.clock() <= 300 + 1
        assert claims["jti"] not in self.jtis
        self.jtis.add(claims["jti"])
        token = f"tok-{len(self.issued) + 1}"
        self.issued.append(token)
        body = {"access_token": token, "token_type": "bearer", "expires_in": self.expires_in, "scope": SCOPE}
        return Reply(200, body, content_type="application/json")


def bearer_of(request: Seen) -> str:
    return request.headers.get("Authorization", "")


# -- static credentials ---------------------------------------------------------------------------


def test_bearer_header_sent(server: FaultServer) -> None:
    server.on("GET", "/fhir/Patient/1", PATIENT)
    FhirClient(server.url, auth=BearerTokenAuth("s3cret-token")).read("Patient", "1")
    assert bearer_of(server.seen()[0]) == "Bearer s3cret-token"


def test_basic_header_sent(server: FaultServer) -> None:
    server.on("GET", "/fhir/Patient/1", PATIENT)
    FhirClient(server.url, auth=BasicAuth("billing", "pässword")).read("Patient", "1")
    scheme, encoded = bearer_of(server.seen()[0]).split(" ")
    assert scheme == "Basic" and base64.b64decode(encoded).decode() == "billing:pässword"


def test_static_secrets_masked() -> None:
    for auth in (BearerTokenAuth("s3cret-token"), BasicAuth("billing", "s3cret-token")):
        assert "s3cret" not in repr(auth) and "s3cret" not in str(auth)
        client = FhirClient("http://127.0.0.1:9/fhir", auth=auth)
        assert "s3cret" not in repr(client)
    assert repr(NoAuth()) == "NoAuth()"


def test_401_with_static_token_is_not_retried(server: FaultServer) -> None:
    server.on("GET", "/fhir/Patient/1", Reply(401, outcome("HAPI-0333: bad token")), PATIENT)
    client = FhirClient(server.url, auth=BearerTokenAuth("s3cret-token"))
    with pytest.raises(FhirUnauthorized) as caught:
        client.read("Patient", "1")
    assert client.request_count == 1
    assert "s3cret" not in str(caught.value) and "s3cret" not in repr(caught.value)


# -- SMART Backend Services -----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_smart_discovery_and_signed_assertion(server: FaultServer, keys: dict[str, Any], alg: str) -> None:
    endpoint = TokenEndpoint(server, keys[alg].public_key(), alg)
    server.on("GET", "/fhir/Patient/1", PATIENT)
    auth = SmartBackendAuth(CLIENT_ID, pem(keys[alg]), alg=alg, kid="key-2026", scope=SCOPE)
    client = FhirClient(server.url, auth=auth)
    for _ in range(3):
        client.read("Patient", "1")
    assert [s.path for s in server.seen()] == [
        "/fhir/.well-known/smart-configuration",
        "/auth/token",
        "/fhir/Patient/1",
        "/fhir/Patient/1",
        "/fhir/Patient/1",
    ]
    assert endpoint.issued == ["tok-1"]  # cached across requests
    assert all(bearer_of(s) == "Bearer tok-1" for s in server.seen("GET", "/fhir/Patient/1"))
    assert endpoint.headers == [{"alg": alg, "typ": "JWT", "kid": "key-2026"}]
    assert auth.token_url == endpoint.url and client.request_count == 3


def test_smart_explicit_token_url_skips_discovery(server: FaultServer, keys: dict[str, Any]) -> None:
    endpoint = TokenEndpoint(server, keys["RS384"].public_key(), "RS384")
    server.on("GET", "/fhir/Patient/1", PATIENT)
    auth = SmartBackendAuth(CLIENT_ID, pem(keys["RS384"]).decode(), scope=SCOPE, token_url=endpoint.url)
    FhirClient(server.url, auth=auth).read("Patient", "1")
    assert server.seen("GET", "/fhir/.well-known/smart-configuration") == []
    assert endpoint.headers[0] == {"alg": "RS384", "typ": "JWT"}  # no kid when none configured


def test_smart_token_refreshed_shortly_before_expiry(server: FaultServer, keys: dict[str, Any]) -> None:
    clock = FakeClock()
    endpoint = TokenEndpoint(server, keys["ES384"].public_key(), "ES384", expires_in=300, clock=clock)
    server.on("GET", "/fhir/Patient/1", PATIENT)
    auth = SmartBackendAuth(CLIENT_ID, pem(keys["ES384"]), alg="ES384", scope=SCOPE, refresh_margin=60, clock=clock)
    client = FhirClient(server.url, auth=auth)
    client.read("Patient", "1")
    clock.now += 239  # 61 s of lifetime left: still good
    client.read("Patient", "1")
    assert endpoint.issued == ["tok-1"]
    clock.now += 2  # within the 60 s margin
    client.read("Patient", "1")
    assert endpoint.issued == ["tok-1", "tok-2"]
    assert [bearer_of(s) for s in server.seen("GET", "/fhir/Patient/1")] == ["Bearer tok-1"] * 2 + ["Bearer tok-2"]
    assert auth.token_request_count == 2


def test_smart_401_refreshes_token_once(server: FaultServer, keys: dict[str, Any]) -> None:
    endpoint = TokenEndpoint(server, keys["RS384"].public_key(), "RS384")
    server.on("GET", "/fhir/Patient/1", Reply(401, outcome("token revoked")), PATIENT)
    client = FhirClient(server.url, auth=SmartBackendAuth(CLIENT_ID, pem(keys["RS384"]), scope=SCOPE))
    assert client.read("Patient", "1")["id"] == "1"
    assert endpoint.issued == ["tok-1", "tok-2"]
    assert [bearer_of(s) for s in server.seen("GET", "/fhir/Patient/1")] == ["Bearer tok-1", "Bearer tok-2"]
    assert client.request_count == 2


def test_smart_persistent_401_raises_after_one_refresh(server: FaultServer, keys: dict[str, Any]) -> None:
    endpoint = TokenEndpoint(server, keys["RS384"].public_key(), "RS384")
    server.on("GET", "/fhir/Patient/1", Reply(401, outcome("insufficient scope")))
    client = FhirClient(server.url, auth=SmartBackendAuth(CLIENT_ID, pem(keys["RS384"]), scope=SCOPE))
    with pytest.raises(FhirUnauthorized, match="insufficient scope") as caught:
        client.read("Patient", "1")
    assert client.request_count == 2 and len(endpoint.issued) == 2
    assert "tok-" not in str(caught.value)


def test_smart_token_fetched_once_under_concurrency(server: FaultServer, keys: dict[str, Any]) -> None:
    endpoint = TokenEndpoint(server, keys["ES384"].public_key(), "ES384")
    auth = SmartBackendAuth(CLIENT_ID, pem(keys["ES384"]), alg="ES384", scope=SCOPE, base_url=server.url)
    tokens: list[str] = []
    threads = [threading.Thread(target=lambda: tokens.append(auth.access_token())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tokens == ["tok-1"] * 8 and endpoint.issued == ["tok-1"]


def test_smart_token_endpoint_error_is_auth_error(server: FaultServer, keys: dict[str, Any]) -> None:
    TokenEndpoint(server, keys["RS384"].public_key(), "RS384")
    server.on(
        "POST",
        "/auth/token",
        Reply(401, {"error": "invalid_client", "error_description": "unknown kid"}, content_type="application/json"),
    )
    auth = SmartBackendAuth(CLIENT_ID, pem(keys["RS384"]), scope=SCOPE)
    client = FhirClient(server.url, auth=auth)
    with pytest.raises(AuthError) as caught:
        client.read("Patient", "1")
    message = str(caught.value)
    assert "HTTP 401" in message and "invalid_client: unknown kid" in message
    assertion = server.seen("POST", "/auth/token")[0].form()["client_assertion"]
    assert assertion not in message and assertion not in repr(caught.value)
    assert server.seen("GET", "/fhir/Patient/1") == []


def test_smart_discovery_failure_is_auth_error(server: FaultServer, keys: dict[str, Any]) -> None:
    server.on("GET", "/fhir/.well-known/smart-configuration", Reply(404, outcome("not here")))
    client = FhirClient(server.url, auth=SmartBackendAuth(CLIENT_ID, pem(keys["RS384"]), scope=SCOPE))
    with pytest.raises(AuthError, match=r"discovery .* HTTP 404"):
        client.read("Patient", "1")


def test_smart_unreachable_token_endpoint_is_auth_error(keys: dict[str, Any]) -> None:
    auth = SmartBackendAuth(CLIENT_ID, pem(keys["RS384"]), token_url="http://127.0.0.1:9/token?secret=x")
    with pytest.raises(AuthError) as caught:
        auth.access_token()
    assert "secret=x" not in str(caught.value)


def test_smart_secrets_masked(server: FaultServer, keys: dict[str, Any]) -> None:
    TokenEndpoint(server, keys["RS384"].public_key(), "RS384")
    key_pem = pem(keys["RS384"]).decode()
    auth = SmartBackendAuth(CLIENT_ID, key_pem, scope=SCOPE, base_url=server.url)
    token = auth.access_token()
    key_body = key_pem.splitlines()[1]
    for text in (repr(auth), str(auth), repr(FhirClient(server.url, auth=auth))):
        assert token not in text and key_body not in text and "PRIVATE KEY" not in text
        assert CLIENT_ID in text or text.startswith("FhirClient")


def test_smart_bad_keys(keys: dict[str, Any]) -> None:
    with pytest.raises(AuthError, match="cannot be loaded") as caught:
        SmartBackendAuth(CLIENT_ID, b"-----BEGIN PRIVATE KEY-----\nnot-a-key-c2VjcmV0\n-----END PRIVATE KEY-----\n")
    assert "c2VjcmV0" not in str(caught.value)
    with pytest.raises(AuthError, match="RS384 needs an RSA"):
        SmartBackendAuth(CLIENT_ID, pem(keys["ES384"]), alg="RS384")
    with pytest.raises(AuthError, match="P-384"):
        SmartBackendAuth(CLIENT_ID, pem(ec.generate_private_key(ec.SECP256R1())), alg="ES384")
    with pytest.raises(AuthError, match="alg must be"):
        SmartBackendAuth(CLIENT_ID, pem(keys["RS384"]), alg="HS256")


def test_smart_without_token_url_or_base_is_auth_error(keys: dict[str, Any]) -> None:
    with pytest.raises(AuthError, match="token endpoint unknown"):
        SmartBackendAuth(CLIENT_ID, pem(keys["RS384"])).access_token()


# -- secrets and settings -------------------------------------------------------------------------


def test_secret_from_env_then_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text("from-file\n")
    monkeypatch.setenv("FHIR_TOKEN_T", "from-env")
    assert secret_from(env="FHIR_TOKEN_T", file=secret_file) == "from-env"
    monkeypatch.delenv("FHIR_TOKEN_T")
    assert secret_from(env="FHIR_TOKEN_T", file=secret_file) == "from-file"
    with pytest.raises(AuthError, match="FHIR_TOKEN_T is not set"):
        secret_from(env="FHIR_TOKEN_T")
    with pytest.raises(AuthError, match="cannot read file"):
        secret_from(file=tmp_path / "missing")
    with pytest.raises(AuthError, match="no environment variable or file"):
        secret_from()


def test_auth_from_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Any, keys: dict[str, Any]) -> None:
    monkeypatch.setenv("FHIR_TOKEN_T", "s3cret-token")
    bearer = auth_from_settings({"type": "bearer", "token_env": "FHIR_TOKEN_T"})
    assert isinstance(bearer, BearerTokenAuth) and "s3cret" not in repr(bearer)

    password_file = tmp_path / "pw"
    password_file.write_text("s3cret-pw")
    basic = auth_from_settings({"type": "basic", "username": "billing", "password_file": str(password_file)})
    assert isinstance(basic, BasicAuth) and basic.username == "billing"

    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem(keys["ES384"]))
    smart = auth_from_settings(
        {
            "type": "smart",
            "client_id": CLIENT_ID,
            "private_key_file": str(key_file),
            "alg": "ES384",
            "kid": "k1",
            "scope": SCOPE,
            "token_url": "https://auth.example/token",
        }
    )
    assert isinstance(smart, SmartBackendAuth)
    assert (smart.alg, smart.kid, smart.scope, smart.token_url) == ("ES384", "k1", SCOPE, "https://auth.example/token")

    assert isinstance(auth_from_settings(None), NoAuth)
    assert isinstance(auth_from_settings({"type": "none"}), NoAuth)


def test_auth_from_settings_rejects_bad_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_T", raising=False)
    with pytest.raises(AuthError, match="inline secrets are not accepted"):
        auth_from_settings({"type": "bearer", "token": "s3cret-token"})
    with pytest.raises(AuthError, match="NOT_SET_T"):
        auth_from_settings({"type": "bearer", "token_env": "NOT_SET_T"})
    with pytest.raises(AuthError, match="auth type must be"):
        auth_from_settings({"type": "kerberos"})
    with pytest.raises(AuthError, match="client_id is required"):
        auth_from_settings({"type": "smart", "private_key_env": "NOT_SET_T"})
    with pytest.raises(AuthError, match="username"):
        auth_from_settings({"type": "basic", "password_env": "NOT_SET_T"})
