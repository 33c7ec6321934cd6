"""An executor killed with SIGKILL: its classic runs fail with EXECUTOR_LOST, promptly, for the
client streaming the run, for watchers on other gateways, and in the run list.

Each test builds its own stack: gateway A -> executor 1 (the victim), gateway B -> executor 2,
sharing the store and NATS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agentrun.v1 import run_pb2, run_service_pb2
from cli.launcher import Service
from tests.client import Client, kinds, rest, scripted_agent, until
from tests.conftest import database_url_for, drop_schema
from tests.stack import Stack

SLOW_TURNS: list[tuple[str, list[tuple[str, str]]]] = [(" ".join(["token"] * 5000), [])]


@pytest.fixture(params=["sqlite", "postgres"])
async def pair(
    request: pytest.FixtureRequest, nats_server: Service, tmp_path: Path
) -> AsyncIterator[tuple[Stack, Client, Client]]:
    url = database_url_for(request.param, tmp_path / "data")
    stack = Stack(database_url=url, nats=nats_server, tmp=tmp_path)
    try:
        victim, survivor = stack.start_executor(), stack.start_executor()
        stack.start_gateway(victim.address)
        stack.start_gateway(survivor.address)
        channels = [grpc.aio.insecure_channel(g.address) for g in stack.gateways]
        yield stack, Client(channels[0]), Client(channels[1])
        for channel in channels:
            await channel.close(grace=None)
    finally:
        stack.stop()
        drop_schema(url)


def assert_lost(event: run_pb2.RunEvent) -> None:
    assert event.HasField("run_failed"), kinds([event])
    assert event.run_failed.error.code == run_pb2.RUN_ERROR_CODE_EXECUTOR_LOST
    assert event.run_failed.error.retryable


async def test_the_client_and_a_watcher_learn_at_once_that_the_run_is_lost(
    pair: tuple[Stack, Client, Client],
) -> None:
    stack, a, b = pair
    agent = await a.create_agent(scripted_agent(turns=SLOW_TURNS, token_delay_ms=10))
    live = a.stream(agent.id, "talk")
    before = await until(live, "text_delta")
    run_id = before[0].run_id
    watch = b.watch(run_id)
    watched = await until(watch, "text_delta")
    stack.executors[0].kill()
    live_rest = await rest(live)
    assert_lost(live_rest[-1])
    live_events = before + live_rest
    assert [e.sequence for e in live_events] == list(range(1, len(live_events) + 1))
    watched += await rest(watch)
    assert watched[-1] == live_events[-1]
    assert [e.sequence for e in watched] == list(range(1, len(watched) + 1))
    run = await b.get_run(run_id)
    assert run.status == run_pb2.RUN_STATUS_FAILED
    assert run.error.code == run_pb2.RUN_ERROR_CODE_EXECUTOR_LOST


async def test_a_run_waiting_for_approval_is_lost_with_its_executor(
    pair: tuple[Stack, Client, Client],
) -> None:
    stack, a, b = pair
    agent = await a.create_agent(
        scripted_agent(
            turns=[("", [("send_email", '{"to": "a@example.com", "subject": "s", "body": "b"}')])]
        )
    )
    live = a.stream(agent.id, "email")
    before = await until(live, "tool_approval_required")
    stack.executors[0].kill()
    after = await rest(live)
    assert_lost(after[-1])
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await b.approve(before[0].run_id, before[-1].tool_approval_required.tool_call.id)
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_later_watcher_learns_that_a_background_run_was_lost(
    pair: tuple[Stack, Client, Client],
) -> None:
    stack, a, b = pair
    agent = await a.create_agent(scripted_agent(turns=SLOW_TURNS, token_delay_ms=10))
    started = await a.runs.StartRun(run_service_pb2.StartRunRequest(agent_id=agent.id, input="go"))
    run_id = started.run.id
    first_watch = b.watch(run_id)
    await until(first_watch, "text_delta")
    first_watch.cancel()
    stack.executors[0].kill()
    events = await b.watch_all(run_id)
    assert kinds(events)[0] == "run_started"
    assert_lost(events[-1])
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
