"""The executors' agent cache: change notices over a real NATS keep every executor current."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agentrun.v1 import agent_service_pb2
from cli.launcher import Service
from common.nats_link import NatsLink, NatsNames
from eventstore.agent_config import AgentConfig, ModelSettings
from executor.agent_cache import AgentCache
from tests.client import Client, scripted_agent
from tests.stack import Stack

NOTICE_GUARD = 10.0  # seconds, far below the cache's 30 s expiry: a bound, never a pace
CONFIG = AgentConfig(agent_id="helper", version=1, model=ModelSettings(provider="scripted"))


@pytest.fixture
async def links(nats_server: Service) -> AsyncIterator[tuple[NatsLink, NatsLink]]:
    names = NatsNames(f"c{uuid.uuid4().hex[:10]}")
    pair = tuple(
        NatsLink([f"nats://{nats_server.address}"], name=n, event_retention=60, names=names)
        for n in ("one", "two")
    )
    yield pair  # type: ignore[misc]
    for link in pair:
        await link.close()


async def connected_cache(link: NatsLink) -> AgentCache:
    cache = AgentCache(link)
    await cache.start()
    await link.start()
    await link.flush()  # the notice subscription is in place
    return cache


async def test_a_read_that_a_notice_overtook_is_not_kept(links: tuple[NatsLink, NatsLink]) -> None:
    cache = await connected_cache(links[0])
    token = cache.token()
    await cache.announce_change("t", "helper")  # the agent changed while it was being read
    cache.put("t", CONFIG, token)
    assert cache.get("t", "helper") is None
    cache.put("t", CONFIG, cache.token())
    assert cache.get("t", "helper") == CONFIG


async def test_without_nats_nothing_is_cached(nats_server: Service) -> None:
    link = NatsLink(["nats://127.0.0.1:1"], name="nowhere", event_retention=60)
    cache = AgentCache(link)
    cache.put("t", CONFIG, cache.token())
    assert cache.get("t", "helper") is None


async def test_a_run_on_another_executor_uses_the_agent_as_updated(
    nats_server: Service, tmp_path: Path
) -> None:
    stack = Stack(database_url=f"sqlite:///{tmp_path / 'data'}", nats=nats_server, tmp=tmp_path)
    try:
        first, second = stack.start_executor(), stack.start_executor()
        via_first = stack.start_gateway(first.address)
        via_second = stack.start_gateway(second.address)
        async with (
            grpc.aio.insecure_channel(via_first.address) as a,
            grpc.aio.insecure_channel(via_second.address) as b,
        ):
            updater, runner = Client(a), Client(b)
            agent = await updater.create_agent(scripted_agent(turns=[("version one", [])]))
            assert (await runner.run(agent.id, "hi"))[-1].run_completed.output == "version one"
            changed = scripted_agent(turns=[("version two", [])], agent_id=agent.id)
            await updater.agents.UpdateAgent(agent_service_pb2.UpdateAgentRequest(agent=changed))
            # The notice crosses NATS to the other executor in about a millisecond, which a
            # loaded machine stretches: runs may start on the old version until it lands, but
            # well before the cache's entries expire (30 s).
            give_up = time.monotonic() + NOTICE_GUARD
            events = await runner.run(agent.id, "hi")
            while events[0].run_started.run.agent_version == 1:
                assert time.monotonic() < give_up, "the change notice never arrived"
                events = await runner.run(agent.id, "hi")
            after = await runner.run(agent.id, "hi")
        assert events[0].run_started.run.agent_version == 2
        assert events[-1].run_completed.output == "version two"
        assert after[0].run_started.run.agent_version == 2
    finally:
        stack.stop()
