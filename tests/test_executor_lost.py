"""An executor killed with SIGKILL: its classic runs fail with EXECUTOR_LOST, promptly, for the
client streaming the run, for watchers on other gateways, and in the run list.

Each test builds its own stack: gateway A -> executors 1 (the victim) and 2, gateway B ->
executor 2, sharing the store and NATS. A run is started on A until the victim holds it; when
the victim dies, A carries its client's stream on to executor 2, which settles the run.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from agentrun.v1 import run_pb2, run_service_pb2
from cli.launcher import Service
from tests.client import Client, assert_history_agrees, kinds, rest, scripted_agent, until
from tests.conftest import database_url_for, drop_schema
from tests.stack import Stack, holder_of, published_events

T = TypeVar("T")

VICTIM = "victim"
GUARD = 60.0  # seconds: a bound on waiting for what must happen, never a pace
# A lost run's stream is ended after 6 s of quiet (not 15).
PINGS = {"AGENTRUN_INTERNAL_PING_INTERVAL": "2"}
SLOW_TURNS: list[tuple[str, list[tuple[str, str]]]] = [(" ".join(["token"] * 5000), [])]


@pytest.fixture(params=["sqlite", "postgres"])
async def pair(
    request: pytest.FixtureRequest, nats_server: Service, tmp_path: Path
) -> AsyncIterator[tuple[Stack, Client, Client]]:
    url = database_url_for(request.param, tmp_path / "data")
    stack = Stack(database_url=url, nats=nats_server, tmp=tmp_path)
    try:
        victim = stack.start_executor(AGENTRUN_EXECUTOR_ID=VICTIM, **PINGS)
        survivor = stack.start_executor(AGENTRUN_EXECUTOR_ID="survivor", **PINGS)
        stack.start_gateway(f"{victim.address},{survivor.address}", **PINGS)
        stack.start_gateway(survivor.address, **PINGS)
        channels = [grpc.aio.insecure_channel(g.address) for g in stack.gateways]
        yield stack, Client(channels[0]), Client(channels[1])
        for channel in channels:
            await channel.close(grace=None)
    finally:
        stack.stop()
        drop_schema(url)


async def on_the_victim(
    stack: Stack, start: Callable[[], Awaitable[T]], run_id_of: Callable[[T], Awaitable[str]]
) -> T:
    """Starts runs until one is held by the victim (the gateway spreads them over the
    executors it is connected to: until its connection to the victim is ready, over the
    survivor alone; on a loaded machine that can take more than a few starts)."""
    give_up = time.monotonic() + GUARD
    while time.monotonic() < give_up:
        started = await start()
        if await holder_of(stack, await run_id_of(started)) == VICTIM:
            return started
    raise AssertionError(f"no run landed on the victim in {GUARD:g} s")


def assert_lost(event: run_pb2.RunEvent) -> None:
    assert event.HasField("run_failed"), kinds([event])
    assert event.run_failed.error.code == run_pb2.RUN_ERROR_CODE_EXECUTOR_LOST
    assert event.run_failed.error.retryable


async def test_the_client_and_a_watcher_learn_at_once_that_the_run_is_lost(
    pair: tuple[Stack, Client, Client],
) -> None:
    stack, a, b = pair
    agent = await a.create_agent(scripted_agent(turns=SLOW_TURNS, token_delay_ms=10))
    live, before = await on_the_victim(stack, lambda: streaming(a, agent.id), run_of_stream)
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
    live, before = await on_the_victim(
        stack, lambda: streaming(a, agent.id, "tool_approval_required"), run_of_stream
    )
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

    async def start() -> str:
        started = await a.runs.StartRun(
            run_service_pb2.StartRunRequest(agent_id=agent.id, input="go")
        )
        return str(started.run.id)

    run_id = await on_the_victim(stack, start, _same)
    first_watch = b.watch(run_id)
    await until(first_watch, "text_delta")
    first_watch.cancel()
    stack.executors[0].kill()
    events = await b.watch_all(run_id)
    assert kinds(events)[0] == "run_started"
    assert_lost(events[-1])
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))


async def streaming(
    client: Client, agent_id: str, until_kind: str = "text_delta"
) -> tuple[Any, list[run_pb2.RunEvent]]:
    live = client.stream(agent_id, "talk")
    return live, await until(live, until_kind)


async def run_of_stream(started: tuple[Any, list[run_pb2.RunEvent]]) -> str:
    return started[1][0].run_id


async def _same(run_id: str) -> str:
    return run_id


async def test_executor_lost_is_appended_once_however_many_see_the_loss(
    pair: tuple[Stack, Client, Client],
) -> None:
    """Five watchers (each asking the survivor to settle the run) and the survivor's reconciler
    all find the run's executor gone: the run's stream gets one EXECUTOR_LOST."""
    stack, a, b = pair
    agent = await a.create_agent(scripted_agent(turns=SLOW_TURNS, token_delay_ms=10))
    started = await on_the_victim(stack, lambda: streaming(a, agent.id), run_of_stream)
    run_id = await run_of_stream(started)
    watches = [b.watch(run_id) for _ in range(5)]
    seen = [await until(watch, "text_delta") for watch in watches]
    stack.executors[0].kill()
    watched = [s + await rest(w) for s, w in zip(seen, watches, strict=True)]
    history = await assert_history_agrees(b, run_id)
    assert_lost(history[-1])
    assert all(w == watched[0] for w in watched)
    assert watched[0][-1] == history[-1]
    published = await published_events(stack, run_id)
    assert [e.sequence for e in published] == list(range(1, len(published) + 1))
    assert [k for k in kinds(published) if k == "run_failed"] == ["run_failed"]
