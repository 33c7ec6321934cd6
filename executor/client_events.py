"""What clients see of a run's recorded history: the one mapping from recorded run events to
client events. Used as a run goes, and by whoever must publish what was recorded but not yet
published (an executor taking a run up, a decision or cancellation made while no one holds it)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from agentrun.v1 import run_pb2
from eventstore.messages import ToolCall
from eventstore.run import Run
from executor.run_stream import RunStream
from executor.translation import ERROR_ENUMS

MODEL_CALL = run_pb2.STEP_KIND_MODEL_CALL
TOOL_CALLS = run_pb2.STEP_KIND_TOOL_CALLS


class Announce(Protocol):
    """Emits StepStarted for a step's current attempt unless it was announced; returns the
    attempt. ``attempt``: the attempt as the run counts it, if more than its host does (a retry
    in a mode whose host counts take-overs only)."""

    def __call__(
        self, step_index: int, kind: run_pb2.StepKind.ValueType, attempt: int = 0
    ) -> int: ...


class Announcements:
    """Which steps, at which attempts, a run's stream has announced; an Announce.

    ``step``/``attempt``: what the stream announced before (by an earlier executor): that
    attempt of that step, and every step before it."""

    def __init__(
        self,
        stream: RunStream,
        attempt_of: Callable[[int], int],
        step: int = 0,
        attempt: int = 0,
    ) -> None:
        self._stream = stream
        self._attempt_of = attempt_of
        self._floor = step
        self._announced: dict[int, int] = {step: attempt} if step else {}

    def __call__(self, step_index: int, kind: run_pb2.StepKind.ValueType, attempt: int = 0) -> int:
        attempt = max(attempt, self._attempt_of(step_index))
        if step_index >= self._floor and self._announced.get(step_index, 0) < attempt:
            self._announced[step_index] = attempt
            self._stream.step_started(step_index, kind, attempt)
        return attempt


def emit_recorded(
    run: Run,
    stream: RunStream,
    events: Sequence[Any],
    announce: Announce,
    *,
    catching_up: bool = False,
) -> None:
    """Adds to ``stream`` the client events of ``events`` (recorded events of ``run``, which is
    at or after their version), and marks the stream with the version they reach.

    ``catching_up``: the events were recorded by an executor that may have died before
    publishing all of a model call's text. Its text is then sent again, whole, as a new attempt
    of the step (a client drops the earlier attempt's partial text); the model is not called.
    """
    emitter = _Emitter(run, stream, announce, catching_up)
    for event in events:
        _emit_of(type(event))(emitter, event)
        stream.mark_version(event.originator_version)


class _Emitter:
    """The client events of one recorded run event, chosen by the event's class."""

    def __init__(self, run: Run, stream: RunStream, announce: Announce, catching_up: bool) -> None:
        self.run = run
        self.stream = stream
        self.announce = announce
        self.catching_up = catching_up

    @functools.singledispatchmethod
    def emit(self, event: object) -> None:
        """Events clients do not see: the request (RunStarted comes from the run itself), an
        executor's claim or release of the run, a failed model call (its retry shows as the
        step's next attempt, whose StepStarted tells clients to drop the failed one's text)."""

    @emit.register
    def _model_call_completed(self, event: Run.ModelCallCompleted) -> None:
        run, stream, step = self.run, self.stream, event.step_index
        self.announce(step, MODEL_CALL)
        if self.catching_up and event.text:
            attempt = run.attempt_of(step) + 1
            stream.step_started(step, MODEL_CALL, attempt)
            stream.text(step, attempt, event.text)
        for call in event.tool_calls:
            tool = run.agent_config.tool(call["name"])
            client = tool is not None and tool.kind == "client"
            stream.tool_call_requested(step, call, run.requires_approval(call), client)
        stream.step_completed(step, MODEL_CALL, event.usage)

    @emit.register
    def _approval_required(self, event: Run.ToolApprovalRequired) -> None:
        self.announce(event.step_index, TOOL_CALLS)
        call = self.run.tool_call(event.tool_call_id)
        self.stream.approval_required(event.step_index, call, event.expire_at)

    @emit.register
    def _approval_decided(self, event: Run.ToolApprovalDecided) -> None:
        self.stream.approval_resolved(
            event.tool_call_id, event.approved, event.reason, event.timed_out, event.arguments_json
        )

    @emit.register
    def _client_tool_call_required(self, event: Run.ClientToolCallRequired) -> None:
        self.announce(event.step_index, TOOL_CALLS)
        call = self.run.tool_call(event.tool_call_id)
        handed: ToolCall = {**call, "arguments_json": event.arguments_json}
        self.stream.client_tool_call_required(event.step_index, handed, event.expire_at)

    @emit.register
    def _tool_call_completed(self, event: Run.ToolCallCompleted) -> None:
        self.announce(event.step_index, TOOL_CALLS)
        call = self.run.tool_call(event.tool_call_id)
        self.stream.tool_result(event.step_index, call, event.output, event.is_error)
        if self.run.completes_step(event.tool_call_id):
            self.stream.step_completed(event.step_index, TOOL_CALLS)

    @emit.register
    def _completed(self, event: Run.Completed) -> None:
        self.stream.run_completed(event.output, self.run.usage)

    @emit.register
    def _cancelled(self, event: Run.Cancelled) -> None:
        self.stream.run_cancelled(event.reason)

    @emit.register
    def _failed(self, event: Run.Failed) -> None:
        code = ERROR_ENUMS.get(event.code, run_pb2.RUN_ERROR_CODE_INTERNAL)
        self.stream.run_failed(code, event.message, event.retryable)


# The handler of an event class, looked up in the registry directly: going through the method
# (``emitter.emit(event)``) makes singledispatchmethod build a wrapper on every call (Python
# 3.11), for every event of every run.
_emit_of: Callable[[type], Callable[[_Emitter, Any], None]] = vars(_Emitter)[
    "emit"
].dispatcher.dispatch
