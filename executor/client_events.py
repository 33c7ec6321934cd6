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

Announce = Callable[[int, "run_pb2.StepKind.ValueType"], object]
"""Emits StepStarted for a step unless it was announced before."""


def emit_recorded(run: Run, stream: RunStream, events: Sequence[Any], announce: Announce) -> None:
    """Adds to ``stream`` the client events of ``events`` (recorded events of ``run``, which is
    at or after their version), and marks the stream with the version they reach."""
    for event in events:
        kind = type(event).__name__
        if kind == "ModelCallCompleted":
            announce(event.step_index, MODEL_CALL)
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


def step_of(event: run_pb2.RunEvent) -> int:
    """The step a published client event belongs to (0 for run-level events)."""
    kind = event.WhichOneof("kind")
    if kind is None:
        return 0
    return int(getattr(getattr(event, kind), "step_index", 0))
