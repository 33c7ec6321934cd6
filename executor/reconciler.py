"""Finding runs that lost their way, continuously (every executor runs this).

- A classic run whose executor is gone (no process answers its control subject, and its stream
  has not ended) is recorded as failed, EXECUTOR_LOST, in its stream and in the run list.
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
from typing import Any

from agentrun.run_events import append_executor_lost, is_terminal, last_published
from agentrun.v1 import run_pb2
from eventstore.run import TERMINAL_STATUSES
from eventstore.run_index import RunRecord
from executor import stored_runs
from executor.context import ExecutorContext
from executor.dispatch import WorkQueue
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
        for record in await asyncio.to_thread(self.ctx.index.active_classic_runs):
            if not self.held_here(record.run_id):
                await self.report_lost(record.tenant, record.run_id, SETTLING_TIME)
        now = time.time()
        stalled_before = now - 3 * self.queue.ack_wait
        for record in await asyncio.to_thread(self.ctx.index.durable_runs_due, stalled_before, now):
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

    async def report_lost(self, tenant: str, run_id: str, min_age: float = 0.0) -> RunRecord:
        """Checks whether a classic run's executor is gone; if so, records how the run ended.

        Idempotent: the check is "does any process answer the run's control subject", the
        published failure is fenced (see agentrun.run_events), and the row update is the same
        however often it is made. A run younger than ``min_age`` seconds is only recorded as
        lost if its stream already says so: its executor may not have subscribed yet.
        """
        record = await asyncio.to_thread(self.ctx.index.get, tenant, run_id)
        if not self.active_elsewhere(record):
            return record
        if await self.ctx.link.holder_answers(run_id) is not False:
            return record
        _, terminal = await last_published(self.ctx.link, run_id)
        if terminal is None or not is_terminal(terminal):
            if time.time() - record.created_at < min_age:
                return record
            terminal = await append_executor_lost(self.ctx.link, run_id, tenant)
        await asyncio.to_thread(self.ctx.index.update, run_id, **ended_fields(terminal))
        return await asyncio.to_thread(self.ctx.index.get, tenant, run_id)

    def active_elsewhere(self, record: RunRecord) -> bool:
        """A classic run, not ended, not held by this executor."""
        return (
            record.execution_mode == "classic"
            and record.status not in TERMINAL_STATUSES
            and not self.held_here(record.run_id)
        )


def ended_fields(terminal: run_pb2.RunEvent | None) -> dict[str, Any]:
    """The run-list fields of a classic run that ended with ``terminal`` (None: it was lost)."""
    if terminal is not None and terminal.HasField("run_completed"):
        return {"status": "completed", "output": terminal.run_completed.output}
    if terminal is not None and terminal.HasField("run_cancelled"):
        return {"status": "cancelled", "pending_approvals": []}
    error = terminal.run_failed.error if terminal is not None else None
    if error is None or error.code == run_pb2.RUN_ERROR_CODE_EXECUTOR_LOST:
        return {
            "status": "failed",
            "error_code": "EXECUTOR_LOST",
            "error_message": "the executor running this classic run went away; the run is lost",
            "error_retryable": True,
            "pending_approvals": [],
        }
    return {
        "status": "failed",
        "error_code": run_pb2.RunErrorCode.Name(error.code).removeprefix("RUN_ERROR_CODE_"),
        "error_message": error.message,
        "error_retryable": error.retryable,
        "pending_approvals": [],
    }
