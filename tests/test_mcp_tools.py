"""MCP servers as tools end to end: real executors and gateways, a real MCP server process
(tests/mcp_server.py, the official SDK's server over Streamable HTTP), runs driven by the
scripted model and by the OpenAI-compatible provider (tests/openai_wire_server.py).

The executors allow tool URLs on 127.0.0.1 only (AGENTRUN_TOOL_URL_ALLOW)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx
import pytest

from agentrun.v1 import agent_pb2, run_pb2
from cli.launcher import free_port
from tests.client import Client, kinds, rest, until
from tests.openai_wire_server import Completion, OpenAIWireServer, WireToolCall
from tests.test_bad_input import status_of
from tests.test_client_tools import approve_with
from tests.test_durable_crashes import Reader
from tests.test_http_tools import (
    CLASSIC,
    DURABLE,
    EXECUTOR_ENV,
    CrashStack,
    client,
    crash_stack,
    results,
    stored_payloads,
    tool_attempts,
    tool_stack,
)

__all__ = ["client", "crash_stack", "tool_stack"]  # (fixtures of test_http_tools, used here)

GUARD = 60.0  # seconds; only bounds a hang
KEY_ENV = "MCP_E2E_OPENAI_API_KEY"  # (set in EXECUTOR_ENV's copy below)
EXECUTOR_ENV[KEY_ENV] = "sk-mcp-e2e"
ALL_TOOLS = ["kb_lookup", "kb_held", "kb_hang", "kb_failing", "kb_big"]


class McpServer:
    """tests/mcp_server.py as a process of its own, steered over its control routes."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process = self._start()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/mcp"

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.mcp_server", str(self.port)], stdout=subprocess.DEVNULL
        )

    def restart(self) -> None:
        """Kills the server and starts another on the same port (which knows no sessions)."""
        self.stop()
        self.process = self._start()
        self.wait_ready()

    def wait_ready(self) -> None:
        with httpx.Client() as http:
            for _ in range(int(GUARD * 20)):
                try:
                    http.get(f"{self.base}/control/calls")
                    return
                except httpx.TransportError:
                    assert self.process.poll() is None, "the MCP server exited"
                    time.sleep(0.05)  # (the process starting: only its port tells)
        raise TimeoutError("the MCP server did not start")

    async def post(self, what: str) -> None:
        async with httpx.AsyncClient() as http:
            (await http.post(f"{self.base}/control/{what}")).raise_for_status()

    async def calls(self, count: int = 0) -> list[dict[str, Any]]:
        """The calls received, once there are ``count``."""
        async with httpx.AsyncClient(timeout=GUARD + 5) as http:
            response = await http.get(f"{self.base}/control/calls", params={"count": count})
            response.raise_for_status()
            found: list[dict[str, Any]] = response.json()
            return found

    async def connections(self) -> int:
        """How many client connections the calls received came over."""
        async with httpx.AsyncClient(timeout=GUARD) as http:
            response = await http.get(f"{self.base}/control/connections")
            response.raise_for_status()
            count: int = response.json()
            return count

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def mcp() -> Iterator[McpServer]:
    server = McpServer()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def wire() -> AsyncIterator[OpenAIWireServer]:
    async with OpenAIWireServer() as server:
        yield server


def mcp_tool(url: str, **fields: Any) -> agent_pb2.Tool:
    return agent_pb2.Tool(mcp=agent_pb2.McpServerTool(url=url, name_prefix="kb_"), **fields)


def scripted(
    tool: agent_pb2.Tool,
    calls: tuple[tuple[str, str], ...],
    mode: agent_pb2.ExecutionMode.ValueType = CLASSIC,
) -> agent_pb2.Agent:
    agent = agent_pb2.Agent(
        id=f"mcp-{uuid.uuid4().hex[:12]}",
        execution_mode=mode,
        model=agent_pb2.ModelConfig(provider="scripted"),
        tools=[tool],
    )
    agent.model.scripted.turns.add(
        text="Calling.",
        tool_calls=[agent_pb2.ScriptedToolCall(name=n, arguments_json=a) for n, a in calls],
    )
    agent.model.scripted.turns.add(text="Done.")
    return agent


def openai_agent(
    tool: agent_pb2.Tool, base_url: str, mode: agent_pb2.ExecutionMode.ValueType
) -> agent_pb2.Agent:
    return agent_pb2.Agent(
        id=f"mcp-{uuid.uuid4().hex[:12]}",
        execution_mode=mode,
        model=agent_pb2.ModelConfig(
            provider="openai", name="gpt-4o-mini", base_url=base_url, api_key_env=KEY_ENV
        ),
        tools=[tool],
    )


def offered(request_body: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """The tools a Chat Completions request offered: name, description, parameters."""
    return [
        (t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
        for t in request_body.get("tools", [])
    ]


async def assert_still_serving(client: Client, mcp: McpServer) -> None:
    """The executor runs an agent with a working MCP tool to its end."""
    agent = await client.create_agent(
        scripted(mcp_tool(mcp.url), (("kb_lookup", '{"query": "ok"}'),))
    )
    events = await client.run(agent.id, "still there?")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    assert results(events)[0].output == "found ok"


# --- CreateAgent ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "field"),
    [
        (agent_pb2.Tool(mcp=agent_pb2.McpServerTool(url="ftp://127.0.0.1/mcp")), "mcp.url"),
        (agent_pb2.Tool(mcp=agent_pb2.McpServerTool(url="http://example.com/mcp")), "mcp.url"),
        (
            agent_pb2.Tool(mcp=agent_pb2.McpServerTool(url="http://127.0.0.1/", name_prefix="a b")),
            "mcp.name_prefix",
        ),
        (
            agent_pb2.Tool(
                mcp=agent_pb2.McpServerTool(url="http://127.0.0.1/", tool_names=["x" * 70])
            ),
            "mcp.tool_names",
        ),
        (
            agent_pb2.Tool(name="x", mcp=agent_pb2.McpServerTool(url="http://127.0.0.1/")),
            "name",
        ),
    ],
)
async def test_bad_mcp_servers_are_refused_naming_their_field(
    client: Client, tool: agent_pb2.Tool, field: str
) -> None:
    agent = agent_pb2.Agent(
        id=f"mcp-{uuid.uuid4().hex[:12]}",
        model=agent_pb2.ModelConfig(provider="scripted"),
        tools=[tool],
    )
    code, message = await status_of(client.create_agent(agent))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert message.startswith(f"agent.tools[0].{field}: "), message


# --- Runs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [CLASSIC, DURABLE], ids=["classic", "durable"])
async def test_a_run_calls_an_mcp_servers_tools_with_the_idempotency_key(
    client: Client, mcp: McpServer, mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    agent = await client.create_agent(
        scripted(
            mcp_tool(mcp.url),
            (("kb_lookup", '{"query": "Paris"}'), ("kb_failing", "{}")),
            mode=mode,
        )
    )
    events = await client.run(agent.id, "look Paris up")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    lookup, failing = results(events)
    assert (lookup.tool_name, lookup.output, lookup.is_error) == ("kb_lookup", "found Paris", False)
    assert failing.is_error
    assert "the lookup service is down" in failing.output
    run_id = events[0].run_id
    received = await mcp.calls(2)
    assert received == [
        {
            "tool": "lookup",
            "arguments": {"query": "Paris"},
            "key": f"{run_id}:{lookup.tool_call_id}",
        },
        {"tool": "failing", "arguments": {}, "key": f"{run_id}:{failing.tool_call_id}"},
    ]
    if mode == DURABLE:
        (listed,) = await stored_payloads(client, run_id, "ToolsListed")
        assert sorted(t["name"] for t in listed["tools"]) == sorted(ALL_TOOLS)


async def test_calls_keep_one_connection_to_the_server(client: Client, mcp: McpServer) -> None:
    """The server answers each call with an SSE stream that it ends after the result: the
    executor reads it to its end, so the next call goes over the same connection."""
    calls = tuple(("kb_lookup", json.dumps({"query": str(i)})) for i in range(4))
    agent = await client.create_agent(scripted(mcp_tool(mcp.url), calls))
    events = await client.run(agent.id, "look four words up")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    assert [r.output for r in results(events)] == [f"found {i}" for i in range(4)]
    assert len(await mcp.calls(4)) == 4
    assert await mcp.connections() == 1


async def test_calls_keep_one_connection_to_a_server_that_ends_its_streams_late(
    client: Client, mcp: McpServer
) -> None:
    """The server ends each call's SSE stream a while after the result (LATE_END), longer than
    the executor takes to make its next call: a call returns once its stream has ended, so the
    next goes over the same connection rather than open another."""
    calls = tuple(("kb_mangled", "{}") for _ in range(4))
    agent = await client.create_agent(scripted(mcp_tool(f"{mcp.base}/raw/lateend/mcp"), calls))
    events = await client.run(agent.id, "four calls")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    assert [(r.output, r.is_error) for r in results(events)] == [("started", False)] * 4
    assert await mcp.connections() == 1


@pytest.mark.parametrize("mode", [CLASSIC, DURABLE], ids=["classic", "durable"])
async def test_the_openai_provider_is_offered_the_servers_tools_and_calls_one(
    client: Client,
    mcp: McpServer,
    wire: OpenAIWireServer,
    mode: agent_pb2.ExecutionMode.ValueType,
) -> None:
    wire.enqueue(
        Completion(tool_calls=[WireToolCall("kb_lookup", ['{"query": ', '"Rome"}'], id="c1")]),
        Completion(tokens=["Found", "."]),
    )
    tool = mcp_tool(mcp.url)
    tool.mcp.tool_names.extend(["lookup", "failing"])
    agent = await client.create_agent(openai_agent(tool, wire.base_url, mode))
    events = await client.run(agent.id, "look Rome up")
    assert events[-1].run_completed.output == "Found.", kinds(events)
    (result,) = results(events)
    assert (result.output, result.is_error) == ("found Rome", False)
    first, second = (offered(r.body) for r in wire.requests)
    assert first == second
    assert [name for name, _, _ in first] == ["kb_lookup", "kb_failing"]
    assert first[0][1] == "Looks a word up."
    assert first[0][2]["properties"]["query"]["type"] == "string"
    assert first[0][2]["required"] == ["query"]


async def test_a_restarted_server_gets_a_new_session(client: Client, mcp: McpServer) -> None:
    """The executor's session to the server outlives a run; the server restarts and forgets it:
    the next run's listing and call go over a new session."""
    calls = (("kb_lookup", '{"query": "Lima"}'),)
    first = await client.create_agent(scripted(mcp_tool(mcp.url), calls))
    events = await client.run(first.id, "look Lima up")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    mcp.restart()
    second = await client.create_agent(scripted(mcp_tool(mcp.url), calls))  # (not cached)
    events = await client.run(second.id, "look Lima up again")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    (result,) = results(events)
    assert (result.output, result.is_error) == ("found Lima", False)
    assert len(await mcp.calls(1)) == 1  # (the new process's)


@pytest.mark.parametrize("mode", [CLASSIC, DURABLE], ids=["classic", "durable"])
async def test_a_server_tool_that_requires_approval_runs_once_approved_as_edited(
    client: Client, mcp: McpServer, mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    """An approval's edit is checked against the schema the server listed (pinned in the run),
    and the tool runs with it."""
    tool = mcp_tool(mcp.url, requires_approval=True)
    agent = await client.create_agent(scripted(tool, (("kb_lookup", '{"query": "Quito"}'),), mode))
    call = client.stream(agent.id, "look Quito up")
    before = await until(call, "tool_approval_required")
    assert await mcp.calls(0) == []  # (not called before the approval)
    run_id, tool_call_id = before[0].run_id, before[-1].tool_approval_required.tool_call.id
    for bad in ('{"query": 7}', "{}"):  # (the server's schema: query, a string, is required)
        code, message = await status_of(approve_with(client, run_id, tool_call_id, bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (bad, message)
        assert "decision.edited_arguments_json" in message
    assert (await client.get_run(run_id)).status == run_pb2.RUN_STATUS_AWAITING_APPROVAL
    await approve_with(client, run_id, tool_call_id, '{"query": "Lima"}')
    events = before + await rest(call)
    assert events[-1].run_completed.output == "Done.", kinds(events)
    (result,) = results(events)
    assert (result.output, result.is_error) == ("found Lima", False)
    assert [c["arguments"] for c in await mcp.calls(1)] == [{"query": "Lima"}]


async def test_a_long_result_is_cut_with_a_marker(client: Client, mcp: McpServer) -> None:
    agent = await client.create_agent(
        scripted(mcp_tool(mcp.url), (("kb_big", '{"size": 100000}'),))
    )
    events = await client.run(agent.id, "big")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    (result,) = results(events)
    assert not result.is_error
    kept, marker = result.output.split("\n[agentrun: ")
    assert kept == "é" * (65536 // 2)
    assert marker == "the tool's result was cut here: it is longer than 65536 bytes]"


async def test_an_unreachable_server_fails_the_run_naming_it(
    client: Client, mcp: McpServer
) -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"
    agent = await client.create_agent(scripted(mcp_tool(url), (("kb_lookup", "{}"),)))
    events = await client.run(agent.id, "look it up")
    failed = events[-1].run_failed.error
    assert failed.code == run_pb2.RUN_ERROR_CODE_TOOL_UNAVAILABLE, kinds(events)
    assert url in failed.message
    assert "could not be reached" in failed.message
    await assert_still_serving(client, mcp)


async def test_a_hanging_call_times_out_and_is_retried_by_its_policy(
    client: Client, mcp: McpServer
) -> None:
    tool = mcp_tool(mcp.url)
    tool.timeout.FromSeconds(1)
    tool.retry_policy.maximum_attempts = 2
    tool.retry_policy.initial_interval.FromMilliseconds(50)
    agent = await client.create_agent(scripted(tool, (("kb_hang", "{}"),)))
    events = await client.run(agent.id, "hang")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    (result,) = results(events)
    assert result.is_error
    assert "timed out after 1 s" in result.output
    assert "after 2 attempts" in result.output
    assert tool_attempts(events)[:2] == [1, 2]
    first, second = await mcp.calls(2)
    assert first["tool"] == second["tool"] == "hang"
    assert first["key"] == second["key"] == f"{events[0].run_id}:{result.tool_call_id}"
    await assert_still_serving(client, mcp)


def retried(tool: agent_pb2.Tool, attempts: int) -> agent_pb2.Tool:
    tool.retry_policy.maximum_attempts = attempts
    tool.retry_policy.initial_interval.FromMilliseconds(50)
    return tool


@pytest.mark.parametrize(("mode", "attempts"), [("flaky", 3), ("dropped", 2)])
async def test_server_errors_and_broken_connections_are_retried_by_the_tools_policy(
    client: Client, mcp: McpServer, mode: str, attempts: int
) -> None:
    """HTTP 503 (twice) and a connection broken in the middle of a response (once), like an
    HTTP tool's: attempts that the tool's retry policy makes again."""
    tool = retried(mcp_tool(f"{mcp.base}/raw/{mode}/mcp"), 3)
    agent = await client.create_agent(scripted(tool, (("kb_mangled", "{}"),)))
    events = await client.run(agent.id, "try until it works")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    (result,) = results(events)
    assert (result.output, result.is_error) == ("started", False)
    assert tool_attempts(events) == list(range(1, attempts + 1))
    await assert_still_serving(client, mcp)


@pytest.mark.parametrize(
    ("path", "call", "error"),
    [
        ("/raw/broken/mcp", ("kb_mangled", "{}"), "malformed response"),
        ("/raw/huge/mcp", ("kb_mangled", "{}"), "a response longer than 1,048,576 bytes"),
        ("/mcp", ("kb_big", '{"size": 600000}'), "a response longer than 1,048,576 bytes"),
    ],
    ids=["malformed", "huge-json", "huge-sse"],
)
async def test_a_malformed_or_huge_response_is_a_tool_error_at_once(
    client: Client, mcp: McpServer, path: str, call: tuple[str, str], error: str
) -> None:
    """A malformed result, and one far beyond the output limit (10 MB of JSON; 1.2 MB of text
    and its structured copy in an SSE event), which is not read whole: the model gets a tool
    error, at once (a retry would get the same), and the executor goes on."""
    tool = retried(mcp_tool(f"{mcp.base}{path}"), 3)
    agent = await client.create_agent(scripted(tool, (call,)))
    events = await client.run(agent.id, "try it")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    (result,) = results(events)
    assert result.is_error
    assert error in result.output
    assert tool_attempts(events) == [1]
    await assert_still_serving(client, mcp)


async def test_a_server_that_hangs_while_the_session_opens_is_asked_again_by_the_next_run(
    client: Client, mcp: McpServer
) -> None:
    tool = mcp_tool(f"{mcp.base}/raw/slowstart/mcp")
    tool.timeout.FromSeconds(1)
    hung = await client.create_agent(scripted(tool, (("kb_mangled", "{}"),)))
    events = await client.run(hung.id, "start")
    failed = events[-1].run_failed.error
    assert failed.code == run_pb2.RUN_ERROR_CODE_TOOL_UNAVAILABLE, kinds(events)
    assert "/raw/slowstart/mcp did not list its tools within 1 s" in failed.message
    events = await client.run(hung.id, "start again")
    assert events[-1].run_completed.output == "Done.", kinds(events)
    (result,) = results(events)
    assert (result.output, result.is_error) == ("started", False)


async def test_a_malformed_tool_list_fails_the_run_naming_the_server(
    client: Client, mcp: McpServer
) -> None:
    url = f"{mcp.base}/raw/badlist/mcp"
    agent = await client.create_agent(scripted(mcp_tool(url), (("kb_mangled", "{}"),)))
    events = await client.run(agent.id, "list")
    failed = events[-1].run_failed.error
    assert failed.code == run_pb2.RUN_ERROR_CODE_TOOL_UNAVAILABLE, kinds(events)
    assert f"the MCP server {url} did not list its tools" in failed.message
    await assert_still_serving(client, mcp)


async def test_a_server_listing_too_many_tools_fails_the_run(
    client: Client, mcp: McpServer
) -> None:
    url = f"{mcp.base}/raw/many/mcp"
    agent = await client.create_agent(scripted(mcp_tool(url), (("kb_mangled0", "{}"),)))
    events = await client.run(agent.id, "many")
    failed = events[-1].run_failed.error
    assert failed.code == run_pb2.RUN_ERROR_CODE_TOOL_UNAVAILABLE, kinds(events)
    assert f"the MCP server {url} lists more than 128 tools" in failed.message


async def test_a_tool_name_that_clashes_fails_the_run(client: Client, mcp: McpServer) -> None:
    agent = scripted(mcp_tool(mcp.url), (("kb_lookup", "{}"),))
    agent.tools[0].mcp.name_prefix = ""
    agent.tools[0].mcp.tool_names.append("lookup")
    clock = agent_pb2.Tool(http=agent_pb2.HttpTool(name="lookup", description="x", url=mcp.url))
    agent.tools.append(clock)
    created = await client.create_agent(agent)
    events = await client.run(created.id, "clash")
    failed = events[-1].run_failed.error
    assert failed.code == run_pb2.RUN_ERROR_CODE_TOOL_UNAVAILABLE, kinds(events)
    assert mcp.url in failed.message
    assert "'lookup'" in failed.message


# --- Crashes --------------------------------------------------------------------------------


async def test_a_killed_executor_resumes_with_the_pinned_tools_and_the_same_key(
    crash_stack: CrashStack, mcp: McpServer, wire: OpenAIWireServer
) -> None:
    """The executor is SIGKILLed while a call is in flight, and the server's tools change
    meanwhile: the next executor makes a second attempt with the same idempotency key, and the
    model is offered the tools as listed when the run started."""
    wire.enqueue(
        Completion(tool_calls=[WireToolCall("kb_held", ['{"query": "Oslo"}'], id="c1")]),
        Completion(tokens=["Held", " it", "."]),
    )
    client = crash_stack.client
    agent = await client.create_agent(openai_agent(mcp_tool(mcp.url), wire.base_url, DURABLE))
    reader = Reader(client, agent.id, kill_after=1_000_000)
    (first,) = await mcp.calls(1)  # in flight, held there
    await mcp.post("add_tool")
    await mcp.post("remove_tool")
    crash_stack.stack.executors[-1].kill()
    await asyncio.to_thread(crash_stack.start_executor)  # takes the run up
    received = await mcp.calls(2)
    await mcp.post("release")
    events = await reader.result()
    assert events[-1].run_completed.output == "Held it.", kinds(events)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert len(received) == 2
    second = received[1]
    assert second == first == {"tool": "held", "arguments": {"query": "Oslo"}, "key": second["key"]}
    assert first["key"] == f"{events[0].run_id}:c1"
    assert tool_attempts(events) == [1, 2]
    (result,) = results(events)
    assert (result.output, result.is_error) == ("held Oslo", False)
    before, after = (offered(r.body) for r in wire.requests)
    assert sorted(name for name, _, _ in after) == sorted(ALL_TOOLS)
    assert after == before
    assert json.dumps(after).count("extra") == 0
