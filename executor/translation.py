"""Translation between the API's messages and the domain's values. Nothing else."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from common.errors import InvalidArgument
from eventstore.agent_config import (
    DEFAULT_APPROVAL_TIMEOUT,
    DEFAULT_MAX_MODEL_CALLS,
    DEFAULT_TOOL_TIMEOUT,
    MAX_AGENT_BYTES,
    MAX_PARAMETERS_BYTES,
    MAX_SCRIPTED_TOOL_CALLS,
    MAX_SCRIPTED_TURNS,
    MAX_TOOLS,
    AgentConfig,
    ClientToolSettings,
    ExecutionMode,
    HttpToolSettings,
    McpServerSettings,
    ModelSettings,
    ScriptedSettings,
    ScriptedToolCall,
    ScriptedTurn,
    ToolSettings,
    check_bytes,
    check_count,
)
from eventstore.agents import StoredAgent
from eventstore.retry_policy import (
    DEFAULT_MODEL_RETRY_POLICY,
    DEFAULT_TOOL_RETRY_POLICY,
    RetryPolicy,
)
from eventstore.run import Run
from eventstore.run_commands import result_digest
from eventstore.run_list import RunRecord
from eventstore.run_store import StoredEvent
from executor.run_stream import set_time, tool_call_proto

MODES: dict[int, ExecutionMode] = {
    agent_pb2.EXECUTION_MODE_CLASSIC: "classic",
    agent_pb2.EXECUTION_MODE_DURABLE: "durable",
}
MODE_ENUMS: dict[str, agent_pb2.ExecutionMode.ValueType] = {
    "classic": agent_pb2.EXECUTION_MODE_CLASSIC,
    "durable": agent_pb2.EXECUTION_MODE_DURABLE,
}
STATUS_ENUMS: dict[str, run_pb2.RunStatus.ValueType] = {
    "running": run_pb2.RUN_STATUS_RUNNING,
    "awaiting_approval": run_pb2.RUN_STATUS_AWAITING_APPROVAL,
    "awaiting_tool_result": run_pb2.RUN_STATUS_AWAITING_TOOL_RESULT,
    "completed": run_pb2.RUN_STATUS_COMPLETED,
    "failed": run_pb2.RUN_STATUS_FAILED,
    "cancelled": run_pb2.RUN_STATUS_CANCELLED,
}
STATUSES = {v: k for k, v in STATUS_ENUMS.items()}

# A run's stored history goes out in batches of about this size: one message per event would
# cost a message on every hop per event; 1 MiB stays far below gRPC's 4 MiB default limit.
HISTORY_BATCH_BYTES = 1 << 20
ERROR_ENUMS: dict[str, run_pb2.RunErrorCode.ValueType] = {
    "EXECUTOR_LOST": run_pb2.RUN_ERROR_CODE_EXECUTOR_LOST,
    "MODEL_ERROR": run_pb2.RUN_ERROR_CODE_MODEL_ERROR,
    "MAX_MODEL_CALLS": run_pb2.RUN_ERROR_CODE_MAX_MODEL_CALLS,
    "INVALID_AGENT": run_pb2.RUN_ERROR_CODE_INVALID_AGENT,
    "ATTEMPTS_EXHAUSTED": run_pb2.RUN_ERROR_CODE_ATTEMPTS_EXHAUSTED,
    "INTERNAL": run_pb2.RUN_ERROR_CODE_INTERNAL,
    "DISPATCH_FAILED": run_pb2.RUN_ERROR_CODE_DISPATCH_FAILED,
    "TOOL_UNAVAILABLE": run_pb2.RUN_ERROR_CODE_TOOL_UNAVAILABLE,
}


def mode_of(value: int) -> ExecutionMode | None:
    """The mode an enum value names; None for UNSPECIFIED."""
    if value == agent_pb2.EXECUTION_MODE_UNSPECIFIED:
        return None
    mode = MODES.get(value)
    if mode is None:
        raise InvalidArgument("execution_mode", f"unknown execution mode {value}")
    return mode


# An agent's fields as protobuf bytes, beyond which they are certainly over their bounds as JSON
# (AgentConfig.validate): a Struct of numbers takes up to about 5.5 times its JSON's size, any
# other field no more than its JSON. Refused before they are turned into Python objects, which
# for megabytes of a Struct takes seconds.
MAX_PARAMETERS_PROTO_BYTES = 8 * MAX_PARAMETERS_BYTES
MAX_AGENT_PROTO_BYTES = MAX_AGENT_BYTES + MAX_PARAMETERS_PROTO_BYTES


def check_agent_proto(agent: agent_pb2.Agent) -> None:
    """Raises InvalidArgument, as AgentConfig.validate would, for an agent too large to be worth
    translating (see MAX_AGENT_PROTO_BYTES)."""
    parameters = agent.model.parameters.ByteSize()
    if parameters > MAX_PARAMETERS_PROTO_BYTES:
        check_bytes("agent.model.parameters", parameters, MAX_PARAMETERS_BYTES)
    size = agent.ByteSize()
    if size > MAX_AGENT_PROTO_BYTES:
        check_bytes("agent", size, MAX_AGENT_BYTES)
    check_count("agent.tools", len(agent.tools), MAX_TOOLS)
    turns = agent.model.scripted.turns
    check_count("agent.model.scripted.turns", len(turns), MAX_SCRIPTED_TURNS)
    for turn in turns:
        check_count(
            "agent.model.scripted.turns.tool_calls", len(turn.tool_calls), MAX_SCRIPTED_TOOL_CALLS
        )


def agent_from_proto(agent: agent_pb2.Agent) -> AgentConfig:
    """The agent's configuration (not validated); raises InvalidArgument for an agent too large
    to translate."""
    check_agent_proto(agent)
    model = agent.model
    scripted = model.scripted
    return AgentConfig(
        agent_id=agent.id,
        version=agent.version,
        display_name=agent.display_name,
        execution_mode=mode_of(agent.execution_mode) or "classic",
        instructions=agent.instructions,
        approval_timeout=(
            seconds_of(agent.approval_timeout)
            if agent.HasField("approval_timeout")
            else DEFAULT_APPROVAL_TIMEOUT
        ),
        max_model_calls=agent.max_model_calls or DEFAULT_MAX_MODEL_CALLS,
        model_retry_policy=(
            _retry_policy_of(agent.model_retry_policy, DEFAULT_MODEL_RETRY_POLICY)
            if agent.HasField("model_retry_policy")
            else DEFAULT_MODEL_RETRY_POLICY
        ),
        tool_retry_policy=(
            _retry_policy_of(agent.tool_retry_policy, DEFAULT_TOOL_RETRY_POLICY)
            if agent.HasField("tool_retry_policy")
            else DEFAULT_TOOL_RETRY_POLICY
        ),
        model=ModelSettings(
            provider=model.provider,
            name=model.name,
            parameters=json_format.MessageToDict(model.parameters),
            base_url=model.base_url,
            api_key_env=model.api_key_env,
            scripted=ScriptedSettings(
                first_token_delay=seconds_of(scripted.first_token_delay),
                token_delay=seconds_of(scripted.token_delay),
                turns=tuple(
                    ScriptedTurn(
                        text=turn.text,
                        tool_calls=tuple(
                            ScriptedToolCall(c.name, c.arguments_json) for c in turn.tool_calls
                        ),
                    )
                    for turn in scripted.turns
                ),
            ),
        ),
        tools=tuple(_tool_of(index, tool) for index, tool in enumerate(agent.tools)),
    )


def _tool_of(index: int, tool: agent_pb2.Tool) -> ToolSettings:
    """A tool's settings."""
    field = f"agent.tools[{index}]"
    kind = tool.WhichOneof("kind")
    timeout = seconds_of(tool.timeout) if tool.HasField("timeout") else DEFAULT_TOOL_TIMEOUT
    policy = (
        _retry_policy_of(tool.retry_policy, DEFAULT_TOOL_RETRY_POLICY)
        if tool.HasField("retry_policy")
        else None
    )
    name = tool.name
    if kind == "builtin":
        if name and name != tool.builtin.name:
            raise InvalidArgument(f"{field}.name", "must be empty or equal to builtin.name")
        name = tool.builtin.name
    settings = ToolSettings(
        name=name,
        description=tool.description,
        requires_approval=tool.requires_approval,
        timeout=timeout,
        retry_policy=policy,
    )
    if kind == "client":
        return _client_tool_of(field, tool, settings)
    if kind == "mcp":
        mcp = tool.mcp
        return replace(
            settings,
            kind="mcp",
            mcp=McpServerSettings(
                url=mcp.url,
                headers_from_env=dict(mcp.headers_from_env),
                tool_names=tuple(mcp.tool_names),
                name_prefix=mcp.name_prefix,
            ),
        )
    if kind != "http":
        return settings
    if tool.name:
        raise InvalidArgument(f"{field}.name", "must be empty for an HTTP tool (use http.name)")
    http = tool.http
    return replace(
        settings,
        name=http.name,
        kind="http",
        http=HttpToolSettings(
            url=http.url,
            description=http.description,
            parameters=_json_of(http.parameters),
            headers_from_env=dict(http.headers_from_env),
        ),
    )


def _client_tool_of(field: str, tool: agent_pb2.Tool, settings: ToolSettings) -> ToolSettings:
    if tool.name:
        raise InvalidArgument(f"{field}.name", "must be empty for a client tool (use client.name)")
    client = tool.client
    return replace(
        settings,
        name=client.name,
        kind="client",
        client=ClientToolSettings(
            description=client.description, parameters=_json_of(client.parameters)
        ),
    )


def _json_of(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as JSON, with its whole numbers as integers again (a Struct holds every number
    as a double; a JSON Schema's "maxLength": 5 must not come back as 5.0)."""

    def whole(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        if isinstance(value, dict):
            return {k: whole(v) for k, v in value.items()}
        if isinstance(value, list):
            return [whole(v) for v in value]
        return value

    result: dict[str, Any] = whole(json_format.MessageToDict(struct))
    return result


def _retry_policy_of(policy: agent_pb2.RetryPolicy, default: RetryPolicy) -> RetryPolicy:
    """A policy's fields, each unset one taking ``default``'s (see the proto's comments)."""
    initial = (
        seconds_of(policy.initial_interval)
        if policy.HasField("initial_interval")
        else default.initial_interval
    )
    return RetryPolicy(
        maximum_attempts=policy.maximum_attempts or default.maximum_attempts,
        initial_interval=initial,
        backoff_coefficient=policy.backoff_coefficient or default.backoff_coefficient,
        maximum_interval=(
            seconds_of(policy.maximum_interval)
            if policy.HasField("maximum_interval")
            else max(default.maximum_interval, initial)
        ),
        non_retryable_error_codes=tuple(policy.non_retryable_error_codes),
    )


def seconds_of(duration: duration_pb2.Duration) -> float:
    """A Duration in seconds, whatever its value (Duration.ToTimedelta overflows on huge ones):
    AgentConfig.validate then refuses one out of bounds, naming its field."""
    return duration.seconds + duration.nanos / 1e9


def agent_to_proto(config: AgentConfig) -> agent_pb2.Agent:
    agent = agent_pb2.Agent(
        id=config.agent_id,
        version=config.version,
        display_name=config.display_name,
        execution_mode=MODE_ENUMS[config.execution_mode],
        instructions=config.instructions,
        max_model_calls=config.max_model_calls,
    )
    agent.approval_timeout.FromNanoseconds(int(config.approval_timeout * 1e9))
    model = agent.model
    model.provider = config.model.provider
    model.name = config.model.name
    model.base_url = config.model.base_url
    model.api_key_env = config.model.api_key_env
    parameters = struct_pb2.Struct()
    parameters.update(config.model.parameters)
    model.parameters.CopyFrom(parameters)
    scripted = config.model.scripted
    model.scripted.first_token_delay.FromNanoseconds(int(scripted.first_token_delay * 1e9))
    model.scripted.token_delay.FromNanoseconds(int(scripted.token_delay * 1e9))
    for turn in scripted.turns:
        model.scripted.turns.add(
            text=turn.text,
            tool_calls=[
                agent_pb2.ScriptedToolCall(name=c.name, arguments_json=c.arguments_json)
                for c in turn.tool_calls
            ],
        )
    for tool in config.tools:
        added = agent.tools.add(
            description=tool.description, requires_approval=tool.requires_approval
        )
        if tool.http is not None:
            added.http.name = tool.name
            added.http.url = tool.http.url
            added.http.description = tool.http.description
            added.http.parameters.update(tool.http.parameters)
            added.http.headers_from_env.update(tool.http.headers_from_env)
        elif tool.client is not None:
            added.client.name = tool.name
            added.client.description = tool.client.description
            added.client.parameters.update(tool.client.parameters)
        elif tool.mcp is not None:
            added.mcp.url = tool.mcp.url
            added.mcp.headers_from_env.update(tool.mcp.headers_from_env)
            added.mcp.tool_names.extend(tool.mcp.tool_names)
            added.mcp.name_prefix = tool.mcp.name_prefix
        else:
            added.name = tool.name  # (not builtin: what clients before the kinds read)
        added.timeout.FromNanoseconds(int(tool.timeout * 1e9))
        if tool.retry_policy is not None:
            _set_retry_policy(added.retry_policy, tool.retry_policy)
    _set_retry_policy(agent.model_retry_policy, config.model_retry_policy)
    _set_retry_policy(agent.tool_retry_policy, config.tool_retry_policy)
    return agent


def _set_retry_policy(message: agent_pb2.RetryPolicy, policy: RetryPolicy) -> None:
    message.maximum_attempts = policy.maximum_attempts
    message.initial_interval.FromNanoseconds(int(policy.initial_interval * 1e9))
    message.backoff_coefficient = policy.backoff_coefficient
    message.maximum_interval.FromNanoseconds(int(policy.maximum_interval * 1e9))
    message.non_retryable_error_codes.extend(policy.non_retryable_error_codes)


def stored_agent_to_proto(stored: StoredAgent) -> agent_pb2.Agent:
    """An agent as the catalog holds it: its configuration with its create and update times."""
    agent = agent_to_proto(stored.config)
    agent.create_time.FromDatetime(stored.create_time)
    agent.update_time.FromDatetime(stored.update_time)
    return agent


def record_to_proto(record: RunRecord) -> run_pb2.Run:
    run = run_pb2.Run(
        id=record.run_id,
        agent_id=record.agent_id,
        agent_version=record.agent_version,
        conversation_id=record.conversation_id,
        execution_mode=MODE_ENUMS.get(record.execution_mode, agent_pb2.EXECUTION_MODE_UNSPECIFIED),
        status=STATUS_ENUMS.get(record.status, run_pb2.RUN_STATUS_UNSPECIFIED),
        input=record.input,
        output=record.output,
        usage=usage_of(record),
        pending_approvals=[tool_call_proto(c) for c in record.pending_approvals],
        request_id=record.request_id,
        version=record.version,
        forked_from_run_id=record.forked_from_run_id,
        forked_at_version=record.forked_at_version,
    )
    if record.error_code:
        run.error.CopyFrom(error_of(record))
    set_time(run.create_time, record.created_at)
    set_time(run.update_time, record.updated_at)
    return run


def usage_of(record: RunRecord) -> run_pb2.Usage:
    return run_pb2.Usage(input_tokens=record.input_tokens, output_tokens=record.output_tokens)


def error_of(record: RunRecord) -> run_pb2.RunError:
    return run_pb2.RunError(
        code=ERROR_ENUMS.get(record.error_code, run_pb2.RUN_ERROR_CODE_INTERNAL),
        message=record.error_message,
        retryable=record.error_retryable,
    )


def record_of(run: Run, executor_id: str = "") -> RunRecord:
    """The run-list row of a run aggregate, as it is now. (It reads the pinned agent's JSON,
    not its parsed form: a run whose agent this version cannot parse must still be listed.)"""
    error = run.error
    pending = run.awaiting_decision()
    return RunRecord(
        run_id=run.run_id,
        tenant=run.tenant,
        agent_id=run.agent["agent_id"],
        request_id=run.request_id,
        agent_version=int(run.agent.get("version", 0)),
        conversation_id=run.conversation_id,
        execution_mode=run.execution_mode,
        status=run.status,
        input=run.input,
        output=run.output,
        input_tokens=run.usage["input_tokens"],
        output_tokens=run.usage["output_tokens"],
        error_code=error["code"] if error else "",
        error_message=error["message"] if error else "",
        error_retryable=error["retryable"] if error else False,
        pending_approvals=pending,
        decisions={call_id: d["approved"] for call_id, d in run.decisions.items()},
        client_results={
            call_id: result_digest(outcome["output"], outcome["is_error"])
            for call_id, outcome in run.outcomes.items()
            if call_id in run.client_calls
        },
        executor_id=executor_id or run.holder,
        created_at=run.created_on.timestamp(),
        updated_at=run.modified_on.timestamp(),
        version=run.version if run.execution_mode == "durable" else 0,
        forked_from_run_id=run.forked_from_run_id,
        forked_at_version=run.forked_at_version,
        approval_deadline=run.approval_deadline or 0.0,
    )


def run_to_proto(run: Run, executor_id: str = "") -> run_pb2.Run:
    return record_to_proto(record_of(run, executor_id))


def history_batches(
    events: Iterable[StoredEvent], max_bytes: int
) -> Iterator[run_service_pb2.ListRunEventsResponse]:
    """The events as ListRunEvents responses of consecutive events, each closed once it holds
    ``max_bytes`` or more (so a batch exceeds it by one event at most); none for no events."""
    batch = run_service_pb2.ListRunEventsResponse()
    size = 0
    for event in events:
        payload = event.payload_json
        stored = batch.events.add(version=event.version, type=event.type, payload_json=payload)
        stored.time.FromDatetime(event.time)
        size += len(payload) + len(event.type) + 32
        if size >= max_bytes:
            yield batch
            batch = run_service_pb2.ListRunEventsResponse()
            size = 0
    if batch.events:
        yield batch
