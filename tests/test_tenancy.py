"""Tenants: API keys name them; nothing of one tenant is visible to, or steerable by, another."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from agentrun.v1 import agent_pb2, agent_service_pb2, run_pb2, run_service_pb2
from cli.launcher import Service
from tests.client import Client, assert_history_agrees, rest, scripted_agent, until
from tests.stack import Stack
from tests.test_client_tools import client_tool_agent, submit

CLASSIC, DURABLE = agent_pb2.EXECUTION_MODE_CLASSIC, agent_pb2.EXECUTION_MODE_DURABLE
EMAIL = '{"to": "a@example.com", "subject": "s", "body": "b"}'


@pytest.fixture
def keyed_gateway(stack: Stack, tmp_path: Path) -> Iterator[Service]:
    """A gateway of the shared stack that requires API keys: acme and globex, from a file that
    holds one key in clear and one as its SHA-256 digest."""
    keys = tmp_path / "keys.json"
    digest = hashlib.sha256(b"globex-secret").hexdigest()
    keys.write_text(json.dumps({"acme": ["acme-secret"], "globex": [f"sha256:{digest}"]}))
    gateway = stack.start_gateway(AGENTRUN_API_KEYS_FILE=str(keys))
    yield gateway
    gateway.stop()
    stack.gateways.remove(gateway)


@pytest.fixture
async def keyed(keyed_gateway: Service) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(keyed_gateway.address)
    yield channel
    await channel.close(grace=None)


async def expect(code: grpc.StatusCode, awaitable: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


async def test_calls_without_a_valid_key_are_refused(keyed: grpc.aio.Channel) -> None:
    for client in (Client(keyed), Client(keyed, api_key="wrong")):
        await expect(grpc.StatusCode.UNAUTHENTICATED, client.create_agent())
        await expect(
            grpc.StatusCode.UNAUTHENTICATED,
            client.runs.ListRuns(run_service_pb2.ListRunsRequest(), metadata=client.metadata),
        )
        stream = client.stream("any", "hi")
        await expect(grpc.StatusCode.UNAUTHENTICATED, stream.read())


@pytest.mark.parametrize("mode", [CLASSIC, DURABLE], ids=["classic", "durable"])
async def test_tenants_see_and_steer_only_their_own_runs_and_agents(
    keyed: grpc.aio.Channel, mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    acme, globex = Client(keyed, "acme-secret"), Client(keyed, "globex-secret")
    agent = scripted_agent(turns=[("", [("send_email", EMAIL)]), ("done", [])], mode=mode)
    await acme.create_agent(agent)
    # The same agent id in another tenant is another agent.
    other = scripted_agent(turns=[("globex speaking", [])], agent_id=agent.id)
    await globex.create_agent(other)
    live = acme.stream(agent.id, "email")
    before = await until(live, "tool_approval_required")
    run_id = before[0].run_id
    tool_call_id = before[-1].tool_approval_required.tool_call.id

    await expect(grpc.StatusCode.NOT_FOUND, globex.get_run(run_id))
    await expect(grpc.StatusCode.NOT_FOUND, globex.watch(run_id).read())
    await expect(grpc.StatusCode.NOT_FOUND, globex.approve(run_id, tool_call_id))
    await expect(
        grpc.StatusCode.NOT_FOUND,
        globex.runs.CancelRun(
            run_service_pb2.CancelRunRequest(run_id=run_id), metadata=globex.metadata
        ),
    )
    listed = await globex.runs.ListRuns(run_service_pb2.ListRunsRequest(), metadata=globex.metadata)
    assert run_id not in [r.id for r in listed.runs]
    theirs = await globex.agents.GetAgent(
        agent_service_pb2.GetAgentRequest(agent_id=agent.id), metadata=globex.metadata
    )
    assert theirs.agent.model.scripted.turns[0].text == "globex speaking"
    globex_run = await globex.run(agent.id, "hi")
    assert globex_run[-1].run_completed.output == "globex speaking"

    # The owner is unaffected by all of that.
    await acme.approve(run_id, tool_call_id)
    after = await rest(live)
    assert after[-1].run_completed.output == "done"
    assert [
        e.tool_approval_resolved.approved for e in after if e.HasField("tool_approval_resolved")
    ] == [True]
    await assert_history_agrees(acme, run_id, before + after)


async def test_one_request_id_in_two_tenants_starts_two_runs(keyed: grpc.aio.Channel) -> None:
    acme, globex = Client(keyed, "acme-secret"), Client(keyed, "globex-secret")
    agent = scripted_agent(turns=[("hello", [])])
    await acme.create_agent(agent)
    await globex.create_agent(agent)
    request_id = "the-same-request"
    ours = await acme.run(agent.id, "hi", request_id=request_id)
    theirs = await globex.run(agent.id, "hi", request_id=request_id)
    assert ours[0].run_id != theirs[0].run_id
    again = await acme.run(agent.id, "hi", request_id=request_id)
    assert again[0].run_id == ours[0].run_id
    await assert_history_agrees(acme, ours[0].run_id, ours)
    await assert_history_agrees(globex, theirs[0].run_id, theirs)


@pytest.mark.parametrize("mode", [CLASSIC, DURABLE], ids=["classic", "durable"])
async def test_another_tenants_tool_result_is_not_found_and_changes_nothing(
    keyed: grpc.aio.Channel, mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    acme, globex = Client(keyed, "acme-secret"), Client(keyed, "globex-secret")
    agent = client_tool_agent(mode)
    await acme.create_agent(agent)
    live = acme.stream(agent.id, "weather?")
    before = await until(live, "client_tool_call_required")
    run_id = before[0].run_id
    tool_call_id = before[-1].client_tool_call_required.tool_call.id

    await expect(grpc.StatusCode.NOT_FOUND, submit(globex, run_id, tool_call_id, "globex's"))
    assert (await acme.get_run(run_id)).status == run_pb2.RUN_STATUS_AWAITING_TOOL_RESULT

    await submit(acme, run_id, tool_call_id, "acme's")
    after = await rest(live)
    assert [e.tool_result.output for e in after if e.HasField("tool_result")] == ["acme's"]
    assert after[-1].run_completed.output == "It is sunny."
