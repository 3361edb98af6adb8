"""PostgreSQL state URLs: what libpq gets, what messages show (never a password), what is refused."""

from __future__ import annotations

import pytest

from adapter.state.pgurl import is_postgres_url, parse, safe_location, with_options


def test_the_parts_go_to_libpq_and_the_adapters_options_do_not() -> None:
    target = parse("postgresql://svc:s%40cret@db.example:5433/billing?sslmode=require&schema=site_a"
                   "&password_env=PG_PW&application_name=adapter")
    assert target.params == {"user": "svc", "host": "db.example", "port": "5433", "dbname": "billing",
                             "sslmode": "require", "application_name": "adapter"}
    assert (target.password, target.schema, target.password_env) == ("s@cret", "site_a", "PG_PW")
    assert target.location == ("postgresql://svc@db.example:5433/billing?sslmode=require&schema=site_a"
                               "&password_env=PG_PW&application_name=adapter")
    assert "s@cret" not in repr(target) and "s%40cret" not in repr(target)
    assert (target.user, target.database, target.server) == ("svc", "billing", "db.example:5433")


def test_several_hosts_ipv6_and_defaults() -> None:
    target = parse("postgres://svc@h1:5432,[::1]:6543/db?target_session_attrs=read-write")
    assert (target.params["host"], target.params["port"]) == ("h1,::1", "5432,6543")
    bare = parse("postgresql:///db")
    assert bare.params == {"dbname": "db"} and bare.server == "localhost:5432" and bare.location == "postgresql:///db"


def test_secrets_in_the_query_are_taken_out_of_the_location() -> None:
    target = parse("postgresql://svc@db/x?password=hunter22&sslpassword=keypass&sslmode=verify-full")
    assert target.password == "hunter22" and target.params["sslpassword"] == "keypass"
    assert target.location == "postgresql://svc@db/x?sslmode=verify-full"


@pytest.mark.parametrize(("url", "message"), [
    ("mysql://svc@db/x", "must start with postgresql://"),
    ("postgresql://svc@db/x/y", "one path part"),
    ("postgresql://svc@db:0/x", "must be a number from 1 to 65535"),
    ("postgresql://svc@[::1/x", "lacks its closing"),
    ("postgresql://svc@db/x?replication=database", "unknown query parameter 'replication'"),
    ("postgresql://svc@db/x?schema=a&schema=b", "given twice"),
    ("postgresql://svc@db/x?schema=pg_catalog", "not starting with pg_"),
    ("postgresql://svc@db/x?password_env=A-B", "name of an environment variable"),
    ("postgresql://svc@db/x?sslmode", "has no value"),
    ("postgresql://svc@db/x#frag", "#fragment"),
])
def test_what_is_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(url)


def test_a_url_that_does_not_parse_is_still_shown_without_its_password() -> None:
    assert safe_location("postgresql://svc:p@ss@db:x/y?password=z") == "postgresql://db:x/y"
    assert safe_location("postgresql://svc:pw@db/x") == "postgresql://svc@db/x"


def test_options_from_the_config_join_the_url_once() -> None:
    assert with_options("postgresql://svc@db/x", schema="a", password_env="PW") == \
        "postgresql://svc@db/x?schema=a&password_env=PW"
    assert with_options("postgresql://svc@db/x?schema=a", schema="a") == "postgresql://svc@db/x?schema=a"
    with pytest.raises(ValueError, match="differs"):
        with_options("postgresql://svc@db/x?schema=a", schema="b")
    assert is_postgres_url("postgres://x") and is_postgres_url("POSTGRESQL://x")
    assert not is_postgres_url("state.sqlite") and not is_postgres_url("postgresql:x")
