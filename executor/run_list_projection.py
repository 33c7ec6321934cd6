"""The run list projection: keeps durable runs' rows in the run list up to date from their
recorded events.

Every executor runs it. It follows the RunStore's notification log from a position stored with
the rows, a batch of notifications at a time; a batch writes its runs' rows and the new position
in one transaction that fails if another process moved the position first, so each
notification is applied once, in order. A row is written from the run's state after the batch,
and never over a row of a later version. Readers that must see their own writes call
``catch_up``.

It is built on the eventsourcing library's projection pieces that fit:

- ``Projection`` (RunListChanges): ``process_event`` dispatches on each event's class, with the
  event's ``Tracking`` (its position in the log); an event of a run refreshes that run's row,
  written from the run's state after the batch: built from the batch's events where they begin
  with the run's creation or continue a run the projection built before (KnownRuns), read
  from the store otherwise.
- ``TrackingRecorder`` (RunListBatch, the projection's view): it knows where the projection is
  (``max_tracking_id``, and so ``has_tracking_id``/``wait``) and records what each event did, a
  batch as one unit.

And not the others, for these reasons:

- ``ProjectionRunner``/``ApplicationSubscription``: there is no subscription on SQLite (its
  recorder's ``subscribe`` raises NotImplementedError), so SQLite would need this follower
  anyway. The runner also builds an application of its own (a second RunStore per executor,
  with its own connection pool and cache), and is meant as a projection's only runner: one that
  loses a tracking insert to another executor's stops with the error, while every executor
  runs this projection. It applies one event per transaction, where this applies a batch.
- The library's tracking tables and their recorders: their position moves to any larger
  notification id (single-row tracking: ``WHERE notification_id < new``), in a transaction of
  its own. Pruning needs a batch to move the position only from where the batch began, in the
  transaction of its rows: otherwise a batch that read a run before the run was pruned could
  write its row back after (see eventstore.pruning). So the position stays a row of
  ``agentrun_projections`` in the run list's own database (on SQLite a different file from the
  RunStore's), moved by RunList.apply_projection.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from uuid import UUID

from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.persistence import Tracking, TrackingRecorder
from eventsourcing.projection import Projection

from common.errors import AgentrunError
from eventstore.run import Run
from eventstore.run_list import RunList
from eventstore.run_store import RunStore
from executor.context import ExecutorContext
from executor.translation import record_of

log = logging.getLogger(__name__)

NAME = "run_list"
BATCH = 500
KNOWN_RUNS = 256


class KnownRuns:
    """Runs as the projection built them from their events, so that a batch that continues a
    run need not read it back from the store. Bounded; finished runs are not kept; safe between
    the background task and readers' catch-ups (a run is taken out while a batch works on it)."""

    def __init__(self, maxsize: int = KNOWN_RUNS) -> None:
        self._runs: dict[UUID, Run] = {}
        self._maxsize = maxsize
        self._lock = threading.Lock()

    def take(self, run_id: UUID) -> Run | None:
        with self._lock:
            return self._runs.pop(run_id, None)

    def keep(self, run: Run) -> None:
        if run.is_finished:
            return
        with self._lock:
            self._runs[run.id] = run
            while len(self._runs) > self._maxsize:
                del self._runs[next(iter(self._runs))]


class RunListBatch(TrackingRecorder):
    """The projection's view: one batch of notifications, applied to the run list as a unit
    (``commit``)."""

    def __init__(
        self, run_list: RunList, run_store: RunStore, known: KnownRuns | None = None
    ) -> None:
        self._run_list = run_list
        self._run_store = run_store
        self._known = known or KnownRuns()
        # Each run's events in the batch (ordered: rows are written in the log's order).
        self._runs: dict[UUID, list[Run.Event]] = {}
        self._reached = 0

    def max_tracking_id(self, application_name: str) -> int | None:
        """How far the projection has applied the RunStore's log (None: not at all)."""
        return self._run_list.projection_position(NAME) or None

    def insert_tracking(self, tracking: Tracking) -> None:
        """The batch has applied the event at ``tracking`` (one that changes no row)."""
        self._reached = max(self._reached, tracking.notification_id)

    def refresh(self, event: Run.Event, tracking: Tracking) -> None:
        """The batch has applied an event of the run: its row is written from its state."""
        self._runs.setdefault(event.originator_id, []).append(event)
        self.insert_tracking(tracking)

    def commit(self, from_position: int) -> bool:
        """Writes the batch's rows and moves the position from ``from_position`` to the last
        event applied, in one transaction; False if another process moved it first."""
        built: list[Run] = []
        records = []
        for run_id, events in self._runs.items():
            run = self._built(run_id, events)
            if run is not None:
                built.append(run)
            else:  # (the store's own copy: only read)
                run = self._run_store.load(str(run_id), to_change=False)
            records.append(record_of(run, ""))
        applied = self._run_list.apply_projection(NAME, from_position, self._reached, records)
        for run in built:
            self._known.keep(run)
        return applied

    def _built(self, run_id: UUID, events: list[Run.Event]) -> Run | None:
        """The run after the batch's events, built from them if they begin with its first
        event or continue a run the projection built before; None otherwise (the caller reads
        it from the store, where it may be ahead of the batch, as the row's version guard
        allows)."""
        run = self._known.take(run_id)
        first = events[0].originator_version
        if first == 1:
            run = None
        elif run is None or run.version + 1 != first:
            return None
        for event in events:
            run = event.mutate(run)
        return run


class RunListChanges(Projection[RunListBatch]):
    """What each recorded event changes in the run list."""

    name = NAME

    @singledispatchmethod
    def process_event(self, domain_event: object, tracking: Tracking) -> None:
        """An event of no run (the RunStore records none today): the position moves on."""
        self.view.insert_tracking(tracking)

    @process_event.register
    def _run_changed(self, domain_event: Run.Event, tracking: Tracking) -> None:
        self.view.refresh(domain_event, tracking)


class RunListProjection:
    """Follows the RunStore's log, in the background and for readers (see module docstring)."""

    def __init__(self, ctx: ExecutorContext, poll_interval: float = 0.25) -> None:
        self.ctx = ctx
        self.poll_interval = poll_interval
        self._task: asyncio.Task[None] | None = None
        self._known = KnownRuns()

    def start(self) -> None:
        self._task = asyncio.create_task(self._forever(), name="run-list-projection")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _forever(self) -> None:
        while True:
            try:
                applied = await asyncio.to_thread(self.catch_up_once)
            except AgentrunError as exc:
                log.warning("run list projection: %s", exc.message)
                applied = 0
            except Exception:
                log.exception("run list projection failed; trying again")
                applied = 0
            if applied < BATCH:
                await asyncio.sleep(self.poll_interval)

    def catch_up(self) -> None:
        """Applies everything recorded so far (for readers that must see their own writes).

        Safe next to the background task and other executors: applying is optimistic."""
        catch_up(self.ctx.run_list, self.ctx.run_store, known=self._known)

    def catch_up_once(self) -> int:
        """Applies the next batch of notifications; returns how many there were."""
        return apply_next_batch(self.ctx.run_list, self.ctx.run_store, known=self._known)


def catch_up(
    run_list: RunList, run_store: RunStore, limit: int = BATCH, known: KnownRuns | None = None
) -> None:
    """Applies what ``run_store`` has recorded so far to ``run_list``."""
    target = run_store.recorder.max_notification_id() or 0
    while run_list.projection_position(NAME) < target:
        apply_next_batch(run_list, run_store, limit, known)


def apply_next_batch(
    run_list: RunList, run_store: RunStore, limit: int = BATCH, known: KnownRuns | None = None
) -> int:
    """Applies the next batch (at most ``limit``) of ``run_store``'s notifications to
    ``run_list``, unless another process applies it first; returns how many there were."""
    # (A batch of its own each time: batches may run at once.)
    batch = RunListBatch(run_list, run_store, known)
    position = batch.max_tracking_id(run_store.name) or 0
    notifications = run_store.recorder.select_notifications(start=position + 1, limit=limit)
    if not notifications:
        return 0
    changes = RunListChanges(batch)
    for notification in notifications:
        event = run_store.mapper.to_domain_event(notification)
        changes.process_event(event, Tracking(run_store.name, notification.id))
    batch.commit(position)
    return len(notifications)
