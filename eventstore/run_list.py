"""The run list: one row per run, for GetRun and ListRuns, on SQLite or PostgreSQL.

Classic runs write their row directly (claimed at start, updated as the run changes state).
Starts are admitted against the tenant's quotas here too (``admit``), so that every executor
counts the same runs.
Writes use PostgreSQL's asynchronous commit: a row lost to a database crash belongs to a classic
run, which such a crash loses anyway, so the first-token path does not wait for an fsync.

Every method is synchronous: call it through a thread.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import psycopg
import psycopg.errors
import psycopg_pool

from common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from common.quotas import CONCURRENCY_RETRY_DELAY, RATE_WINDOW, TenantQuotas
from eventstore.messages import ToolCall
from eventstore.persistence import RECONNECT_TIMEOUT, StoreConfig
from eventstore.run_status import ACTIVE_STATUSES

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

_COLUMNS_SQL = """
    run_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    agent_version BIGINT NOT NULL,
    conversation_id TEXT NOT NULL,
    execution_mode TEXT NOT NULL,
    status TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    error_code TEXT NOT NULL,
    error_message TEXT NOT NULL,
    error_retryable BOOLEAN NOT NULL,
    pending_approvals TEXT NOT NULL,
    decisions TEXT NOT NULL,
    client_results TEXT NOT NULL DEFAULT '{}',
    executor_id TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    version BIGINT NOT NULL,
    forked_from_run_id TEXT NOT NULL,
    forked_at_version BIGINT NOT NULL,
    approval_deadline DOUBLE PRECISION NOT NULL
"""
_TRACKING_SQL = (
    "CREATE TABLE IF NOT EXISTS agentrun_projections "
    "(name TEXT PRIMARY KEY, position BIGINT NOT NULL)"
)
_LIST_INDEX_SQL = (
    "CREATE INDEX IF NOT EXISTS agentrun_runs_by_tenant "
    "ON agentrun_runs (tenant, created_at DESC, run_id DESC)"
)
# The active statuses as literals, not parameters: the planner uses a partial index only for
# a condition it can prove implies the index's, and a parameter proves nothing.
_IS_ACTIVE_SQL = f"status IN ({', '.join(repr(s) for s in sorted(ACTIVE_STATUSES))})"
# Active runs only: most rows are of ended runs, which the reconciler, the metrics and quota
# admission never look for. An index of every row grew with the table (so did its upkeep and
# the scans of its entries dead since their run ended); this one holds only the active runs.
_ACTIVE_INDEX_SQL = (
    "CREATE INDEX IF NOT EXISTS agentrun_runs_active_only "
    f"ON agentrun_runs (execution_mode, status) WHERE {_IS_ACTIVE_SQL}"
)
# One row per start admitted under a quota, kept a while: the rate window counts them, and a
# run not in the run list yet (a durable run's row is projected a moment after it is stored)
# counts as running.
_ADMISSIONS_SQL = (
    "CREATE TABLE IF NOT EXISTS agentrun_admissions "
    "(run_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, admitted_at DOUBLE PRECISION NOT NULL)"
)
_ADMISSIONS_INDEX_SQL = (
    "CREATE INDEX IF NOT EXISTS agentrun_admissions_by_tenant "
    "ON agentrun_admissions (tenant, admitted_at)"
)
_TENANT_ACTIVE_INDEX_SQL = (
    "CREATE INDEX IF NOT EXISTS agentrun_runs_active_by_tenant "
    f"ON agentrun_runs (tenant) WHERE {_IS_ACTIVE_SQL}"
)
# The indexes of every row the two above replace, dropped from run lists made before.
_REPLACED_INDEXES = ("agentrun_runs_active", "agentrun_runs_by_tenant_status")
ADMISSIONS_KEPT = 5 * RATE_WINDOW


@dataclass
class RunRecord:
    """One row of the run list."""

    run_id: str
    tenant: str
    agent_id: str
    request_id: str = ""
    agent_version: int = 0
    conversation_id: str = ""
    execution_mode: str = "classic"
    status: str = "running"
    input: str = ""
    output: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    error_code: str = ""
    error_message: str = ""
    error_retryable: bool = False
    pending_approvals: list[ToolCall] = field(default_factory=list)
    decisions: dict[str, bool] = field(default_factory=dict)
    # The results the client submitted, as digests (eventstore.run_commands.result_digest), by
    # tool call id: a classic run's repeated result is recognised once the run has ended.
    client_results: dict[str, str] = field(default_factory=dict)
    executor_id: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    version: int = 0
    forked_from_run_id: str = ""
    forked_at_version: int = 0
    approval_deadline: float = 0.0


_FIELD_NAMES = tuple(f.name for f in fields(RunRecord))
_UPDATABLE = frozenset(_FIELD_NAMES) - {"run_id", "tenant", "created_at"}
_JSON_FIELDS = frozenset({"pending_approvals", "decisions", "client_results"})


@dataclass(frozen=True)
class RunFilter:
    agent_id: str = ""
    conversation_id: str = ""
    statuses: Sequence[str] = ()
    execution_mode: str = ""


class RunList:
    """The run list over one SQL database (see module docstring)."""

    def __init__(self, store: StoreConfig) -> None:
        self._db: _Database
        if store.postgres is None:
            store.sqlite_dir.mkdir(parents=True, exist_ok=True)
            # (The file keeps the name it had before the run list was called so: data dirs of
            # earlier versions stay readable.)
            self._db = _SqliteDatabase(str(store.sqlite_dir / "runindex.sqlite"))
        else:
            store.ensure_schema()
            pg = store.postgres
            self._db = _PostgresDatabase(pg.conninfo(), pg.schema, pg.connect_timeout)
        with self._db.cursor() as cur:
            cur.execute(f"CREATE TABLE IF NOT EXISTS agentrun_runs ({_COLUMNS_SQL})")
            # (A column added since the first version: run lists made before get it.)
            self._db.add_column(cur, "agentrun_runs", "client_results TEXT NOT NULL DEFAULT '{}'")
            cur.execute(_LIST_INDEX_SQL)
            cur.execute(_ACTIVE_INDEX_SQL)
            cur.execute(_TRACKING_SQL)
            cur.execute(_ADMISSIONS_SQL)
            cur.execute(_ADMISSIONS_INDEX_SQL)
            cur.execute(_TENANT_ACTIVE_INDEX_SQL)
            for index in _REPLACED_INDEXES:
                cur.execute(f"DROP INDEX IF EXISTS {index}")

    def close(self) -> None:
        self._db.close()

    def claim(self, record: RunRecord) -> RunRecord | None:
        """Inserts the run's row unless one exists. None if inserted; else the existing row.

        The run id is derived from (tenant, request_id) when there is a request_id, so a repeated
        start finds the first start's row: this insert is the idempotency check.
        """
        now = time.time()
        record.created_at = record.created_at or now
        record.updated_at = now
        values = _to_row(record)
        placeholders = ", ".join(["%s"] * len(values))
        with self._db.cursor() as cur:
            cur.execute(
                f"INSERT INTO agentrun_runs ({', '.join(_FIELD_NAMES)}) VALUES ({placeholders}) "
                "ON CONFLICT (run_id) DO NOTHING",
                values,
            )
            if cur.rowcount == 1:
                return None
            cur.execute(
                f"SELECT {', '.join(_FIELD_NAMES)} FROM agentrun_runs WHERE run_id = %s",
                (record.run_id,),
            )
            row = cur.fetchone()
        if row is None:  # deleted between the two statements: treat as a new claim
            return self.claim(record)
        return _from_row(row)

    def admit(self, tenant: str, run_id: str, quotas: TenantQuotas) -> None:
        """Admits a new run of ``tenant`` under its quotas, or raises ResourceExhausted.

        One tenant's admissions are serialised (a transaction-scoped advisory lock on
        PostgreSQL; SQLite has one writer at a time), so that executors starting the tenant's
        runs at the same moment never admit more than the quotas allow. A repeated start (its
        run is admitted or listed already) is admitted without counting again.
        """
        now = time.time()
        with self._db.cursor(transaction=True) as cur:
            if self._db.locks_per_key:
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"admit:{tenant}",))
            cur.execute(
                "SELECT 1 FROM agentrun_admissions WHERE run_id = %s "
                "UNION ALL SELECT 1 FROM agentrun_runs WHERE run_id = %s",
                (run_id, run_id),
            )
            if cur.fetchone() is not None:
                return
            cur.execute(
                "DELETE FROM agentrun_admissions WHERE tenant = %s AND admitted_at < %s",
                (tenant, now - ADMISSIONS_KEPT),
            )
            if quotas.runs_per_minute:
                cur.execute(
                    "SELECT count(*), min(admitted_at) FROM agentrun_admissions "
                    "WHERE tenant = %s AND admitted_at > %s",
                    (tenant, now - RATE_WINDOW),
                )
                started, oldest = cur.fetchone() or (0, None)
                if started >= quotas.runs_per_minute and oldest is not None:
                    raise ResourceExhausted(
                        "TENANT_RUNS_PER_MINUTE",
                        f"tenant {tenant!r} started {started} runs in the last minute; "
                        f"the limit is {quotas.runs_per_minute}",
                        retry_delay=max(0.0, oldest + RATE_WINDOW - now),
                        limit=quotas.runs_per_minute,
                    )
            if quotas.max_concurrent_runs:
                # One statement, so one snapshot: a run whose row is written between two
                # statements (a durable run's row projected, a classic run's claimed) would be
                # counted by neither its admission nor its row.
                cur.execute(
                    "SELECT (SELECT count(*) FROM agentrun_runs "
                    f"WHERE tenant = %s AND {_IS_ACTIVE_SQL}) + "
                    "(SELECT count(*) FROM agentrun_admissions a WHERE a.tenant = %s AND NOT "
                    "EXISTS (SELECT 1 FROM agentrun_runs r WHERE r.run_id = a.run_id))",
                    (tenant, tenant),
                )
                active = (cur.fetchone() or (0,))[0]
                if active >= quotas.max_concurrent_runs:
                    raise ResourceExhausted(
                        "TENANT_CONCURRENT_RUNS",
                        f"tenant {tenant!r} has {active} runs running or awaiting approval; "
                        f"the limit is {quotas.max_concurrent_runs}",
                        retry_delay=CONCURRENCY_RETRY_DELAY,
                        limit=quotas.max_concurrent_runs,
                    )
            cur.execute(
                "INSERT INTO agentrun_admissions (run_id, tenant, admitted_at) VALUES (%s, %s, %s)",
                (run_id, tenant, now),
            )

    def withdraw(self, run_id: str) -> None:
        """Forgets the admission of a run whose start failed before it was stored."""
        with self._db.cursor() as cur:
            cur.execute("DELETE FROM agentrun_admissions WHERE run_id = %s", (run_id,))

    def update(self, run_id: str, **changes: Any) -> None:
        self._update(run_id, changes, active_only=False)

    def update_active(self, run_id: str, **changes: Any) -> bool:
        """Updates the run's row unless it records an ended run; True if it was updated.

        A classic run's row is the arbiter of how it ended: its executor records the end here
        before the end goes out, and whoever finds the executor gone records EXECUTOR_LOST here
        before appending it to the run's stream. Only one of them can move the row from active
        to ended, so a run's stream and its row never tell two different endings.
        """
        return self._update(run_id, changes, active_only=True)

    def _update(self, run_id: str, changes: dict[str, Any], *, active_only: bool) -> bool:
        unknown = set(changes) - _UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        changes["updated_at"] = time.time()
        for name in _JSON_FIELDS & changes.keys():
            changes[name] = json.dumps(changes[name])
        assignments = ", ".join(f"{name} = %s" for name in changes)
        condition = f" AND {_IS_ACTIVE_SQL}" if active_only else ""
        with self._db.cursor() as cur:
            cur.execute(
                f"UPDATE agentrun_runs SET {assignments} WHERE run_id = %s{condition}",
                (*changes.values(), run_id),
            )
            updated: bool = cur.rowcount == 1
            return updated

    def remove(self, run_id: str) -> None:
        with self._db.cursor() as cur:
            cur.execute("DELETE FROM agentrun_runs WHERE run_id = %s", (run_id,))

    def get(self, tenant: str, run_id: str) -> RunRecord:
        with self._db.cursor() as cur:
            cur.execute(
                f"SELECT {', '.join(_FIELD_NAMES)} FROM agentrun_runs "
                "WHERE run_id = %s AND tenant = %s",
                (run_id, tenant),
            )
            row = cur.fetchone()
        if row is None:
            raise NotFound("run", run_id)
        return _from_row(row)

    def list_runs(
        self, tenant: str, run_filter: RunFilter, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[RunRecord], str]:
        """Runs newest first, a page at a time; the token encodes the filter it belongs to."""
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        filter_key = json.dumps(asdict(run_filter) | {"statuses": sorted(run_filter.statuses)})
        where = ["tenant = %s"]
        params: list[Any] = [tenant]
        for column in ("agent_id", "conversation_id", "execution_mode"):
            value = getattr(run_filter, column)
            if value:
                where.append(f"{column} = %s")
                params.append(value)
        if run_filter.statuses:
            where.append(f"status IN ({', '.join(['%s'] * len(run_filter.statuses))})")
            params.extend(run_filter.statuses)
        if page_token:
            created_at, last_id = _decode_page_token(page_token, filter_key)
            where.append("(created_at < %s OR (created_at = %s AND run_id < %s))")
            params.extend([created_at, created_at, last_id])
        with self._db.cursor() as cur:
            cur.execute(
                f"SELECT {', '.join(_FIELD_NAMES)} FROM agentrun_runs "
                f"WHERE {' AND '.join(where)} "
                "ORDER BY created_at DESC, run_id DESC LIMIT %s",
                (*params, size + 1),
            )
            rows = cur.fetchall()
        records = [_from_row(r) for r in rows[:size]]
        token = ""
        if len(rows) > size:
            last = records[-1]
            token = _encode_page_token(last.created_at, last.run_id, filter_key)
        return records, token

    def projection_position(self, name: str) -> int:
        """How far the projection ``name`` has applied its source's notifications."""
        with self._db.cursor() as cur:
            cur.execute("SELECT position FROM agentrun_projections WHERE name = %s", (name,))
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def apply_projection(
        self, name: str, from_position: int, to_position: int, records: Sequence[RunRecord]
    ) -> bool:
        """Writes ``records`` and moves the projection from ``from_position`` to ``to_position``
        in one transaction, unless another process moved it first (then nothing is written and
        False is returned). A row is only replaced by a record of the same or a later version."""
        columns = [n for n in _FIELD_NAMES if n != "created_at"]
        assignments = ", ".join(f"{n} = excluded.{n}" for n in columns if n != "run_id")
        placeholders = ", ".join(["%s"] * len(_FIELD_NAMES))
        with self._db.cursor(transaction=True) as cur:
            cur.execute(
                "INSERT INTO agentrun_projections (name, position) VALUES (%s, 0) "
                "ON CONFLICT (name) DO NOTHING",
                (name,),
            )
            cur.execute(
                "UPDATE agentrun_projections SET position = %s WHERE name = %s AND position = %s",
                (to_position, name, from_position),
            )
            if cur.rowcount != 1:
                return False
            for record in records:
                record.updated_at = record.updated_at or time.time()
                cur.execute(
                    f"INSERT INTO agentrun_runs ({', '.join(_FIELD_NAMES)}) "
                    f"VALUES ({placeholders}) ON CONFLICT (run_id) DO UPDATE SET {assignments} "
                    "WHERE agentrun_runs.version <= excluded.version",
                    _to_row(record),
                )
        return True

    def durable_runs_due(self, stalled_before: float, deadline_before: float) -> list[RunRecord]:
        """Durable runs that may need help: running ones that have not changed since
        ``stalled_before`` (their executor may be gone, or their dispatch lost), and suspended
        ones whose deadline (of an approval, or of a client's tool result) has passed
        ``deadline_before``."""
        with self._db.cursor() as cur:
            cur.execute(
                f"SELECT {', '.join(_FIELD_NAMES)} FROM agentrun_runs "
                f"WHERE execution_mode = 'durable' AND {_IS_ACTIVE_SQL} AND ("
                "(status = 'running' AND updated_at < %s) OR "
                "(status IN ('awaiting_approval', 'awaiting_tool_result') "
                "AND approval_deadline > 0 AND approval_deadline <= %s))",
                (stalled_before, deadline_before),
            )
            return [_from_row(r) for r in cur.fetchall()]

    def suspended_durable_runs(self) -> int:
        """How many durable runs are suspended awaiting a decision (of every tenant)."""
        with self._db.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM agentrun_runs "
                f"WHERE execution_mode = 'durable' AND {_IS_ACTIVE_SQL} "
                "AND status = 'awaiting_approval'"
            )
            row = cur.fetchone()
            return int(row[0]) if row is not None else 0

    def active_classic_runs(self) -> list[RunRecord]:
        """Classic runs not yet ended, for the reconciler that finds runs whose executor died."""
        with self._db.cursor() as cur:
            cur.execute(
                f"SELECT {', '.join(_FIELD_NAMES)} FROM agentrun_runs "
                f"WHERE execution_mode = 'classic' AND {_IS_ACTIVE_SQL}"
            )
            return [_from_row(r) for r in cur.fetchall()]


def _to_row(record: RunRecord) -> tuple[Any, ...]:
    values = asdict(record)
    for name in _JSON_FIELDS:
        values[name] = json.dumps(values[name])
    return tuple(values[name] for name in _FIELD_NAMES)


def _from_row(row: Sequence[Any]) -> RunRecord:
    values = dict(zip(_FIELD_NAMES, row, strict=True))
    for name in _JSON_FIELDS:
        values[name] = json.loads(values[name])
    values["error_retryable"] = bool(values["error_retryable"])
    return RunRecord(**values)


def _encode_page_token(created_at: float, run_id: str, filter_key: str) -> str:
    raw = json.dumps({"c": created_at, "r": run_id, "f": filter_key})
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_page_token(token: str, filter_key: str) -> tuple[float, str]:
    try:
        data = json.loads(base64.b64decode(token.encode(), altchars=b"-_", validate=True))
        created_at, run_id, key = float(data["c"]), str(data["r"]), str(data["f"])
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested too deep
        raise InvalidArgument("page_token", "is not a token from a previous response") from None
    if key != filter_key:
        raise InvalidArgument("page_token", "was issued for different filters")
    return created_at, run_id


class _Cursor:
    """The small part of a DB-API cursor this module uses, with %s placeholders everywhere."""

    def __init__(self, cursor: Any, placeholder: str) -> None:
        self._cursor = cursor
        self._placeholder = placeholder

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        if self._placeholder != "%s":
            sql = sql.replace("%s", self._placeholder)
        self._cursor.execute(sql, tuple(params))

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    def fetchone(self) -> Sequence[Any] | None:
        row: Sequence[Any] | None = self._cursor.fetchone()
        return row

    def fetchall(self) -> list[Sequence[Any]]:
        return list(self._cursor.fetchall())

    def columns(self, table: str) -> set[str]:
        self._cursor.execute(f"SELECT * FROM {table} LIMIT 0")
        return {d[0] for d in self._cursor.description}


class _Database:
    locks_per_key = False  # whether it has advisory locks (else it has one writer at a time)

    def cursor(self, transaction: bool = False) -> Any:
        raise NotImplementedError

    def add_column(self, cur: _Cursor, table: str, column_sql: str) -> None:
        """Adds the column unless the table has it (each one a transaction: one writer)."""
        if column_sql.split()[0] not in cur.columns(table):
            cur.execute(f"ALTER TABLE {table} ADD COLUMN {column_sql}")

    def close(self) -> None:
        raise NotImplementedError


class _SqliteDatabase(_Database):
    """One connection shared by threads under a lock: SQLite serialises writers anyway."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=10000")

    @contextmanager
    def cursor(self, transaction: bool = False) -> Iterator[_Cursor]:
        """Every use is one transaction here (``transaction`` is for the PostgreSQL twin)."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield _Cursor(cur, "?")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()


class _PostgresDatabase(_Database):
    locks_per_key = True

    def add_column(self, cur: _Cursor, table: str, column_sql: str) -> None:
        """(Executors may start together: the statement itself skips a column there is.)"""
        cur.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column_sql}")

    def __init__(self, conninfo: str, schema: str, timeout: float) -> None:
        if schema:
            conninfo += f" options='-c search_path={schema}'"

        def configure(conn: psycopg.Connection[Any]) -> None:
            conn.execute("SET synchronous_commit = off")

        # Autocommit: every statement is one round trip (none of this module's writes needs
        # more than one statement to be atomic).
        self._pool = psycopg_pool.ConnectionPool(
            conninfo,
            min_size=2,
            max_size=8,
            kwargs={"autocommit": True},
            configure=configure,
            open=True,
            timeout=timeout,  # the wait for a connection: a database that is down fails fast
            reconnect_timeout=RECONNECT_TIMEOUT,
        )

    @contextmanager
    def cursor(self, transaction: bool = False) -> Iterator[_Cursor]:
        """Statements commit one by one, or together with ``transaction``."""
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                if transaction:
                    with conn.transaction():
                        yield _Cursor(cur, "%s")
                else:
                    yield _Cursor(cur, "%s")
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise Unavailable("database", f"the database is unavailable: {exc}") from exc

    def close(self) -> None:
        self._pool.close()
