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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Any

import nats.errors
import nats.js.errors

from agentrun.errors import AgentrunError, Conflict, FailedPrecondition, NotFound
from agentrun.nats_link import TENANT_HEADER, NatsLink, message_id
from agentrun.run_events import WRONG_LAST_SEQUENCE, Outgoing, Published, published
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
        self.loop = AgentLoop(run, self.stream, self, ctx.models, ctx.settings.data_dir)
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
        return None  # the run list follows the store (executor.run_list)

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
            if run.error is not None and run.error["code"] == ATTEMPTS_EXHAUSTED:
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
