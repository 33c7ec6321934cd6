"""Bad input gets a clear status and message, and hurts nothing: the servers keep serving."""

from __future__ import annotations

import os
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentrun.v1 import agent_pb2, agent_service_pb2, run_service_pb2
from tests.client import Client, rest, scripted_agent, until
from tests.stack import Stack

EMAIL = '{"to": "a@example.com", "subject": "s", "body": "b"}'


async def status_of(awaitable: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable  # type: ignore[misc]
    return caught.value.code(), caught.value.details() or ""


async def test_runs_of_unknown_agents_and_bad_inputs_are_refused(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=[("ok", [])]))
    cases = [
        ("no-such-agent", "hi", grpc.StatusCode.NOT_FOUND, "agent 'no-such-agent' not found"),
        ("", "hi", grpc.StatusCode.INVALID_ARGUMENT, "agent_id: is required"),
        (agent.id, "", grpc.StatusCode.INVALID_ARGUMENT, "input: must not be empty"),
        (agent.id, "   ", grpc.StatusCode.INVALID_ARGUMENT, "input: must not be empty"),
        (agent.id, "x" * 70_000, grpc.StatusCode.INVALID_ARGUMENT, "the limit is 65536 bytes"),
    ]
    for agent_id, text, code, message in cases:
        got = await status_of(client.stream(agent_id, text).read())
        assert got[0] == code
        assert message in got[1]
        got = await status_of(
            client.runs.StartRun(run_service_pb2.StartRunRequest(agent_id=agent_id, input=text))
        )
        assert got[0] == code
        assert message in got[1]
    # A refused start leaves nothing behind: the same request_id works once the input is fixed.
    request_id = str(uuid.uuid4())
    refused = await status_of(client.stream(agent.id, "", request_id=request_id).read())
    assert refused[0] == grpc.StatusCode.INVALID_ARGUMENT
    events = await client.run(agent.id, "hi", request_id=request_id)
    assert events[-1].run_completed.output == "ok"


async def test_unknown_and_malformed_run_ids(channels: list[grpc.aio.Channel]) -> None:
    client = Client(channels[0])
    unknown = str(uuid.uuid4())
    assert (await status_of(client.get_run(unknown)))[0] == grpc.StatusCode.NOT_FOUND
    assert (await status_of(client.watch(unknown).read()))[0] == grpc.StatusCode.NOT_FOUND
    for bad in ("", "not-a-uuid", "agentrun.events.>", "*"):
        code, message = await status_of(client.watch(bad).read())
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "run_id: must be a run id" in message
        assert (await status_of(client.get_run(bad)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await status_of(client.watch(unknown, after=-1).read())
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_approvals_that_name_nothing_pending_are_refused(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(
        scripted_agent(turns=[("", [("send_email", EMAIL), ("clock", "{}")]), ("done", [])])
    )
    live = client.stream(agent.id, "email")
    before = await until(live, "tool_approval_required")
    run_id = before[0].run_id
    clock_call = next(
        e.tool_call_requested.tool_call
        for e in before
        if e.HasField("tool_call_requested") and e.tool_call_requested.tool_call.name == "clock"
    )
    code, message = await status_of(client.approve(run_id, "call_that_does_not_exist"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "not awaiting approval" in message
    # Approvals are keyed by tool call id, never by tool name.
    code, message = await status_of(client.approve(run_id, "send_email"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, message = await status_of(client.approve(run_id, clock_call.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "not awaiting approval" in message
    code, message = await status_of(client.approve(run_id, ""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    await client.approve(run_id, before[-1].tool_approval_required.tool_call.id)
    events = await rest(live)
    assert events[-1].run_completed.output == "done"
    code, _ = await status_of(client.approve(run_id, "call_that_does_not_exist"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


async def test_converse_must_start_or_attach_first(channels: list[grpc.aio.Channel]) -> None:
    client = Client(channels[0])
    call = client.runs.Converse()
    await call.write(
        run_service_pb2.ConverseRequest(
            tool_approval=run_service_pb2.ToolApprovalDecision(tool_call_id="x", approved=True)
        )
    )
    code, message = await status_of(call.read())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "start or attach" in message
    empty = client.runs.Converse()
    await empty.done_writing()
    assert (await status_of(empty.read()))[0] == grpc.StatusCode.INVALID_ARGUMENT


async def test_bad_agents_are_refused(channels: list[grpc.aio.Channel]) -> None:
    client = Client(channels[0])
    bad = {
        "agent.id": agent_pb2.Agent(id="Bad Id!", model=agent_pb2.ModelConfig(provider="scripted")),
        "agent.model.provider": agent_pb2.Agent(
            id="x-1", model=agent_pb2.ModelConfig(provider="?")
        ),
        "agent.tools": agent_pb2.Agent(
            id="x-2",
            model=agent_pb2.ModelConfig(provider="scripted"),
            tools=[agent_pb2.Tool(name="rm_rf")],
        ),
        "agent.max_model_calls": agent_pb2.Agent(
            id="x-3", model=agent_pb2.ModelConfig(provider="scripted"), max_model_calls=-1
        ),
    }
    for field, agent in bad.items():
        code, message = await status_of(client.create_agent(agent))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert message.startswith(field)
    created = await client.create_agent(scripted_agent())
    code, _ = await status_of(client.create_agent(scripted_agent(agent_id=created.id)))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, _ = await status_of(
        client.agents.UpdateAgent(
            agent_service_pb2.UpdateAgentRequest(agent=created, expected_version=7)
        )
    )
    assert code == grpc.StatusCode.ABORTED
    code, message = await status_of(
        client.runs.ListRuns(run_service_pb2.ListRunsRequest(page_token="garbage"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in message


def with_durations(agent: agent_pb2.Agent, field: str, seconds: int) -> agent_pb2.Agent:
    """``agent`` with the duration ``field`` (as an error names it) set to ``seconds``."""
    changed = agent_pb2.Agent()
    changed.CopyFrom(agent)
    durations = {
        "agent.approval_timeout": changed.approval_timeout,
        "agent.tools.timeout": changed.tools[0].timeout,
        "agent.model.scripted.first_token_delay": changed.model.scripted.first_token_delay,
        "agent.model.scripted.token_delay": changed.model.scripted.token_delay,
    }
    durations[field].seconds = seconds
    return changed


# Each duration with a value past its bound: the largest a Duration may hold (accepted before,
# it made runs fail), 2**62 seconds (INTERNAL OverflowError before), and just past the bound.
DURATIONS_OUT_OF_BOUNDS = [
    ("agent.approval_timeout", 315_576_000_000, "30 days"),
    ("agent.approval_timeout", 2**62, "30 days"),
    ("agent.approval_timeout", 30 * 86400 + 1, "30 days"),
    ("agent.tools.timeout", 2**62, "1 hour"),
    ("agent.tools.timeout", 3601, "1 hour"),
    ("agent.model.scripted.first_token_delay", 2**62, "60 seconds"),
    ("agent.model.scripted.token_delay", 61, "60 seconds"),
]


async def test_durations_past_their_bounds_are_refused_naming_the_field(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    valid = scripted_agent(tools=(("clock", False),))
    for field, seconds, bound in DURATIONS_OUT_OF_BOUNDS:
        code, message = await status_of(client.create_agent(with_durations(valid, field, seconds)))
        assert (code, message) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field}: must be at most {bound}",
        )
    created = await client.create_agent(valid)
    for field, seconds, bound in DURATIONS_OUT_OF_BOUNDS:
        update = agent_service_pb2.UpdateAgentRequest(agent=with_durations(created, field, seconds))
        code, message = await status_of(client.agents.UpdateAgent(update))
        assert (code, message) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field}: must be at most {bound}",
        )
    unchanged = await client.agents.GetAgent(agent_service_pb2.GetAgentRequest(agent_id=created.id))
    assert unchanged.agent == created


async def test_garbage_bytes_do_not_hurt_the_servers(
    channels: list[grpc.aio.Channel], stack: Stack
) -> None:
    methods = [
        "/agentrun.v1.RunService/StartRun",
        "/agentrun.v1.RunService/GetRun",
        "/agentrun.v1.AgentService/CreateAgent",
    ]
    for method in methods:
        call = channels[0].unary_unary(method, request_serializer=None, response_deserializer=None)
        for payload in (os.urandom(64), b"\xff" * 10, b""):
            with pytest.raises(grpc.aio.AioRpcError):
                await call(payload)
    executor_channel = grpc.aio.insecure_channel(stack.executors[0].address)
    try:
        raw = executor_channel.unary_unary(
            "/agentrun.v1.ExecutorService/GetRun",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await raw(os.urandom(64))
        for channel in (channels[0], executor_channel):
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest())
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await executor_channel.close(grace=None)
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=[("still fine", [])]))
    assert (await client.run(agent.id, "hi"))[-1].run_completed.output == "still fine"


async def test_a_run_id_in_any_uuid_spelling_names_the_same_run(
    channels: list[grpc.aio.Channel],
) -> None:
    """Upper case, no hyphens, braces or urn:uuid: all name the run; every call finds it."""
    client = Client(channels[0])
    agent = await client.create_agent(
        scripted_agent(turns=[("", [("send_email", EMAIL)]), ("sent", [])])
    )
    live = client.stream(agent.id, "email")
    before = await until(live, "tool_approval_required")
    run_id = before[0].run_id
    spellings = [
        run_id.upper(),
        run_id.replace("-", ""),
        f"{{{run_id}}}",
        f"urn:uuid:{run_id}",
    ]
    for spelling in spellings:
        assert (await client.get_run(spelling)).id == run_id
        assert (await client.watch(spelling, after=len(before) - 1).read()).events[0] == before[-1]
    call_id = before[-1].tool_approval_required.tool_call.id
    await client.approve(spellings[0], call_id)
    await client.approve(spellings[1], call_id)  # the same decision again: fine
    after = await rest(live)
    assert after[-1].run_completed.output == "sent"
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await client.runs.CancelRun(run_service_pb2.CancelRunRequest(run_id=spellings[3]))
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
