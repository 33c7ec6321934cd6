"""Input that is too large, too deep, undecodable or unsafe gets a clear answer and hurts
nothing: requests are refused with INVALID_ARGUMENT, a model's bad tool call is a tool error
the model sees."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentrun.v1 import agent_pb2, agent_service_pb2, run_pb2, run_service_pb2
from executor.tools.send_email import read_outbox
from tests.client import Client, rest, scripted_agent, until
from tests.openai_wire_server import (
    Completion,
    HttpError,
    OpenAIWireServer,
    RawStream,
    WireToolCall,
)
from tests.stack import Stack

# Characters that would break a header into lines or hide one: a few of each kind.
HEADER_BREAKERS = ["\u2028", "\u2029", "\x85", "\x00", "\x0b", "\x0c", "\x1b", "\x7f", "\x9b"]


def tool_results(events: list[run_pb2.RunEvent]) -> list[run_pb2.ToolResult]:
    return [e.tool_result for e in events if e.HasField("tool_result")]


async def test_send_email_refuses_control_and_line_separator_characters_in_headers(
    channels: list[grpc.aio.Channel], stack: Stack
) -> None:
    calls = []
    for char in HEADER_BREAKERS:
        calls.append({"to": "ada@example.com", "subject": f"Hi{char}Bcc: eve@x.com", "body": "b"})
        calls.append({"to": f"ada@example.com{char}", "subject": "Hi", "body": "b"})
    turns = [("", [("send_email", json.dumps(c)) for c in calls]), ("done", [])]
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=turns, tools=(("send_email", False),)))
    events = await client.run(agent.id, "email")
    results = tool_results(events)
    assert len(results) == len(calls), events[-1]
    for call, result in zip(calls, results, strict=True):
        header = "subject" if call["to"] == "ada@example.com" else "to"
        assert result.is_error, (call, result.output)
        assert f"argument '{header}' must be a single line without control" in result.output
    assert events[-1].run_completed.output == "done"
    run_id = events[0].run_id
    assert [m for m in read_outbox(stack.data_dir) if m["run_id"] == run_id] == []


MODES = {"classic": agent_pb2.EXECUTION_MODE_CLASSIC, "durable": agent_pb2.EXECUTION_MODE_DURABLE}
# Arguments as a model may send them: nested far past any parser's recursion limit, nested
# past agentrun's bound but within the parser's, and not JSON at all.
BAD_ARGUMENTS = [
    ('{"expression": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested more than 64 levels deep"),
    ('{"expression": ' + "[" * 100 + "]" * 100 + "}", "nested more than 64 levels deep"),
    ('{"expression": "6*7"', "malformed arguments (not JSON)"),
]


@pytest.mark.parametrize("mode", MODES)
async def test_malformed_or_too_deep_tool_arguments_are_a_tool_error_the_model_sees(
    channels: list[grpc.aio.Channel], mode: str
) -> None:
    calls = [("calculator", arguments) for arguments, _ in BAD_ARGUMENTS]
    # The object and 63 arrays in it: 64 levels.
    calls.append(("calculator", '{"expression": ' + "[" * 63 + "]" * 63 + "}"))
    turns = [("", calls), ("done", [])]
    client = Client(channels[0])
    agent = await client.create_agent(
        scripted_agent(turns=turns, tools=(("calculator", False),), mode=MODES[mode])
    )
    events = await client.run(agent.id, "calculate")
    results = tool_results(events)
    assert len(results) == len(calls), events[-1]
    for (_, message), result in zip(BAD_ARGUMENTS, results, strict=False):
        assert result.is_error
        assert message in result.output
    # 64 levels reach the tool, which refuses a list for an expression.
    assert results[-1].is_error
    assert "malformed" not in results[-1].output
    assert events[-1].run_completed.output == "done"
    # At once: no step was tried again (a durable run once burned its attempts on this).
    assert {e.step_started.attempt for e in events if e.HasField("step_started")} == {1}


@pytest.mark.parametrize("mode", MODES)
async def test_too_deep_arguments_from_an_openai_compatible_model_are_a_tool_error(
    channels: list[grpc.aio.Channel], mode: str
) -> None:
    deep, message = BAD_ARGUMENTS[0]
    async with OpenAIWireServer() as model:
        model.enqueue(
            Completion(tool_calls=[WireToolCall("calculator", [deep], id="call_deep")]),
            Completion(tokens=["done"]),
        )
        agent = agent_pb2.Agent(
            id=f"deep-{uuid.uuid4().hex[:12]}",
            execution_mode=MODES[mode],
            model=agent_pb2.ModelConfig(provider="openai", name="m", base_url=model.base_url),
            tools=[agent_pb2.Tool(name="calculator")],
        )
        client = Client(channels[0])
        await client.create_agent(agent)
        events = await client.run(agent.id, "calculate")
    [result] = tool_results(events)
    assert result.is_error
    assert message in result.output
    assert events[-1].run_completed.output == "done"
    assert {e.step_started.attempt for e in events if e.HasField("step_started")} == {1}
    # The model heard of it: the second request carries the error as the call's result.
    answered = model.requests[1].body["messages"][-1]
    assert answered["role"] == "tool"
    assert message in answered["content"]


DEEP_JSON = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("mode", MODES)
async def test_a_model_answer_nested_too_deep_is_a_model_error(
    channels: list[grpc.aio.Channel], mode: str
) -> None:
    """A stream chunk or an error body nested past the parser's recursion limit fails the model
    call (MODEL_ERROR), as any malformed answer does; the run fails at once, not INTERNAL."""
    client = Client(channels[0])
    answers: list[tuple[RawStream | HttpError, str]] = [
        (RawStream(f"data: {DEEP_JSON}\n\n"), "openai: malformed JSON in stream chunk"),
        (HttpError(400, raw_body=DEEP_JSON), "openai: HTTP 400"),
    ]
    for answer, message in answers:
        async with OpenAIWireServer() as model:
            model.enqueue(answer)
            agent = agent_pb2.Agent(
                id=f"deep-{uuid.uuid4().hex[:12]}",
                execution_mode=MODES[mode],
                model=agent_pb2.ModelConfig(provider="openai", name="m", base_url=model.base_url),
                model_retry_policy=agent_pb2.RetryPolicy(maximum_attempts=1),
            )
            await client.create_agent(agent)
            events = await client.run(agent.id, "hi")
        failed = events[-1].run_failed.error
        assert failed.code == run_pb2.RUN_ERROR_CODE_MODEL_ERROR, events[-1]
        assert failed.message.startswith(message), failed.message


async def test_a_page_token_nested_too_deep_is_an_invalid_argument(
    channels: list[grpc.aio.Channel],
) -> None:
    token = base64.urlsafe_b64encode(DEEP_JSON.encode()).decode()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await Client(channels[0]).runs.ListRuns(run_service_pb2.ListRunsRequest(page_token=token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "page_token: is not a token from a previous response"


def with_bad_utf8(message: bytes, placeholder: bytes) -> bytes:
    """``message`` with ``placeholder`` (in a string field) replaced by as many bytes that are
    not UTF-8."""
    assert placeholder in message
    return message.replace(placeholder, b"\xff\xfe" * (len(placeholder) // 2))


def too_deep_agent() -> bytes:
    """A CreateAgentRequest whose model.parameters nest deeper than protobuf decodes."""
    request = agent_service_pb2.CreateAgentRequest(agent=scripted_agent())
    value = request.agent.model.parameters.fields["deep"]
    for _ in range(200):
        value = value.list_value.values.add()
    value.string_value = "bottom"
    serialized: bytes = request.SerializeToString()
    return serialized


def undecodable_requests() -> dict[str, list[bytes]]:
    """Requests that cannot be decoded, by method: garbage, a string that is not UTF-8, a
    Struct deeper than protobuf's limit."""
    garbage = b"\xff" * 10
    agent = agent_service_pb2.CreateAgentRequest(
        agent=scripted_agent(agent_id="placeholder-id")
    ).SerializeToString()
    start = run_service_pb2.StreamRunRequest(agent_id="a", input="PLACEHOLDER").SerializeToString()
    watch = run_service_pb2.WatchRunRequest(run_id="PLACEHOLDER").SerializeToString()
    return {
        "/agentrun.v1.AgentService/CreateAgent": [
            garbage,
            with_bad_utf8(agent, b"placeholder-id"),
            too_deep_agent(),
        ],
        "/agentrun.v1.RunService/GetRun": [garbage, with_bad_utf8(watch, b"PLACEHOLDER")],
        "/agentrun.v1.RunService/StartRun": [with_bad_utf8(start, b"PLACEHOLDER")],
        "/agentrun.v1.RunService/StreamRun": [garbage, with_bad_utf8(start, b"PLACEHOLDER")],
        "/agentrun.v1.RunService/WatchRun": [garbage, with_bad_utf8(watch, b"PLACEHOLDER")],
    }


async def call_raw(channel: grpc.aio.Channel, method: str, payload: bytes) -> None:
    """Calls ``method`` with ``payload`` as its request; reads the first response."""
    if method.endswith(("StreamRun", "WatchRun")):
        await channel.unary_stream(method, None, None)(payload).read()
    else:
        await channel.unary_unary(method, None, None)(payload)


def raw_bidi(channel: grpc.aio.Channel, method: str, decode: Any = None) -> Any:
    """A bidi call of ``method`` that sends requests as raw bytes."""
    return channel.stream_stream(method, None, decode)(None)


def assert_undecodable(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert (error.details() or "").startswith("request: cannot be decoded"), error


async def test_requests_that_cannot_be_decoded_are_invalid_arguments(
    channels: list[grpc.aio.Channel], stack: Stack
) -> None:
    channel = channels[0]
    for method, payloads in undecodable_requests().items():
        for payload in payloads:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call_raw(channel, method, payload)
            assert_undecodable(caught.value)
    # Converse: a first message, and a message after the start.
    converse = "/agentrun.v1.RunService/Converse"
    call = raw_bidi(channel, converse)
    await call.write(b"\xff" * 10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert_undecodable(caught.value)
    client = Client(channel)
    agent = await client.create_agent(
        scripted_agent(turns=[("", [("send_email", '{"to": "a@example.com"}')]), ("done", [])])
    )
    call = raw_bidi(channel, converse, run_service_pb2.ConverseResponse.FromString)
    start = run_service_pb2.StreamRunRequest(agent_id=agent.id, input="email")
    await call.write(run_service_pb2.ConverseRequest(start=start).SerializeToString())
    run_id = (await until(call, "tool_approval_required"))[0].run_id
    await call.write(b"\xff" * 10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rest(call)
    assert_undecodable(caught.value)
    await client.runs.CancelRun(run_service_pb2.CancelRunRequest(run_id=run_id))
    # Health and reflection too (their servicers are gRPC's).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_raw(channel, "/grpc.health.v1.Health/Check", b"\xff" * 10)
    assert_undecodable(caught.value)
    call = raw_bidi(channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    await call.write(b"\xff" * 10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert_undecodable(caught.value)
    # The executor answers so too, on every service, internal or public.
    executor = grpc.aio.insecure_channel(stack.executors[0].address)
    try:
        call = raw_bidi(executor, "/agentrun.internal.v1.ExecutorService/ExecuteRun")
        await call.write(b"\xff" * 10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert_undecodable(caught.value)
        create = executor.unary_unary("/agentrun.v1.AgentService/CreateAgent", None, None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(too_deep_agent(), metadata=(("agentrun-tenant", "local"),))
        assert_undecodable(caught.value)
        health = health_pb2_grpc.HealthStub(executor)
        answer = await health.Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await executor.close(grace=None)


def changed(agent: agent_pb2.Agent, change: Any) -> agent_pb2.Agent:
    copy = agent_pb2.Agent()
    copy.CopyFrom(agent)
    change(copy)
    return copy


def nested_parameters(agent: agent_pb2.Agent, depth: int) -> None:
    value = agent.model.parameters.fields["deep"]
    for _ in range(depth - 1):  # the parameters object itself is level 1
        value = value.list_value.values.add()
    value.string_value = "bottom"


def turns_of(agent: agent_pb2.Agent, count: int, size: int) -> None:
    for _ in range(count):
        agent.model.scripted.turns.add(text="w" * size)


# An agent over each bound, and the start of the message that refuses it.
OVERSIZED: list[tuple[Any, str]] = [
    (
        lambda a: setattr(a, "display_name", "d" * 257),
        "agent.display_name: must be at most 256 characters",
    ),
    (
        lambda a: setattr(a.tools[0], "description", "d" * 4097),
        "agent.tools.description: must be at most 4,096 characters",
    ),
    (
        lambda a: setattr(a, "instructions", "i" * 100_001),
        "agent.instructions: must be at most 100,000 characters",
    ),
    (
        # 400,000 keys, 10 MB: refused before it is decoded.
        lambda a: a.model.parameters.update({f"key-{i:06}": i for i in range(400_000)}),
        "agent: must be at most 1,048,576 bytes",
    ),
    (
        # 40,000 keys, 1 MB: refused before it is turned into Python objects.
        lambda a: a.model.parameters.update({f"key-{i:06}": i for i in range(40_000)}),
        "agent.model.parameters: must be at most 65,536 bytes",
    ),
    (
        lambda a: a.model.parameters.update({"big": "p" * 70_000}),
        "agent.model.parameters: must be at most 65,536 bytes (70,010 given)",
    ),
    (
        lambda a: nested_parameters(a, 33),
        "agent.model.parameters: must nest at most 32 levels deep",
    ),
    (
        lambda a: turns_of(a, 1, 600_000),
        "agent.model.scripted.turns: each must be at most 524,288 bytes",
    ),
    (
        lambda a: turns_of(a, 1_001, 1),
        "agent.model.scripted.turns: must have at most 1,000 entries",
    ),
    (lambda a: turns_of(a, 3, 400_000), "agent: must be at most 1,048,576 bytes"),
    (lambda a: turns_of(a, 18, 500_000), "agent: must be at most 1,048,576 bytes"),
]


async def test_agents_over_a_size_bound_are_refused_naming_the_field_and_bound(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    valid = scripted_agent(turns=[("ok", [])], tools=(("clock", False),))
    created = await client.create_agent(valid)
    for n, (change, message) in enumerate(OVERSIZED):
        fresh = changed(valid, change)
        fresh.id = f"{valid.id}-{n}"
        for call in (
            client.create_agent(fresh),
            client.agents.UpdateAgent(
                agent_service_pb2.UpdateAgentRequest(agent=changed(created, change))
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (caught.value.details() or "").startswith(message), caught.value.details()

    # Just within every bound: accepted.
    def within_bounds(agent: agent_pb2.Agent) -> None:
        agent.id = f"{agent.id}-within"
        agent.display_name = "d" * 256
        agent.model.parameters.update({"big": "p" * 60_000})
        nested_parameters(agent, 32)
        turns_of(agent, 1, 500_000)

    within = changed(valid, within_bounds)
    await client.create_agent(within)
    unchanged = await client.agents.GetAgent(agent_service_pb2.GetAgentRequest(agent_id=created.id))
    assert unchanged.agent == created
    assert (await client.run(created.id, "hi"))[-1].run_completed.output == "ok"


async def test_list_agents_pages_so_that_no_response_is_too_large(
    channels: list[grpc.aio.Channel],
) -> None:
    """18 agents of almost 1 MiB each: 17 MB, more than a gRPC message may hold. Their ids sort
    before any other test's, so that they share the first page of a count-only paging."""
    client = Client(channels[0])
    prefix = f"a--{uuid.uuid4().hex[:8]}"
    ids = [f"{prefix}-{i:02}" for i in range(18)]
    for agent_id in ids:
        big = scripted_agent(agent_id=agent_id)
        turns_of(big, 2, 480_000)
        await client.create_agent(big)
    try:
        listed: list[str] = []
        token = ""
        while True:
            page = await client.agents.ListAgents(
                agent_service_pb2.ListAgentsRequest(page_size=500, page_token=token)
            )
            listed.extend(a.id for a in page.agents if a.id.startswith(prefix))
            token = page.next_page_token
            if not token:
                break
        assert listed == ids
    finally:
        for agent_id in ids:
            await client.agents.DeleteAgent(agent_service_pb2.DeleteAgentRequest(agent_id=agent_id))
