"""NATS down: classic runs still stream; resumption is unavailable meanwhile and comes back,
with the events of the runs that streamed during the outage, whole, however long it lasted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agentrun.launcher import start_nats
from tests.client import Client, assert_history_agrees, kinds, scripted_agent, text_of
from tests.conftest import database_url_for, drop_schema
from tests.stack import Stack


@pytest.fixture
async def own_nats_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    nats = start_nats(tmp_path / "nats", tmp_path / "logs", name="own-nats")
    stack = Stack(database_url=f"sqlite:///{tmp_path / 'data'}", nats=nats, tmp=tmp_path)
    try:
        stack.start_executor()
        stack.start_gateway()
        yield stack
    finally:
        stack.stop()
        stack.nats.stop()


async def test_classic_runs_stream_while_nats_is_down(
    own_nats_stack: Stack, tmp_path: Path
) -> None:
    stack = own_nats_stack
    channel = grpc.aio.insecure_channel(stack.gateways[0].address)
    client = Client(channel)
    agent = await client.create_agent(scripted_agent(turns=[("streaming without NATS", [])]))
    before_outage = await client.run(agent.id, "hi")
    assert await client.watch_all(before_outage[0].run_id) == before_outage

    executor, gateway = stack.executors[0], stack.gateways[0]
    executor_mark, gateway_mark = executor.lines_seen, gateway.lines_seen
    port = stack.nats.port
    stack.nats.kill()
    gateway.wait_for_output("disconnected from NATS", after=gateway_mark)

    during = await client.run(agent.id, "hi")
    assert kinds(during)[-1] == "run_completed"
    assert text_of(during) == "streaming without NATS"
    with pytest.raises(grpc.aio.AioRpcError) as unavailable:
        await client.watch(during[0].run_id).read()
    assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "NATS is unavailable" in (unavailable.value.details() or "")

    stack.nats = start_nats(tmp_path / "nats", tmp_path / "logs", port=port, name="own-nats-2")
    executor.wait_for_output("reconnected to NATS", after=executor_mark)
    gateway.wait_for_output("reconnected to NATS", after=gateway_mark)
    assert await client.watch_all(during[0].run_id) == during
    assert await client.watch_all(before_outage[0].run_id) == before_outage
    await channel.close(grace=None)


@pytest.fixture(params=["sqlite", "postgres"])
async def outage_stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    url = database_url_for(request.param, tmp_path / "data")
    nats = start_nats(tmp_path / "nats", tmp_path / "logs", name="own-nats")
    stack = Stack(database_url=url, nats=nats, tmp=tmp_path)
    try:
        stack.start_executor()
        stack.start_gateway()
        stack.start_gateway()
        yield stack
    finally:
        stack.stop()
        stack.nats.stop()
        drop_schema(url)


async def test_a_run_whose_executor_died_before_publishing_it_ends_as_the_run_list_says(
    outage_stack: Stack, tmp_path: Path
) -> None:
    """A classic run completes while NATS is down, and its executor is SIGKILLed before NATS
    is back: its events never reach JetStream. Its stream then gets the end the run list
    recorded (not EXECUTOR_LOST: the run was not lost, it completed)."""
    stack = outage_stack
    channel = grpc.aio.insecure_channel(stack.gateways[0].address)
    client = Client(channel)
    agent = await client.create_agent(scripted_agent(turns=[("done before the crash", [])]))
    executor, gateway = stack.executors[0], stack.gateways[0]
    gateway_mark = gateway.lines_seen
    port = stack.nats.port
    stack.nats.kill()
    gateway.wait_for_output("disconnected from NATS", after=gateway_mark)
    live = await client.run(agent.id, "hi")
    assert kinds(live)[-1] == "run_completed"
    executor.kill()

    stack.nats = start_nats(tmp_path / "nats", tmp_path / "logs", port=port, name="own-nats-2")
    stack.start_executor(AGENTRUN_EXECUTOR_LISTEN=executor.address)
    gateway.wait_for_output("reconnected to NATS", after=gateway_mark)
    history = await assert_history_agrees(client, live[0].run_id)
    assert history[-1].run_completed.output == "done before the crash"
    await channel.close(grace=None)
