"""HTTP tools end to end: real executors and gateways, a real HTTP endpoint in the test process
(tests/tool_server.py), runs driven by the scripted model.

The executors allow tool URLs on 127.0.0.1 only (AGENTRUN_TOOL_URL_ALLOW)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from agentrun.v1 import agent_pb2, agent_service_pb2
from cli.launcher import Service
from tests.client import Client
from tests.conftest import database_url_for, drop_schema
from tests.stack import Stack
from tests.test_bad_input import status_of
from tests.tool_server import ToolServer

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
            agent_with(agent_pb2.Tool(mcp=agent_pb2.McpServerTool(url=url))),
            "agent.tools[0].mcp",
        ),
        (
            agent_with(agent_pb2.Tool(client=agent_pb2.ClientTool(name="pick"))),
            "agent.tools[0].client",
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
