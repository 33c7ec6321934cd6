"""Tools the client executes and approvals that edit, in the pure domain: the state machine's
steps, the commands that steer them, and their JSON form for control requests."""

from __future__ import annotations

import json
import uuid

import pytest

from common.errors import FailedPrecondition, InvalidArgument
from eventstore.agent_config import (
    AgentConfig,
    ClientToolSettings,
    McpServerSettings,
    ModelSettings,
    ToolSettings,
)
from eventstore.messages import ToolCall, Usage
from eventstore.run import PinnedTool, Run
from eventstore.run_commands import (
    RESULT_TIMED_OUT,
    Decide,
    SubmitResult,
    TimeOutApprovals,
    from_json,
    to_json,
)
from eventstore.run_steps import (
    AwaitApprovals,
    AwaitResults,
    CallModel,
    HandToClient,
    RequestApprovals,
    next_step,
)
from tests.test_run_steps import replayed, status_of

USAGE: Usage = {"input_tokens": 1, "output_tokens": 1}
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
PARIS, OSLO = json.dumps({"city": "Paris"}), json.dumps({"city": "Oslo"})


def new_run(requires_approval: bool = False, tools: tuple[ToolSettings, ...] = ()) -> Run:
    """A run of an agent with ``tools``, by default the client's tool "weather"."""
    weather = ToolSettings(
        "weather",
        requires_approval=requires_approval,
        timeout=60.0,
        kind="client",
        client=ClientToolSettings("The weather.", SCHEMA),
    )
    agent = AgentConfig(
        agent_id="a", model=ModelSettings(provider="scripted"), tools=tools or (weather,)
    )
    return Run(
        run_id=str(uuid.uuid4()),
        tenant="t",
        request_id="",
        agent=agent.to_json(),
        input="hello",
        conversation_id="c",
        history=[],
        execution_mode="durable",
    )


def call(call_id: str, arguments: str = PARIS) -> ToolCall:
    return {"id": call_id, "name": "weather", "arguments_json": arguments}


def test_a_client_call_is_handed_to_the_client_then_waited_for() -> None:
    run = new_run()
    run.record_model_call(1, "", [call("c1"), call("c2", OSLO)], USAGE)
    assert next_step(run) == HandToClient(step_index=2, call=call("c1"), arguments_json=PARIS)
    run.require_client_result(2, "c1", PARIS, 100.0)
    assert run.status == "awaiting_tool_result"
    assert run.waits
    assert run.approval_deadline == 100.0
    expected = AwaitResults(step_index=2, calls=(call("c1"),), expire_at=100.0)
    assert next_step(run) == expected
    assert next_step(replayed(run)) == expected

    assert SubmitResult("c1", "sunny").apply(run)
    assert status_of(run) == "running"
    assert not SubmitResult("c1", "sunny").apply(run)  # an identical repeat: nothing to do
    with pytest.raises(FailedPrecondition, match="another result"):
        SubmitResult("c1", "rain").apply(run)
    with pytest.raises(FailedPrecondition, match="another result"):
        SubmitResult("c1", "sunny", is_error=True).apply(run)
    with pytest.raises(FailedPrecondition, match="does not wait"):
        SubmitResult("c2", "snow").apply(run)  # not handed to the client yet
    assert next_step(run) == HandToClient(step_index=2, call=call("c2", OSLO), arguments_json=OSLO)
    run.require_client_result(2, "c2", OSLO, 200.0)
    assert SubmitResult("c2", "snow").apply(run)
    assert next_step(replayed(run)) == CallModel(step_index=3, call_index=1)
    assert [m["content"] for m in run.messages if m["role"] == "tool"] == ["sunny", "snow"]


def test_a_late_result_is_a_tool_error_for_the_model() -> None:
    run = new_run()
    run.record_model_call(1, "", [call("c1")], USAGE)
    run.require_client_result(2, "c1", PARIS, 100.0)
    assert not TimeOutApprovals(99.0).apply(run)
    assert TimeOutApprovals(100.0).apply(run)
    assert run.outcomes["c1"] == {
        "output": json.dumps({"error": RESULT_TIMED_OUT}),
        "is_error": True,
    }
    assert not run.waits
    with pytest.raises(FailedPrecondition, match="another result"):
        SubmitResult("c1", "sunny").apply(run)


def test_an_approval_comes_first_and_its_edit_is_what_the_client_gets() -> None:
    run = new_run(requires_approval=True)
    run.record_model_call(1, "", [call("c1")], USAGE)
    assert next_step(run) == RequestApprovals(step_index=2, calls=(call("c1"),))
    run.require_approval(2, "c1", 100.0)
    assert isinstance(next_step(run), AwaitApprovals)
    with pytest.raises(FailedPrecondition, match="does not wait"):
        SubmitResult("c1", "sunny").apply(run)
    for bad in ('{"town": "Oslo"}', '{"city": 7}', "[]", "{"):
        with pytest.raises(InvalidArgument, match="edited_arguments_json"):
            Decide("c1", True, arguments_json=bad).apply(run)
    with pytest.raises(InvalidArgument, match="only an approval"):
        Decide("c1", False, arguments_json=OSLO).apply(run)
    assert status_of(run) == "awaiting_approval"  # nothing was recorded
    assert Decide("c1", True, arguments_json=OSLO).apply(run)
    assert not Decide("c1", True, arguments_json=OSLO).apply(run)
    with pytest.raises(FailedPrecondition, match="other arguments"):
        Decide("c1", True).apply(run)
    step = next_step(replayed(run))
    assert step == HandToClient(step_index=2, call=call("c1"), arguments_json=OSLO)
    assert run.tool_call("c1")["arguments_json"] == PARIS  # the model's call is kept


@pytest.mark.parametrize(
    "command",
    [
        Decide("c1", True, "ok", OSLO),
        Decide("c1", False, "no"),
        SubmitResult("c1", "sunny"),
        SubmitResult("c1", "failed", is_error=True),
    ],
)
def test_commands_go_to_a_runs_holder_as_they_are(command: Decide | SubmitResult) -> None:
    assert from_json(json.loads(json.dumps(to_json(command)))) == command


def test_an_edit_of_a_server_tools_call_is_checked_against_its_pinned_schema() -> None:
    """A tool of an MCP server has the schema pinned in the run; an edit is checked against it,
    unless the server's schema does not hold (then the server checks what it gets)."""
    server = ToolSettings("", requires_approval=True, kind="mcp", mcp=McpServerSettings("http://h"))
    run = new_run(tools=(server,))
    pinned: list[PinnedTool] = [
        {"name": n, "server": 0, "server_name": n, "description": "", "parameters": schema}
        for n, schema in (("weather", SCHEMA), ("odd", {"type": 5}))
    ]
    run.list_tools(pinned)
    odd: ToolCall = {"id": "c2", "name": "odd", "arguments_json": "{}"}
    run.record_model_call(1, "", [call("c1"), odd], USAGE)
    run.require_approval(2, "c1", 100.0)
    run.require_approval(2, "c2", 100.0)
    with pytest.raises(InvalidArgument, match="does not fit the tool's JSON Schema"):
        Decide("c1", True, arguments_json='{"town": "Oslo"}').apply(run)
    assert Decide("c1", True, arguments_json=OSLO).apply(run)
    assert Decide("c2", True, arguments_json='{"anything": 1}').apply(run)
