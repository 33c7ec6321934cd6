"""Finding runs that lost their way, continuously (every executor runs this).

- A classic run whose executor is gone is settled: recorded as failed, EXECUTOR_LOST, in the run
  list and its stream, or given the end it reached (see executor.lost_runs).
- A durable run that should be running but has not changed for a while and that no process
  holds (its executor died and its dispatch message is gone, or its dispatch was never
  published: a crash between commit and publish) is dispatched again, as a recovery.
- A suspended durable run whose approval deadline passed gets its approvals denied as timed out.

All of it is idempotent: holders are asked first, stream appends are fenced, store writes are
optimistic and dispatches are deduplicated, so several executors reconciling at once agree.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

from eventstore.run_list import RunRecord
from eventstore.run_status import TERMINAL_STATUSES
from executor import stored_runs
from executor.context import ExecutorContext
from executor.dispatch import WorkQueue
from executor.lost_runs import LostRuns
from executor.periodic import every

log = logging.getLogger(__name__)

SETTLING_TIME = 5.0  # a classic run this young may not answer its control subject yet


class Reconciler:
    def __init__(
        self, ctx: ExecutorContext, queue: WorkQueue, held_here: Callable[[str], bool]
    ) -> None:
        self.ctx = ctx
        self.queue = queue
        self.held_here = held_here
        self.lost = LostRuns(ctx, held_here)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(
            every(self.ctx.settings.reconcile_interval, self.once, "reconciler"), name="reconciler"
        )

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def once(self) -> None:
        if not self.ctx.link.is_connected:
            return
        for record in await asyncio.to_thread(self.ctx.run_list.active_classic_runs):
            if not self.held_here(record.run_id):
                await self.lost.settle(record.tenant, record.run_id, min_age=SETTLING_TIME)
        now = time.time()
        stalled_before = now - 3 * self.queue.ack_wait
        for record in await asyncio.to_thread(
            self.ctx.run_list.durable_runs_due, stalled_before, now
        ):
            if self.held_here(record.run_id):
                continue
            if record.status == "awaiting_approval":
                await stored_runs.time_out_approvals(
                    self.ctx, self.queue, record.tenant, record.run_id
                )
            elif await self.ctx.link.holder_answers(record.run_id) is False:
                run = await asyncio.to_thread(
                    functools.partial(self.ctx.run_store.load, record.run_id, to_change=False)
                )
                if not run.is_finished and not run.awaiting_decision():
                    log.info("run %s: no executor holds it; dispatching it again", run.run_id)
                    await self.queue.dispatch(run.run_id, run.tenant, run.version, recovery=True)

    def active_elsewhere(self, record: RunRecord) -> bool:
        """A classic run, not ended, not held by this executor."""
        return (
            record.execution_mode == "classic"
            and record.status not in TERMINAL_STATUSES
            and not self.held_here(record.run_id)
        )
