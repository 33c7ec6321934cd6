"""The run list projection: keeps durable runs' rows in the run list up to date from their
recorded events.

It follows the RunStore's notification log from a tracking position stored with the rows, and
writes a batch's rows and the new position in one transaction that fails if another process
moved the position first: every executor runs it, each notification is applied once, in order.
A row is written from the run's current state, and never over a row of a later version.
"""

from __future__ import annotations

import asyncio
import logging

from common.errors import AgentrunError
from executor.context import ExecutorContext
from executor.translation import record_of

log = logging.getLogger(__name__)

NAME = "run_list"
BATCH = 500


class RunListProjection:
    def __init__(self, ctx: ExecutorContext, poll_interval: float = 0.25) -> None:
        self.ctx = ctx
        self.poll_interval = poll_interval
        self._task: asyncio.Task[None] | None = None

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
        target = self.ctx.run_store.recorder.max_notification_id() or 0
        while self.ctx.run_list.projection_position(NAME) < target:
            self.catch_up_once()

    def catch_up_once(self) -> int:
        """Applies the next batch of notifications; returns how many there were."""
        run_list, store = self.ctx.run_list, self.ctx.run_store
        position = run_list.projection_position(NAME)
        notifications = store.recorder.select_notifications(start=position + 1, limit=BATCH)
        if not notifications:
            return 0
        run_ids = list(dict.fromkeys(str(n.originator_id) for n in notifications))
        records = [record_of(store.load(run_id, to_change=False), "") for run_id in run_ids]
        run_list.apply_projection(NAME, position, notifications[-1].id, records)
        return len(notifications)
