"""Changes to durable runs that no executor holds (suspended, queued, or orphaned): a decision,
a cancellation, an approval that timed out. Each is recorded in the store first (optimistic
concurrency: a conflict means the run changed meanwhile, so it is read again), then published
to the run's stream, then the run is dispatched if it can go on. Publishing and dispatching may
fail (NATS down): the executor that takes the run up publishes what its stream lacks, and the
reconciler dispatches runs that wait for nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time

import nats.errors

from common.errors import AgentrunError, Conflict, FailedPrecondition
from eventstore.run import Run
from executor.context import ExecutorContext
from executor.dispatch import WorkQueue
from executor.durable import publish_recorded

log = logging.getLogger(__name__)

ATTEMPTS = 10


async def decide(
    ctx: ExecutorContext,
    queue: WorkQueue,
    tenant: str,
    run_id: str,
    tool_call_id: str,
    approved: bool,
    reason: str,
) -> None:
    """Records a decision on a suspended run; a repeat of the recorded decision changes nothing."""
    for _ in range(ATTEMPTS):
        run = await asyncio.to_thread(ctx.run_store.load_for, tenant, run_id)
        if not run.check_decision(tool_call_id, approved):
            return
        run.decide(tool_call_id, approved, reason, False)
        if await _record(ctx, queue, run):
            return
    raise Conflict(f"run {run_id} is changing too fast; try again")


async def cancel(
    ctx: ExecutorContext, tenant: str, run_id: str, reason: str, *, held_here: bool = False
) -> bool:
    """Cancels a run nobody drives. False if another executor holds it now (cancel through
    it). ``held_here``: this executor is letting the run go, so its answer does not count."""
    for _ in range(ATTEMPTS):
        run = await asyncio.to_thread(ctx.run_store.load_for, tenant, run_id)
        if run.is_finished:
            raise FailedPrecondition(f"run {run_id} has already ended ({run.status})")
        if not held_here and await ctx.link.holder_answers(run_id):
            return False
        run.cancel(reason)
        if await _record(ctx, None, run):
            return True
    raise Conflict(f"run {run_id} is changing too fast; try again")


async def time_out_approvals(
    ctx: ExecutorContext, queue: WorkQueue, tenant: str, run_id: str
) -> None:
    """Denies, as timed out, the approvals of a suspended run whose deadline has passed."""
    for _ in range(ATTEMPTS):
        run = await asyncio.to_thread(ctx.run_store.load_for, tenant, run_id)
        now = time.time()
        expired = [c for c in run.awaiting_decision() if run.approvals_required[c["id"]] <= now]
        if not expired or run.is_finished:
            return
        for call in expired:
            run.decide(call["id"], False, "no decision before the approval timeout", True)
        if await _record(ctx, queue, run):
            return


async def _record(ctx: ExecutorContext, queue: WorkQueue | None, run: Run) -> bool:
    """Commits the run's new events, publishes them, dispatches the run if it can go on.
    False if the run changed meanwhile (nothing was recorded)."""
    recorded = list(run.pending_events)
    try:
        await asyncio.to_thread(ctx.run_store.commit, run)
    except Conflict:
        return False
    try:
        await publish_recorded(ctx.link, run, recorded)
        if queue is not None and not run.is_finished and not run.awaiting_decision():
            await queue.dispatch(run.run_id, run.tenant, run.version)
    except (TimeoutError, AgentrunError, nats.errors.Error) as exc:
        log.warning("run %s: recorded, not yet published or dispatched: %s", run.run_id, exc)
    return True
