"""Durable runs on an executor: taking them from the work queue, holding them while their steps
run, letting them go when they end or suspend.

Holding a run means: its events are committed step by step (a step's events in one save) and
its client events are published, fenced, to its stream; its dispatch message is kept alive; its
control subject answers (liveness, cancellation). What a run recorded but its stream does not
show yet (the previous executor died between a commit and a publish) is published first.

Draining (SIGTERM): the executor stops taking runs and hands back the runs it holds at once. A
handed-back run stops being driven (its step in progress runs again elsewhere as a new attempt,
exactly as after a crash), stops answering its control subject, lets an interrupted commit land
and its published events out, and only then releases its message with ``nak``: the next taker
finds nobody answering for the run and the stream and store as this executor left them.

A run taken up again whose step has had too many attempts (see
eventstore.run_steps.exhausted_attempts) is failed instead of resumed, and dead-lettered.

Taking a run up may also fail with an error: one that says nothing about the run (the database
or NATS out of reach, another executor changing the run meanwhile) leaves the message to be
delivered again after ``ack_wait``, as often as it takes; any other (a bug, data of the run this
version cannot read) gives the message back with a growing delay, and at the
AGENTRUN_MAX_DISPATCH_FAILURES-th delivery fails the run with DISPATCH_FAILED and dead-letters
it (see DurableRunner._take_failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Any

import nats.errors
import nats.js.errors

from common.errors import AgentrunError, Conflict, FailedPrecondition, NotFound, Unavailable
from common.event_streams import WRONG_LAST_SEQUENCE, Outgoing, Published, published
from common.nats_link import TENANT_HEADER, NatsLink, message_id
from eventstore.run import Run
from eventstore.run_steps import ATTEMPTS_EXHAUSTED, AwaitApprovals, exhausted_attempts
from executor.agent_loop import AgentLoop
from executor.client_events import Announcements, emit_recorded
from executor.context import ExecutorContext
from executor.control import answering
from executor.dispatch import Dispatch, WorkQueue, keep_alive
from executor.event_publisher import RunPublisher, marks_headers
from executor.run_stream import Marks, RunStream
from executor.translation import run_to_proto

log = logging.getLogger(__name__)

PUBLISH_FLUSH_TIMEOUT = 10.0
RECENT_RUNS = 1000
DISPATCH_FAILED = "DISPATCH_FAILED"
DEAD_LETTERED = frozenset({ATTEMPTS_EXHAUSTED, DISPATCH_FAILED})
# Failures of a take-up that say nothing about the run: the infrastructure comes back, or the
# executor that changed the run meanwhile has it.
PASSING_FAILURES = (Unavailable, Conflict, nats.errors.Error, TimeoutError, ConnectionError)
FAIL_ATTEMPTS = 10
MAX_ERROR_TEXT = 500


def _changing_hands(op: str, request: dict[str, Any]) -> None:
    raise FailedPrecondition("the run is changing hands; try again")


def marks_of(state: Published) -> Marks:
    """The marks a run's published stream has reached."""
    return Marks(state.version, state.step, state.attempt)


class RunLost(Exception):
    """This executor no longer holds the run: another one took it over."""


class HandedBack(Exception):
    """The executor is draining: the run goes back to the queue for another executor."""


class HeldRun:
    """A durable run this executor holds (see module docstring); the RunHost of its loop."""

    def __init__(
        self,
        ctx: ExecutorContext,
        queue: WorkQueue,
        run: Run,
        dispatch: Dispatch,
        stream_state: Published,
    ) -> None:
        # First: a run whose agent this version cannot read fails before anything starts.
        config = run.agent_config
        self.ctx = ctx
        self.run = run
        self._dispatch = dispatch
        self._queue = queue
        self._state = stream_state
        self.publisher = RunPublisher(
            ctx.link,
            run.run_id,
            run.tenant,
            last_stream_sequence=stream_state.stream_sequence,
            published_marks=marks_of(stream_state),
            on_fenced=self._fenced,
        )
        first = stream_state.last_sequence + 1
        self.stream = RunStream(
            run.run_id,
            first_sequence=first,
            on_taken=self.publisher.enqueue,
            pace=self.publisher.pace,
        )
        self.loop = AgentLoop(
            run, self.stream, self, ctx.models, ctx.settings.data_dir, config=config
        )
        self.loop.announced_before(stream_state.step, stream_state.attempt)
        self._cancel_reason: str | None = None
        self._driving = False
        self._lost = False
        self._handing_back = False
        self._commit: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def run_id(self) -> str:
        return self.run.run_id

    async def hold(self, recorded_after: list[Any]) -> None:
        """Holds the run until it ends, suspends, or is lost; ``recorded_after`` are the recorded
        events the stream does not show yet."""
        self.task = asyncio.current_task()
        heartbeat = asyncio.create_task(keep_alive(self._dispatch.msg, self._queue.ack_wait))
        await self.ctx.link.subscribe_control(
            self.run_id, answering(self._control, self.ctx.executor_id)
        )
        handed_back = False
        try:
            if not self._state.last_sequence:
                self.stream.run_started(run_to_proto(self.run, self.ctx.executor_id))
            self.loop.emit_recorded(recorded_after, catching_up=True)
            await self._drive()
        except RunLost:
            self._lost = True
        except HandedBack:
            handed_back = True
        except asyncio.CancelledError:
            if not self._handing_back:
                raise
            if self.task is not None:
                self.task.uncancel()
            handed_back = True  # cancelled outside the steps (say, while recording a cancel)
        except Exception:
            await self._close_streams()  # the error goes to DurableRunner._take_failed
            raise
        finally:
            heartbeat.cancel()
            await self.ctx.link.unsubscribe_control(self.run_id)  # before the nak, see below
        if handed_back and not self._lost:
            await self._release()
            return
        if self._lost:
            await self.stream.close()
            log.warning("run %s: taken over by another executor; letting it go", self.run_id)
            return  # the message is someone else's now
        self.stream.take_now()
        await self.stream.close()
        if await self.publisher.close(PUBLISH_FLUSH_TIMEOUT):
            with contextlib.suppress(nats.errors.Error):
                await self._dispatch.msg.ack()

    async def _close_streams(self) -> None:
        """Publishes what the run's stream took so far and stops its tasks."""
        self.stream.take_now()
        await self.stream.close()
        await self.publisher.close(PUBLISH_FLUSH_TIMEOUT)

    async def _release(self) -> None:
        """Gives the run's message back for immediate redelivery (see module docstring)."""
        if self._commit is not None:
            with contextlib.suppress(Exception):
                # It must land before the next taker's claim, which would conflict with it
                # and make that taker drop the run.
                await self._commit
        if not self.run.is_finished and not self.run.awaiting_decision():
            # Recorded so that the interrupted attempt is not counted as a failed one (see
            # eventstore.run_steps.exhausted_attempts): rolling restarts are not poison.
            self.run.release(self.ctx.executor_id)
            with contextlib.suppress(AgentrunError):  # then it counts as failed: no harm
                await asyncio.to_thread(self.ctx.run_store.commit, self.run)
        self.stream.take_now()
        await self.stream.close()
        await self.publisher.close(PUBLISH_FLUSH_TIMEOUT)
        with contextlib.suppress(nats.errors.Error):
            await self._dispatch.msg.nak()
        log.info("run %s: handed back for another executor", self.run_id)

    def hand_back(self) -> None:
        """Stops driving the run at once; ``hold`` then releases it (see module docstring). A
        run whose driving has ended (it ended or suspended) is let go as usual instead."""
        self._handing_back = True
        if self._driving and self.task is not None:
            self.task.cancel()

    async def _drive(self) -> None:
        if self._handing_back:
            raise HandedBack
        self._driving = True
        try:
            if self.run.is_finished:
                await self.finished(self.run)  # its executor died before recording its turn
            else:
                await self.loop.drive()
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            if self._lost:
                raise RunLost from None
            if self._handing_back:
                raise HandedBack from None
            if self._cancel_reason is None:
                raise
            await self.loop.cancel(self._cancel_reason)
        finally:
            self._driving = False

    def cancel(self, tenant: str, reason: str) -> bool:
        """Cancels the run if its steps are being driven here. False if they are not (it is
        suspending or being let go): cancel it through the store then."""
        if tenant != self.run.tenant:
            raise NotFound("run", self.run_id)
        if self.run.is_finished or self._cancel_reason is not None:
            raise FailedPrecondition(f"run {self.run_id} has already ended ({self.run.status})")
        if not self._driving or self.task is None:
            return False
        self._cancel_reason = reason
        self.task.cancel()
        return True

    def _fenced(self) -> None:
        """Something else was appended to the run's stream: another executor took it over."""
        self._lost = True
        if self._driving and self.task is not None:
            self.task.cancel()

    def _control(self, op: str, request: dict[str, Any]) -> None:
        if op != "cancel":
            raise FailedPrecondition("a durable run takes decisions through its store")
        if not self.cancel(str(request["tenant"]), str(request.get("reason", ""))):
            raise FailedPrecondition("the run is changing hands; try again")

    # -- RunHost ---------------------------------------------------------------------------------

    def attempt(self, step_index: int) -> int:
        return self.run.attempt_of(step_index)

    async def commit(self, run: Run) -> None:
        # Shielded: a run handed back mid-commit waits for the commit's thread before its nak.
        self._commit = asyncio.ensure_future(asyncio.to_thread(self.ctx.run_store.commit, run))
        try:
            await asyncio.shield(self._commit)
        except Conflict:
            self._lost = True
            raise RunLost from None

    async def status_changed(self, run: Run) -> None:
        return None  # the run list follows the store (executor.run_list_projection)

    async def wait_for_decisions(self, run: Run, step: AwaitApprovals) -> bool:
        return False  # suspend: the run waits in the store, not here

    async def finished(self, run: Run) -> None:
        if run.status == "completed":
            await asyncio.to_thread(
                self.ctx.conversations.record_turn,
                run.tenant,
                run.conversation_id,
                run.run_id,
                run.messages,
                probably_new=not run.history,
            )


class DurableRunner:
    """Takes durable runs from the work queue and holds them (see module docstring)."""

    def __init__(self, ctx: ExecutorContext, queue: WorkQueue, concurrency: int) -> None:
        self.ctx = ctx
        self.queue = queue
        self.held: dict[str, HeldRun] = {}
        self._recent: OrderedDict[str, Run] = OrderedDict()
        self._slots = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task[None] | None = None
        self._taking: set[asyncio.Task[Any]] = set()
        self._claiming: set[str] = set()  # runs whose claim is being committed here
        self._draining = False

    def start(self) -> None:
        self._task = asyncio.create_task(self.queue.take_forever(self.take, self._slots))

    async def stop(self) -> None:
        """Stops taking runs from the queue."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def drain(self, wait: float) -> None:
        """Stops taking runs and hands back every run held here (see module docstring); waits
        up to ``wait`` seconds for them to be released."""
        self._draining = True
        await self.stop()
        for held in list(self.held.values()):
            held.hand_back()
        if self._taking:
            await asyncio.wait(list(self._taking), timeout=wait)

    def remember(self, run: Run) -> None:
        """Keeps a run this executor just stored, so that taking it from the queue here does not
        read it back (when another executor takes it, or it changed meanwhile, the store
        decides: a stale copy's first commit conflicts and the run is taken up again)."""
        self._recent[run.run_id] = run
        while len(self._recent) > RECENT_RUNS:
            self._recent.popitem(last=False)

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

        A message delivered again (its previous taker stopped keeping it alive) or sent by a
        reconciler claims the run with a Resumed event before anything else; if a live executor
        still answers for the run, the message is a duplicate and is dropped instead (one that
        does not answer in time is taken to be stuck). Either way the store's optimistic
        concurrency decides, so two executors never both advance a run.
        """
        if self._draining:
            with contextlib.suppress(nats.errors.Error):
                await dispatch.msg.nak()
            return
        store = self.ctx.run_store
        taken_over = dispatch.deliveries > 1 or dispatch.recovery
        recent = self._recent.pop(dispatch.run_id, None)
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
        claiming = taken_over and not run.is_finished and run.awaiting_decision() == []
        if claiming and run.run_id in self._claiming:
            await dispatch.msg.ack()  # a duplicate, being claimed here already
            return
        holding = False
        try:
            if claiming:
                self._claiming.add(run.run_id)
                # This executor answers for the run before its claim is committed: whoever
                # loads the run after the claim then finds a holder and drops its duplicate
                # message instead of claiming the run again (another Resumed, another attempt).
                await self.ctx.link.subscribe_control(
                    run.run_id, answering(_changing_hands, self.ctx.executor_id), flush=True
                )
                poisoned = exhausted_attempts(run, self.ctx.settings.max_step_attempts)
                if poisoned is None:
                    run.resume(self.ctx.executor_id)
                else:
                    run.fail(poisoned.code, poisoned.message, retryable=False)
                try:
                    await asyncio.to_thread(store.commit, run)
                except Conflict:
                    await dispatch.msg.ack()
                    return
            if run.error is not None and run.error["code"] in DEAD_LETTERED:
                await self._dead_letter(run, dispatch)  # again if an earlier taker died first
            state = Published() if fresh else await published(self.ctx.link, run.run_id)
            recorded_after = (
                []
                if fresh
                else await asyncio.to_thread(store.recorded_after, run.run_id, state.version)
            )
            held = HeldRun(self.ctx, self.queue, run, dispatch, state)
            if self._draining:  # it began while the run was being taken up
                held.hand_back()
            self.held[run.run_id] = held
            holding = True
            try:
                await held.hold(recorded_after)
            finally:
                self.held.pop(run.run_id, None)
        finally:
            if claiming:
                self._claiming.discard(run.run_id)
                if not holding:
                    await self.ctx.link.unsubscribe_control(run.run_id)

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
            if not run.is_finished and not run.awaiting_decision():
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
            return run, failure
        raise Conflict(f"run {run_id} kept changing while it was being failed")

    async def _dead_letter(self, run: Run, dispatch: Dispatch) -> None:
        assert run.error is not None
        step_index = run.steps_completed + 1
        log.error("run %s: dead-lettered: %s", run.run_id, run.error["message"])
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


async def publish_recorded(link: NatsLink, run: Run, events: list[Any]) -> None:
    """Publishes the client events of ``events`` (recorded while nobody held the run: a decision,
    a cancellation, an approval timeout) after the run's last published event, fenced; retried
    from a fresh read if the stream moved meanwhile."""
    for _ in range(10):
        state = await published(link, run.run_id)
        pending = [e for e in events if e.originator_version > state.version]
        if not pending:
            return
        stream = RunStream(run.run_id, first_sequence=state.last_sequence + 1, drain=False)
        announce = Announcements(stream, run.attempt_of, state.step, state.attempt)
        emit_recorded(run, stream, pending, announce, catching_up=True)
        batch = stream.take_now()
        if not batch:
            return
        marks = stream.marks.merge(Marks(step=state.step, attempt=state.attempt))
        message = Outgoing(
            link,
            run.run_id,
            batch,
            message_id=f"{message_id(run.run_id, batch[0].sequence)}:recorded",
            after=state.stream_sequence,
            headers={TENANT_HEADER: run.tenant},
            marks=marks_headers(marks),
            marks_before=marks_headers(marks_of(state)),
        )
        try:
            await message.publish()
            return
        except nats.js.errors.APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
    log.warning("run %s: its stream kept moving; recorded events not published", run.run_id)
