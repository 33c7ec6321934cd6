"""Steering runs: one path for every command (eventstore.run_commands: a decision on a tool
call, a cancellation, the approval timeout), whatever the run's mode and wherever it is.

A command goes to whoever holds the run: a session on this executor, or the executor whose
session answers the run's control subject. When nobody holds the run, or its holder is
letting it go, the command is recorded in the store: optimistic concurrency, where a conflict
means the run changed or was taken up meanwhile and the command goes round again. What was
recorded is then published to the run's stream, and the run is dispatched if it can go on
(publishing and dispatching may fail with NATS down: the executor that takes the run up
publishes what its stream lacks, and the reconciler dispatches runs that wait for nothing).
A run that nobody holds and the store does not have (a classic run) is lost: it is settled
(executor.lost_runs) and the command refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats.errors

from common.errors import AgentrunError, Conflict, FailedPrecondition, NotFound, Unavailable
from eventstore.run import Run
from eventstore.run_commands import Command, Decide, SubmitResult, result_digest
from eventstore.run_list import RunRecord
from eventstore.run_status import TERMINAL_STATUSES
from executor import control, run_metrics
from executor.context import ExecutorContext
from executor.durable.dispatch import WorkQueue
from executor.durable.stored_events import publish_recorded
from executor.lost_runs import LostRuns
from executor.session.sessions import Sessions

log = logging.getLogger(__name__)

ATTEMPTS = 10

RecordOf = Callable[[str, str], Awaitable[RunRecord]]
"""The run's row in the run list, for a tenant (NotFound for another tenant's run)."""


class Steering:
    """Carries commands to runs (see module docstring)."""

    def __init__(
        self,
        ctx: ExecutorContext,
        sessions: Sessions,
        queue: WorkQueue,
        lost: LostRuns,
        record_of: RecordOf,
    ) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.queue = queue
        self.lost = lost
        self.record_of = record_of

    async def steer(self, tenant: str, run_id: str, command: Command) -> None:
        for _ in range(ATTEMPTS):
            if await self._to_holder(tenant, run_id, command):
                return
            try:
                if await self._in_store(tenant, run_id, command):
                    return
            except Conflict:
                continue  # the run changed meanwhile (or was taken up): go round again
            await self._refuse_lost(tenant, run_id)
        raise Conflict(f"run {run_id} is changing too fast; try again")

    async def _to_holder(self, tenant: str, run_id: str, command: Command) -> bool:
        """Gives the command to the run's holder; False if nobody (here or elsewhere) takes it."""
        session = self.sessions.get(run_id)
        if session is not None:
            return await session.steer(tenant, command)
        record = await self.record_of(tenant, run_id)
        if record.status in TERMINAL_STATUSES:
            if isinstance(command, SubmitResult | Decide) and record.execution_mode == "durable":
                return False  # the store has the whole decision or result to compare with
            _refuse_ended(record, command)
            return True
        answer = await control.request(self.ctx.link, run_id, tenant, command)
        return answer is control.Answer.DONE

    async def _in_store(self, tenant: str, run_id: str, command: Command) -> bool:
        """Records the command in the store. False if the store does not have the run; raises
        Conflict if the run changed meanwhile."""
        try:
            run = await asyncio.to_thread(self.ctx.run_store.load_for, tenant, run_id)
        except NotFound:
            return False
        if not command.apply(run):
            return True  # a repeat: nothing to record
        recorded = list(run.pending_events)
        await asyncio.to_thread(self.ctx.run_store.commit, run)
        if run.is_finished:  # a suspended run cancelled: no session records its end
            run_metrics.ended(run)
        await self._announce(run, recorded)
        return True

    async def _announce(self, run: Run, recorded: Sequence[Any]) -> None:
        try:
            await publish_recorded(self.ctx.link, run, recorded)
            if not run.is_finished and not run.waits:
                await self.queue.dispatch(
                    run.run_id, run.tenant, run.version, trace_context=run.trace_context
                )
        except (TimeoutError, AgentrunError, nats.errors.Error) as exc:
            log.warning("run %s: recorded, not yet published or dispatched: %s", run.run_id, exc)

    async def _refuse_lost(self, tenant: str, run_id: str) -> None:
        """A run nobody holds and the store does not have: settled, then refused."""
        settled = await self.lost.settle(tenant, run_id)
        if settled.status in TERMINAL_STATUSES:
            raise FailedPrecondition(
                f"run {run_id} has already ended ({settled.status}): its executor went away"
            )
        raise Unavailable("executor", f"the executor holding run {run_id} did not answer")


def _refuse_ended(record: RunRecord, command: Command) -> None:
    """A command for an ended run: a repeat of its recorded decision or result is fine, all
    else fails."""
    if isinstance(command, SubmitResult) and command.tool_call_id in record.client_results:
        recorded = record.client_results[command.tool_call_id]
        if recorded == result_digest(command.output, command.is_error):
            return
        raise FailedPrecondition(
            f"tool call {command.tool_call_id!r} already has another result; a result cannot change"
        )
    if isinstance(command, Decide) and command.tool_call_id in record.decisions:
        if record.decisions[command.tool_call_id] == command.approved:
            return
        verdict = "approved" if record.decisions[command.tool_call_id] else "denied"
        raise FailedPrecondition(
            f"tool call {command.tool_call_id!r} was already {verdict}; a decision cannot change"
        )
    raise FailedPrecondition(f"run {record.run_id} has already ended ({record.status})")
