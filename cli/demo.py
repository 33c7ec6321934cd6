"""The demo agents that ``agentrun up`` creates: scripted model, the three built-in tools; and
``demo-tools``, whose tools are those of the example MCP server (examples/mcp_server.py) that
``up`` starts beside the stack."""

from __future__ import annotations

from typing import Any

import grpc

from agentrun.v1 import agent_pb2, agent_service_pb2, agent_service_pb2_grpc

DEMO_AGENTS = ("demo-classic", "demo-durable")
DEMO_TOOLS_AGENT = "demo-tools"
Metadata = tuple[tuple[str, str], ...]


def demo_agent(agent_id: str, mode: agent_pb2.ExecutionMode.ValueType) -> agent_pb2.Agent:
    agent = agent_pb2.Agent(
        id=agent_id,
        display_name=f"Demo agent ({agent_pb2.ExecutionMode.Name(mode).split('_')[-1].lower()})",
        execution_mode=mode,
        instructions="You are a helpful demo agent.",
        model=agent_pb2.ModelConfig(provider="scripted"),
        tools=[
            agent_pb2.Tool(name="clock"),
            agent_pb2.Tool(name="calculator"),
            agent_pb2.Tool(name="send_email", requires_approval=True),
        ],
    )
    agent.model.scripted.first_token_delay.FromMilliseconds(150)
    agent.model.scripted.token_delay.FromMilliseconds(40)
    agent.approval_timeout.FromSeconds(600)
    return agent


def demo_tools_agent(mcp_url: str) -> agent_pb2.Agent:
    """A durable agent whose tools are the help desk's (examples/mcp_server.py) at ``mcp_url``:
    "open a ticket: the printer is jammed", "list my tickets"."""
    agent = demo_agent(DEMO_TOOLS_AGENT, agent_pb2.EXECUTION_MODE_DURABLE)
    agent.display_name = "Demo agent (help desk over MCP)"
    agent.instructions = "You open and list help desk tickets."
    del agent.tools[:]
    tool = agent.tools.add(mcp=agent_pb2.McpServerTool(url=mcp_url))
    tool.timeout.FromSeconds(10)
    tool.retry_policy.maximum_attempts = 3
    return agent


async def _create(stub: Any, agent: agent_pb2.Agent, metadata: Metadata) -> bool:
    """Creates the agent unless it exists; whether it created it."""
    try:
        await stub.CreateAgent(
            agent_service_pb2.CreateAgentRequest(agent=agent), metadata=metadata, timeout=30
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        return False
    return True


async def seed_demo_agents(target: str, metadata: Metadata = ()) -> list[str]:
    """Creates the demo agents through the gateway unless they exist. Returns those created."""
    created = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        for agent_id, mode in zip(
            DEMO_AGENTS,
            (agent_pb2.EXECUTION_MODE_CLASSIC, agent_pb2.EXECUTION_MODE_DURABLE),
            strict=True,
        ):
            if await _create(stub, demo_agent(agent_id, mode), metadata):
                created.append(agent_id)
    return created


async def seed_demo_tools_agent(target: str, mcp_url: str, metadata: Metadata = ()) -> str:
    """Creates demo-tools for the help desk at ``mcp_url``, or points the one there is at it
    (the server's port changes from one ``up`` to the next). Says which it did."""
    agent = demo_tools_agent(mcp_url)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        if await _create(stub, agent, metadata):
            return "created"
        response = await stub.GetAgent(
            agent_service_pb2.GetAgentRequest(agent_id=DEMO_TOOLS_AGENT),
            metadata=metadata,
            timeout=30,
        )
        if list(response.agent.tools) == list(agent.tools):
            return "found"
        update = agent_service_pb2.UpdateAgentRequest(
            agent=agent, expected_version=response.agent.version
        )
        update.update_mask.paths.append("tools")
        await stub.UpdateAgent(update, metadata=metadata, timeout=30)
        return "updated"
