"""The service config (YAML + environment): every value validated, every error naming the file and the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from adapter.errors import ConfigError
from adapter.service import make_client
from adapter.settings import load_settings, secret


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "adapter.yaml"
    path.write_text(text)
    return path


def test_yaml_with_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  url: http://a/fhir\n  auth: {type: bearer, token_env: T}\npoll:\n"
                           "  interval_seconds: 10\nstate_path: s.sqlite\n")
    settings = load_settings(path, env={"CHARGE_ADAPTER__SERVER__URL": "http://b/fhir",
                                        "CHARGE_ADAPTER__SERVE__PORT": "9000", "OTHER": "x",
                                        "CHARGE_ADAPTER__SERVER__TRUST_ENV": "true"})
    assert settings.server.url == "http://b/fhir" and settings.server.auth == {"type": "bearer", "token_env": "T"}
    assert settings.poll.interval_seconds == 10.0 and settings.serve.port == 9000
    assert settings.state_path == "s.sqlite" and settings.state.location == "s.sqlite"
    assert settings.serve.endpoint == "http://127.0.0.1:9000/notify"
    assert settings.server.trust_env is True and load_settings(None, env={}).server.trust_env is False


def test_the_state_section_and_its_shorthand(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "state: /var/lib/a.sqlite\n"), env={}).state.location == "/var/lib/a.sqlite"
    full = load_settings(write(tmp_path, "state:\n  location: sqlite:///x.sqlite\n  done_retention_days: 1\n"),
                         env={"CHARGE_ADAPTER__STATE__BUSY_TIMEOUT_SECONDS": "2.5"})
    assert (full.state.location, full.state.done_retention_days, full.state.busy_timeout_seconds) == \
        ("sqlite:///x.sqlite", 1.0, 2.5)
    assert load_settings(None, env={"CHARGE_ADAPTER__STATE": "y.sqlite"}).state.location == "y.sqlite"


def test_a_postgresql_state_carries_its_options_in_the_url(tmp_path: Path) -> None:
    """`state.schema` and `state.password_env` travel to the backend inside the location, so every caller of
    open_state gets them."""
    short = load_settings(write(tmp_path, "state: postgres://svc@db.example:5433/adapter\n"), env={})
    assert short.state.location == "postgres://svc@db.example:5433/adapter"
    full = load_settings(write(tmp_path, "state:\n  location: postgresql://svc@db/adapter?sslmode=require\n"
                                         "  schema: site_a\n  password_env: ADAPTER_PG_PASSWORD\n"
                                         "  busy_timeout_seconds: 2\n"), env={})
    assert full.state.location == ("postgresql://svc@db/adapter?sslmode=require&schema=site_a"
                                   "&password_env=ADAPTER_PG_PASSWORD")
    assert (full.state.schema, full.state.busy_timeout_seconds) == ("site_a", 2.0)
    env = load_settings(None, env={"CHARGE_ADAPTER__STATE__LOCATION": "postgresql://svc@db/adapter?schema=b",
                                   "CHARGE_ADAPTER__STATE__SCHEMA": "b"})
    assert env.state.location == "postgresql://svc@db/adapter?schema=b"


BAD_VALUES = [
    # the values of the issue: accepted before, breaking the service
    ("poll:\n  page_size: 0\n", "poll.page_size", "whole number at least 1 and at most 1000 (got 0)"),
    ("poll:\n  page_size: 2.7\n", "poll.page_size", "whole number at least 1"),
    ("worker:\n  batch: 0\n", "worker.batch", "at least 1"),
    ("serve:\n  threads: 0\n", "serve.threads", "at least 1"),
    ("poll:\n  interval_seconds: 0\n", "poll.interval_seconds", "at least 0.1"),
    ("poll:\n  interval_seconds: .nan\n", "poll.interval_seconds", "finite number"),
    ("poll:\n  overlap_seconds: .inf\n", "poll.overlap_seconds", "finite number"),
    ("poll:\n  overlap_seconds: -1\n", "poll.overlap_seconds", "at least 0"),
    ("poll:\n  interval_seconds: soon\n", "poll.interval_seconds", "must be a number"),
    ("serve:\n  port: 70000\n", "serve.port", "at most 65535"),
    ("serve:\n  port: true\n", "serve.port", "whole number"),
    ("serve:\n  max_body_bytes: 10\n", "serve.max_body_bytes", "at least 1024"),
    ("serve:\n  safety_poll_seconds: 0.5\n", "serve.safety_poll_seconds", "0 (off) or at least 1"),
    ("serve:\n  connection_limit: 1\n", "serve.connection_limit", "at least 10"),
    ("serve:\n  header_timeout_seconds: 0\n", "serve.header_timeout_seconds", "above 0"),
    ("serve:\n  request_timeout_seconds: .inf\n", "serve.request_timeout_seconds", "finite"),
    ("serve:\n  base_path: notify\n", "serve.base_path", "must start with /"),
    ("serve:\n  token_env: ''\n", "serve.token_env", "must name the environment variable"),
    ("serve:\n  token_env: 'MY TOKEN'\n", "serve.token_env", "name of an environment variable"),
    ("serve:\n  subscription_id: 'a/b'\n", "serve.subscription_id", "valid FHIR id"),
    ("worker:\n  max_attempts: 0\n", "worker.max_attempts", "at least 1"),
    ("worker:\n  retry_initial_seconds: 10\n  retry_max_seconds: 5\n", "worker.retry_max_seconds",
     "at least worker.retry_initial_seconds"),
    ("worker:\n  lease_seconds: 1\n", "worker.lease_seconds", "at least 10"),
    ("server:\n  connect_timeout: 0\n", "server.connect_timeout", "above 0"),
    ("server:\n  read_timeout: -5\n", "server.read_timeout", "above 0"),
    ("server:\n  retry_seconds: .nan\n", "server.retry_seconds", "finite"),
    ("server:\n  trust_env: sometimes\n", "server.trust_env", "true or false"),
    ("server:\n  url: ftp://x\n", "server.url", "must be an http"),
    ("server:\n  ca_bundle: /no/such/ca.pem\n", "server.ca_bundle", "CA bundle not found: /no/such/ca.pem"),
    ("server:\n  client_cert: /no/such/cert.pem\n", "server.client_cert", "certificate not found"),
    ("server:\n  auth: {type: kerberos}\n", "server.auth.type", "must be one of none, bearer, basic, smart"),
    ("server:\n  auth: {type: bearer, token: abc}\n", "server.auth.token", "secrets are never inline"),
    ("server:\n  auth: {type: bearer, token_env: 5}\n", "server.auth.token_env", "non-empty string"),
    ("server:\n  auth: {type: bearer, token_file: /no/such/token}\n", "server.auth.token_file",
     "file not found: /no/such/token"),
    ("server:\n  auth: {type: smart, client_id: c, refresh_margin: .nan}\n", "server.auth.refresh_margin", "finite"),
    ("server:\n  auth: [bearer]\n", "server.auth", "must be a mapping"),
    ("state:\n  location: mysql://db/adapter\n", "state.location", "mysql: state is not supported"),
    ("state:\n  location: postgresql://svc:hunter22@db/adapter\n", "state.location",
     "must not contain a password (a config file or an environment listing would show it): name the variable"),
    ("state:\n  location: postgresql://svc@db/adapter?password=hunter22\n", "state.location",
     "must not contain a password"),
    ("state:\n  location: postgresql://svc@db:5432x/adapter\n", "state.location", "port '5432x' must be a number"),
    ("state:\n  location: postgresql://svc@db/adapter?sslmod=require\n", "state.location",
     "unknown query parameter 'sslmod'"),
    ("state:\n  location: postgresql://svc@db/adapter\n  schema: Adapter-1\n", "state.schema",
     "must be a lower-case name"),
    ("state:\n  location: postgresql://svc@db/adapter?schema=a\n  schema: b\n", "state.schema",
     "differs from state.schema (b): give it once"),
    ("state:\n  location: postgresql://svc@db/adapter\n  password_env: 'PG PASSWORD'\n", "state.password_env",
     "name of an environment variable"),
    ("state:\n  location: a.sqlite\n  schema: adapter\n", "state.schema", "only for a postgresql:// location"),
    ("state:\n  location: ''\n", "state.location", "must be a file path"),
    ("state:\n  busy_timeout_seconds: 0\n", "state.busy_timeout_seconds", "above 0"),
    ("state:\n  audit_retention_days: 0\n", "state.audit_retention_days", "at least 1"),
    ("state_path: a.sqlite\nstate: b.sqlite\n", "state_path", "not both"),
    ("health:\n  max_queue_age_seconds: 0\n", "health.max_queue_age_seconds", "at least 1"),
    ("logging:\n  patient_references: plain\n", "logging.patient_references", "must be one of omit, hashed"),
    ("server:\n  ur: x\n", "server.ur", "unknown key"),
    ("servers: {}\n", "servers", "unknown key"),
    ("poll: [1]\n", "poll", "must be a mapping"),
]


@pytest.mark.parametrize(("text", "key", "message"), BAD_VALUES, ids=[b[1] + ":" + b[2][:20] for b in BAD_VALUES])
def test_every_bad_value_names_the_file_and_the_key(tmp_path: Path, text: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), env={})
    assert caught.value.file == str(tmp_path / "adapter.yaml") and caught.value.entry == key
    assert "hunter22" not in str(caught.value)
    assert message in caught.value.reason


def test_a_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, ""), env={"CHARGE_ADAPTER__POLL__PAGE_SIZE": "2.7"})
    assert caught.value.file.startswith("CHARGE_ADAPTER__POLL__PAGE_SIZE (environment, over ")
    assert caught.value.entry == "poll.page_size"
    with pytest.raises(ConfigError, match="CHARGE_ADAPTER__NOPE__X: unknown setting"):
        load_settings(None, env={"CHARGE_ADAPTER__NOPE__X": "1"})


@pytest.mark.parametrize("text", ["a: [", "- 1\n", "\xff"])
def test_unreadable_config_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "adapter.yaml"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"adapter\.yaml"):
        load_settings(path, env={})
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "missing.yaml", env={})


def test_an_unset_token_variable_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_TOKEN_VARIABLE", raising=False)
    settings = load_settings(write(tmp_path, "server:\n  url: http://127.0.0.1:1/fhir\n  auth: {type: bearer, "
                                             "token_env: NO_SUCH_TOKEN_VARIABLE}\n"), env={})
    with pytest.raises(ConfigError) as caught:
        make_client(settings.server, settings.source)
    assert caught.value.entry == "server.auth.token_env"
    assert "NO_SUCH_TOKEN_VARIABLE is not set" in caught.value.reason
    with pytest.raises(ConfigError) as no_url:
        make_client(load_settings(None, env={}).server, "(no config file)")
    assert no_url.value.entry == "server.url"


def test_a_bad_smart_key_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    settings = load_settings(write(tmp_path, f"server:\n  url: http://127.0.0.1:1/fhir\n  auth: {{type: smart, "
                                             f"client_id: c, private_key_file: {key}}}\n"), env={})
    with pytest.raises(ConfigError) as caught:
        make_client(settings.server, settings.source)
    assert caught.value.entry == "server.auth" and "cannot be loaded" in caught.value.reason


def test_secrets_name_the_key_and_never_a_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(write(tmp_path, "serve:\n  token_env: RECEIVER_TOKEN_FOR_TEST\n"), env={})
    monkeypatch.delenv("RECEIVER_TOKEN_FOR_TEST", raising=False)
    with pytest.raises(ConfigError) as caught:
        secret(settings, "serve.token_env", "receiver bearer token")
    assert caught.value.entry == "serve.token_env" and "RECEIVER_TOKEN_FOR_TEST" in caught.value.reason
    monkeypatch.setenv("RECEIVER_TOKEN_FOR_TEST", "s3cret")
    assert secret(settings, "serve.token_env", "receiver bearer token") == "s3cret"


def test_the_example_config_holds_the_defaults() -> None:
    """config/service.example.yaml documents every key: it must load, and say what the defaults are."""
    example = load_settings(Path(__file__).resolve().parents[2] / "config" / "service.example.yaml", env={})
    defaults = load_settings(None, env={})
    for section in ("state", "poll", "serve", "worker", "health", "logging", "sinks"):
        assert getattr(example, section) == getattr(defaults, section), section
    assert example.server.url and dataclasses.replace(example.server, url="", auth={}) == defaults.server


def test_the_sinks_section_nested_keys_and_their_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "sinks:\n  fhir: false\n  hl7v2:\n    enabled: true\n    host: engine.local\n"
                           "    port: 6661\n")
    sinks = load_settings(path, env={"CHARGE_ADAPTER__SINKS__HL7V2__ACK_TIMEOUT_SECONDS": "12"}).sinks
    assert (sinks.fhir, sinks.hl7v2.enabled, sinks.hl7v2.host, sinks.hl7v2.port) == (False, True, "engine.local", 6661)
    assert sinks.hl7v2.ack_timeout_seconds == 12.0 and sinks.hl7v2.transport == "mllp"
    defaults = load_settings(None, env={}).sinks
    assert defaults.fhir is True and defaults.hl7v2.enabled is False


@pytest.mark.parametrize(("text", "key", "message"), [
    ("sinks:\n  fhir: false\n", "sinks.fhir", "no sink left"),
    ("sinks:\n  hl7v2: {enabled: true, port: 6661}\n", "sinks.hl7v2.host", "host name"),
    ("sinks:\n  hl7v2: {enabled: true, host: h}\n", "sinks.hl7v2.port", "port is needed"),
    ("sinks:\n  hl7v2: {enabled: true, host: h, port: 70000}\n", "sinks.hl7v2.port", "at most 65535"),
    ("sinks:\n  hl7v2: {enabled: true, transport: file}\n", "sinks.hl7v2.folder", "folder"),
    ("sinks:\n  hl7v2: {enabled: true, transport: kafka, folder: x}\n", "sinks.hl7v2.transport", "mllp, file"),
    ("sinks:\n  hl7v2: {enabled: true, host: h, port: 1, ca_bundle: x.pem}\n", "sinks.hl7v2.ca_bundle",
     "only used with tls"),
    ("sinks:\n  hl7v2: {enabled: true, host: h, port: 1, tls: true, ca_bundle: /nope.pem}\n",
     "sinks.hl7v2.ca_bundle", "not found"),
    ("sinks:\n  hl7v2: {enabled: true, host: h, port: 1, ack_timeout_seconds: 0}\n",
     "sinks.hl7v2.ack_timeout_seconds", "above 0"),
    ("sinks:\n  hl7v2: {enabeld: true}\n", "sinks.hl7v2.enabeld", "unknown key"),
    ("sinks:\n  hl7v2: true\n", "sinks.hl7v2", "must be a mapping"),
])
def test_every_bad_sink_value_names_the_file_and_the_key(tmp_path: Path, text: str, key: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert caught.value.file == str(path) and caught.value.entry == key and message in caught.value.reason
