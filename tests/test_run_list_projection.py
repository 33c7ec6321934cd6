"""The run list projection on every backend: the library's Projection dispatching recorded run
events to a batch (its view), each batch applied once, whichever executor applies it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from eventsourcing.persistence import Tracking

from common.errors import NotFound
from eventstore.persistence import StoreConfig
from eventstore.run import Run
from eventstore.run_list import RunFilter, RunList
from eventstore.run_store import RunStore
from executor.run_list_projection import (
    NAME,
    KnownRuns,
    RunListBatch,
    RunListChanges,
    apply_next_batch,
    catch_up,
)
from executor.translation import record_of
from tests.test_run_store import TENANT, call, new_run

EMAIL = call("c1", "send_email")


@dataclass
class Executor:
    """What an executor has of the store: its run list and RunStore (connections, cache)."""

    run_list: RunList
    runs: RunStore

    def close(self) -> None:
        self.runs.close()
        self.run_list.close()


def open_executor(store: StoreConfig) -> Executor:
    return Executor(RunList(store), RunStore(store))  # (RunList first: it makes the schema)


@pytest.fixture
def executor(store: StoreConfig) -> Iterator[Executor]:
    opened = open_executor(store)
    yield opened
    opened.close()


def started(runs: RunStore) -> Run:
    run = new_run()
    runs.create(run)
    return run


def assert_rows_are_the_runs(executor: Executor, runs: list[Run]) -> None:
    for run in runs:
        stored = executor.runs.load(run.run_id, to_change=False)
        assert executor.run_list.get(TENANT, run.run_id) == record_of(stored, "")
    last = executor.runs.recorder.max_notification_id()
    assert executor.run_list.projection_position(NAME) == last


def test_catching_up_writes_each_runs_row_as_the_run_is(executor: Executor) -> None:
    waiting, done, running = (started(executor.runs) for _ in range(3))
    waiting.record_model_call(1, "", [EMAIL], {"input_tokens": 2, "output_tokens": 3})
    waiting.require_approval(2, "c1", 1_000_000.0)
    executor.runs.commit(waiting)
    done.record_model_call(1, "hi", [], {"input_tokens": 1, "output_tokens": 1})
    done.complete("hi")
    executor.runs.commit(done)

    catch_up(executor.run_list, executor.runs)

    assert_rows_are_the_runs(executor, [waiting, done, running])
    statuses = {r.run_id: r.status for r in executor.run_list.list_runs(TENANT, RunFilter())[0]}
    assert statuses == {
        waiting.run_id: "awaiting_approval",
        done.run_id: "completed",
        running.run_id: "running",
    }
    view = RunListBatch(executor.run_list, executor.runs)
    last = executor.runs.recorder.max_notification_id()
    assert last is not None
    assert view.max_tracking_id(executor.runs.name) == last
    assert view.has_tracking_id(executor.runs.name, last)
    assert not view.has_tracking_id(executor.runs.name, last + 1)


def test_a_run_continued_over_batches_has_the_row_of_the_stored_run(
    store: StoreConfig, executor: Executor
) -> None:
    """A batch that continues a run the projection built before builds on it; one that
    continues a run it knows at an older version (another executor applied the batch between)
    reads the run from the store. Either way the row is the run as stored."""
    known = KnownRuns()
    other = open_executor(store)
    try:
        run = started(executor.runs)
        apply_next_batch(executor.run_list, executor.runs, known=known)
        run.record_model_call(1, "", [EMAIL], {"input_tokens": 2, "output_tokens": 3})
        run.require_approval(2, "c1", 1_000_000.0)
        executor.runs.commit(run)
        apply_next_batch(executor.run_list, executor.runs, known=known)  # built on the known
        assert_rows_are_the_runs(executor, [run])
        run = executor.runs.load(run.run_id)
        run.decide("c1", True, "", timed_out=False)
        executor.runs.commit(run)
        apply_next_batch(other.run_list, other.runs)  # another executor's batch
        run = executor.runs.load(run.run_id)
        run.record_tool_outcome(2, "c1", "sent", is_error=False)
        executor.runs.commit(run)
        apply_next_batch(executor.run_list, executor.runs, known=known)  # known is stale
        assert_rows_are_the_runs(executor, [run])
        run = executor.runs.load(run.run_id)
        run.complete("done")
        executor.runs.commit(run)
        apply_next_batch(executor.run_list, executor.runs, known=known)
        assert_rows_are_the_runs(executor, [run])
        assert executor.run_list.get(TENANT, run.run_id).status == "completed"
    finally:
        other.close()


def test_an_event_of_no_run_only_moves_the_position(executor: Executor) -> None:
    batch = RunListBatch(executor.run_list, executor.runs)
    RunListChanges(batch).process_event(object(), Tracking(executor.runs.name, 3))
    assert batch.commit(0)
    assert executor.run_list.projection_position(NAME) == 3
    assert executor.run_list.list_runs(TENANT, RunFilter()) == ([], "")


def test_a_batch_begun_before_another_executor_moved_the_position_writes_nothing(
    executor: Executor,
) -> None:
    run = started(executor.runs)
    late = RunListBatch(executor.run_list, executor.runs)
    changes = RunListChanges(late)
    for notification in executor.runs.recorder.select_notifications(start=1, limit=10):
        event = executor.runs.mapper.to_domain_event(notification)
        changes.process_event(event, Tracking(executor.runs.name, notification.id))
    assert apply_next_batch(executor.run_list, executor.runs) == 1  # another executor's batch
    executor.run_list.remove(run.run_id)  # as pruning does, once the row is applied

    assert not late.commit(0)

    with pytest.raises(NotFound):
        executor.run_list.get(TENANT, run.run_id)  # not written back
    assert executor.run_list.projection_position(NAME) == 1


def test_executors_following_at_once_apply_every_notification_in_order(
    store: StoreConfig, executor: Executor
) -> None:
    """Two executors follow the log in small batches while one of them records runs; the rows
    end as the runs are, and the position at the last notification."""
    followers = [executor, open_executor(store)]
    recorded: list[Run] = []
    writing = threading.Event()
    writing.set()

    def write() -> None:
        try:
            for n in range(30):
                run = started(executor.runs)
                run.record_model_call(1, f"answer {n}", [], {"input_tokens": 1, "output_tokens": 1})
                run.complete(f"answer {n}")
                executor.runs.commit(run)
                recorded.append(run)
        finally:
            writing.clear()

    def follow(other: Executor) -> None:
        known = KnownRuns()  # (as an executor's projection keeps it)
        while writing.is_set():
            apply_next_batch(other.run_list, other.runs, limit=3, known=known)
        catch_up(other.run_list, other.runs, limit=3, known=known)

    threads = [threading.Thread(target=write)]
    threads += [threading.Thread(target=follow, args=(f,)) for f in followers]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        catch_up(executor.run_list, executor.runs)
        assert len(recorded) == 30
        assert_rows_are_the_runs(executor, recorded)
        assert {r.status for r in executor.run_list.list_runs(TENANT, RunFilter())[0]} == {
            "completed"
        }
    finally:
        followers[1].close()
