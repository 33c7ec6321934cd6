"""RunList.admit on PostgreSQL, where rows are written while a start is admitted.

A run counts against its tenant's concurrency quota through its admission until its row is
in the run list (a durable run's row is projected a moment after it is stored), then through
its row. Whenever the row appears, the run must be counted once — never by neither.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from common.errors import ResourceExhausted
from common.quotas import TenantQuotas
from eventstore import run_list as run_list_module
from eventstore.persistence import StoreConfig
from eventstore.run_list import RunList, RunRecord
from tests.conftest import database_url_for, drop_schema

ONE_AT_A_TIME = TenantQuotas(max_concurrent_runs=1)


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[StoreConfig]:
    url = database_url_for("postgres", tmp_path)
    yield StoreConfig.from_url(url)
    drop_schema(url)


class Statements:
    """Counts the run list's SQL statements and, once, does something after the n-th."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._after: tuple[int, Callable[[], object]] | None = None
        execute = run_list_module._Cursor.execute

        def counted(cursor: Any, sql: str, params: Sequence[Any] = ()) -> None:
            execute(cursor, sql, params)
            self.count += 1
            if self._after is not None and self._after[0] == self.count:
                action, self._after = self._after[1], None
                action()

        monkeypatch.setattr(run_list_module._Cursor, "execute", counted)

    def restart(self, after: int = 0, action: Callable[[], object] | None = None) -> None:
        self.count = 0
        self._after = (after, action) if action is not None else None


def test_a_run_listed_while_another_is_admitted_still_counts(
    postgres: StoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two executors: one admits starts, the other lists an admitted run (as its projection
    # writes a durable run's row, or a classic start claims its row).
    admitting, listing = RunList(postgres), RunList(postgres)
    try:
        statements = Statements(monkeypatch)
        admitting.admit("probe", str(uuid.uuid4()), ONE_AT_A_TIME)
        statements.restart()
        with pytest.raises(ResourceExhausted):
            admitting.admit("probe", str(uuid.uuid4()), ONE_AT_A_TIME)
        refusal_statements = statements.count

        # The first run's row appears after each statement of the second run's admission in
        # turn: every time, the first run is counted and the second refused.
        for after in range(1, refusal_statements + 1):
            tenant, first = f"tenant-{after}", str(uuid.uuid4())
            admitting.admit(tenant, first, ONE_AT_A_TIME)
            row = RunRecord(run_id=first, tenant=tenant, agent_id="helper", status="running")
            statements.restart(after, functools.partial(listing.claim, row))
            with pytest.raises(ResourceExhausted, match="the limit is 1"):
                admitting.admit(tenant, str(uuid.uuid4()), ONE_AT_A_TIME)
            assert listing.get(tenant, first).status == "running"
    finally:
        admitting.close()
        listing.close()
