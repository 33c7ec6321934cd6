"""A run session: one run's whole life on this executor, the same for both execution modes.

A session drives its run's agent loop, streams the run's events (sequenced and coalesced in a
RunStream, published to the run's JetStream subject by a RunPublisher), answers the run's
control subject (commands from any executor, liveness pings), and lets the run go when it ends,
suspends, is taken over or handed back. It is the RunHost of its loop.

What makes a run classic or durable is only which ports the session holds:

- ``recording`` (executor.session.recording): events kept in memory with the run list's row,
  or committed to the store step by step, where a conflict means another executor took over;
- ``waiting`` (executor.session.waiting): decisions awaited in memory, or the run suspended.

Steering comes in as commands (eventstore.run_commands) through ``steer``; a command the
session cannot take now (a decision for a run that suspends, a cancellation while it is being
let go) is refused with False, and the caller records it in the store instead.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Sequence
from typing import Any

from common import logs, metrics, tracing
from common.errors import FailedPrecondition, NotFound
from common.event_streams import Published
from eventstore.agent_config import AgentConfig
from eventstore.run import Run
from eventstore.run_commands import Cancel, Command, Decide, SubmitResult, check_not_ended
from eventstore.run_steps import AwaitApprovals, AwaitResults
from executor import run_metrics
from executor.agent_loop import AgentLoop
from executor.context import ExecutorContext
from executor.control import answering
from executor.event_publisher import RunPublisher
from executor.lost_runs import end_event_of
from executor.run_stream import Marks, RunStream
from executor.session.recording import EndedElsewhere, Outcome, Recording, TakenOver
from executor.session.waiting import Waiting
from executor.translation import run_to_proto

log = logging.getLogger(__name__)


class _Stop(enum.Enum):
    """Why the session interrupted its loop."""

    CANCEL = "cancel"  # a client cancelled the run
    TAKEN_OVER = "taken over"  # the run's stream or store moved on elsewhere
    HAND_BACK = "hand back"  # the executor drains (a run that can move goes elsewhere)
    ABANDON = "abandon"  # the executor stops (a run that cannot move fails)


class RunSession:
    """One run's life on this executor (see module docstring)."""

    def __init__(
        self,
        ctx: ExecutorContext,
        run: Run,
        recording: Recording,
        waiting: Waiting,
        *,
        config: AgentConfig | None = None,
        stream_state: Published | None = None,
    ) -> None:
        state = stream_state or Published()
        self.ctx = ctx
        self.run = run
        self.recording = recording
        self.waiting = waiting
        self.publisher = RunPublisher(
            ctx.link,
            run.run_id,
            run.tenant,
            last_stream_sequence=state.stream_sequence,
            published_marks=Marks(state.version, state.step, state.attempt),
            on_fenced=self._taken_over,
        )
        self.stream = RunStream(
            run.run_id,
            first_sequence=state.last_sequence + 1,
            on_taken=self.publisher.enqueue,
            pace=self.publisher.pace,
        )
        self.loop = AgentLoop(run, self.stream, self, ctx.models, ctx.tools, config=config)
        self.loop.announced_before(state.step, state.attempt)
        self.decided = asyncio.Event()
        self.task: asyncio.Task[Any] | None = None
        self._announce_start = not state.last_sequence
        self._stop: _Stop | None = None
        self._cancel_reason = ""
        self._driving = False

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def start(self, recorded_after: Sequence[Any] = ()) -> asyncio.Task[Outcome]:
        """Holds the run in a task of its own (see ``hold``)."""
        task = asyncio.create_task(self.hold(recorded_after), name=f"run-{self.run_id}")
        self.task = task
        return task

    async def hold(self, recorded_after: Sequence[Any] = ()) -> Outcome:
        """Holds the run until it ends, suspends, is taken over or handed back.

        ``recorded_after``: recorded events the run's stream does not show yet (an executor
        that held the run before died between a commit and its publish)."""
        self.task = asyncio.current_task()
        logs.about_run(
            self.run_id,
            self.run.tenant,
            run_metrics.agent_of(self.run),
            tracing.trace_id() or tracing.trace_id_of(self.run.trace_context),
        )
        held = metrics.labelled(metrics.RUNS_HELD, self.run.execution_mode)
        held.inc()
        try:
            return await self._hold(recorded_after)
        finally:
            held.dec()

    async def _hold(self, recorded_after: Sequence[Any]) -> Outcome:
        await self.recording.hold()
        try:
            await self.ctx.link.subscribe_control(
                self.run_id, answering(self._steer_from_control, self.ctx.executor_id)
            )
        except BaseException:  # (NATS went away) nothing was done: stop as if never begun
            await self.stream.close()
            await self.publisher.close(0.0)
            await self.recording.let_go(self.run, Outcome.FAILED, False)
            raise
        outcome = Outcome.LOST
        try:
            if self._announce_start:
                self.stream.run_started(run_to_proto(self.run, self.ctx.executor_id))
            self.loop.emit_recorded(recorded_after, catching_up=True)
            outcome = await self._drive()
            return outcome
        except Exception:
            outcome = Outcome.FAILED
            raise
        finally:
            await self._let_go(outcome)

    async def _drive(self) -> Outcome:
        if self._stop is not None:
            return await self._interrupted(self._stop)
        self._driving = True
        try:
            if self.run.is_finished:
                await self.recording.ended(self.run)  # its last holder died before that
            else:
                await self.loop.drive()
        except asyncio.CancelledError:
            if self._stop is None:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            return await self._interrupted(self._stop)
        except TakenOver:
            return Outcome.LOST
        except EndedElsewhere:
            await self._end_as_recorded()
        except Exception as exc:
            if not self.recording.fails_on_errors or self.run.is_finished:
                raise
            log.exception("run %s failed unexpectedly", self.run_id)
            await self.loop.fail(
                "INTERNAL", f"internal error: {type(exc).__name__}", retryable=True
            )
        finally:
            self._driving = False
        return Outcome.ENDED if self.run.is_finished else Outcome.SUSPENDED

    async def _interrupted(self, stop: _Stop) -> Outcome:
        """Carries out why the loop was interrupted."""
        try:
            if stop is _Stop.CANCEL:
                await self.loop.cancel(self._cancel_reason)
            elif stop is _Stop.ABANDON:
                await self.loop.fail(
                    "EXECUTOR_LOST", "the executor running the run shut down", retryable=True
                )
            elif stop is _Stop.HAND_BACK:
                return Outcome.HANDED_BACK
            else:
                return Outcome.LOST
        except TakenOver:
            return Outcome.LOST
        except EndedElsewhere:
            await self._end_as_recorded()
        return Outcome.ENDED

    async def _end_as_recorded(self) -> None:
        """Ends the stream as the run's row says the run ended (settled as lost meanwhile)."""
        record = await asyncio.to_thread(self.ctx.run_list.get, self.run.tenant, self.run_id)
        log.warning("run %s: settled as %s while it ran here", self.run_id, record.status)
        self.stream.end(end_event_of(record))

    async def _let_go(self, outcome: Outcome) -> None:
        """Publishes what the stream took (unless the run was taken over), stops answering for
        the run, then lets the recording let it go (the order matters: whoever takes the run
        up next must find nobody answering, and the stream as this session left it)."""
        published = False
        try:
            if outcome is not Outcome.LOST:
                await self.stream.drained()
            await self.stream.close()
            wait = 0.0 if outcome is Outcome.LOST else self.recording.publish_wait
            published = await self.publisher.close(wait)
        finally:
            await self.ctx.link.unsubscribe_control(self.run_id)
            await self.recording.let_go(self.run, outcome, published)
        if outcome is Outcome.LOST:
            log.warning("run %s: taken over by another executor; letting it go", self.run_id)

    # -- steering --------------------------------------------------------------------------------

    async def steer(self, tenant: str, command: Command) -> bool:
        """Carries out a command for the run. False if it cannot be taken here now (record it
        in the store then); raises a domain error to refuse it."""
        if tenant != self.run.tenant:
            raise NotFound("run", self.run_id)
        if isinstance(command, Cancel):
            return self.cancel(command.reason)
        if self.waiting.takes_decisions:
            await self.apply(command)
            return True
        # Taken by the store; answered here when the answer is known: a repeat of the recorded
        # decision or result is fine, a contradiction is not.
        if isinstance(command, Decide):
            return not self.run.check_decision(
                command.tool_call_id, command.approved, command.arguments_json
            )
        if isinstance(command, SubmitResult):
            return not self.run.check_result(command.tool_call_id, command.output, command.is_error)
        return False

    async def state_changed(self) -> None:
        """The run started or stopped waiting for decisions."""
        await self.recording.state_changed(self.run)

    async def apply(self, command: Command) -> bool:
        """Applies a command's events to the run here and emits them; False if it changed
        nothing."""
        if not command.apply(self.run):
            return False
        recorded = list(self.run.pending_events)
        await self.recording.commit(self.run)
        self.loop.emit_recorded(recorded)
        self.decided.set()
        return True

    def cancel(self, reason: str) -> bool:
        """Cancels the run if its loop is driven here; False if it is not (it is suspending or
        being let go: cancel it in the store then)."""
        if self._stop is _Stop.CANCEL:
            raise FailedPrecondition(f"run {self.run_id} is being cancelled already")
        check_not_ended(self.run)
        if not self._driving or self._stop is not None or self.task is None:
            return False
        self._cancel_reason = reason
        self._interrupt(_Stop.CANCEL)
        return True

    async def _steer_from_control(self, tenant: str, command: Command) -> bool:
        return await self.steer(tenant, command)

    def hand_back(self) -> None:
        """Stops driving the run at once; it is let go for another executor to take up. A run
        whose driving has ended (it ended or suspended) is let go as usual instead."""
        self._interrupt(_Stop.HAND_BACK)

    def abandon(self) -> None:
        """Ends the run because this executor stops: it fails with EXECUTOR_LOST."""
        if not self.run.is_finished:
            self._interrupt(_Stop.ABANDON)

    def _taken_over(self) -> None:
        """Something else was appended to the run's stream: another executor took the run over
        (or, for a run that cannot move, settled it as lost: it ends as its row says)."""
        self._interrupt(_Stop.TAKEN_OVER if self.recording.movable else _Stop.ABANDON)

    def _interrupt(self, stop: _Stop) -> None:
        if self._stop is None or stop is _Stop.TAKEN_OVER:
            self._stop = stop
        if self._driving and self.task is not None:
            self.task.cancel()

    # -- RunHost ---------------------------------------------------------------------------------

    def attempt(self, step_index: int) -> int:
        return self.run.attempt_of(step_index)

    async def commit(self, run: Run) -> None:
        await self.recording.commit(run)

    async def status_changed(self, run: Run) -> None:
        await self.recording.state_changed(run)

    async def wait_for_decisions(self, run: Run, step: AwaitApprovals | AwaitResults) -> bool:
        return await self.waiting.for_decisions(self)

    async def finished(self, run: Run) -> None:
        await self.recording.ended(run)
        run_metrics.ended(run)
