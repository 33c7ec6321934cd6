"""Agents that an older version stored with durations this one refuses still run.

An approval timeout of 315,576,000,000 s (the largest protobuf Duration) was accepted before
durations were bounded; every run of such an agent then failed at its approval, when the
deadline went out as a protobuf Timestamp: a classic run with INTERNAL, a durable one by being
taken up again for ever without its approval ever streamed. Such an agent is written here
straight into the stack's store, as that version wrote it.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from agentrun.v1 import agent_pb2
from common.settings import LOCAL_TENANT
from eventstore.agents import Agent, AgentCatalog
from eventstore.persistence import StoreConfig
from executor.translation import agent_from_proto
from tests.client import Client, rest, scripted_agent, until
from tests.stack import Stack

EMAIL = json.dumps({"to": "ada@example.com", "subject": "Hi", "body": "Hello Ada"})
TURNS = [("Sending.", [("send_email", EMAIL)]), ("Sent.", [])]
LARGEST_DURATION = 315_576_000_000
LAST_TIMESTAMP = "9999-12-31T23:59:59.999999999Z"
GUARD = 30.0  # fails a test that would otherwise wait for ever; never reached when it passes


def store_as_an_older_version(stack: Stack, agent: agent_pb2.Agent) -> None:
    """Writes the agent into the stack's store without validating it (as versions before the
    bounds did: they only refused what was not positive)."""
    config = agent_from_proto(agent).with_version(1)
    catalog = AgentCatalog(StoreConfig.from_url(stack.database_url, stack.data_dir))
    try:
        catalog.save(Agent(tenant=LOCAL_TENANT, agent_id=config.agent_id, config=config.to_json()))
    finally:
        catalog.close()


@pytest.mark.parametrize(
    "mode",
    [agent_pb2.EXECUTION_MODE_CLASSIC, agent_pb2.EXECUTION_MODE_DURABLE],
    ids=["classic", "durable"],
)
async def test_a_run_of_an_agent_with_an_unbounded_approval_timeout_completes(
    stack: Stack, channels: list[grpc.aio.Channel], mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    agent = scripted_agent(turns=TURNS, mode=mode)
    agent.approval_timeout.FromSeconds(LARGEST_DURATION)
    await asyncio.to_thread(store_as_an_older_version, stack, agent)
    client = Client(channels[0])
    call = client.stream(agent.id, "email Ada")
    before = await asyncio.wait_for(until(call, "tool_approval_required"), GUARD)
    required = before[-1].tool_approval_required
    # The deadline lies beyond what a Timestamp holds: it reads as the last one that it does.
    assert required.expire_time.ToJsonString() == LAST_TIMESTAMP
    await Client(channels[1]).approve(before[0].run_id, required.tool_call.id)
    after = await asyncio.wait_for(rest(call), GUARD)
    assert after[-1].run_completed.output == "Sent."
