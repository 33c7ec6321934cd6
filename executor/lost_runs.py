"""Classic runs whose executor is gone: deciding it, and recording how each ended, once.

A classic run lives in one executor's memory. It is lost when no process answers its control
subject (asked twice, on a connection that has settled: see NatsLink.holder_answers) — unless
it ended before its executor went, which its row in the run list then says (the executor
records a run's end there before the end goes out).

The row is the arbiter. Moving it from active to ended is a conditional update
(RunList.update_active) that only one writer wins: the run's executor recording the end it
reached, or a reporter recording EXECUTOR_LOST. A reporter appends EXECUTOR_LOST to the run's
stream only after winning the row, and an executor that finds its run's row already ended ends
the run as the row says; so the stream and the row never tell two different endings. Whoever
then finds the stream without an end appends the row's (fenced: once, however many report it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from agentrun.v1 import run_pb2
from common import metrics
from common.event_streams import append_end, is_terminal, last_published
from eventstore.run_list import RunRecord
from eventstore.run_status import TERMINAL_STATUSES
from executor.context import ExecutorContext
from executor.translation import error_of, usage_of

log = logging.getLogger(__name__)

# Seconds before "nobody holds the run" is asked again and believed: the executor of a run
# that has just started may not have its control subscription at the server yet (it is not
# flushed, to keep a round trip off the first-token path).
CONFIRM_LOSS_AFTER = 0.25
# Internal ping intervals a lost run's stream stays quiet before a settle that brings no relayed
# events ends it: longer than a gateway takes to notice its executor gone (a frozen one: two
# intervals of unanswered pings) and report what it relayed.
QUIET_BEFORE_LOST = 3
# A classic run this young may not answer its control subject yet: the reconciler and readers
# leave it be unless its stream has ended.
SETTLING_TIME = 5.0
EXECUTOR_LOST_MESSAGE = "the executor running this classic run went away; the run is lost"


class LostRuns:
    """Settles classic runs whose executor may be gone (see module docstring)."""

    def __init__(
        self,
        ctx: ExecutorContext,
        held_here: Callable[[str], bool],
        movable: Callable[[str], bool],
    ) -> None:
        self.ctx = ctx
        self.held_here = held_here
        self.movable = movable  # whether runs of an execution mode can move (see executor.modes)

    async def settle(
        self,
        tenant: str,
        run_id: str,
        *,
        min_age: float = 0.0,
        relayed: Sequence[run_pb2.RunEvent] = (),
    ) -> RunRecord:
        """Checks whether a classic run's executor is gone; if it is, makes the run's row and
        stream say how the run ended, and returns the row.

        ``relayed``: events a gateway gave its client that the stream may lack (the executor
        died before publishing them); they are appended before the end. A run younger than
        ``min_age`` seconds is only settled if its stream has ended: its executor may not have
        subscribed yet.
        """
        run_list = self.ctx.run_list
        record = await asyncio.to_thread(run_list.get, tenant, run_id)
        if self.movable(record.execution_mode) or self.held_here(run_id):
            return record
        if not await self._holder_gone(run_id):
            return record
        if record.status not in TERMINAL_STATUSES:
            _, last = await last_published(self.ctx.link, run_id)
            stream_end = last if last is not None and is_terminal(last) else None
            if stream_end is None and not self._may_end(record, last, min_age, relayed):
                return record
            # The stream may have an end the row lacks (the row's update failed at the end).
            fields = ended_fields(stream_end)
            settled = await asyncio.to_thread(run_list.update_active, run_id, **fields)
            record = await asyncio.to_thread(run_list.get, tenant, run_id)
            if settled and stream_end is None:  # (a run that ended on its executor counted there)
                metrics.run_ended(
                    record.execution_mode,
                    record.agent_id,
                    record.status,
                    record.error_code,
                    record.created_at,
                )
        end = await append_end(self.ctx.link, run_id, tenant, end_event_of(record), relayed)
        if end is not None:
            log.info(
                "run %s: its executor is gone; its stream ends at %d (%s)",
                run_id,
                end.sequence,
                end.WhichOneof("kind"),
            )
        return record

    def _may_end(
        self,
        record: RunRecord,
        last: run_pb2.RunEvent | None,
        min_age: float,
        relayed: Sequence[run_pb2.RunEvent],
    ) -> bool:
        """Whether a run whose stream has no end may be given one now. A settle that brings no
        relayed events waits until the stream has been quiet for QUIET_BEFORE_LOST pings: the
        gateway that was streaming the run to its client (which may have given it events the
        dead executor never published) resumes at once and reports them, and the stream must
        end after what that client saw, not before it."""
        now = time.time()
        if now - record.created_at < min_age:
            return False
        if relayed:
            return True
        last_time = last.time.ToSeconds() if last is not None else record.created_at
        return now - last_time >= QUIET_BEFORE_LOST * self.ctx.settings.internal_ping_interval

    async def _holder_gone(self, run_id: str) -> bool:
        link = self.ctx.link
        if await link.holder_answers(run_id) is not False:
            return False
        await asyncio.sleep(CONFIRM_LOSS_AFTER)
        return await link.holder_answers(run_id) is False


def ended_fields(end: run_pb2.RunEvent | None) -> dict[str, Any]:
    """The run-list fields of a classic run that ended with ``end`` (None: it was lost)."""
    if end is not None and end.HasField("run_completed"):
        return {"status": "completed", "output": end.run_completed.output, "pending_approvals": []}
    if end is not None and end.HasField("run_cancelled"):
        return {"status": "cancelled", "pending_approvals": []}
    error = end.run_failed.error if end is not None else None
    if error is None:
        return {
            "status": "failed",
            "error_code": "EXECUTOR_LOST",
            "error_message": EXECUTOR_LOST_MESSAGE,
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


def end_event_of(record: RunRecord) -> run_pb2.RunEvent:
    """The terminal event of an ended run, as its row records it (no sequence yet)."""
    if record.status == "completed":
        completed = run_pb2.RunCompleted(output=record.output, usage=usage_of(record))
        return run_pb2.RunEvent(run_id=record.run_id, run_completed=completed)
    if record.status == "cancelled":
        return run_pb2.RunEvent(run_id=record.run_id, run_cancelled=run_pb2.RunCancelled())
    failed = run_pb2.RunFailed(error=error_of(record))
    return run_pb2.RunEvent(run_id=record.run_id, run_failed=failed)
