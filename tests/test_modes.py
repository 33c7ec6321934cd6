"""executor.modes: an agent's runs follow its mode as it changes; a repeat keeps its first run."""

from __future__ import annotations

import uuid

import grpc

from agentrun.v1 import agent_pb2, agent_service_pb2, run_service_pb2
from tests.client import Client, scripted_agent

CLASSIC = agent_pb2.EXECUTION_MODE_CLASSIC
DURABLE = agent_pb2.EXECUTION_MODE_DURABLE


async def test_runs_stream_whole_whatever_the_mode(channels: list[grpc.aio.Channel]) -> None:
    """An agent switched between the modes: every run streams whole in the mode it had."""
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=[("Hello.", [])], mode=DURABLE))
    outputs: list[tuple[int, str]] = []
    switches = (DURABLE, DURABLE, CLASSIC, CLASSIC, DURABLE)
    for mode in switches:
        changed = scripted_agent(turns=[(f"Hello in mode {mode}.", [])], mode=mode)
        changed.id = agent.id
        await client.agents.UpdateAgent(agent_service_pb2.UpdateAgentRequest(agent=changed))
        events = await client.run(agent.id, "hi")
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert events[0].run_started.run.execution_mode == mode
        outputs.append((mode, events[-1].run_completed.output))
    overridden = await client.run(agent.id, "hi", execution_mode=CLASSIC)
    assert overridden[0].run_started.run.execution_mode == CLASSIC
    assert overridden[-1].HasField("run_completed")
    assert outputs == [(m, f"Hello in mode {m}.") for m in switches]


async def test_a_repeat_after_the_agent_changed_mode_returns_the_first_run(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=[("First.", [])], mode=CLASSIC))
    request_id = str(uuid.uuid4())
    first = await client.run(agent.id, "hi", request_id=request_id)
    changed = scripted_agent(turns=[("Second.", [])], mode=DURABLE)
    changed.id = agent.id
    await client.agents.UpdateAgent(agent_service_pb2.UpdateAgentRequest(agent=changed))
    again = await client.run(agent.id, "hi", request_id=request_id)
    assert again[0].run_id == first[0].run_id
    assert again[-1].run_completed.output == "First."
    listed = await client.runs.ListRuns(run_service_pb2.ListRunsRequest(agent_id=agent.id))
    assert [(r.id, r.execution_mode) for r in listed.runs] == [(first[0].run_id, CLASSIC)]
