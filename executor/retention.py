"""The retention job: every executor prunes, now and then, the store's records of runs that
finished longer ago than AGENTRUN_RUN_RETENTION (what is removed and kept, and why several
executors may do it at once: eventstore.pruning).

| variable | default | meaning |
|---|---|---|
| AGENTRUN_RUN_RETENTION | 2592000 (30 days) | seconds a finished run's events, snapshots and |
|   |   | run-list row stay in the store; 0 keeps them forever |
| AGENTRUN_RETENTION_INTERVAL | 300 | seconds between an executor's prunes |

The first prune comes at a random moment within the first interval, so that executors started
together spread out. A prune goes batch by batch, each in a thread (the store is synchronous),
so the event loop and the store's other users get their turn between batches. JetStream's run
event streams expire on their own (AGENTRUN_EVENT_RETENTION, the stream's max_age).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from eventstore.persistence import StoreConfig
from eventstore.pruning import BATCH_RUNS, PruneResult, RunPruner
from eventstore.run_store import RunStore
from executor.context import ExecutorContext
from executor.periodic import every
from executor.run_list_projection import NAME as RUN_LIST_PROJECTION

log = logging.getLogger(__name__)


class RetentionJob:
    """Prunes finished runs older than ``retention`` seconds every ``interval`` seconds;
    ``retention`` 0 (or less) turns it off."""

    def __init__(
        self,
        store: StoreConfig,
        run_store: RunStore | None,
        *,
        retention: float,
        interval: float,
        batch_size: int = BATCH_RUNS,
    ) -> None:
        self.retention = retention
        self.interval = interval
        self.pruner = RunPruner(
            store, run_store, projection=RUN_LIST_PROJECTION, batch_size=batch_size
        )
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def of(ctx: ExecutorContext) -> RetentionJob:
        """The job of an executor, from its settings."""
        settings = ctx.settings
        if 0 < settings.run_retention < settings.event_retention or (
            settings.run_retention > 0 and settings.event_retention <= 0
        ):
            log.warning(
                "AGENTRUN_RUN_RETENTION (%.0f s) is shorter than AGENTRUN_EVENT_RETENTION (%s): "
                "pruned runs' event streams stay in JetStream after them",
                settings.run_retention,
                f"{settings.event_retention:.0f} s" if settings.event_retention > 0 else "forever",
            )
        return RetentionJob(
            ctx.store,
            ctx.run_store,
            retention=settings.run_retention,
            interval=settings.retention_interval,
        )

    @property
    def enabled(self) -> bool:
        return self.retention > 0

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(
                every(
                    self.interval,
                    self.once,
                    "retention",
                    first_after=random.uniform(0, self.interval),
                ),
                name="retention",
            )

    def stop(self) -> None:
        """Stops the job (a batch already in its thread still completes: it is short)."""
        if self._task is not None:
            self._task.cancel()

    async def wait_stopped(self) -> None:
        """Returns once the stopped job's task has ended."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def once(self, now: float | None = None) -> PruneResult:
        """One prune, batch by batch, of the runs that finished before ``now`` (default: the
        current time) minus the retention. Stops early when another executor is pruning.
        (RunPruner.prune, with a trip to a worker thread per batch: stopping the job takes
        effect between batches, not after the whole prune.)"""
        total = PruneResult()
        if not self.enabled:
            return total
        finished_before = (time.time() if now is None else now) - self.retention
        while True:
            batch = await asyncio.to_thread(self.pruner.prune_batch, finished_before)
            if batch is None:
                break
            total += batch.result
            if not batch.more:
                break
        if total.runs or total.deferred:
            log.info(
                "retention: pruned %d runs (%d events, %d snapshots); %d left for later",
                total.runs,
                total.events,
                total.snapshots,
                total.deferred,
            )
        return total
