"""The run's state machine: from a run's events alone, decide its one next step. No I/O.

Both modes ask ``next_step`` what to do, do it, record its result as events, and ask again.
"""

from __future__ import annotations

from dataclasses import dataclass

from eventstore.messages import ToolCall
from eventstore.run import Decision, Run

MODEL_ERROR = "MODEL_ERROR"
ATTEMPTS_EXHAUSTED = "ATTEMPTS_EXHAUSTED"


@dataclass(frozen=True)
class CallModel:
    """Call the model with the run's messages. ``call_index`` counts the run's model calls;
    ``attempt`` is the step's attempt. A retry says ``not_before`` (epoch seconds): the end of
    its backoff."""

    step_index: int
    call_index: int
    attempt: int = 1
    not_before: float = 0.0


@dataclass(frozen=True)
class ListTools:
    """List the tools of the agent's MCP servers and pin them in the run (before its first
    model call)."""


@dataclass(frozen=True)
class RequestApprovals:
    """Ask a human to decide on these tool calls (record that approval is required)."""

    step_index: int
    calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class AwaitApprovals:
    """Wait until these tool calls are decided, or until ``expire_at`` (epoch seconds)."""

    step_index: int
    calls: tuple[ToolCall, ...]
    expire_at: float


@dataclass(frozen=True)
class RunTool:
    """Execute one tool call; if ``denial`` is set, record the denial instead of executing. A
    retry says ``not_before`` (epoch seconds): the end of its backoff. ``exhausted``: the call
    failed and its retry policy allows no more attempts: record this error for the model
    instead of executing."""

    step_index: int
    call: ToolCall
    denial: Decision | None
    not_before: float = 0.0
    exhausted: str = ""


@dataclass(frozen=True)
class HandToClient:
    """The call is the client's to execute (a client tool): record that the run waits for its
    result, with the arguments the client runs it with."""

    step_index: int
    call: ToolCall
    arguments_json: str


@dataclass(frozen=True)
class AwaitResults:
    """Wait until the client submits these calls' results, or until ``expire_at``."""

    step_index: int
    calls: tuple[ToolCall, ...]
    expire_at: float


@dataclass(frozen=True)
class Finish:
    """Complete the run with this output."""

    output: str


@dataclass(frozen=True)
class FailRun:
    """Fail the run; ``retryable``: whether running it again may succeed."""

    code: str
    message: str
    retryable: bool = False


@dataclass(frozen=True)
class Finished:
    """The run has ended; nothing is left to do."""


Step = (
    ListTools
    | CallModel
    | RequestApprovals
    | AwaitApprovals
    | RunTool
    | HandToClient
    | AwaitResults
    | Finish
    | FailRun
    | Finished
)


def next_step(run: Run) -> Step:
    """The one next step of ``run``, decided from its recorded events alone."""
    if run.is_finished:
        return Finished()
    if run.pinned_tools is None and run.agent_config.mcp_servers:
        return ListTools()
    step_index = run.steps_completed + 1
    last = run.messages[-1]
    if last["role"] == "assistant" and not last.get("tool_calls"):
        return Finish(last["content"])
    pending = run.pending_tool_calls()
    if not pending:
        max_calls = run.agent_config.max_model_calls
        if run.model_calls >= max_calls:
            return FailRun(
                "MAX_MODEL_CALLS",
                f"the run needed more than the agent's {max_calls} model calls",
            )
        return _model_call(run, step_index)
    unrequested = tuple(
        c for c in pending if run.requires_approval(c) and c["id"] not in run.approvals_required
    )
    if unrequested:
        return RequestApprovals(step_index=step_index, calls=unrequested)
    undecided = tuple(run.awaiting_decision())
    if undecided:
        expire_at = min(run.approvals_required[c["id"]] for c in undecided)
        return AwaitApprovals(step_index=step_index, calls=undecided, expire_at=expire_at)
    call = pending[0]
    decision = run.decisions.get(call["id"])
    if decision is not None and not decision["approved"]:
        return RunTool(step_index=step_index, call=call, denial=decision)
    if _client_executes(run, call):
        if call["id"] in run.client_calls:
            expire_at = run.client_calls[call["id"]]
            return AwaitResults(step_index=step_index, calls=(call,), expire_at=expire_at)
        return HandToClient(step_index=step_index, call=call, arguments_json=run.arguments_of(call))
    return _tool_call(run, step_index, call)


def _client_executes(run: Run, call: ToolCall) -> bool:
    tool = run.agent_config.tool(call["name"])
    return tool is not None and tool.kind == "client"


def _tool_call(run: Run, step_index: int, call: ToolCall) -> RunTool:
    """The tool call, again after a backoff if an attempt failed; or, if the tool's retry
    policy (as of the run's start) allows no further attempt, its failure for the model."""
    failures = run.tool_failures_of(call["id"])
    if not failures:
        return RunTool(step_index=step_index, call=call, denial=None)
    config = run.agent_config
    last, policy = failures[-1], config.tool_retry_policy_of(run.tool_settings_of(call["name"]))
    if not policy.retries(last["code"], True, len(failures)):
        message = last["message"]
        if len(failures) >= policy.maximum_attempts:
            attempts = f"{len(failures)} attempt{'s' if len(failures) > 1 else ''}"
            message += f" (after {attempts}: the tool's retry policy allows no more)"
        return RunTool(step_index=step_index, call=call, denial=None, exhausted=message)
    wait = policy.interval(len(failures))
    if last["retry_after"] > 0:  # what the tool asked for, within the policy's longest wait
        wait = min(max(wait, last["retry_after"]), policy.maximum_interval)
    return RunTool(
        step_index=step_index, call=call, denial=None, not_before=last["failed_at"] + wait
    )


def _model_call(run: Run, step_index: int) -> CallModel | FailRun:
    """The step's model call, again after a backoff if it failed; or the run fails if the
    agent's retry policy (as of the run's start) allows no further attempt."""
    attempt = run.attempt_of(step_index)
    failures = run.failures_of(step_index)
    if not failures:
        return CallModel(step_index=step_index, call_index=run.model_calls, attempt=attempt)
    last, policy = failures[-1], run.agent_config.model_retry_policy
    if not policy.retries(last["code"], last["retryable"], len(failures)):
        message = last["message"]
        if last["retryable"] and len(failures) >= policy.maximum_attempts:
            attempts = f"{len(failures)} attempt{'s' if len(failures) > 1 else ''}"
            message += f" (after {attempts}: the agent's retry policy allows no more)"
        return FailRun(MODEL_ERROR, message, retryable=last["retryable"])
    return CallModel(
        step_index=step_index,
        call_index=run.model_calls,
        attempt=attempt,
        not_before=last["failed_at"] + policy.interval(len(failures)),
    )


def exhausted_attempts(run: Run, max_attempts: int) -> FailRun | None:
    """Decides, for a run taken up after its executor stopped mid-way, whether it may go on.

    None if it may (it is then resumed: its step in progress runs again as a new attempt). A
    FailRun if that step has already had ``max_attempts`` attempts: a step that keeps crashing
    its executor (a poison run) is not retried forever.
    """
    step_index = run.steps_completed + 1
    # Every attempt so far has ended (the run is being taken up again); those a draining
    # executor handed back did not crash it, nor did those whose model or tool call failed.
    attempts = (
        run.attempt_of(step_index)
        - run.releases_of(step_index)
        - run.failed_attempts_of(step_index)
    )
    if attempts < max_attempts:
        return None
    step = next_step(run)
    if isinstance(step, RunTool):
        what = f"step {step_index} (tool call {step.call['name']!r})"
    elif isinstance(step, CallModel):
        what = f"step {step_index} (model call)"
    else:
        what = f"step {step_index}"
    return FailRun(
        ATTEMPTS_EXHAUSTED,
        f"{what} was attempted {attempts} times and its executor stopped during each attempt; "
        f"the run is not retried again (the limit is {max_attempts} attempts)",
    )
