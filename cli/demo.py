"""The two demo agents that ``agentrun up`` creates: scripted model, the three built-in tools."""

from __future__ import annotations

import grpc

from agentrun.v1 import agent_pb2, agent_service_pb2, agent_service_pb2_grpc

DEMO_AGENTS = ("demo-classic", "demo-durable")


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


async def seed_demo_agents(target: str, metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """Creates the demo agents through the gateway unless they exist. Returns those created."""
    created = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        for agent_id, mode in zip(
            DEMO_AGENTS,
            (agent_pb2.EXECUTION_MODE_CLASSIC, agent_pb2.EXECUTION_MODE_DURABLE),
            strict=True,
        ):
            try:
                await stub.CreateAgent(
                    agent_service_pb2.CreateAgentRequest(agent=demo_agent(agent_id, mode)),
                    metadata=metadata,
                    timeout=30,
                )
                created.append(agent_id)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
    return created
