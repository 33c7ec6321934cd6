"""Where the store keeps its data: one database URL configures every application and read model.

- ``postgresql://user:password@host:port/dbname[?schema=name]``: PostgreSQL (production). Every
  application gets its own ``<name>_events`` table; read models get their own tables. The
  optional schema (created if missing) isolates one deployment or test session from another.
  ``pool_size=N`` (default 4) and ``max_overflow=M`` (default 8) size each application's
  connection pool: a process holds about three such pools, so many executors against one
  server need them smaller (or a bigger ``max_connections``, or a pooler in between).
  TLS: libpq's ``sslmode``, ``sslrootcert``, ``sslcert``, ``sslkey`` and ``sslcrl`` parameters
  reach every connection (the eventsourcing pools, the run list, pruning).
  ``connect_timeout=S`` (default 3) bounds both connecting and waiting for a pooled connection:
  while the server is down, calls fail (UNAVAILABLE) after that long instead of hanging.
- ``sqlite:///path/to/dir`` or no URL: SQLite files under that directory (default ./.agentrun).
  Each application gets its own file: eventsourcing always names its SQLite table
  ``stored_events``, so two applications must not share a file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from urllib.parse import parse_qs, unquote, urlparse
from uuid import UUID

import psycopg
import psycopg.errors
from eventsourcing.application import Application
from eventsourcing.persistence import ApplicationRecorder

from common.errors import InvalidArgument

DEFAULT_DATA_DIR = Path(".agentrun")
# libpq's TLS parameters, taken from the URL's query as they are.
SSL_PARAMETERS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# How long a connection pool keeps trying to replace a connection it lost, with a growing
# backoff (psycopg_pool's default is 5 minutes, by when the backoff has grown to minutes): after
# that it gives up, and the next call that needs a connection starts over at once, so that a
# database that is back is used within seconds.
RECONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class PostgresParams:
    host: str
    port: int
    user: str
    password: str
    dbname: str
    schema: str = ""
    pool_size: int = 4
    max_overflow: int = 8
    ssl: tuple[tuple[str, str], ...] = ()  # (libpq parameter, value): SSL_PARAMETERS
    connect_timeout: int = 3

    def conninfo(self) -> str:
        """A libpq connection string for psycopg (values quoted, password included)."""

        def quote(value: str) -> str:
            return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

        parts = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "dbname": self.dbname,
            "connect_timeout": str(self.connect_timeout),
        }
        if self.password:
            parts["password"] = self.password
        parts.update(self.ssl)
        return " ".join(f"{k}={quote(v)}" for k, v in parts.items())


@dataclass(frozen=True)
class StoreConfig:
    """Either ``postgres`` is set, or the store uses SQLite files under ``sqlite_dir``."""

    sqlite_dir: Path = DEFAULT_DATA_DIR
    postgres: PostgresParams | None = None

    @staticmethod
    def from_url(url: str | None, default_dir: Path = DEFAULT_DATA_DIR) -> StoreConfig:
        if not url:
            return StoreConfig(sqlite_dir=default_dir)
        parsed = urlparse(url)
        if parsed.scheme == "sqlite":
            path = unquote(parsed.path) or str(default_dir)
            return StoreConfig(sqlite_dir=Path(path))
        if parsed.scheme in ("postgres", "postgresql"):
            query = parse_qs(parsed.query)
            schema = query.get("schema", [""])[0]
            if schema and not schema.replace("_", "").isalnum():
                raise InvalidArgument("database url", "schema must be letters, digits and _")
            try:
                port = parsed.port or 5432
            except ValueError:
                raise InvalidArgument("database url", "the port must be a number") from None
            pool = {}
            for name in ("pool_size", "max_overflow", "connect_timeout"):
                if name in query:
                    value = query[name][0]
                    if not value.isdigit() or (name != "max_overflow" and int(value) < 1):
                        raise InvalidArgument("database url", f"{name} must be a count")
                    pool[name] = int(value)
            ssl = tuple((name, query[name][0]) for name in SSL_PARAMETERS if name in query)
            mode = dict(ssl).get("sslmode")
            if mode is not None and mode not in SSL_MODES:
                raise InvalidArgument("database url", f"sslmode must be one of {SSL_MODES}")
            return StoreConfig(
                postgres=PostgresParams(
                    host=parsed.hostname or "127.0.0.1",
                    port=port,
                    user=unquote(parsed.username or "postgres"),
                    password=unquote(parsed.password or ""),
                    dbname=(parsed.path or "/postgres").lstrip("/") or "postgres",
                    schema=schema,
                    ssl=ssl,
                    **pool,
                )
            )
        raise InvalidArgument("database url", "must start with postgresql:// or sqlite://")

    @property
    def is_postgres(self) -> bool:
        return self.postgres is not None

    @property
    def system(self) -> str:
        """The database's name in OpenTelemetry's ``db.system.name``."""
        return "sqlite" if self.postgres is None else "postgresql"

    def describe(self) -> str:
        """The store's location, without credentials, for logs."""
        if self.postgres is None:
            return f"sqlite:{self.sqlite_dir}"
        pg = self.postgres
        suffix = f"?schema={pg.schema}" if pg.schema else ""
        return f"postgresql://{pg.user}@{pg.host}:{pg.port}/{pg.dbname}{suffix}"

    def ensure_schema(self) -> None:
        """Creates the PostgreSQL schema if there is one and it is missing (idempotent)."""
        if self.postgres is None or not self.postgres.schema:
            return
        # Another process may create the schema at the same moment.
        duplicate = (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateSchema)
        with (
            psycopg.connect(self.postgres.conninfo(), autocommit=True) as db,
            contextlib.suppress(*duplicate),
        ):
            db.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.postgres.schema}"')

    @contextlib.contextmanager
    def creating_tables(self) -> Iterator[None]:
        """Holds, on PostgreSQL, a lock that one process at a time gets: executors starting
        together would otherwise create the same tables and functions at once, and PostgreSQL
        refuses concurrent ``CREATE OR REPLACE FUNCTION`` ("tuple concurrently updated")."""
        if self.postgres is None:
            yield
            return
        key = f"agentrun.tables:{self.postgres.schema}"
        with psycopg.connect(self.postgres.conninfo(), autocommit=True) as db:
            db.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))
            try:
                yield
            finally:
                db.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))

    def application_env(self, name: str) -> dict[str, str]:
        """The eventsourcing settings for the application called ``name``."""
        if self.postgres is None:
            self.sqlite_dir.mkdir(parents=True, exist_ok=True)
            return {
                "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": str(self.sqlite_dir / f"{name.lower()}.sqlite"),
                "SQLITE_LOCK_TIMEOUT": "10",
            }
        pg = self.postgres
        env = {
            "PERSISTENCE_MODULE": "eventstore.postgres_recorders:PostgresFactory",
            "POSTGRES_DBNAME": pg.dbname,
            "POSTGRES_HOST": pg.host,
            "POSTGRES_PORT": str(pg.port),
            "POSTGRES_USER": pg.user,
            "POSTGRES_PASSWORD": pg.password,
            "POSTGRES_POOL_SIZE": str(pg.pool_size),
            "POSTGRES_MAX_OVERFLOW": str(pg.max_overflow),
            "POSTGRES_CONNECT_TIMEOUT": str(pg.connect_timeout),
        }
        if pg.schema:
            env["POSTGRES_SCHEMA"] = pg.schema
        for name, value in pg.ssl:
            env[f"POSTGRES_{name.upper()}"] = value
        return env


class UnnotifiedApplication(Application[UUID]):
    """An application whose events nobody follows in order (no projection reads its log).

    Its recorder is an aggregate recorder: on PostgreSQL an application recorder locks its
    whole table on every save so that notification ids come in commit order, which serialises
    all writers of the application; without a notification log there is nothing to keep in order.
    Its ``notification_log`` must not be read.
    """

    def construct_recorder(self) -> ApplicationRecorder:
        return cast(ApplicationRecorder, self.factory.aggregate_recorder())
