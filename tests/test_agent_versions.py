"""What agent.proto promises of versions, through a real gateway and executor: a deletion is a
version too, an agent created again goes on after it, and every version keeps naming the
configuration it named."""

from __future__ import annotations

import grpc
import pytest

from agentrun.v1 import agent_pb2, agent_service_pb2
from tests.client import Client, scripted_agent


async def get(client: Client, agent_id: str, version: int = 0) -> agent_pb2.Agent:
    response = await client.agents.GetAgent(
        agent_service_pb2.GetAgentRequest(agent_id=agent_id, version=version)
    )
    found: agent_pb2.Agent = response.agent
    return found


async def test_an_agent_created_again_goes_on_after_its_deletions_version(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    first = scripted_agent()
    first.display_name = "first"
    assert (await client.create_agent(first)).version == 1
    await client.agents.DeleteAgent(agent_service_pb2.DeleteAgentRequest(agent_id=first.id))
    with pytest.raises(grpc.aio.AioRpcError) as deleted:
        await get(client, first.id)
    assert deleted.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await get(client, first.id, version=1)).display_name == "first"

    again = scripted_agent(agent_id=first.id)
    again.display_name = "again"
    created = await client.create_agent(again)

    assert (created.version, created.display_name) == (3, "again")
    assert (await get(client, first.id)).display_name == "again"
    assert (await get(client, first.id, version=1)).display_name == "first"
    with pytest.raises(grpc.aio.AioRpcError) as deletion:
        await get(client, first.id, version=2)
    assert deletion.value.code() == grpc.StatusCode.NOT_FOUND
