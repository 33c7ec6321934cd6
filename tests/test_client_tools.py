"""Tools the client executes, and approvals that edit a call's arguments: on the shared stack of
real executors and gateways, in both execution modes."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from executor.agent_loop import CUT_MARKER
from tests.client import Client, kinds, rest, scripted_agent, until
from tests.stack import Stack

CLASSIC, DURABLE = agent_pb2.EXECUTION_MODE_CLASSIC, agent_pb2.EXECUTION_MODE_DURABLE
MODES = pytest.mark.parametrize("mode", [CLASSIC, DURABLE], ids=["classic", "durable"])

CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
PARIS = json.dumps({"city": "Paris"})
TURNS = [("Looking it up.", [("weather", PARIS)]), ("It is sunny.", [])]


def client_tool_agent(
    mode: agent_pb2.ExecutionMode.ValueType,
    *,
    requires_approval: bool = False,
    timeout_s: float | None = None,
    turns: list[tuple[str, list[tuple[str, str]]]] = TURNS,
) -> agent_pb2.Agent:
    """A scripted agent whose one tool, "weather", the client executes."""
    agent = scripted_agent(turns=turns, tools=(), mode=mode)
    tool = agent.tools.add(requires_approval=requires_approval)
    tool.client.name = "weather"
    tool.client.description = "The weather now in a city."
    tool.client.parameters.update(CITY_SCHEMA)
    if timeout_s is not None:
        tool.timeout.FromNanoseconds(int(timeout_s * 1e9))
    return agent


async def submit(
    client: Client, run_id: str, tool_call_id: str, output: str, is_error: bool = False
) -> None:
    await client.runs.SubmitToolResult(
        run_service_pb2.SubmitToolResultRequest(
            run_id=run_id,
            result=run_service_pb2.ToolResultSubmission(
                tool_call_id=tool_call_id, output=output, is_error=is_error
            ),
        ),
        metadata=client.metadata,
    )


async def approve_with(client: Client, run_id: str, tool_call_id: str, arguments: str) -> None:
    await client.runs.SubmitToolApproval(
        run_service_pb2.SubmitToolApprovalRequest(
            run_id=run_id,
            decision=run_service_pb2.ToolApprovalDecision(
                tool_call_id=tool_call_id, approved=True, edited_arguments_json=arguments
            ),
        ),
        metadata=client.metadata,
    )


async def refused(awaitable: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return caught.value


def only(events: list[run_pb2.RunEvent], kind: str) -> Any:
    found = [getattr(e, kind) for e in events if e.WhichOneof("kind") == kind]
    assert len(found) == 1, kinds(events)
    return found[0]


async def stored(client: Client, run_id: str) -> list[run_pb2.StoredRunEvent]:
    call = client.runs.ListRunEvents(
        run_service_pb2.ListRunEventsRequest(run_id=run_id), metadata=client.metadata
    )
    return [e async for response in call for e in response.events]


@MODES
async def test_a_client_tool_call_waits_for_the_result_from_another_gateway(
    channels: list[grpc.aio.Channel], mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    first, second = Client(channels[0]), Client(channels[1])
    oslo = json.dumps({"city": "Oslo"})
    turns = [("Looking.", [("weather", PARIS), ("weather", oslo)]), ("It is sunny.", [])]
    agent = await first.create_agent(client_tool_agent(mode, turns=turns))
    live = first.stream(agent.id, "weather in Paris and Oslo?")
    before = await until(live, "client_tool_call_required")
    run_id = before[0].run_id
    requested = [e.tool_call_requested for e in before if e.HasField("tool_call_requested")]
    assert [(r.client_executes, r.requires_approval) for r in requested] == [(True, False)] * 2
    required = before[-1].client_tool_call_required
    assert required.tool_call.name == "weather"
    assert json.loads(required.tool_call.arguments_json) == {"city": "Paris"}
    assert (await second.get_run(run_id)).status == run_pb2.RUN_STATUS_AWAITING_TOOL_RESULT

    # The calls of a step go to the client in order: the second waits while the first's result
    # is repeated and contradicted.
    paris = required.tool_call.id
    await submit(second, run_id, paris, '{"sky": "clear"}')
    handed = await until(live, "client_tool_call_required")
    assert only(handed, "tool_result").output == '{"sky": "clear"}'
    await submit(first, run_id, paris, '{"sky": "clear"}')  # an identical repeat
    conflict = await refused(submit(second, run_id, paris, '{"sky": "grey"}'))
    assert conflict.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another result" in (conflict.details() or "")
    assert (await second.get_run(run_id)).status == run_pb2.RUN_STATUS_AWAITING_TOOL_RESULT

    second_call = handed[-1].client_tool_call_required.tool_call
    assert json.loads(second_call.arguments_json) == {"city": "Oslo"}
    await submit(first, run_id, second_call.id, "no such city", is_error=True)
    after = await rest(live)
    result = only(after, "tool_result")
    assert (result.tool_call_id, result.output, result.is_error) == (
        second_call.id,
        "no such city",
        True,
    )
    assert after[-1].run_completed.output == "It is sunny."
    assert (await first.get_run(run_id)).status == run_pb2.RUN_STATUS_COMPLETED
    late = await refused(submit(second, run_id, paris, '{"sky": "grey"}'))
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another result" in (late.details() or "")
    # What was recorded is kept (a classic run's in the run list): a repeat after the end is
    # still acknowledged.
    await submit(second, run_id, paris, '{"sky": "clear"}')
    await submit(first, run_id, second_call.id, "no such city", is_error=True)
    if mode == DURABLE:
        history = [e.type for e in await stored(first, run_id)]
        assert history.count("ClientToolCallRequired") == 2
        assert history.count("ToolCallCompleted") == 2


@MODES
async def test_a_result_on_converse_is_recorded_and_cut_like_any_tools(
    channels: list[grpc.aio.Channel], mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(client_tool_agent(mode))
    call = client.runs.Converse()
    await call.write(
        run_service_pb2.ConverseRequest(
            start=run_service_pb2.StreamRunRequest(agent_id=agent.id, input="weather?")
        )
    )
    before = await until(call, "client_tool_call_required")
    tool_call_id = before[-1].client_tool_call_required.tool_call.id
    huge = "x" * (64 * 1024 + 10)
    await call.write(
        run_service_pb2.ConverseRequest(
            tool_result=run_service_pb2.ToolResultSubmission(tool_call_id=tool_call_id, output=huge)
        )
    )
    after = await until(call, "run_completed")
    await call.done_writing()
    output = only(after, "tool_result").output
    assert output == "x" * (64 * 1024) + CUT_MARKER.format(limit=64 * 1024)


@MODES
async def test_a_result_that_does_not_come_in_time_is_a_tool_error(
    channels: list[grpc.aio.Channel], mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(client_tool_agent(mode, timeout_s=0.3))
    events = await client.run(agent.id, "weather?")
    result = only(events, "tool_result")
    assert result.is_error
    assert "did not submit" in json.loads(result.output)["error"]
    assert events[-1].run_completed.output == "It is sunny."  # the model carried on
    late = await refused(submit(client, events[0].run_id, result.tool_call_id, "{}"))
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_result_for_a_call_that_waits_for_none_is_refused(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(client_tool_agent(CLASSIC, requires_approval=True))
    live = client.stream(agent.id, "weather?")
    before = await until(live, "tool_approval_required")
    run_id, tool_call_id = before[0].run_id, before[-1].tool_approval_required.tool_call.id
    early = await refused(submit(client, run_id, tool_call_id, "{}"))
    assert early.code() == grpc.StatusCode.FAILED_PRECONDITION
    missing = await refused(submit(client, run_id, "", "{}"))
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    await client.approve(run_id, tool_call_id, approved=False)
    assert (await rest(live))[-1].run_completed.output == "It is sunny."


@MODES
async def test_an_approved_client_call_goes_to_the_client_with_the_edited_arguments(
    channels: list[grpc.aio.Channel], mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    first, second = Client(channels[0]), Client(channels[1])
    agent = await first.create_agent(client_tool_agent(mode, requires_approval=True))
    live = first.stream(agent.id, "weather?")
    before = await until(live, "tool_approval_required")
    run_id, tool_call_id = before[0].run_id, before[-1].tool_approval_required.tool_call.id
    assert not [e for e in before if e.HasField("client_tool_call_required")]
    oslo = json.dumps({"city": "Oslo"})
    await approve_with(second, run_id, tool_call_id, oslo)
    handed = await until(live, "client_tool_call_required")
    assert only(handed, "tool_approval_resolved").edited_arguments_json == oslo
    assert handed[-1].client_tool_call_required.tool_call.arguments_json == oslo
    await submit(second, run_id, tool_call_id, '{"sky": "snow"}')
    after = await rest(live)
    assert only(after, "tool_result").output == '{"sky": "snow"}'
    assert after[-1].run_completed.output == "It is sunny."


@MODES
async def test_an_approval_may_edit_the_arguments_within_the_tools_schema(
    channels: list[grpc.aio.Channel], mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    first, second = Client(channels[0]), Client(channels[1])
    original = json.dumps({"expression": "1 + 1"})
    agent = await first.create_agent(
        scripted_agent(
            turns=[("Computing.", [("calculator", original)]), ("Done.", [])],
            tools=(("calculator", True),),
            mode=mode,
        )
    )
    live = first.stream(agent.id, "compute")
    before = await until(live, "tool_approval_required")
    run_id, tool_call_id = before[0].run_id, before[-1].tool_approval_required.tool_call.id
    for bad in ('{"expr": "6 * 7"}', "[1]", "not json"):
        invalid = await refused(approve_with(second, run_id, tool_call_id, bad))
        assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "edited_arguments_json" in (invalid.details() or "")
    assert (await first.get_run(run_id)).status == run_pb2.RUN_STATUS_AWAITING_APPROVAL
    edited = json.dumps({"expression": "6 * 7"})
    await approve_with(second, run_id, tool_call_id, edited)
    await approve_with(first, run_id, tool_call_id, edited)  # an identical repeat
    if mode == DURABLE:  # (a classic run's row keeps only the verdict once the run has ended)
        other = await refused(approve_with(first, run_id, tool_call_id, original))
        assert other.code() == grpc.StatusCode.FAILED_PRECONDITION
    after = await rest(live)
    assert only(after, "tool_approval_resolved").edited_arguments_json == edited
    assert json.loads(only(after, "tool_result").output)["result"] == 42  # ran with the edit
    assert after[-1].run_completed.output == "Done."
    if mode == DURABLE:
        history = [(e.type, json.loads(e.payload_json)) for e in await stored(first, run_id)]
        asked = next(p for t, p in history if t == "ModelCallCompleted")
        assert asked["tool_calls"][0]["arguments_json"] == original
        decided = [p for t, p in history if t == "ToolApprovalDecided"]
        assert [d["arguments_json"] for d in decided] == [edited]


# The control subject's path does not depend on the store: one backend spares the PostgreSQL
# server the connections of two more executors.
@pytest.mark.parametrize("empty_stack", ["sqlite"], indirect=True)
async def test_a_result_and_an_edit_reach_a_classic_run_held_by_another_executor(
    empty_stack: Stack,
) -> None:
    """Each gateway reaches one executor: the run is held by the first, the approval and the
    result come in through the second, which carries them over the run's control subject."""
    first_executor, second_executor = empty_stack.start_executor(), empty_stack.start_executor()
    first = empty_stack.start_gateway(first_executor.address)
    second = empty_stack.start_gateway(second_executor.address)
    async with (
        grpc.aio.insecure_channel(first.address) as near,
        grpc.aio.insecure_channel(second.address) as far,
    ):
        holder, other = Client(near), Client(far)
        agent = await holder.create_agent(client_tool_agent(CLASSIC, requires_approval=True))
        live = holder.stream(agent.id, "weather?")
        before = await until(live, "tool_approval_required")
        run_id, tool_call_id = before[0].run_id, before[-1].tool_approval_required.tool_call.id
        invalid = await refused(approve_with(other, run_id, tool_call_id, '{"town": "Oslo"}'))
        assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
        oslo = json.dumps({"city": "Oslo"})
        await approve_with(other, run_id, tool_call_id, oslo)
        handed = await until(live, "client_tool_call_required")
        assert handed[-1].client_tool_call_required.tool_call.arguments_json == oslo
        await submit(other, run_id, tool_call_id, "snow")
        after = await rest(live)
    assert only(after, "tool_result").output == "snow"
    assert after[-1].run_completed.output == "It is sunny."
