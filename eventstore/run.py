"""A run as an event-sourced aggregate: pure domain, no I/O.

Both execution modes drive this same aggregate. Classic mode applies its events in memory only;
durable mode stores them (a step's events in one save) before the next step starts. Its events are
the results of the run's steps; eventstore.run_steps decides the next step from them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypedDict
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from common.errors import FailedPrecondition
from eventstore.agent_config import AgentConfig, ToolSettings
from eventstore.messages import (
    ChatMessage,
    ToolCall,
    Usage,
    add_usage,
    assistant_message,
    no_usage,
    tool_message,
    user_message,
)
from eventstore.retry_policy import RetryPolicy
from eventstore.run_status import TERMINAL_STATUSES as TERMINAL_STATUSES  # (re-exported)
from eventstore.run_status import RunStatus


class Decision(TypedDict):
    approved: bool
    reason: str
    timed_out: bool


class ToolOutcome(TypedDict):
    output: str
    is_error: bool


class RunError(TypedDict):
    code: str
    message: str
    retryable: bool


class ModelFailure(TypedDict):
    """A failed attempt of a model call: what the provider said, and when (epoch seconds: a
    retry's backoff counts from it)."""

    step_index: int
    code: str
    message: str
    retryable: bool
    failed_at: float


class ToolFailure(TypedDict):
    """A failed attempt of a tool call that a retry may cure (a connection error, a timeout,
    HTTP 429 or 5xx): what failed, and when (epoch seconds: a retry's backoff counts from it).
    ``retry_after``: the seconds the tool asked to wait (HTTP Retry-After), 0 if it did not."""

    step_index: int
    tool_call_id: str
    code: str
    message: str
    retry_after: float
    failed_at: float


# The policies that runs requested before agents had any are read with: the defaults as they
# were then (a later change of the defaults must not change how those runs go on).
_V1_MODEL_RETRY_POLICY = RetryPolicy(3, 1.0, 2.0, 30.0)
_V1_TOOL_RETRY_POLICY = RetryPolicy(1, 1.0, 2.0, 30.0)


def _add_v1_retry_policies(agent: dict[str, Any]) -> None:
    agent.setdefault("model_retry_policy", _V1_MODEL_RETRY_POLICY.to_json())
    agent.setdefault("tool_retry_policy", _V1_TOOL_RETRY_POLICY.to_json())


class PinnedTool(TypedDict):
    """A tool of an MCP server as the run offers it: ``name`` (with the server's prefix) is what
    the model calls it; ``server`` is the server's index in the agent's tools; ``server_name``
    the server's own name for it."""

    name: str
    server: int
    server_name: str
    description: str
    parameters: dict[str, Any]


class Run(Aggregate):
    """One run of an agent. The aggregate id is the run id (a UUID).

    Its event classes are declared here, so that code reading recorded events dispatches on the
    classes themselves (the stored topic stays ``eventstore.run:Run.<name>``)."""

    # Version 2 of a run's state: its agent has retry policies, and ``releases`` is always
    # there. Version 3: ``model_failures``. Version 4: ``tool_failures``. Version 5:
    # ``client_calls`` and ``edited_arguments``. Version 6: ``pinned_tools``. Version 7:
    # ``trace_context``. Snapshots of earlier versions are upcast when they are read.
    class_version = 7

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        _add_v1_retry_policies(state["agent"])
        state.setdefault("releases", {})

    @staticmethod
    def upcast_v2_v3(state: dict[str, Any]) -> None:
        state["model_failures"] = []

    @staticmethod
    def upcast_v3_v4(state: dict[str, Any]) -> None:
        state["tool_failures"] = []

    @staticmethod
    def upcast_v4_v5(state: dict[str, Any]) -> None:
        state["client_calls"] = {}
        state["edited_arguments"] = {}

    @staticmethod
    def upcast_v5_v6(state: dict[str, Any]) -> None:
        state["pinned_tools"] = None

    @staticmethod
    def upcast_v6_v7(state: dict[str, Any]) -> None:
        state["trace_context"] = {}

    class Requested(Aggregate.Created):
        """Version 2: the agent has retry policies (earlier requests get the defaults). Version
        3: ``trace_context``, the W3C trace context of the run's trace (empty: not traced), so
        that whoever takes the run up continues its trace."""

        class_version = 3

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            _add_v1_retry_policies(state["agent"])

        @staticmethod
        def upcast_v2_v3(state: dict[str, Any]) -> None:
            state["trace_context"] = {}

        run_id: str
        tenant: str
        request_id: str
        agent: dict[str, Any]
        input: str
        conversation_id: str
        history: list[ChatMessage]
        execution_mode: str
        forked_from_run_id: str
        forked_at_version: int
        trace_context: dict[str, str]

    class StepResult(Aggregate.Event):
        """What a step recorded (a model call, a tool call, an approval and its decision): a
        fork of the run records it again. Executor bookkeeping (Resumed, Released) is not."""

    class ModelCallCompleted(StepResult):
        step_index: int
        text: str
        tool_calls: list[ToolCall]
        usage: Usage

    class ModelCallFailed(Aggregate.Event):
        """An attempt of a model call failed; the retry policy decides what follows. A fork
        does not record it again: its model call starts afresh."""

        step_index: int
        attempt: int
        code: str
        message: str
        retryable: bool
        failed_at: float

    class ToolCallFailed(Aggregate.Event):
        """An attempt of a tool call failed in a way a retry may cure; the tool's retry policy
        decides what follows (another attempt, or the failure goes to the model). A fork does
        not record it again: its tool call starts afresh."""

        step_index: int
        tool_call_id: str
        attempt: int
        code: str
        message: str
        retry_after: float
        failed_at: float

    class ToolsListed(StepResult):
        """The tools of the agent's MCP servers, as listed when the run started: the run offers
        exactly these, wherever and whenever it goes on (a fork too)."""

        tools: list[PinnedTool]

    class ToolApprovalRequired(StepResult):
        step_index: int
        tool_call_id: str
        expire_at: float

    class ToolApprovalDecided(StepResult):
        """Version 2: ``arguments_json``, the arguments an approval edited ("" if none: the
        call runs with the model's, which its ModelCallCompleted keeps either way)."""

        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["arguments_json"] = ""

        tool_call_id: str
        approved: bool
        reason: str
        timed_out: bool
        arguments_json: str

    class ClientToolCallRequired(StepResult):
        """The call is the client's to execute (a client tool): the run waits for its result
        until ``expire_at`` (epoch seconds). ``arguments_json``: what the client runs it with
        (the approved arguments, if an approval edited them)."""

        step_index: int
        tool_call_id: str
        arguments_json: str
        expire_at: float

    class ToolCallCompleted(StepResult):
        step_index: int
        tool_call_id: str
        output: str
        is_error: bool

    class Resumed(Aggregate.Event):
        step_index: int
        executor_id: str

    class Released(Aggregate.Event):
        step_index: int
        executor_id: str

    class Ended(Aggregate.Event):
        """The run reached a terminal status; nothing is recorded after it."""

    class Completed(Ended):
        output: str

    class Failed(Ended):
        code: str
        message: str
        retryable: bool

    class Cancelled(Ended):
        reason: str

    # The agent parsed from ``agent`` (see agent_config), once per instance. In a slot, not an
    # attribute: the library snapshots and compares aggregates by their __dict__, where it has
    # no JSON form and would make two equal runs differ.
    __slots__ = ("_agent_config",)
    if TYPE_CHECKING:  # (a class annotation would make the library process Run as a dataclass)
        _agent_config: AgentConfig

    @staticmethod
    def create_id(run_id: str) -> UUID:
        return UUID(run_id)

    def __getstate__(self) -> dict[str, Any]:
        """What a copy of the run gets (the library deep-copies runs from its cache): not the
        parsed agent, which a copy parses again faster than it would be copied."""
        return self.__dict__

    @event(Requested)
    def __init__(
        self,
        run_id: str,
        tenant: str,
        request_id: str,
        agent: dict[str, Any],
        input: str,
        conversation_id: str,
        history: list[ChatMessage],
        execution_mode: str,
        forked_from_run_id: str = "",
        forked_at_version: int = 0,
        trace_context: dict[str, str] = {},  # noqa: B006 (never changed: copied below)
    ) -> None:
        self.run_id = run_id
        self.tenant = tenant
        self.request_id = request_id
        self.agent = agent
        self.input = input
        self.conversation_id = conversation_id
        self.history = history
        self.execution_mode = execution_mode
        self.messages: list[ChatMessage] = [user_message(input)]
        self.status: RunStatus = "running"
        self.model_calls = 0
        self.steps_completed = 0
        self.usage: Usage = no_usage()
        self.approvals_required: dict[str, float] = {}
        self.decisions: dict[str, Decision] = {}
        self.outcomes: dict[str, ToolOutcome] = {}
        self.output = ""
        self.error: RunError | None = None
        self.cancel_reason = ""
        self.attempts: dict[str, int] = {}  # step index (as text: JSON keys) -> attempt
        self.releases: dict[str, int] = {}  # step index -> attempts handed back by a drain
        self.model_failures: list[ModelFailure] = []  # of the model call in progress
        self.tool_failures: list[ToolFailure] = []  # of the run's tool calls
        self.client_calls: dict[str, float] = {}  # tool call id -> when waiting for it ends
        self.edited_arguments: dict[str, str] = {}  # tool call id -> arguments an approval set
        self.pinned_tools: list[PinnedTool] | None = None  # its MCP servers' tools, once listed
        self.holder = ""
        self.forked_from_run_id = forked_from_run_id
        self.forked_at_version = forked_at_version
        self.trace_context = dict(trace_context)

    # -- reading -------------------------------------------------------------------------------

    @property
    def agent_config(self) -> AgentConfig:
        """The agent as of the run's start (pinned in its request), as a typed value.

        Parsed on first use rather than when the request is applied: a run whose agent this
        version cannot read still loads, so that it can be listed and failed."""
        try:
            return self._agent_config
        except AttributeError:
            self._agent_config = AgentConfig.from_json(self.agent)
            return self._agent_config

    def know_agent(self, config: AgentConfig) -> None:
        """Gives the run its pinned agent already parsed: ``config``, whose JSON form the run
        was requested with. Spares a parse that, for an agent of a megabyte, holds the event
        loop for tens of milliseconds."""
        self._agent_config = config

    @property
    def is_finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def model_messages(self) -> list[ChatMessage]:
        """What the model sees: the conversation's earlier turns, then this run's messages."""
        return [*self.history, *self.messages]

    def pending_tool_calls(self) -> list[ToolCall]:
        """The last model call's tool calls that have no outcome yet, in the model's order."""
        last = self.messages[-1]
        if last["role"] == "tool":
            last = next(m for m in reversed(self.messages) if m["role"] == "assistant")
        if last["role"] != "assistant":
            return []
        return [c for c in last.get("tool_calls", []) if c["id"] not in self.outcomes]

    def tool_call(self, tool_call_id: str) -> ToolCall:
        """The tool call of this run with this id (KeyError if there is none)."""
        for message in reversed(self.messages):  # (usually the last model call's: look there first)
            for call in message.get("tool_calls", []):
                if call["id"] == tool_call_id:
                    return call
        raise KeyError(tool_call_id)

    def completes_step(self, tool_call_id: str) -> bool:
        """Whether this call is the last of its model call's tool calls (they run in order, so
        its outcome completes the step)."""
        for message in reversed(self.messages):
            calls = message.get("tool_calls", [])
            if any(c["id"] == tool_call_id for c in calls):
                return calls[-1]["id"] == tool_call_id
        return False

    def requires_approval(self, call: ToolCall) -> bool:
        tool = self.tool_settings_of(call["name"])
        return tool is not None and tool.requires_approval

    def pinned_tool(self, name: str) -> PinnedTool | None:
        """The MCP server's tool the model calls ``name``, as pinned at the run's start."""
        return next((t for t in self.pinned_tools or () if t["name"] == name), None)

    def tool_schema(self, name: str) -> dict[str, Any] | None:
        """The JSON Schema of the arguments of the tool the model calls ``name``: as pinned for
        a tool of an MCP server (None: not known here)."""
        pinned = self.pinned_tool(name)
        if pinned is not None:
            return pinned["parameters"]
        settings = self.agent_config.tool(name)
        return settings.schema if settings is not None else None

    def tool_settings_of(self, name: str) -> ToolSettings | None:
        """The agent's settings of the tool the model calls ``name``: its own, or for a tool of
        an MCP server, the server's."""
        config = self.agent_config
        pinned = self.pinned_tool(name)
        return config.tools[pinned["server"]] if pinned is not None else config.tool(name)

    def attempt_of(self, step_index: int) -> int:
        """1, or more if the step was retried (its model call failed) or interrupted (by a
        crash or a drain) and taken up again."""
        return self.attempts.get(str(step_index), 1)

    def failures_of(self, step_index: int) -> list[ModelFailure]:
        """The failed attempts of the step's model call, oldest first (none once it
        completed)."""
        return [f for f in self.model_failures if f["step_index"] == step_index]

    def tool_failures_of(self, tool_call_id: str) -> list[ToolFailure]:
        """The failed attempts of a tool call, oldest first."""
        return [f for f in self.tool_failures if f["tool_call_id"] == tool_call_id]

    def failed_attempts_of(self, step_index: int) -> int:
        """How many attempts of the step failed (its model call's, or its tool calls'), as
        opposed to being ended by their executor stopping."""
        tool_failures = sum(1 for f in self.tool_failures if f["step_index"] == step_index)
        return len(self.failures_of(step_index)) + tool_failures

    def releases_of(self, step_index: int) -> int:
        """How many attempts of the step a draining executor handed back (see ``release``)."""
        return self.releases.get(str(step_index), 0)

    @property
    def approval_deadline(self) -> float | None:
        """When the first wait for the outside ends (epoch seconds: an undecided approval times
        out, or a client's tool result is too late), if the run waits."""
        waiting = [self.approvals_required[c["id"]] for c in self.awaiting_decision()]
        waiting += [self.client_calls[c["id"]] for c in self.awaiting_result()]
        return min(waiting) if waiting else None

    @property
    def waits(self) -> bool:
        """Whether the run waits for the outside (decisions, or a client's tool results)."""
        return bool(self.awaiting_decision() or self.awaiting_result())

    def awaiting_result(self) -> list[ToolCall]:
        """Tool calls handed to the client whose result has not come."""
        return [c for c in self.pending_tool_calls() if c["id"] in self.client_calls]

    def arguments_of(self, call: ToolCall) -> str:
        """The arguments the call runs with: an approval's edit, or the model's."""
        return self.edited_arguments.get(call["id"]) or call["arguments_json"]

    def check_result(self, tool_call_id: str, output: str, is_error: bool) -> bool:
        """Validates a client's result. True if it is new; False if it repeats the recorded one.

        Raises FailedPrecondition if the call does not wait for a result, or has another."""
        recorded = self.outcomes.get(tool_call_id)
        if recorded is not None and tool_call_id in self.client_calls:
            if recorded == {"output": output, "is_error": is_error}:
                return False
            raise FailedPrecondition(
                f"tool call {tool_call_id!r} already has another result; a result cannot change"
            )
        if self.is_finished:
            raise FailedPrecondition(f"run {self.run_id} has already ended ({self.status})")
        if tool_call_id not in self.client_calls:
            raise FailedPrecondition(
                f"tool call {tool_call_id!r} does not wait for a result from the client"
            )
        return True

    def awaiting_decision(self) -> list[ToolCall]:
        """Tool calls whose approval was required and not yet decided."""
        return [
            c
            for c in self.pending_tool_calls()
            if c["id"] in self.approvals_required and c["id"] not in self.decisions
        ]

    def check_decision(self, tool_call_id: str, approved: bool, arguments_json: str = "") -> bool:
        """Validates a decision. True if it is new; False if it repeats the recorded one.

        Raises FailedPrecondition if the call is not awaiting approval, or was decided otherwise.
        """
        recorded = self.decisions.get(tool_call_id)
        if recorded is not None:
            if recorded["approved"] == approved:
                if self.edited_arguments.get(tool_call_id, "") != arguments_json:
                    raise FailedPrecondition(
                        f"tool call {tool_call_id!r} was already approved with other arguments"
                    )
                return False
            verdict = "approved" if recorded["approved"] else "denied"
            how = " by the approval timeout" if recorded["timed_out"] else ""
            raise FailedPrecondition(
                f"tool call {tool_call_id!r} was already {verdict}{how}; a decision cannot change"
            )
        if self.is_finished:
            raise FailedPrecondition(f"run {self.run_id} has already ended ({self.status})")
        if tool_call_id not in self.approvals_required:
            raise FailedPrecondition(f"tool call {tool_call_id!r} is not awaiting approval")
        return True

    # -- events ----------------------------------------------------------------------------------

    @event(ModelCallCompleted)
    def record_model_call(
        self, step_index: int, text: str, tool_calls: list[ToolCall], usage: Usage
    ) -> None:
        self.messages.append(assistant_message(text, tool_calls))
        self.model_calls += 1
        self.steps_completed = step_index
        self.usage = add_usage(self.usage, usage)
        self.model_failures = []

    def record_model_failure(
        self, step_index: int, code: str, message: str, retryable: bool
    ) -> None:
        """The model call of ``step_index`` failed (``code``, ``retryable``: as its provider
        said); it is then tried again as the step's next attempt, or the run fails
        (eventstore.run_steps decides, from the agent's retry policy)."""
        self._model_call_failed(
            step_index=step_index,
            attempt=self.attempt_of(step_index),
            code=code,
            message=message,
            retryable=retryable,
            failed_at=time.time(),
        )

    @event(ModelCallFailed)
    def _model_call_failed(
        self,
        step_index: int,
        attempt: int,
        code: str,
        message: str,
        retryable: bool,
        failed_at: float,
    ) -> None:
        self.model_failures.append(
            {
                "step_index": step_index,
                "code": code,
                "message": message,
                "retryable": retryable,
                "failed_at": failed_at,
            }
        )
        self.attempts[str(step_index)] = self.attempt_of(step_index) + 1

    def record_tool_failure(
        self, step_index: int, tool_call_id: str, code: str, message: str, retry_after: float
    ) -> None:
        """An attempt of the tool call failed in a way a retry may cure; it is then tried again
        as the step's next attempt, or its failure goes to the model (eventstore.run_steps
        decides, from the tool's retry policy as of the run's start)."""
        self._tool_call_failed(
            step_index=step_index,
            tool_call_id=tool_call_id,
            attempt=self.attempt_of(step_index),
            code=code,
            message=message,
            retry_after=retry_after,
            failed_at=time.time(),
        )

    @event(ToolCallFailed)
    def _tool_call_failed(
        self,
        step_index: int,
        tool_call_id: str,
        attempt: int,
        code: str,
        message: str,
        retry_after: float,
        failed_at: float,
    ) -> None:
        self.tool_failures.append(
            {
                "step_index": step_index,
                "tool_call_id": tool_call_id,
                "code": code,
                "message": message,
                "retry_after": retry_after,
                "failed_at": failed_at,
            }
        )
        self.attempts[str(step_index)] = self.attempt_of(step_index) + 1

    @event(ToolsListed)
    def list_tools(self, tools: list[PinnedTool]) -> None:
        """Pins the tools of the agent's MCP servers (see ToolsListed)."""
        self.pinned_tools = tools

    @event(ToolApprovalRequired)
    def require_approval(self, step_index: int, tool_call_id: str, expire_at: float) -> None:
        self.approvals_required[tool_call_id] = expire_at
        self.status = "awaiting_approval"

    @event(ToolApprovalDecided)
    def decide(
        self,
        tool_call_id: str,
        approved: bool,
        reason: str,
        timed_out: bool,
        arguments_json: str = "",
    ) -> None:
        self.decisions[tool_call_id] = {
            "approved": approved,
            "reason": reason,
            "timed_out": timed_out,
        }
        if arguments_json:
            self.edited_arguments[tool_call_id] = arguments_json
        if not self.awaiting_decision():
            self.status = "running"

    @event(ClientToolCallRequired)
    def require_client_result(
        self, step_index: int, tool_call_id: str, arguments_json: str, expire_at: float
    ) -> None:
        self.client_calls[tool_call_id] = expire_at
        self.status = "awaiting_tool_result"

    @event(ToolCallCompleted)
    def record_tool_outcome(
        self, step_index: int, tool_call_id: str, output: str, is_error: bool
    ) -> None:
        self.outcomes[tool_call_id] = {"output": output, "is_error": is_error}
        self.messages.append(tool_message(tool_call_id, output, is_error))
        if self.status == "awaiting_tool_result":
            self.status = "running"
        if not self.pending_tool_calls():
            self.steps_completed = step_index

    def resume(self, executor_id: str) -> None:
        """An executor takes the run up after its previous executor stopped mid-way: the step
        in progress (if it had started) runs again as a new attempt. Recording this is the
        taker's claim: a stale executor's next commit conflicts with it."""
        self._resumed(step_index=self.steps_completed + 1, executor_id=executor_id)

    @event(Resumed)
    def _resumed(self, step_index: int, executor_id: str) -> None:
        self.attempts[str(step_index)] = self.attempt_of(step_index) + 1
        self.holder = executor_id

    def release(self, executor_id: str) -> None:
        """A draining executor (or one whose taking the run up failed) hands the run back: the
        step in progress runs again elsewhere, and its interrupted attempt does not count
        towards the step's failed attempts."""
        self._released(step_index=self.steps_completed + 1, executor_id=executor_id)

    @event(Released)
    def _released(self, step_index: int, executor_id: str) -> None:
        self.releases[str(step_index)] = self.releases_of(step_index) + 1
        self.holder = ""

    @event(Completed)
    def complete(self, output: str) -> None:
        self.output = output
        self.status = "completed"

    @event(Failed)
    def fail(self, code: str, message: str, retryable: bool) -> None:
        self.error = {"code": code, "message": message, "retryable": retryable}
        self.status = "failed"

    @event(Cancelled)
    def cancel(self, reason: str) -> None:
        self.cancel_reason = reason
        self.status = "cancelled"
