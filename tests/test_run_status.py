"""One definition of a run's ends: the statuses, and everything derived from them (the stream's
end events, the API's statuses, the run list's active rows)."""

from __future__ import annotations

from pathlib import Path

from agentrun.v1 import run_pb2
from common.event_streams import TERMINAL_KINDS, is_terminal
from eventstore.persistence import StoreConfig
from eventstore.run_list import RunList, RunRecord
from eventstore.run_status import ACTIVE_STATUSES, RUN_STATUSES, TERMINAL_STATUSES
from executor.translation import STATUS_ENUMS


def test_every_status_is_either_active_or_terminal() -> None:
    assert set(RUN_STATUSES) == ACTIVE_STATUSES | TERMINAL_STATUSES
    assert not ACTIVE_STATUSES & TERMINAL_STATUSES
    assert {"completed", "failed", "cancelled"} == TERMINAL_STATUSES


def test_the_stream_ends_with_the_event_of_a_terminal_status() -> None:
    kinds = {f.name for f in run_pb2.RunEvent.DESCRIPTOR.oneofs_by_name["kind"].fields}
    assert kinds >= TERMINAL_KINDS
    assert {f"run_{status}" for status in TERMINAL_STATUSES} == TERMINAL_KINDS
    assert is_terminal(run_pb2.RunEvent(run_cancelled=run_pb2.RunCancelled()))
    assert not is_terminal(run_pb2.RunEvent(text_delta=run_pb2.TextDelta()))


def test_the_apis_statuses_are_the_domains() -> None:
    assert set(STATUS_ENUMS) == set(RUN_STATUSES)


def test_the_run_list_treats_exactly_the_active_statuses_as_active(tmp_path: Path) -> None:
    run_list = RunList(StoreConfig(sqlite_dir=tmp_path))
    try:
        for status in RUN_STATUSES:
            run_list.claim(RunRecord(run_id=status, tenant="t", agent_id="a", status=status))
        assert {r.run_id for r in run_list.active_classic_runs()} == ACTIVE_STATUSES
        updated = {s for s in RUN_STATUSES if run_list.update_active(s, output="x")}
        assert updated == ACTIVE_STATUSES
    finally:
        run_list.close()
