"""NATS down: classic runs still stream; resumption is unavailable meanwhile and comes back,
with the events of the runs that streamed during the outage, whole, however long it lasted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from cli.launcher import start_nats
from tests.client import Client, assert_history_agrees, kinds, rest, scripted_agent, text_of, until
from tests.conftest import database_url_for, drop_schema
from tests.stack import Stack

# How long NATS stays down after the runs end: well past any flush timeout of a publisher.
OUTAGE_AFTER_THE_RUNS = 30.0


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


async def test_classic_runs_stream_while_nats_is_down(outage_stack: Stack, tmp_path: Path) -> None:
    stack = outage_stack
    channel = grpc.aio.insecure_channel(stack.gateways[0].address)
    client = Client(channel)
    agent = await client.create_agent(scripted_agent(turns=[("streaming without NATS", [])]))
    before_outage = await client.run(agent.id, "hi")
    assert await client.watch_all(before_outage[0].run_id) == before_outage

    executor = stack.executors[0]
    executor_mark = executor.lines_seen
    port = stack.nats.port
    stack.nats.kill()
    executor.wait_for_output("disconnected from NATS", after=executor_mark)

    during = await client.run(agent.id, "hi")
    assert kinds(during)[-1] == "run_completed"
    assert text_of(during) == "streaming without NATS"
    with pytest.raises(grpc.aio.AioRpcError) as unavailable:
        await client.watch(during[0].run_id).read()
    assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "NATS is unavailable" in (unavailable.value.details() or "")

    stack.nats = start_nats(tmp_path / "nats", tmp_path / "logs", port=port, name="own-nats-2")
    executor.wait_for_output("reconnected to NATS", after=executor_mark)
    assert await client.watch_all(during[0].run_id) == during
    assert await client.watch_all(before_outage[0].run_id) == before_outage
    await channel.close(grace=None)


@pytest.mark.timeout(240)
async def test_classic_runs_that_outlive_a_long_nats_outage_publish_their_whole_history(
    outage_stack: Stack, tmp_path: Path
) -> None:
    """NATS is SIGKILLed while classic runs stream, and stays down for 30 s after they end.
    Once it is back, each run's stream holds exactly what its live client saw, ending as
    GetRun says; watchers that were attached through the outage get the same; nobody
    declares the runs lost."""
    stack = outage_stack
    channels = [grpc.aio.insecure_channel(g.address) for g in stack.gateways]
    live_client, watching_client = Client(channels[0]), Client(channels[1])
    words = " ".join(f"w{i}" for i in range(60))
    agent = await live_client.create_agent(scripted_agent(turns=[(words, [])], token_delay_ms=50))
    calls = [live_client.stream(agent.id, f"run {i}") for i in range(5)]
    firsts = [await until(call, "text_delta") for call in calls]
    run_ids = [first[0].run_id for first in firsts]
    watches = [watching_client.watch(run_id) for run_id in run_ids for _ in range(2)]
    for watch in watches:
        await until(watch, "text_delta")
    watched = [asyncio.ensure_future(rest(watch)) for watch in watches]

    executor = stack.executors[0]
    mark = executor.lines_seen
    port = stack.nats.port
    stack.nats.kill()
    executor.wait_for_output("disconnected from NATS", after=mark)
    lives = [first + await rest(call) for first, call in zip(firsts, calls, strict=True)]
    for live in lives:
        assert kinds(live)[-1] == "run_completed"
        assert text_of(live) == words
    await asyncio.sleep(OUTAGE_AFTER_THE_RUNS)  # the outage itself, not a wait for anything

    stack.nats = start_nats(tmp_path / "nats", tmp_path / "logs", port=port, name="own-nats-2")
    executor.wait_for_output("reconnected to NATS", after=mark)
    for i, live in enumerate(lives):
        for watch_result in watched[2 * i : 2 * i + 2]:
            rest_of_watch = await watch_result
            assert kinds(rest_of_watch)[-1] == "run_completed"
            assert rest_of_watch == live[-len(rest_of_watch) :]
        await assert_history_agrees(watching_client, live[0].run_id, live)
        await assert_history_agrees(live_client, live[0].run_id, live)
    for channel in channels:
        await channel.close(grace=None)


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
    executor = stack.executors[0]
    mark = executor.lines_seen
    port = stack.nats.port
    stack.nats.kill()
    executor.wait_for_output("disconnected from NATS", after=mark)
    live = await client.run(agent.id, "hi")
    assert kinds(live)[-1] == "run_completed"
    executor.kill()

    stack.nats = start_nats(tmp_path / "nats", tmp_path / "logs", port=port, name="own-nats-2")
    replacement = stack.start_executor(AGENTRUN_EXECUTOR_LISTEN=executor.address)
    replacement.wait_for_output("connected to NATS at")
    history = await assert_history_agrees(client, live[0].run_id)
    assert history[-1].run_completed.output == "done before the crash"
    await channel.close(grace=None)
