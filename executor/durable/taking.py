"""Taking durable runs up from the dispatch work queue: claims, poison runs, failed take-ups.

A taken run is held in a session (executor.session) until it ends, suspends, is taken over or
handed back. A message delivered again (its previous taker stopped keeping it alive) or sent by
a reconciler first claims the run with a Resumed event; whatever the run recorded but its
stream does not show yet (its previous executor died between a commit and a publish) is
published first. A run whose step has had too many attempts (see
eventstore.run_steps.exhausted_attempts) is failed instead of resumed, and dead-lettered.

Taking a run up may also fail with an error: one that says nothing about the run (the database
or NATS out of reach, another executor changing the run meanwhile) leaves the message to be
delivered again after ``ack_wait``, as often as it takes; any other (a bug, data of the run this
version cannot read) gives the message back with a growing delay, and at the
AGENTRUN_MAX_DISPATCH_FAILURES-th delivery fails the run with DISPATCH_FAILED and dead-letters
it (see Taker._take_failed).

Draining (SIGTERM): the executor stops taking runs; its sessions hand theirs back (see
executor.session.sessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import AbstractContextManager
from typing import Any

import nats.errors
from opentelemetry.trace import Span, SpanKind

from common import metrics, tracing
from common.errors import Conflict, FailedPrecondition, NotFound, Unavailable
from common.event_streams import Published, published
from eventstore.run import Run
from eventstore.run_commands import Command
from eventstore.run_steps import ATTEMPTS_EXHAUSTED, exhausted_attempts
from executor import run_metrics
from executor.context import ExecutorContext
from executor.control import answering
from executor.durable.dispatch import Dispatch, WorkQueue
from executor.durable.stored_events import publish_recorded
from executor.modes import Durable
from executor.session.recording import store_span
from executor.session.session import RunSession
from executor.session.sessions import Sessions

log = logging.getLogger(__name__)

DISPATCH_FAILED = "DISPATCH_FAILED"
DEAD_LETTERED = frozenset({ATTEMPTS_EXHAUSTED, DISPATCH_FAILED})
# Failures of a take-up that say nothing about the run: the infrastructure comes back, or the
# executor that changed the run meanwhile has it.
PASSING_FAILURES = (Unavailable, Conflict, nats.errors.Error, TimeoutError, ConnectionError)
FAIL_ATTEMPTS = 10
MAX_ERROR_TEXT = 500


async def _changing_hands(tenant: str, command: Command) -> bool:
    raise FailedPrecondition("the run is changing hands; try again")


class Taker:
    """Takes durable runs from the work queue and holds them (see module docstring)."""

    def __init__(
        self,
        ctx: ExecutorContext,
        queue: WorkQueue,
        mode: Durable,
        sessions: Sessions,
        concurrency: int,
    ) -> None:
        self.ctx = ctx
        self.queue = queue
        self.mode = mode
        self.sessions = sessions
        self._slots = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task[None] | None = None
        self._taking: set[asyncio.Task[Any]] = set()
        self._claiming: set[str] = set()  # runs whose claim is being committed here
        self._draining = False

    def start(self) -> None:
        self._task = asyncio.create_task(self.queue.take_forever(self.take, self._slots))

    async def stop(self) -> None:
        """Stops taking runs from the queue."""
        self._draining = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_taken(self, wait: float) -> None:
        """Waits up to ``wait`` seconds for the take-ups under way to let their runs go."""
        if self._taking:
            await asyncio.wait(list(self._taking), timeout=wait)

    async def take(self, dispatch: Dispatch) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._taking.add(task)
        try:
            await self._take(dispatch)
        except PASSING_FAILURES as exc:
            log.warning("run %s: not taken up (%r); it is delivered again", dispatch.run_id, exc)
        except Exception as exc:
            await self._take_failed(dispatch, exc)
        finally:
            self._taking.discard(task)

    async def _take(self, dispatch: Dispatch) -> None:
        """Takes up a run from a dispatch message.

        A message delivered again or sent by a reconciler claims the run with a Resumed event
        before anything else; if a live executor still answers for the run, the message is a
        duplicate and is dropped instead (one that does not answer in time is taken to be
        stuck). Either way the store's optimistic concurrency decides, so two executors never
        both advance a run.
        """
        if self._draining:
            with contextlib.suppress(nats.errors.Error):
                await dispatch.msg.nak()
            return
        store = self.ctx.run_store
        taken_over = dispatch.deliveries > 1 or dispatch.recovery
        recent = self.mode.recent(dispatch.run_id)
        try:
            run = (
                recent
                if recent and not taken_over
                else await asyncio.to_thread(store.load, dispatch.run_id)
            )
        except NotFound:
            await dispatch.msg.term()
            return
        fresh = run.version == 1 and not taken_over
        if not fresh and await self.ctx.link.holder_answers(run.run_id) is True:
            await dispatch.msg.ack()  # a duplicate: the run's holder has it in hand
            return
        claiming = taken_over and not run.is_finished and not run.waits
        if claiming and run.run_id in self._claiming:
            await dispatch.msg.ack()  # a duplicate, being claimed here already
            return
        holding = False
        try:
            with _take_span(run, dispatch, self.ctx.executor_id) as taking:
                if claiming:
                    self._claiming.add(run.run_id)
                    if not await self._claim(run, dispatch):
                        return
                if run.error is not None and run.error["code"] in DEAD_LETTERED:
                    await self._dead_letter(run, dispatch)  # again if an earlier taker died first
                session, recorded_after = await self._session(run, dispatch, fresh)
                if taking.is_recording():
                    step_index = run.steps_completed + 1
                    taking.set_attribute("agentrun.step.index", step_index)
                    taking.set_attribute("agentrun.step.attempt", run.attempt_of(step_index))
            # The run's spans here are the take's children (it has ended: a span that lasted
            # as long as the session would be lost with an executor that dies).
            tracing.carry_on(taking)
            holding = True  # the session answers for the run from here on
            await self.sessions.hold(session, recorded_after)
        finally:
            if claiming:
                self._claiming.discard(run.run_id)
                if not holding:
                    await self.ctx.link.unsubscribe_control(run.run_id)

    async def _claim(self, run: Run, dispatch: Dispatch) -> bool:
        """Claims a run taken over from a gone executor: a Resumed event (or, for a run whose
        step had too many attempts, its failure). False if another executor claimed it first."""
        # This executor answers for the run before its claim is committed: whoever loads the
        # run after the claim then finds a holder and drops its duplicate message instead of
        # claiming the run again (another Resumed, another attempt).
        await self.ctx.link.subscribe_control(
            run.run_id, answering(_changing_hands, self.ctx.executor_id), flush=True
        )
        poisoned = exhausted_attempts(run, self.ctx.settings.max_step_attempts)
        if poisoned is None:
            run.resume(self.ctx.executor_id)
        else:
            run.fail(poisoned.code, poisoned.message, retryable=False)
        try:
            with store_span(self.ctx, run, "commit run events"):
                await asyncio.to_thread(self.ctx.run_store.commit, run)
        except Conflict:
            await dispatch.msg.ack()
            return False
        if poisoned is None:
            metrics.labelled(metrics.HANDOVERS, "resumed").inc()
        else:
            run_metrics.ended(run)
        return True

    async def _session(
        self, run: Run, dispatch: Dispatch, fresh: bool
    ) -> tuple[RunSession, list[Any]]:
        """The session that will hold a taken run, and the recorded events its stream lacks."""
        config = run.agent_config  # first: a run whose agent cannot be read fails at once
        state = Published() if fresh else await published(self.ctx.link, run.run_id)
        recorded_after = (
            []
            if fresh
            else await asyncio.to_thread(
                self.ctx.run_store.recorded_after, run.run_id, state.version
            )
        )
        session = self.mode.session(run, dispatch, state, config, fresh=fresh)
        if self._draining:  # it began while the run was being taken up
            session.hand_back()
        return session, recorded_after

    async def _take_failed(self, dispatch: Dispatch, exc: Exception) -> None:
        """Handles a take-up that raised an error that is not one of PASSING_FAILURES: the
        message comes back later (see WorkQueue.retry_later), until its
        AGENTRUN_MAX_DISPATCH_FAILURES-th delivery; a failure then ends the run (``_give_up``).

        Failures are counted by JetStream's delivery count of the message: they leave no other
        trace to count (the store may be what fails, and a delivered message cannot be
        changed). The trade-off: it also counts deliveries that ended otherwise (a drain's
        hand-back, an executor that died, an outage), so a run whose message was handed back k
        times is failed after max - k failures. Never without one, though: hand-backs and
        crashes alone do not fail a run here (crashes have their own limit,
        AGENTRUN_MAX_STEP_ATTEMPTS). Each failed take-up records that it let the run go
        (``_let_go``), so that it does not count towards that limit as well.
        """
        run_id, limit = dispatch.run_id, self.ctx.settings.max_dispatch_failures
        if await self.ctx.link.holder_answers(run_id) is True:
            with contextlib.suppress(nats.errors.Error):
                await dispatch.msg.ack()  # a duplicate: another executor holds the run
            return
        if dispatch.deliveries < limit:
            log.error(
                "run %s: taking it up failed (delivery %d; the limit is %d); trying again later",
                run_id,
                dispatch.deliveries,
                limit,
                exc_info=exc,
            )
            await self._let_go(run_id)
            await self.queue.retry_later(dispatch)
            return
        log.error("run %s: taking it up failed again; failing the run", run_id, exc_info=exc)
        text = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_TEXT]
        await self._give_up(
            dispatch,
            f"taking the run up kept failing (its dispatch was delivered {dispatch.deliveries} "
            f"times; the limit is {limit}), the last time with {text}; it is not tried again",
        )

    async def _let_go(self, run_id: str) -> None:
        """Records that a failed take-up let the run go (a Released event, as a drain records):
        its step's attempt then does not count as one that crashed its executor."""
        try:
            run = await asyncio.to_thread(self.ctx.run_store.load, run_id)
            if not run.is_finished and not run.waits:
                run.release(self.ctx.executor_id)
                await asyncio.to_thread(self.ctx.run_store.commit, run)
        except Exception as exc:  # then the attempt counts as a crashed one: no harm
            log.warning("run %s: could not record letting it go: %r", run_id, exc)

    async def _give_up(self, dispatch: Dispatch, message: str) -> None:
        """Ends a run whose taking up keeps failing: RunFailed(DISPATCH_FAILED), not retryable,
        in the store, then on the run's stream (that event alone: publishing the run's earlier
        events may be what failed; the store keeps them), a dead letter, the message acked.

        Idempotent, so two executors (two messages of one run: a reconciler's, say) may both get
        here: the store's optimistic concurrency decides which failure is recorded (the other
        commit conflicts, and reading again finds the run ended: it is left as it is), the
        publish is fenced and deduplicated, and so is the dead letter (by its Nats-Msg-Id).
        An outage meanwhile leaves the message to be delivered again (and to get here again).
        Any other error terminates the message and dead-letters what is known.
        """
        try:
            run, failure = await self._fail_in_store(dispatch.run_id, message)
            await publish_recorded(self.ctx.link, run, failure)
            if run.error is not None and run.error["code"] in DEAD_LETTERED:
                await self._dead_letter(run, dispatch)
            await dispatch.msg.ack()
        except PASSING_FAILURES as exc:
            log.warning("run %s: not failed yet (%r); it is delivered again", dispatch.run_id, exc)
        except Exception as exc:
            log.error(
                "run %s: cannot fail it; dropping its dispatch", dispatch.run_id, exc_info=exc
            )
            with contextlib.suppress(nats.errors.Error):
                await dispatch.msg.term()
            record = {
                "error": {"code": DISPATCH_FAILED, "message": message, "retryable": False},
                "not_failed": f"{type(exc).__name__}: {exc}"[:MAX_ERROR_TEXT],
                "executor_id": self.ctx.executor_id,
                "deliveries": dispatch.deliveries,
            }
            with contextlib.suppress(*PASSING_FAILURES):
                await self.queue.dead_letter(dispatch.run_id, dispatch.tenant, record)

    async def _fail_in_store(self, run_id: str, message: str) -> tuple[Run, list[Any]]:
        """Fails the run with DISPATCH_FAILED unless it has ended; the run and its last event."""
        store = self.ctx.run_store
        for _ in range(FAIL_ATTEMPTS):
            run = await asyncio.to_thread(store.load, run_id)
            if run.is_finished:
                return run, await asyncio.to_thread(store.recorded_after, run_id, run.version - 1)
            run.fail(DISPATCH_FAILED, message, retryable=False)
            failure = list(run.pending_events)
            try:
                await asyncio.to_thread(store.commit, run)
            except Conflict:
                continue
            run_metrics.ended(run)
            return run, failure
        raise Conflict(f"run {run_id} kept changing while it was being failed")

    async def _dead_letter(self, run: Run, dispatch: Dispatch) -> None:
        assert run.error is not None
        step_index = run.steps_completed + 1
        log.error("run %s: dead-lettered: %s", run.run_id, run.error["message"])
        metrics.labelled(metrics.HANDOVERS, "dead_lettered").inc()
        await self.queue.dead_letter(
            run.run_id,
            run.tenant,
            {
                "error": dict(run.error),
                "step_index": step_index,
                "attempts": run.attempt_of(step_index),
                "executor_id": self.ctx.executor_id,
                "deliveries": dispatch.deliveries,
            },
        )


def _take_span(run: Run, dispatch: Dispatch, executor_id: str) -> AbstractContextManager[Span]:
    """The span of taking a run up, a child of the dispatch's (or else the run's) trace; its
    attributes are built only when tracing is on."""
    if not tracing.enabled():
        return tracing.span("take run")
    attributes = {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.message.delivery_count": dispatch.deliveries,
        "agentrun.run.id": run.run_id,
        "agentrun.run.mode": run.execution_mode,
        "agentrun.executor.id": executor_id,
        "agentrun.dispatch.recovery": dispatch.recovery,
    }
    parent = tracing.parent_from(dispatch.trace_context) or tracing.parent_from(run.trace_context)
    return tracing.span("take run", kind=SpanKind.CONSUMER, parent=parent, attributes=attributes)
