"""Commands that steer a run from outside: a decision on a tool call, a client's tool result, a
cancellation, the timeout of the run's waits. Pure domain: each validates against the run and
applies its events, whoever holds the run (an executor driving it in memory, or the store when
nobody does).

A command also has a JSON form, the body of a control request to the executor holding the run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing.exceptions import Unresolvable

from common.errors import FailedPrecondition, InvalidArgument
from eventstore.run import Run

APPROVAL_TIMED_OUT = "no decision before the approval timeout"
RESULT_TIMED_OUT = "the client did not submit the tool's result within its timeout"


@dataclass(frozen=True)
class Decide:
    """Approve or deny a tool call that waits for approval."""

    tool_call_id: str
    approved: bool
    reason: str = ""
    arguments_json: str = ""  # an approval's edit of the call's arguments ("": none)

    def apply(self, run: Run) -> bool:
        """Records the decision. False if it repeats the recorded one (nothing to do); raises
        FailedPrecondition if the call does not wait for approval or was decided otherwise, and
        InvalidArgument if edited arguments do not fit the tool's schema."""
        if not run.check_decision(self.tool_call_id, self.approved, self.arguments_json):
            return False
        if self.arguments_json:
            self._check_arguments(run)
        run.decide(self.tool_call_id, self.approved, self.reason, False, self.arguments_json)
        return True

    def _check_arguments(self, run: Run) -> None:
        field = "decision.edited_arguments_json"
        if not self.approved:
            raise InvalidArgument(field, "only an approval may edit the call's arguments")
        try:
            arguments = json.loads(self.arguments_json)
        except ValueError as exc:
            raise InvalidArgument(field, f"is not JSON: {exc}") from None
        if not isinstance(arguments, dict):
            raise InvalidArgument(field, "must be a JSON object")
        schema = run.tool_schema(run.tool_call(self.tool_call_id)["name"])
        if schema is None:
            return  # (a kind whose schema is not known here: the tool checks its arguments)
        try:
            Draft202012Validator.check_schema(schema)
            error = next(iter(Draft202012Validator(schema).iter_errors(arguments)), None)
        except (SchemaError, Unresolvable):
            return  # (an MCP server's schema that does not hold: the server checks)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            at = f" at {where}" if where else ""
            raise InvalidArgument(
                field, f"does not fit the tool's JSON Schema{at}: {error.message}"
            )


def result_digest(output: str, is_error: bool) -> str:
    """What the run list keeps of a client's tool result, to recognise its repeat."""
    return hashlib.sha256(json.dumps([output, is_error]).encode()).hexdigest()


@dataclass(frozen=True)
class SubmitResult:
    """The result of a tool call that the client executed."""

    tool_call_id: str
    output: str
    is_error: bool = False

    def apply(self, run: Run) -> bool:
        """Records the result. False if it repeats the recorded one (nothing to do); raises
        FailedPrecondition if the call does not wait for a result or has another."""
        if not run.check_result(self.tool_call_id, self.output, self.is_error):
            return False
        step_index = run.steps_completed + 1
        run.record_tool_outcome(step_index, self.tool_call_id, self.output, self.is_error)
        return True


@dataclass(frozen=True)
class Cancel:
    """Cancel a run that has not ended."""

    reason: str = ""

    def apply(self, run: Run) -> bool:
        check_not_ended(run)
        run.cancel(self.reason)
        return True


@dataclass(frozen=True)
class TimeOutApprovals:
    """Deny, as timed out, the tool calls whose approval deadline is before ``now``; and give
    the model a tool error for the client's tool calls whose result is later than that."""

    now: float

    def apply(self, run: Run) -> bool:
        if run.is_finished:
            return False
        expired = [
            c for c in run.awaiting_decision() if run.approvals_required[c["id"]] <= self.now
        ]
        for call in expired:
            run.decide(call["id"], False, APPROVAL_TIMED_OUT, True)
        late = [c for c in run.awaiting_result() if run.client_calls[c["id"]] <= self.now]
        for call in late:
            output = json.dumps({"error": RESULT_TIMED_OUT})
            run.record_tool_outcome(run.steps_completed + 1, call["id"], output, True)
        return bool(expired or late)


Command = Decide | SubmitResult | Cancel | TimeOutApprovals


def check_not_ended(run: Run) -> None:
    if run.is_finished:
        raise FailedPrecondition(f"run {run.run_id} has already ended ({run.status})")


def to_json(command: Command) -> dict[str, Any]:
    if isinstance(command, Decide):
        return {
            "op": "decide",
            "tool_call_id": command.tool_call_id,
            "approved": command.approved,
            "reason": command.reason,
            "arguments_json": command.arguments_json,
        }
    if isinstance(command, SubmitResult):
        return {
            "op": "submit_result",
            "tool_call_id": command.tool_call_id,
            "output": command.output,
            "is_error": command.is_error,
        }
    if isinstance(command, Cancel):
        return {"op": "cancel", "reason": command.reason}
    return {"op": "time_out_approvals", "now": command.now}


def from_json(body: dict[str, Any]) -> Command:
    """The command of a control request's body; InvalidArgument if it names none."""
    op = body.get("op")
    if op == "decide":
        return Decide(
            str(body["tool_call_id"]),
            bool(body["approved"]),
            str(body.get("reason", "")),
            str(body.get("arguments_json", "")),
        )
    if op == "submit_result":
        return SubmitResult(
            str(body["tool_call_id"]), str(body["output"]), bool(body.get("is_error", False))
        )
    if op == "cancel":
        return Cancel(str(body.get("reason", "")))
    if op == "time_out_approvals":
        return TimeOutApprovals(float(body["now"]))
    raise InvalidArgument("op", f"unknown control operation {op!r}")
