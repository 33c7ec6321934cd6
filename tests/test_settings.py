"""Settings from the environment, API keys, and the store's database URL."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import psycopg.conninfo
import pytest

from common.errors import InvalidArgument
from common.settings import ApiKeys, ConfigurationError, Settings, TlsFiles
from eventstore.persistence import PostgresParams, StoreConfig


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def write_keys(tmp_path: Path, data: object) -> str:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(data))
    return str(path)


# Settings.from_env


def test_defaults() -> None:
    settings = Settings.from_env({})

    assert settings.database_url == ""
    assert settings.data_dir == Path(".agentrun")
    assert settings.nats_urls == ("nats://127.0.0.1:4222",)
    assert settings.executor_target == "127.0.0.1:50052"
    assert settings.gateway_listen == "127.0.0.1:50051"
    assert settings.executor_listen == "127.0.0.1:50052"
    assert not settings.api_keys.enabled
    assert settings.event_retention == 604800.0
    assert settings.max_input_bytes == 65536
    assert settings.liveness_interval == 1.0
    assert settings.reconcile_interval == 5.0
    assert settings.internal_ping_interval == 5.0
    assert settings.drain_grace == 10.0
    assert settings.max_dispatch_failures == 5
    assert settings.executor_id.startswith("executor-")
    assert len(settings.executor_id) == len("executor-") + 8
    assert Settings.from_env({}).executor_id != settings.executor_id


def test_every_variable() -> None:
    settings = Settings.from_env(
        {
            "AGENTRUN_DATABASE_URL": "postgresql://db/agentrun",
            "AGENTRUN_DATA_DIR": "/var/lib/agentrun",
            "AGENTRUN_NATS_URL": "nats://n1:4222, nats://n2:4222",
            "AGENTRUN_EXECUTOR_TARGET": "dns:///executors:50052",
            "AGENTRUN_GATEWAY_LISTEN": "0.0.0.0:7000",
            "AGENTRUN_EXECUTOR_LISTEN": "0.0.0.0:7001",
            "AGENTRUN_API_KEYS": "acme:k1",
            "AGENTRUN_EVENT_RETENTION": "3600",
            "AGENTRUN_MAX_INPUT_BYTES": "1024",
            "AGENTRUN_EXECUTOR_ID": "executor-east",
            "AGENTRUN_LIVENESS_INTERVAL": "0.25",
            "AGENTRUN_RECONCILE_INTERVAL": "2.5",
            "AGENTRUN_INTERNAL_PING_INTERVAL": "1.5",
            "AGENTRUN_DRAIN_GRACE": "30",
            "AGENTRUN_MAX_DISPATCH_FAILURES": "3",
            "UNRELATED": "ignored",
        }
    )

    assert settings == Settings(
        database_url="postgresql://db/agentrun",
        data_dir=Path("/var/lib/agentrun"),
        nats_urls=("nats://n1:4222", "nats://n2:4222"),
        executor_target="dns:///executors:50052",
        gateway_listen="0.0.0.0:7000",
        executor_listen="0.0.0.0:7001",
        api_keys=ApiKeys({sha256("k1"): "acme"}),
        event_retention=3600.0,
        max_input_bytes=1024,
        executor_id="executor-east",
        liveness_interval=0.25,
        reconcile_interval=2.5,
        internal_ping_interval=1.5,
        drain_grace=30.0,
        max_dispatch_failures=3,
    )


def test_empty_variables_mean_the_defaults() -> None:
    names = ["DATA_DIR", "NATS_URL", "GATEWAY_LISTEN", "MAX_INPUT_BYTES", "API_KEYS"]
    settings = Settings.from_env({f"AGENTRUN_{name}": "" for name in names})

    assert settings.data_dir == Path(".agentrun")
    assert settings.nats_urls == ("nats://127.0.0.1:4222",)
    assert settings.gateway_listen == "127.0.0.1:50051"
    assert settings.max_input_bytes == 65536
    assert not settings.api_keys.enabled


@pytest.mark.parametrize(
    "name",
    [
        "EVENT_RETENTION",
        "MAX_INPUT_BYTES",
        "LIVENESS_INTERVAL",
        "RECONCILE_INTERVAL",
        "INTERNAL_PING_INTERVAL",
        "DRAIN_GRACE",
    ],
)
def test_a_malformed_number_raises_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="lots"):
        Settings.from_env({f"AGENTRUN_{name}": "lots"})


@pytest.mark.parametrize("value", ["0", "-1"])
def test_the_internal_ping_interval_is_above_zero(value: str) -> None:
    with pytest.raises(ConfigurationError, match="INTERNAL_PING_INTERVAL"):
        Settings.from_env({"AGENTRUN_INTERNAL_PING_INTERVAL": value})


def test_the_drain_grace_may_be_zero_but_not_negative() -> None:
    assert Settings.from_env({"AGENTRUN_DRAIN_GRACE": "0"}).drain_grace == 0.0
    with pytest.raises(ConfigurationError, match="DRAIN_GRACE"):
        Settings.from_env({"AGENTRUN_DRAIN_GRACE": "-1"})


def test_blank_nats_url_entries_are_dropped() -> None:
    settings = Settings.from_env({"AGENTRUN_NATS_URL": "nats://n1:4222, ,nats://n2:4222,"})

    assert settings.nats_urls == ("nats://n1:4222", "nats://n2:4222")


# API keys


def test_api_keys_from_the_env_string() -> None:
    keys = Settings.from_env(
        {"AGENTRUN_API_KEYS": "acme:key-1, globex:key-2 ,acme:key:3,"}
    ).api_keys

    assert keys.enabled
    assert keys.tenant_of("key-1") == "acme"
    assert keys.tenant_of("key-2") == "globex"
    assert keys.tenant_of("key:3") == "acme"  # a key may hold ':'
    assert keys.tenant_of("key-4") is None
    assert keys.tenant_of("") is None
    assert keys.tenant_of("acme") is None


def test_api_keys_are_held_only_as_digests() -> None:
    keys = ApiKeys.parse("acme:secret", None)

    assert dict(keys.digests) == {sha256("secret"): "acme"}


def test_api_key_digest_in_the_env_string() -> None:
    keys = ApiKeys.parse(f"acme:sha256:{sha256('hidden').upper()}", None)

    assert keys.tenant_of("hidden") == "acme"
    assert keys.tenant_of(f"sha256:{sha256('hidden')}") is None


def test_api_keys_from_a_file(tmp_path: Path) -> None:
    file = write_keys(
        tmp_path,
        {"acme": ["plain-key", f"sha256:{sha256('digest-key')}"], "globex": "only-key"},
    )

    keys = Settings.from_env({"AGENTRUN_API_KEYS_FILE": file}).api_keys

    assert keys.tenant_of("plain-key") == "acme"
    assert keys.tenant_of("digest-key") == "acme"
    assert keys.tenant_of("only-key") == "globex"
    assert keys.tenant_of("sha256:" + sha256("digest-key")) is None
    assert len(keys.digests) == 3


def test_api_keys_from_the_env_string_and_a_file_together(tmp_path: Path) -> None:
    file = write_keys(tmp_path, {"globex": ["from-file"]})

    keys = Settings.from_env(
        {"AGENTRUN_API_KEYS": "acme:from-env", "AGENTRUN_API_KEYS_FILE": file}
    ).api_keys

    assert (keys.tenant_of("from-env"), keys.tenant_of("from-file")) == ("acme", "globex")


def test_without_keys_api_keys_are_disabled() -> None:
    keys = ApiKeys.parse("", None)

    assert not keys.enabled
    assert keys.tenant_of("anything") is None


@pytest.mark.parametrize("pairs", ["acme", "acme:", ":key", " :key", "acme: ", "ok:1,broken"])
def test_malformed_env_entries_raise_value_error(pairs: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        ApiKeys.parse(pairs, None)


@pytest.mark.parametrize(
    "content",
    ['["acme", "key"]', '"acme:key"', "{not json", '{"acme": [""]}', '{"": ["key"]}'],
)
def test_malformed_key_files_raise_value_error(tmp_path: Path, content: str) -> None:
    file = tmp_path / "keys.json"
    file.write_text(content)

    with pytest.raises(ValueError):  # noqa: PT011 - the messages differ; the type is the contract
        ApiKeys.parse("", str(file))


@pytest.mark.parametrize("data", [{"acme": [123]}, {"acme": 5}, {"acme": [None]}], ids=str)
def test_key_file_entries_that_are_not_text_raise_value_error(tmp_path: Path, data: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        ApiKeys.parse("", write_keys(tmp_path, data))


@pytest.mark.parametrize("digest", ["", "not-hex", "abc123"])
def test_a_malformed_sha256_digest_raises_value_error(digest: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        ApiKeys.parse(f"acme:sha256:{digest}", None)


# StoreConfig.from_url


@pytest.mark.parametrize("url", [None, ""])
def test_no_url_means_sqlite_in_the_default_dir(url: str | None, tmp_path: Path) -> None:
    assert StoreConfig.from_url(url) == StoreConfig(sqlite_dir=Path(".agentrun"))
    assert StoreConfig.from_url(url, default_dir=tmp_path) == StoreConfig(sqlite_dir=tmp_path)


def test_sqlite_url() -> None:
    config = StoreConfig.from_url("sqlite:///var/lib/agent%20run")

    assert config == StoreConfig(sqlite_dir=Path("/var/lib/agent run"))
    assert not config.is_postgres
    assert config.describe() == "sqlite:/var/lib/agent run"


def test_sqlite_url_without_a_path_uses_the_default_dir(tmp_path: Path) -> None:
    assert StoreConfig.from_url("sqlite://", default_dir=tmp_path).sqlite_dir == tmp_path


def test_postgres_url_with_every_part() -> None:
    config = StoreConfig.from_url(
        "postgresql://alice:p%40ss%3Aw0rd@db.example.com:6543/agents?schema=tenant_1"
    )

    assert config.is_postgres
    assert config.postgres == PostgresParams(
        host="db.example.com",
        port=6543,
        user="alice",
        password="p@ss:w0rd",
        dbname="agents",
        schema="tenant_1",
    )


@pytest.mark.parametrize("url", ["postgres://", "postgresql://", "postgresql:///"])
def test_postgres_url_defaults(url: str) -> None:
    assert StoreConfig.from_url(url).postgres == PostgresParams(
        host="127.0.0.1", port=5432, user="postgres", password="", dbname="postgres"
    )


@pytest.mark.parametrize(
    "url", ["mysql://db/agents", "http://example.com", "file:///tmp/x", "/just/a/path"]
)
def test_an_unknown_scheme_is_invalid(url: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        StoreConfig.from_url(url)
    assert caught.value.field == "database url"


@pytest.mark.parametrize("schema", ["bad-name", "a%20b", "x%3Bdrop", "s%22q"])
def test_a_bad_schema_name_is_invalid(schema: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        StoreConfig.from_url(f"postgresql://db/agents?schema={schema}")
    assert caught.value.field == "database url"


def test_conninfo_quotes_every_value() -> None:
    params = PostgresParams(
        host="db.example.com", port=6543, user="o'neil", password="a b'c\\d", dbname="my db"
    )

    conninfo = params.conninfo()

    assert conninfo == (
        "host='db.example.com' port='6543' user='o\\'neil' dbname='my db' connect_timeout='3' "
        "password='a b\\'c\\\\d'"
    )
    # libpq reads back exactly the values given.
    assert psycopg.conninfo.conninfo_to_dict(conninfo) == {
        "host": "db.example.com",
        "port": "6543",
        "user": "o'neil",
        "dbname": "my db",
        "connect_timeout": "3",
        "password": "a b'c\\d",
    }


def test_conninfo_leaves_out_an_empty_password() -> None:
    params = PostgresParams(host="h", port=5432, user="u", password="", dbname="d")

    assert params.conninfo() == "host='h' port='5432' user='u' dbname='d' connect_timeout='3'"


def test_describe_hides_the_password() -> None:
    with_schema = StoreConfig.from_url("postgresql://alice:hunter2@db:6543/agents?schema=blue")
    without = StoreConfig.from_url("postgres://alice:hunter2@db/agents")

    assert with_schema.describe() == "postgresql://alice@db:6543/agents?schema=blue"
    assert without.describe() == "postgresql://alice@db:5432/agents"
    assert "hunter2" not in with_schema.describe() + without.describe()


def test_application_env_for_sqlite_creates_the_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "yet"
    config = StoreConfig.from_url(f"sqlite://{data_dir}")

    env = config.application_env("AgentCatalog")

    assert data_dir.is_dir()
    assert env == {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": str(data_dir / "agentcatalog.sqlite"),
        "SQLITE_LOCK_TIMEOUT": "10",
    }


def test_application_env_for_postgres() -> None:
    url = "postgresql://alice:s3cret@db:6543/agents"

    env = StoreConfig.from_url(f"{url}?schema=blue").application_env("AgentCatalog")

    assert env == {
        "PERSISTENCE_MODULE": "eventstore.postgres_recorders:PostgresFactory",
        "POSTGRES_DBNAME": "agents",
        "POSTGRES_HOST": "db",
        "POSTGRES_PORT": "6543",
        "POSTGRES_USER": "alice",
        "POSTGRES_PASSWORD": "s3cret",
        "POSTGRES_POOL_SIZE": "4",
        "POSTGRES_MAX_OVERFLOW": "8",
        "POSTGRES_CONNECT_TIMEOUT": "3",
        "POSTGRES_SCHEMA": "blue",
    }
    assert "POSTGRES_SCHEMA" not in StoreConfig.from_url(url).application_env("AgentCatalog")


def test_nats_replicas_default_to_one_and_are_read() -> None:
    assert Settings.from_env({}).nats_replicas == 1
    assert Settings.from_env({"AGENTRUN_NATS_REPLICAS": "3"}).nats_replicas == 3


def test_postgres_url_sets_pool_sizes() -> None:
    config = StoreConfig.from_url("postgresql://db/agents?schema=s&pool_size=2&max_overflow=0")
    assert config.postgres is not None
    assert (config.postgres.pool_size, config.postgres.max_overflow) == (2, 0)
    env = config.application_env("Runs")
    assert (env["POSTGRES_POOL_SIZE"], env["POSTGRES_MAX_OVERFLOW"]) == ("2", "0")
    defaults = StoreConfig.from_url("postgresql://db/agents").application_env("Runs")
    assert (defaults["POSTGRES_POOL_SIZE"], defaults["POSTGRES_MAX_OVERFLOW"]) == ("4", "8")


def test_postgres_url_sets_the_connect_timeout() -> None:
    config = StoreConfig.from_url("postgresql://db/agents?connect_timeout=7")
    assert config.postgres is not None
    assert "connect_timeout='7'" in config.postgres.conninfo()
    assert config.application_env("Runs")["POSTGRES_CONNECT_TIMEOUT"] == "7"


@pytest.mark.parametrize(
    "query", ["pool_size=0", "pool_size=x", "max_overflow=-1", "connect_timeout=0"]
)
def test_postgres_pool_sizes_must_be_counts(query: str) -> None:
    with pytest.raises(InvalidArgument):
        StoreConfig.from_url(f"postgresql://db/agents?{query}")


# TLS and internal access


def test_tls_settings_come_whole_or_not_at_all(tmp_path: Path) -> None:
    pem = str(tmp_path / "x.pem")
    settings = Settings.from_env(
        {
            "AGENTRUN_TLS_CERT": pem,
            "AGENTRUN_TLS_KEY": pem,
            "AGENTRUN_INTERNAL_TLS_CA": pem,
            "AGENTRUN_INTERNAL_TLS_CERT": pem,
            "AGENTRUN_INTERNAL_TLS_KEY": pem,
            "AGENTRUN_INTERNAL_TOKEN": "t",
        }
    )
    assert settings.tls == TlsFiles(Path(pem), Path(pem), None)
    assert settings.internal_tls == TlsFiles(Path(pem), Path(pem), Path(pem))
    assert settings.internal_token == "t"
    assert Settings.from_env({}).tls is None
    assert Settings.from_env({}).internal_tls is None
    assert not Settings.from_env({}).nats_tls
    for partial in (
        {"AGENTRUN_TLS_KEY": pem},
        {"AGENTRUN_TLS_CLIENT_CA": pem},
        {"AGENTRUN_INTERNAL_TLS_CA": pem, "AGENTRUN_INTERNAL_TLS_CERT": pem},
        {"AGENTRUN_NATS_TLS_CERT": pem},
    ):
        with pytest.raises(ConfigurationError):
            Settings.from_env(partial)
    assert Settings.from_env({"AGENTRUN_NATS_TLS_CA": pem}).nats_tls


def test_tenant_quotas_default_to_no_limit_and_are_read() -> None:
    assert not Settings.from_env({}).tenant_quotas.enabled
    quotas = Settings.from_env(
        {"AGENTRUN_TENANT_MAX_CONCURRENT_RUNS": "5", "AGENTRUN_TENANT_RUNS_PER_MINUTE": "60"}
    ).tenant_quotas
    assert (quotas.max_concurrent_runs, quotas.runs_per_minute) == (5, 60)
    with pytest.raises(ValueError, match="a limit is a count"):
        Settings.from_env({"AGENTRUN_TENANT_RUNS_PER_MINUTE": "-1"})


def test_metrics_are_served_only_where_asked() -> None:
    assert Settings.from_env({}).metrics_listen == ""
    listen = {"AGENTRUN_METRICS_LISTEN": "0.0.0.0:9464"}
    assert Settings.from_env(listen).metrics_listen == "0.0.0.0:9464"


@pytest.mark.parametrize("listen", ["9464x", "localhost", "host:"])
def test_a_metrics_address_without_a_port_is_refused(listen: str) -> None:
    with pytest.raises(ConfigurationError):
        Settings.from_env({"AGENTRUN_METRICS_LISTEN": listen})
