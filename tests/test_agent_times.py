"""AgentService's output-only times, through a real gateway and executor: create_time is when
the agent was created (again, after a deletion), update_time when the version returned was."""

from __future__ import annotations

import grpc
from google.protobuf import field_mask_pb2

from agentrun.v1 import agent_pb2, agent_service_pb2
from tests.client import Client, scripted_agent


def times(agent: agent_pb2.Agent) -> tuple[int, int]:
    assert agent.HasField("create_time"), agent
    assert agent.HasField("update_time"), agent
    return agent.create_time.ToNanoseconds(), agent.update_time.ToNanoseconds()


async def get(client: Client, agent_id: str, version: int = 0) -> agent_pb2.Agent:
    response = await client.agents.GetAgent(
        agent_service_pb2.GetAgentRequest(agent_id=agent_id, version=version)
    )
    found: agent_pb2.Agent = response.agent
    return found


async def listed(client: Client, agent_id: str) -> agent_pb2.Agent:
    token = ""
    while True:
        response = await client.agents.ListAgents(
            agent_service_pb2.ListAgentsRequest(page_size=500, page_token=token)
        )
        for agent in response.agents:
            if agent.id == agent_id:
                found: agent_pb2.Agent = agent
                return found
        token = response.next_page_token
        assert token, f"{agent_id} is not listed"


async def test_create_get_update_and_list_return_the_agents_times(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    created = await client.create_agent(scripted_agent())
    created_at, first_update = times(created)
    assert created_at == first_update
    assert times(await get(client, created.id)) == (created_at, first_update)
    assert times(await listed(client, created.id)) == (created_at, first_update)

    changed = agent_pb2.Agent(id=created.id, display_name="Renamed")
    response = await client.agents.UpdateAgent(
        agent_service_pb2.UpdateAgentRequest(
            agent=changed, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])
        )
    )
    updated: agent_pb2.Agent = response.agent

    assert updated.version == 2
    created_again_at, second_update = times(updated)
    assert created_again_at == created_at
    assert second_update > first_update
    # Through the other gateway too: the times are the executor's, stored with the agent.
    other = Client(channels[1])
    assert times(await get(other, created.id)) == (created_at, second_update)
    assert times(await listed(other, created.id)) == (created_at, second_update)
    assert times(await get(other, created.id, version=1)) == (created_at, first_update)


async def test_an_agent_created_again_after_its_deletion_has_a_new_create_time(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    first = await client.create_agent(scripted_agent())
    await client.agents.DeleteAgent(agent_service_pb2.DeleteAgentRequest(agent_id=first.id))

    again = await client.create_agent(scripted_agent(agent_id=first.id))

    assert again.version == 3  # version 2 was the deletion
    created_at, updated_at = times(again)
    assert created_at == updated_at
    assert created_at > times(first)[0]
    assert times(await get(client, first.id)) == (created_at, updated_at)
