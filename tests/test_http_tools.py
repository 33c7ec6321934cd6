"""HTTP tools end to end: real executors and gateways, a real HTTP endpoint in the test process
(tests/tool_server.py), runs driven by the scripted model.

The executors allow tool URLs on 127.0.0.1 only (AGENTRUN_TOOL_URL_ALLOW)."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from agentrun.v1 import agent_pb2, agent_service_pb2, run_pb2, run_service_pb2
from cli.launcher import Service, free_port
from common.settings import LOCAL_TENANT
from eventstore.agents import Agent, AgentCatalog
from eventstore.persistence import StoreConfig
from executor.translation import agent_from_proto
from tests.client import Client, kinds
from tests.conftest import database_url_for, drop_schema
from tests.stack import Stack
from tests.test_bad_input import status_of
from tests.test_durable_crashes import Reader
from tests.tool_server import GUARD, Reply, ToolServer

CLASSIC = agent_pb2.EXECUTION_MODE_CLASSIC
DURABLE = agent_pb2.EXECUTION_MODE_DURABLE
ALLOW = "127.0.0.1"
EXECUTOR_ENV = {
    "AGENTRUN_TOOL_URL_ALLOW": ALLOW,
    "AGENTRUN_DISPATCH_ACK_WAIT": "1",
    "AGENTRUN_RECONCILE_INTERVAL": "0.5",
    "TOOL_SECRET": "s3cret",
}


@pytest.fixture(scope="module")
def tool_stack(nats_server: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One executor and one gateway on PostgreSQL; tests that kill executors add their own."""
    tmp = tmp_path_factory.mktemp("http-tools")
    url = database_url_for("postgres", tmp / "data")
    stack = Stack(database_url=url, nats=nats_server, tmp=tmp)
    try:
        stack.start_executor(**EXECUTOR_ENV)
        stack.start_gateway(**EXECUTOR_ENV)
        yield stack
    finally:
        stack.stop()
        drop_schema(url)


@pytest.fixture
async def client(tool_stack: Stack) -> AsyncIterator[Client]:
    channel = grpc.aio.insecure_channel(tool_stack.gateways[0].address)
    yield Client(channel)
    await channel.close(grace=None)


@pytest.fixture
def server() -> Iterator[ToolServer]:
    running = ToolServer()
    running.start()
    yield running
    running.stop()


def http_tool(name: str, url: str, **fields: object) -> agent_pb2.Tool:
    tool = agent_pb2.Tool(
        http=agent_pb2.HttpTool(
            name=name,
            url=url,
            description=f"The {name} tool.",
            headers_from_env={"X-Secret": "TOOL_SECRET"},
        ),
        **fields,  # type: ignore[arg-type]
    )
    tool.http.parameters.update(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    )
    return tool


def agent_with(
    *tools: agent_pb2.Tool, mode: agent_pb2.ExecutionMode.ValueType = CLASSIC
) -> agent_pb2.Agent:
    return agent_pb2.Agent(
        id=f"http-{uuid.uuid4().hex[:12]}",
        execution_mode=mode,
        model=agent_pb2.ModelConfig(provider="scripted"),
        tools=list(tools),
    )


# --- CreateAgent refuses bad tools --------------------------------------------------------------


async def test_bad_tools_are_refused_naming_their_field(
    client: Client, server: ToolServer, tmp_path: Path
) -> None:
    url = server.url("/weather")
    bad_schema = http_tool("weather", url)
    bad_schema.http.parameters.update({"properties": {"city": {"type": 7}}})
    cases = [
        (agent_with(http_tool("weather", "http://10.1.2.3/weather")), "agent.tools[0].http.url"),
        (
            agent_with(agent_pb2.Tool(name="clock"), http_tool("weather", "https://example.com")),
            "agent.tools[1].http.url",
        ),
        (agent_with(http_tool("weather", "ftp://127.0.0.1/x")), "agent.tools[0].http.url"),
        (agent_with(bad_schema), "agent.tools[0].http.parameters"),
        (
            agent_with(http_tool("weather", url), http_tool("weather", url)),
            "agent.tools[1].http.name",
        ),
        (agent_with(http_tool("the weather", url)), "agent.tools[0].http.name"),
        (
            agent_with(agent_pb2.Tool(client=agent_pb2.ClientTool(name="pick"))),
            "agent.tools[0].client.description",
        ),
    ]
    for agent, field in cases:
        code, message = await status_of(client.create_agent(agent))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message.startswith(f"{field}: "), message
    created = await client.create_agent(agent_with(http_tool("weather", url)))
    assert created.tools[0].http.url == url
    assert created.tools[0].http.headers_from_env == {"X-Secret": "TOOL_SECRET"}
    created.tools[0].http.url = "http://169.254.169.254/latest"
    update = client.agents.UpdateAgent(
        agent_service_pb2.UpdateAgentRequest(
            agent=created, update_mask=field_mask_pb2.FieldMask(paths=["tools"])
        )
    )
    code, message = await status_of(update)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("agent.tools[0].http.url: "), message


# --- calls ------------------------------------------------------------------------------------

PARIS = json.dumps({"city": "Paris"})
TURNS = (("Checking.", (("weather", PARIS),)), ("Done.", ()))
FAST_RETRIES = agent_pb2.RetryPolicy(maximum_attempts=3, backoff_coefficient=2.0)
FAST_RETRIES.initial_interval.FromMilliseconds(200)
FAST_RETRIES.maximum_interval.FromSeconds(5)


def scripted(
    *tools: agent_pb2.Tool,
    mode: agent_pb2.ExecutionMode.ValueType = CLASSIC,
    turns: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = TURNS,
) -> agent_pb2.Agent:
    agent = agent_with(*tools, mode=mode)
    for text, calls in turns:
        agent.model.scripted.turns.add(
            text=text,
            tool_calls=[agent_pb2.ScriptedToolCall(name=n, arguments_json=a) for n, a in calls],
        )
    return agent


def results(events: list[run_pb2.RunEvent]) -> list[run_pb2.ToolResult]:
    return [e.tool_result for e in events if e.HasField("tool_result")]


def tool_attempts(events: list[run_pb2.RunEvent]) -> list[int]:
    """The attempts the stream announced of the step that runs the tool calls."""
    return [
        e.step_started.attempt
        for e in events
        if e.HasField("step_started") and e.step_started.kind == run_pb2.STEP_KIND_TOOL_CALLS
    ]


async def stored_types(client: Client, run_id: str) -> list[str]:
    call = client.runs.ListRunEvents(run_service_pb2.ListRunEventsRequest(run_id=run_id))
    return [event.type async for response in call for event in response.events]


async def stored_payloads(client: Client, run_id: str, kind: str) -> list[dict[str, Any]]:
    call = client.runs.ListRunEvents(run_service_pb2.ListRunEventsRequest(run_id=run_id))
    return [
        json.loads(event.payload_json)
        async for response in call
        for event in response.events
        if event.type == kind
    ]


@pytest.mark.parametrize("mode", [CLASSIC, DURABLE], ids=["classic", "durable"])
async def test_a_run_calls_an_http_tool(
    client: Client, server: ToolServer, mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    url = server.script("/weather", Reply(200, b'{"temp": 21}'))
    agent = await client.create_agent(scripted(http_tool("weather", url), mode=mode))
    events = await client.run(agent.id, "weather in Paris?")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    (result,) = results(events)
    assert (result.tool_name, result.output, result.is_error) == ("weather", '{"temp": 21}', False)
    (received,) = server.received["/weather"]
    assert received.body == {"city": "Paris"}
    assert received.headers["Idempotency-Key"] == f"{events[0].run_id}:{result.tool_call_id}"
    assert received.headers["X-Secret"] == "s3cret"
    assert received.headers["Content-Type"] == "application/json"
    assert tool_attempts(events) == [1]


@pytest.mark.parametrize("mode", [CLASSIC, DURABLE], ids=["classic", "durable"])
async def test_503_twice_then_200_is_three_recorded_attempts_with_growing_waits(
    client: Client, server: ToolServer, mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    url = server.script(
        "/weather",
        Reply(503, b"overloaded"),
        Reply(503, b"still overloaded", (("Retry-After", "0"),)),
        Reply(200, b'{"temp": 22}'),
    )
    agent = await client.create_agent(
        scripted(http_tool("weather", url, retry_policy=FAST_RETRIES), mode=mode)
    )
    events = await client.run(agent.id, "weather in Paris?")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    (result,) = results(events)
    assert (result.output, result.is_error) == ('{"temp": 22}', False)
    assert tool_attempts(events) == [1, 2, 3]
    received = server.received["/weather"]
    assert len(received) == 3
    assert len({r.headers["Idempotency-Key"] for r in received}) == 1
    # Each retry waited at least its backoff: 0.2 s, then 0.4 s.
    first_wait, second_wait = (b.at - a.at for a, b in itertools.pairwise(received))
    assert first_wait >= 0.2
    assert second_wait >= 0.4
    if mode == DURABLE:
        run_id = events[0].run_id
        failed = await stored_payloads(client, run_id, "ToolCallFailed")
        assert [(f["attempt"], f["code"]) for f in failed] == [(1, "http_503"), (2, "http_503")]
        assert "still overloaded" in failed[1]["message"]
        assert (await stored_types(client, run_id)).count("ToolCallCompleted") == 1


async def test_retry_after_lengthens_the_wait(client: Client, server: ToolServer) -> None:
    url = server.script(
        "/weather", Reply(429, b"slow down", (("Retry-After", "1"),)), Reply(200, b"{}")
    )
    agent = await client.create_agent(
        scripted(http_tool("weather", url, retry_policy=FAST_RETRIES), mode=DURABLE)
    )
    events = await client.run(agent.id, "weather?")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    (failed,) = await stored_payloads(client, events[0].run_id, "ToolCallFailed")
    assert (failed["code"], failed["retry_after"]) == ("http_429", 1.0)
    _, second = server.received["/weather"]
    assert second.at >= failed["failed_at"] + 1.0  # not the policy's 0.2 s


async def test_connection_errors_and_timeouts_are_retried(
    client: Client, server: ToolServer
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/weather"  # nothing listens there
    slow = server.script("/slow", Reply(200, b"late", hold=True), Reply(200, b'{"ok": 1}'))
    short = agent_pb2.Tool()
    short.timeout.FromMilliseconds(300)
    agent = scripted(
        http_tool("weather", nobody, retry_policy=FAST_RETRIES),
        http_tool("slow", slow, retry_policy=FAST_RETRIES, timeout=short.timeout),
        mode=DURABLE,
        turns=(("Checking.", (("weather", PARIS), ("slow", PARIS))), ("Done.", ())),
    )
    created = await client.create_agent(agent)
    events = await client.run(created.id, "weather?")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    unreachable, late = results(events)
    assert unreachable.is_error
    assert "could not be reached: ConnectError (after 3 attempts" in unreachable.output
    assert (late.output, late.is_error) == ('{"ok": 1}', False)
    failed = await stored_payloads(client, events[0].run_id, "ToolCallFailed")
    assert [f["code"] for f in failed] == ["transport"] * 3 + ["timeout"]
    assert len(server.received["/slow"]) == 2


@pytest.mark.parametrize("mode", [CLASSIC, DURABLE], ids=["classic", "durable"])
async def test_400_is_a_tool_error_at_once(
    client: Client, server: ToolServer, mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    url = server.script("/weather", Reply(400, b'{"error": "no such city"}'))
    agent = await client.create_agent(
        scripted(http_tool("weather", url, retry_policy=FAST_RETRIES), mode=mode)
    )
    events = await client.run(agent.id, "weather in Atlantis?")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    (result,) = results(events)
    assert result.is_error
    assert "HTTP 400" in result.output
    assert "no such city" in result.output
    assert len(server.received["/weather"]) == 1
    assert tool_attempts(events) == [1]
    if mode == DURABLE:
        assert "ToolCallFailed" not in await stored_types(client, events[0].run_id)


async def test_a_retry_policy_that_allows_no_more_gives_the_model_the_last_error(
    client: Client, server: ToolServer
) -> None:
    url = server.script("/weather", Reply(502, b"bad gateway"))
    two = agent_pb2.RetryPolicy(maximum_attempts=2)
    two.initial_interval.FromMilliseconds(10)
    agent = await client.create_agent(
        scripted(http_tool("weather", url, retry_policy=two), mode=DURABLE)
    )
    events = await client.run(agent.id, "weather?")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    (result,) = results(events)
    assert result.is_error
    assert "HTTP 502: bad gateway (after 2 attempts" in result.output
    assert len(server.received["/weather"]) == 2
    types = await stored_types(client, events[0].run_id)
    assert types.count("ToolCallFailed") == 2


def peak_memory(service: Service) -> int:
    """The most memory the service's process has held at once (VmHWM), in bytes."""
    for line in Path(f"/proc/{service.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("mode", [CLASSIC, DURABLE], ids=["classic", "durable"])
async def test_a_10_mb_result_is_cut_with_a_marker(
    tool_stack: Stack, client: Client, server: ToolServer, mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    huge = ("é" * (5 * 1024 * 1024)).encode()  # 10 MiB of two-byte characters
    url = server.script("/weather", Reply(200, huge))
    agent = await client.create_agent(scripted(http_tool("weather", url), mode=mode))
    small = server.script("/small", Reply(200, b"{}"))
    warm_up = await client.create_agent(scripted(http_tool("weather", small), mode=mode))
    await client.run(warm_up.id, "weather?")  # whatever a first run of the mode allocates
    peak = peak_memory(tool_stack.executors[0])
    events = await client.run(agent.id, "weather?")
    # The executor never held the response: reading it whole would have taken 10 MiB at least.
    assert peak_memory(tool_stack.executors[0]) - peak < 4 * 1024 * 1024
    assert events[-1].run_completed.output == "Done.", kinds(events)
    (result,) = results(events)
    assert not result.is_error
    kept, marker = result.output.split("\n[agentrun: ")
    assert kept == "é" * (65536 // 2)
    assert marker == "the tool's result was cut here: it is longer than 65536 bytes]"
    # The executor still serves.
    again = await client.run(agent.id, "weather?")
    assert again[-1].HasField("run_completed")


async def test_a_url_the_executor_does_not_allow_is_refused_at_call_time(
    tool_stack: Stack, client: Client, server: ToolServer
) -> None:
    """An agent accepted where another allow list held (written straight into the store)."""
    server.script("/weather", Reply(200, b"{}"))
    elsewhere = server.url("/weather").replace("127.0.0.1", "localhost")
    config = agent_from_proto(scripted(http_tool("weather", elsewhere))).with_version(1)
    catalog = AgentCatalog(StoreConfig.from_url(tool_stack.database_url, tool_stack.data_dir))
    try:
        catalog.save(Agent(tenant=LOCAL_TENANT, agent_id=config.agent_id, config=config.to_json()))
    finally:
        catalog.close()
    events = await client.run(config.agent_id, "weather?")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    (result,) = results(events)
    assert result.is_error
    assert "does not allow calls to" in result.output
    assert server.received["/weather"] == []


async def test_a_header_whose_variable_the_executor_lacks_is_a_tool_error(
    client: Client, server: ToolServer
) -> None:
    url = server.script("/weather", Reply(200, b"{}"))
    tool = http_tool("weather", url)
    tool.http.headers_from_env["X-Other"] = "AGENTRUN_TEST_NO_SUCH_VARIABLE"
    agent = await client.create_agent(scripted(tool))
    events = await client.run(agent.id, "weather?")
    (result,) = results(events)
    assert result.is_error
    assert "AGENTRUN_TEST_NO_SUCH_VARIABLE" in result.output
    assert server.received["/weather"] == []


# --- executors killed around a call -------------------------------------------------------------


@dataclass
class CrashStack:
    """A gateway in front of one executor port, where a killed executor's successor listens."""

    stack: Stack
    port: int
    client: Client

    def start_executor(self) -> Service:
        return self.stack.start_executor(
            AGENTRUN_EXECUTOR_LISTEN=f"127.0.0.1:{self.port}", **EXECUTOR_ENV
        )


@pytest.fixture
async def crash_stack(nats_server: Service, tmp_path: Path) -> AsyncIterator[CrashStack]:
    url = database_url_for("postgres", tmp_path / "data")
    stack = Stack(database_url=url, nats=nats_server, tmp=tmp_path)
    try:
        crash = CrashStack(stack, free_port(), None)  # type: ignore[arg-type]
        crash.start_executor()
        stack.start_gateway(f"127.0.0.1:{crash.port}", **EXECUTOR_ENV)
        channel = grpc.aio.insecure_channel(stack.gateways[0].address)
        crash.client = Client(channel)
        yield crash
        await channel.close(grace=None)
    finally:
        stack.stop()
        drop_schema(url)


async def test_an_executor_killed_during_a_call_is_followed_by_a_second_attempt_with_the_same_key(
    crash_stack: CrashStack, server: ToolServer
) -> None:
    url = server.script(
        "/weather", Reply(200, b'{"temp": 1}', hold=True), Reply(200, b'{"temp": 23}')
    )
    client = crash_stack.client
    agent = await client.create_agent(scripted(http_tool("weather", url), mode=DURABLE))
    reader = Reader(client, agent.id, kill_after=1_000_000)
    (first,) = await server.wait_for("/weather", 1)  # the call is in flight, held there
    crash_stack.stack.executors[-1].kill()
    await asyncio.to_thread(crash_stack.start_executor)  # takes the run up
    received = await server.wait_for("/weather", 2)
    server.release()  # (the first call's executor is gone: nobody reads its answer)
    events = await reader.result()
    assert events[-1].run_completed.output == "Done.", kinds(events)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    second = received[1]
    assert len(received) == 2
    assert second.headers["Idempotency-Key"] == first.headers["Idempotency-Key"]
    assert first.headers["Idempotency-Key"].startswith(f"{events[0].run_id}:")
    assert second.body == first.body == {"city": "Paris"}
    assert tool_attempts(events) == [1, 2]
    (result,) = results(events)
    assert (result.output, result.is_error) == ('{"temp": 23}', False)
    types = await stored_types(client, events[0].run_id)
    assert types.count("Resumed") == 1
    assert types.count("ToolCallCompleted") == 1


async def test_an_executor_killed_between_two_attempts_is_followed_by_the_second(
    crash_stack: CrashStack, server: ToolServer
) -> None:
    """The first attempt fails (503); its executor dies while it waits out the backoff. The
    next executor makes the second attempt, after the backoff that is left, and, as the policy
    allows two attempts, a second 503 goes to the model: a third request would mean that it
    had counted from the first again."""
    url = server.script("/weather", Reply(503, b"overloaded"), Reply(503, b"overloaded again"))
    two = agent_pb2.RetryPolicy(maximum_attempts=2)
    two.initial_interval.FromSeconds(3)
    client = crash_stack.client
    agent = await client.create_agent(
        scripted(http_tool("weather", url, retry_policy=two), mode=DURABLE)
    )
    reader = Reader(client, agent.id, kill_after=1)
    await server.wait_for("/weather", 1)
    await asyncio.wait_for(reader.reached.wait(), GUARD)
    run_id = reader.events[0].run_id
    (failed,) = await stored_until(client, run_id, "ToolCallFailed")
    crash_stack.stack.executors[-1].kill()
    await asyncio.to_thread(crash_stack.start_executor)
    events = await reader.result()
    assert events[-1].run_completed.output == "Done.", kinds(events)
    received = server.received["/weather"]
    assert len(received) == 2
    assert received[1].headers["Idempotency-Key"] == received[0].headers["Idempotency-Key"]
    assert received[1].at >= failed["failed_at"] + 3.0  # the backoff that was left
    (result,) = results(events)
    assert result.is_error
    assert "overloaded again (after 2 attempts" in result.output
    types = await stored_types(client, run_id)
    assert types.count("ToolCallFailed") == 2
    assert types.count("Resumed") == 1


async def stored_until(client: Client, run_id: str, kind: str) -> list[dict[str, Any]]:
    """The stored events of ``kind``, once there is one (polled: a failed attempt is recorded
    but not streamed)."""
    deadline = asyncio.get_running_loop().time() + GUARD
    while not (found := await stored_payloads(client, run_id, kind)):
        assert asyncio.get_running_loop().time() < deadline, f"no {kind} in {run_id}"
        await asyncio.sleep(0.02)
    return found
