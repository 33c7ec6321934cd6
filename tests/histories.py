"""The invariant every test must leave true: each ended run's published history agrees with the
run list — it is whole (sequences 1..n), ends with exactly one terminal event, and that event is
the end the run list records (the status, a completed run's output, a failed run's error code).

Checked for the runs a stack's store lists (every tenant), by reading the run list's table and
the runs' JetStream subjects directly: no gateway, no API key, nothing the services could hide.
Tests call it through Stack.verify_histories (at a stack's end, and after each test that uses
the shared stack).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from agentrun.v1 import run_pb2
from common.event_streams import is_terminal
from eventstore.persistence import StoreConfig
from eventstore.run_status import TERMINAL_STATUSES

if TYPE_CHECKING:
    from tests.stack import Stack

_ENDED_SQL = (
    "SELECT run_id, status, output, error_code FROM agentrun_runs "
    f"WHERE created_at >= %s AND status IN ({', '.join(['%s'] * len(TERMINAL_STATUSES))})"
)


@dataclass(frozen=True)
class Ended:
    """An ended run as the run list records it."""

    run_id: str
    status: str
    output: str
    error_code: str


def ended_runs(database_url: str, since: float) -> list[Ended]:
    """The ended runs created at or after ``since`` (epoch seconds), of every tenant."""
    config = StoreConfig.from_url(database_url)
    params: list[Any] = [since, *sorted(TERMINAL_STATUSES)]
    if config.postgres is None:
        path = config.sqlite_dir / "runindex.sqlite"
        if not path.exists():
            return []
        with sqlite3.connect(path) as conn:
            rows = conn.execute(_ENDED_SQL.replace("%s", "?"), params).fetchall()
    else:
        with psycopg.connect(config.postgres.conninfo()) as conn:
            if config.postgres.schema:
                conn.execute(f'SET search_path TO "{config.postgres.schema}"')
            exists = conn.execute("SELECT to_regclass('agentrun_runs')").fetchone()
            if exists is None or exists[0] is None:
                return []
            rows = conn.execute(_ENDED_SQL, params).fetchall()
    return [Ended(str(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


def disagreement(run: Ended, history: list[run_pb2.RunEvent]) -> str | None:
    """What is wrong with an ended run's published history; None if nothing is (or if nothing
    of it is retained: a run whose stream expired or was never published has nothing to tell)."""
    if not history:
        return None
    sequences = [e.sequence for e in history]
    if sequences != list(range(1, len(history) + 1)):
        return f"sequences {sequences[:5]}...{sequences[-5:]} are not 1..{len(history)}"
    ends = [e for e in history if is_terminal(e)]
    if not ends:
        return (
            f"the run list says {run.status}, the stream ends with {history[-1].WhichOneof('kind')}"
        )
    if ends != [history[-1]]:
        kinds = [e.WhichOneof("kind") for e in ends]
        return f"{len(ends)} terminal events ({kinds}), or one not last"
    end = history[-1]
    kind = end.WhichOneof("kind")
    if kind != f"run_{run.status}":
        return f"the run list says {run.status}, the stream ends with {kind}"
    if kind == "run_completed" and end.run_completed.output != run.output:
        return "the completed output differs from the run list's"
    if kind == "run_failed":
        code = run_pb2.RunErrorCode.Name(end.run_failed.error.code)
        if code.removeprefix("RUN_ERROR_CODE_") != run.error_code:
            return f"the run list says {run.error_code}, the stream {code}"
    return None


async def verify(stack: Stack, since: float) -> None:
    """Raises AssertionError naming every ended run whose history disagrees (see module
    docstring)."""
    from tests.stack import published_events

    wrong = []
    for run in ended_runs(stack.database_url, since):
        history = await published_events(stack, run.run_id)
        if history and not is_terminal(history[-1]):
            history = await published_events(stack, run.run_id, wait_for_end=10.0)
        problem = disagreement(run, history)
        if problem is not None:
            wrong.append(f"run {run.run_id}: {problem}")
    assert not wrong, "histories that disagree with the run list:\n" + "\n".join(wrong)
