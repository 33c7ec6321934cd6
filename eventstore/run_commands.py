"""Commands that steer a run from outside: a decision on a tool call, a cancellation, the approval
timeout. Pure domain: each validates against the run and applies its events, whoever holds the
run (an executor driving it in memory, or the store when nobody does).

A command also has a JSON form, the body of a control request to the executor holding the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.errors import FailedPrecondition, InvalidArgument
from eventstore.run import Run

APPROVAL_TIMED_OUT = "no decision before the approval timeout"


@dataclass(frozen=True)
class Decide:
    """Approve or deny a tool call that waits for approval."""

    tool_call_id: str
    approved: bool
    reason: str = ""

    def apply(self, run: Run) -> bool:
        """Records the decision. False if it repeats the recorded one (nothing to do); raises
        FailedPrecondition if the call does not wait for approval or was decided otherwise."""
        if not run.check_decision(self.tool_call_id, self.approved):
            return False
        run.decide(self.tool_call_id, self.approved, self.reason, False)
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
    """Deny, as timed out, the tool calls whose approval deadline is before ``now``."""

    now: float

    def apply(self, run: Run) -> bool:
        if run.is_finished:
            return False
        expired = [
            c for c in run.awaiting_decision() if run.approvals_required[c["id"]] <= self.now
        ]
        for call in expired:
            run.decide(call["id"], False, APPROVAL_TIMED_OUT, True)
        return bool(expired)


Command = Decide | Cancel | TimeOutApprovals


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
        }
    if isinstance(command, Cancel):
        return {"op": "cancel", "reason": command.reason}
    return {"op": "time_out_approvals", "now": command.now}


def from_json(body: dict[str, Any]) -> Command:
    """The command of a control request's body; InvalidArgument if it names none."""
    op = body.get("op")
    if op == "decide":
        return Decide(
            str(body["tool_call_id"]), bool(body["approved"]), str(body.get("reason", ""))
        )
    if op == "cancel":
        return Cancel(str(body.get("reason", "")))
    if op == "time_out_approvals":
        return TimeOutApprovals(float(body["now"]))
    raise InvalidArgument("op", f"unknown control operation {op!r}")
