"""What clients see of a run's recorded history: the one mapping from recorded run events to
client events. Used as a run goes, and by whoever must publish what was recorded but not yet
published (an executor taking a run up, a decision or cancellation made while no one holds it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from agentrun.v1 import run_pb2
from eventstore.run import Run
from executor.run_stream import RunStream
from executor.translation import ERROR_ENUMS

MODEL_CALL = run_pb2.STEP_KIND_MODEL_CALL
TOOL_CALLS = run_pb2.STEP_KIND_TOOL_CALLS

Announce = Callable[[int, "run_pb2.StepKind.ValueType"], int]
"""Emits StepStarted for a step's current attempt unless it was announced; returns the attempt."""


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

    def __call__(self, step_index: int, kind: run_pb2.StepKind.ValueType) -> int:
        attempt = self._attempt_of(step_index)
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
    for event in events:
        kind = type(event).__name__
        if kind == "ModelCallCompleted":
            announce(event.step_index, MODEL_CALL)
            if catching_up and event.text:
                attempt = run.attempt_of(event.step_index) + 1
                stream.step_started(event.step_index, MODEL_CALL, attempt)
                stream.text(event.step_index, attempt, event.text)
            for call in event.tool_calls:
                stream.tool_call_requested(event.step_index, call, run.requires_approval(call))
            stream.step_completed(event.step_index, MODEL_CALL, event.usage)
        elif kind == "ToolApprovalRequired":
            announce(event.step_index, TOOL_CALLS)
            call = run.tool_call(event.tool_call_id)
            stream.approval_required(event.step_index, call, event.expire_at)
        elif kind == "ToolApprovalDecided":
            stream.approval_resolved(
                event.tool_call_id, event.approved, event.reason, event.timed_out
            )
        elif kind == "ToolCallCompleted":
            announce(event.step_index, TOOL_CALLS)
            call = run.tool_call(event.tool_call_id)
            stream.tool_result(event.step_index, call, event.output, event.is_error)
            if run.completes_step(event.tool_call_id):
                stream.step_completed(event.step_index, TOOL_CALLS)
        elif kind == "Completed":
            stream.run_completed(event.output, run.usage)
        elif kind == "Cancelled":
            stream.run_cancelled(event.reason)
        elif kind == "Failed":
            code = ERROR_ENUMS.get(event.code, run_pb2.RUN_ERROR_CODE_INTERNAL)
            stream.run_failed(code, event.message, event.retryable)
        stream.mark_version(event.originator_version)
