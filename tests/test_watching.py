"""executor.watching: WatchRun's range — a run's events after a sequence, none after its end,
OUT_OF_RANGE beyond it — on both modes, through real processes."""

from __future__ import annotations

import grpc
import pytest

from agentrun.v1 import agent_pb2
from tests.client import Client, assert_history_agrees, scripted_agent

MODES = [agent_pb2.EXECUTION_MODE_CLASSIC, agent_pb2.EXECUTION_MODE_DURABLE]


@pytest.mark.parametrize("mode", MODES, ids=["classic", "durable"])
async def test_a_watch_of_an_ended_run_is_bounded_by_its_end(
    channels: list[grpc.aio.Channel], mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=[("Done here.", [])], mode=mode))
    events = await client.run(agent.id, "hi")
    run_id, end = events[0].run_id, events[-1].sequence
    await assert_history_agrees(client, run_id, events)
    assert await client.watch_all(run_id, after=end - 1) == events[-1:]
    assert await client.watch_all(run_id, after=end) == []  # the client has everything
    with pytest.raises(grpc.aio.AioRpcError) as beyond:
        await client.watch_all(run_id, after=end + 1)
    assert beyond.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert f"ended with event {end}" in (beyond.value.details() or "")
