"""Finding runs that lost their way, continuously (every executor runs this).

- A classic run whose executor is gone is settled: recorded as failed, EXECUTOR_LOST, in the run
  list and its stream, or given the end it reached (see executor.lost_runs).
- A durable run that should be running but has not changed for a while and that no process
  holds (its executor died and its dispatch message is gone, or its dispatch was never
  published: a crash between commit and publish) is dispatched again, as a recovery.
- A suspended durable run whose approval deadline passed gets its approvals denied as timed out,
  and one whose client's tool result is late gives the model a tool error (the command a
  session waiting in memory gives itself; see executor.steering).

All of it is idempotent: holders are asked first, stream appends are fenced, store writes are
optimistic and dispatches are deduplicated, so several executors reconciling at once agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

from common.errors import AgentrunError
from eventstore.run_commands import TimeOutApprovals
from eventstore.run_status import WAITING_STATUSES
from executor.context import ExecutorContext
from executor.durable.dispatch import WorkQueue
from executor.lost_runs import SETTLING_TIME, LostRuns
from executor.periodic import every
from executor.session.sessions import Sessions
from executor.steering import Steering

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self,
        ctx: ExecutorContext,
        queue: WorkQueue,
        sessions: Sessions,
        lost: LostRuns,
        steering: Steering,
    ) -> None:
        self.ctx = ctx
        self.queue = queue
        self.sessions = sessions
        self.lost = lost
        self.steering = steering
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
            if not self.sessions.holds(record.run_id):
                await self.lost.settle(record.tenant, record.run_id, min_age=SETTLING_TIME)
        now = time.time()
        stalled_before = now - 3 * self.queue.ack_wait
        due = self.ctx.run_list.durable_runs_due
        for record in await asyncio.to_thread(due, stalled_before, now):
            if self.sessions.holds(record.run_id):
                continue
            if record.status in WAITING_STATUSES:
                with contextlib.suppress(AgentrunError):  # decided or ended meanwhile
                    command = TimeOutApprovals(now)
                    await self.steering.steer(record.tenant, record.run_id, command)
            elif await self.ctx.link.holder_answers(record.run_id) is False:
                await self._dispatch_again(record.run_id)

    async def _dispatch_again(self, run_id: str) -> None:
        load = functools.partial(self.ctx.run_store.load, run_id, to_change=False)
        run = await asyncio.to_thread(load)
        if not run.is_finished and not run.waits:
            log.info("run %s: no executor holds it; dispatching it again", run.run_id)
            await self.queue.dispatch(
                run.run_id, run.tenant, run.version, recovery=True, trace_context=run.trace_context
            )
