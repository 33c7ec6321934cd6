"""NATS down: classic runs still stream; resumption is unavailable meanwhile and comes back,
with the events of the runs that streamed during the outage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agentrun.launcher import start_nats
from tests.client import Client, kinds, scripted_agent, text_of
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
