"""Retention in the store: pruning the records of runs that finished long ago.

Synchronous (direct SQL on the store's tables): call it through a thread.

What a prune removes, for each run whose run-list row says it FINISHED (completed, failed or
cancelled) longer ago than the retention:

- its stored events and snapshots (the RunStore's ``runstore_events``/``runstore_snapshots`` on
  PostgreSQL, ``stored_events``/``stored_snapshots`` in ``runstore.sqlite`` on SQLite); the
  eventsourcing library's stores are append-only, so this is direct SQL on its tables;
- its run-list row (``agentrun_runs``), last: on SQLite the two live in different files, and a
  prune interrupted between them leaves a row whose events are gone, which the next pass finds
  (still finished, still old) and completes. On PostgreSQL a batch is one transaction.

After that GetRun, ListRuns, ListRunEvents and ForkRun treat the run as unknown (NOT_FOUND, or
left out of the list), and a new start with the same request id starts a new run: idempotency of
starts holds within the retention.

When a run finished: its row's ``updated_at``, i.e. the time of the last recorded event of a
durable run (its ending), and the last change of a classic run's row (its ending).

What it keeps:

- runs that have not finished (running, awaiting approval, queued), however old: a suspended run
  waits for a human for as long as it takes (its approval timeout ends it, if it has one);
- conversations: a conversation's turns are the conversation's own content, which its next runs
  read as their history. Removing a pruned run's turn would silently change what an agent sees
  in a conversation that is still in use; the conversation keeps the pruned run's id only as a
  reference (it de-duplicates turns). Conversations have no retention here;
- a fork of a pruned run (its history is a copy); its ``forked_from_run_id`` then names a run
  that is gone;
- agents; and JetStream, whose run event streams expire on their own (AGENTRUN_EVENT_RETENTION
  is the stream's max_age). Keep the store's retention at least as long, so that a run's stream
  is gone before its run id can be reused.

No archive: a prune deletes. An archive written by each executor to a local directory would be
scattered over machines and not atomic with the delete; an operator who must keep histories
longer raises the retention (0 keeps everything) or backs the database up.

Safe with several executors pruning at once:

- PostgreSQL: one pruner at a time. Each batch is one transaction that first takes a
  transaction-level advisory lock (``pg_try_advisory_xact_lock``, keyed by the schema); when
  another executor holds it, this pass stops (the holder goes on until nothing is left). Two
  pruners would do the same deletes twice, wait on each other's row locks, and could deadlock
  on rows taken in different orders; pruning is never urgent. The deletes are idempotent anyway
  (by run id), so a lock that goes with its connection leaves nothing half done.
- SQLite (one machine): writes are serialised by the files' locks, and every delete is
  idempotent: two pruners at once remove each run once, the second finds nothing left to delete.

Bounded: a batch is at most ``batch_size`` runs in short transactions (with a lock timeout on
PostgreSQL, where deleting events waits for, and holds off, the RunStore's table-locking saves
for the length of the batch); the caller runs batch after batch and may yield in between.

Two fences protect the run-list projection, which follows the RunStore's notification log:

- a run is only pruned once the projection has applied all its events (its events'
  notification ids are at or below the projection's position): otherwise the projection, having
  read the run before the prune, could write its row back after it;
- on SQLite the notification id is the events table's rowid, and SQLite gives a new row the
  largest rowid plus one: deleting the store's newest event would let the next event reuse its
  id, which the projection has already passed. A run that holds the newest event is left for a
  later pass (after anything newer has been written).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import psycopg.errors

from common.errors import Unavailable
from eventstore.persistence import StoreConfig
from eventstore.run_status import TERMINAL_STATUSES
from eventstore.run_store import RunStore

BATCH_RUNS = 100
LOCK_TIMEOUT = "5s"  # PostgreSQL: a batch that cannot get its locks soon gives up (next pass)
DEFAULT_PROJECTION = "run_list"

# The tables of the RunStore (eventsourcing's names; a test holds them to the library).
POSTGRES_EVENTS = "runstore_events"
POSTGRES_SNAPSHOTS = "runstore_snapshots"
SQLITE_EVENTS = "stored_events"
SQLITE_SNAPSHOTS = "stored_snapshots"

_FINISHED = tuple(sorted(TERMINAL_STATUSES))


@dataclass(frozen=True)
class PruneResult:
    """What a prune did: runs removed (their run-list rows), their events and snapshots, and
    finished old runs left for a later pass (see the module docstring's fences)."""

    runs: int = 0
    events: int = 0
    snapshots: int = 0
    deferred: int = 0

    def __add__(self, other: PruneResult) -> PruneResult:
        return PruneResult(
            self.runs + other.runs,
            self.events + other.events,
            self.snapshots + other.snapshots,
            self.deferred + other.deferred,
        )


@dataclass(frozen=True)
class Batch:
    """One batch's outcome, and whether there may be more to do."""

    result: PruneResult
    candidates: int  # finished old runs seen (at most the batch size)
    pruned: tuple[str, ...]
    batch_size: int

    @property
    def more(self) -> bool:
        """Whether another batch may find more: this one was full and got somewhere (runs left
        for later come first in the next batch again: a batch of only those ends the prune)."""
        return self.candidates >= self.batch_size and bool(self.pruned)


class RunPruner:
    """Prunes finished runs older than a retention (see module docstring). ``run_store``: this
    process's RunStore, whose cache then forgets the pruned runs."""

    def __init__(
        self,
        store: StoreConfig,
        run_store: RunStore | None = None,
        *,
        projection: str = DEFAULT_PROJECTION,
        batch_size: int = BATCH_RUNS,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.store = store
        self.run_store = run_store
        self.projection = projection
        self.batch_size = batch_size
        self._index_ready = False

    def prune(self, retention: float, now: float) -> PruneResult:
        """Prunes runs that finished before ``now - retention``, batch after batch, until none
        is left or another process is pruning. ``retention`` 0 (or less) keeps everything."""
        total = PruneResult()
        if retention <= 0:
            return total
        while True:
            batch = self.prune_batch(now - retention)
            if batch is None:
                return total
            total += batch.result
            if not batch.more:
                return total

    def prune_batch(self, finished_before: float) -> Batch | None:
        """One batch: up to ``batch_size`` runs that finished before ``finished_before`` (a
        time.time() value). None if another process is pruning now (PostgreSQL)."""
        batch: Batch | None
        try:
            self._ensure_index()
            if self.store.postgres is None:
                batch = self._sqlite_batch(finished_before)
            else:
                batch = self._postgres_batch(finished_before)
        except (psycopg.OperationalError, sqlite3.OperationalError) as exc:
            raise Unavailable("database", f"cannot prune finished runs now: {exc}") from exc
        if batch is not None and self.run_store is not None:
            for run_id in batch.pruned:
                self.run_store.forget(run_id)
        return batch

    # -- PostgreSQL -------------------------------------------------------------------------------

    def _postgres_batch(self, finished_before: float) -> Batch | None:
        pg = self.store.postgres
        assert pg is not None
        with self._postgres() as db, db.transaction(), db.cursor() as cur:
            cur.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            cur.execute(
                "SELECT pg_try_advisory_xact_lock(hashtext(%s))",
                (f"agentrun.retention:{pg.schema}",),
            )
            row = cur.fetchone()
            if row is None or not row[0]:
                return None
            cur.execute(
                "SELECT run_id, execution_mode FROM agentrun_runs "
                "WHERE status = ANY(%s) AND updated_at < %s ORDER BY updated_at LIMIT %s",
                (list(_FINISHED), finished_before, self.batch_size),
            )
            candidates = [(str(r[0]), str(r[1])) for r in cur.fetchall()]
            if not candidates:
                return Batch(PruneResult(), 0, (), self.batch_size)
            position = _position(cur, self.projection)
            durable = [UUID(run_id) for run_id, mode in candidates if mode == "durable"]
            newest: dict[str, int] = {}
            if durable:
                cur.execute(
                    f"SELECT originator_id, max(notification_id) FROM {POSTGRES_EVENTS} "
                    "WHERE originator_id = ANY(%s) GROUP BY originator_id",
                    (durable,),
                )
                newest = {str(r[0]): int(r[1]) for r in cur.fetchall()}
            deferred = {run_id for run_id, last in newest.items() if last > position}
            pruned = [run_id for run_id, _ in candidates if run_id not in deferred]
            ids = [UUID(run_id) for run_id in pruned if run_id in newest]
            # The run-list rows first: the events table is the one the RunStore's saves lock,
            # so it is touched last, for the shortest time.
            cur.execute(
                "DELETE FROM agentrun_runs WHERE run_id = ANY(%s) AND status = ANY(%s)",
                (pruned, list(_FINISHED)),
            )
            runs = cur.rowcount
            cur.execute(f"DELETE FROM {POSTGRES_SNAPSHOTS} WHERE originator_id = ANY(%s)", (ids,))
            snapshots = cur.rowcount
            cur.execute(f"DELETE FROM {POSTGRES_EVENTS} WHERE originator_id = ANY(%s)", (ids,))
            events = cur.rowcount
        return Batch(
            PruneResult(runs, events, snapshots, len(deferred)),
            len(candidates),
            tuple(pruned),
            self.batch_size,
        )

    @contextlib.contextmanager
    def _postgres(self) -> Iterator[psycopg.Connection[Any]]:
        pg = self.store.postgres
        assert pg is not None
        conninfo = pg.conninfo()
        if pg.schema:
            conninfo += f" options='-c search_path={pg.schema}'"
        with psycopg.connect(conninfo, connect_timeout=5) as db:
            yield db

    # -- SQLite -----------------------------------------------------------------------------------

    def _sqlite_batch(self, finished_before: float) -> Batch:
        directory = self.store.sqlite_dir
        with _sqlite(directory / "runindex.sqlite") as index:
            rows = index.execute(
                "SELECT run_id, execution_mode FROM agentrun_runs "
                f"WHERE status IN ({_marks(_FINISHED)}) AND updated_at < ? "
                "ORDER BY updated_at LIMIT ?",
                (*_FINISHED, finished_before, self.batch_size),
            ).fetchall()
            candidates = [(str(r[0]), str(r[1])) for r in rows]
            if not candidates:
                return Batch(PruneResult(), 0, (), self.batch_size)
            found = index.execute(
                "SELECT position FROM agentrun_projections WHERE name = ?", (self.projection,)
            ).fetchone()
            position = int(found[0]) if found else 0
            durable = {UUID(run_id).hex: run_id for run_id, mode in candidates if mode == "durable"}
            deferred: set[str] = set()
            events = snapshots = 0
            if durable:
                with _sqlite(directory / "runstore.sqlite") as runs, _transaction(runs):
                    deferred, events, snapshots = _delete_sqlite_events(runs, durable, position)
            pruned = [run_id for run_id, _ in candidates if run_id not in deferred]
            with _transaction(index):
                removed = index.execute(
                    f"DELETE FROM agentrun_runs WHERE run_id IN ({_marks(pruned)}) "
                    f"AND status IN ({_marks(_FINISHED)})",
                    (*pruned, *_FINISHED),
                ).rowcount
        return Batch(
            PruneResult(removed, events, snapshots, len(deferred)),
            len(candidates),
            tuple(pruned),
            self.batch_size,
        )

    # -- both -------------------------------------------------------------------------------------

    def _ensure_index(self) -> None:
        """An index for finding finished runs by age (idempotent; once per process)."""
        if self._index_ready:
            return
        sql = (
            "CREATE INDEX IF NOT EXISTS agentrun_runs_finished "
            "ON agentrun_runs (status, updated_at)"
        )
        if self.store.postgres is None:
            with _sqlite(self.store.sqlite_dir / "runindex.sqlite") as index:
                index.execute(sql)
        else:
            # Another executor may create it at the same moment.
            duplicate = (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable)
            with contextlib.suppress(*duplicate), self._postgres() as db:
                db.execute(sql)
        self._index_ready = True


def _position(cur: psycopg.Cursor[Any], projection: str) -> int:
    cur.execute("SELECT position FROM agentrun_projections WHERE name = %s", (projection,))
    row = cur.fetchone()
    return int(row[0]) if row else 0


def _delete_sqlite_events(
    runs: sqlite3.Connection, durable: dict[str, str], position: int
) -> tuple[set[str], int, int]:
    """Deletes the events and snapshots of the durable runs ``durable`` (stored key -> run id),
    but for those the fences keep (module docstring). Returns those kept, the events and the
    snapshots deleted. Call it in a write transaction: nothing may be inserted meanwhile."""
    (store_newest,) = runs.execute(f"SELECT max(rowid) FROM {SQLITE_EVENTS}").fetchone()
    newest = runs.execute(
        f"SELECT originator_id, max(rowid) FROM {SQLITE_EVENTS} "
        f"WHERE originator_id IN ({_marks(durable)}) GROUP BY originator_id",
        tuple(durable),
    ).fetchall()
    kept = {durable[str(key)] for key, last in newest if last > position or last >= store_newest}
    keys = [key for key, run_id in durable.items() if run_id not in kept]
    if not keys:
        return kept, 0, 0
    where = f"WHERE originator_id IN ({_marks(keys)})"
    snapshots = runs.execute(f"DELETE FROM {SQLITE_SNAPSHOTS} {where}", keys).rowcount
    events = runs.execute(f"DELETE FROM {SQLITE_EVENTS} {where}", keys).rowcount
    return kept, events, snapshots


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _marks(values: Sequence[Any] | dict[str, str]) -> str:
    return ", ".join("?" * len(values))


@contextlib.contextmanager
def _sqlite(path: Path) -> Iterator[sqlite3.Connection]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: the store has not been set up here")
    db = sqlite3.connect(str(path), isolation_level=None, timeout=10.0)
    try:
        db.execute("PRAGMA busy_timeout=10000")
        yield db
    finally:
        db.close()
