"""The streams that grow are bounded: the run-events stream by bytes and per message, the
dead-letter stream by age and bytes, each discarding its oldest messages at its limit. The
limits are applied to streams that exist already, and events larger than the per-message limit
go out in parts that fit it."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import nats.js.errors
import pytest
from nats.js.api import DiscardPolicy

from cli.launcher import Service
from common.nats_link import NatsLink, NatsNames, StreamLimits
from common.settings import Settings
from tests.client import Client, scripted_agent, text_of
from tests.stack import Stack, published_events

MIB = 1024**2
DAY = 24 * 3600.0


def test_the_stream_limits_and_their_safe_defaults() -> None:
    defaults = Settings.from_env({}).stream_limits
    assert defaults == StreamLimits(
        events_max_bytes=1024 * MIB,
        events_max_message_bytes=MIB,
        deadletter_max_age=30 * DAY,
        deadletter_max_bytes=64 * MIB,
    )
    changed = Settings.from_env(
        {
            "AGENTRUN_EVENT_STREAM_MAX_BYTES": "0",
            "AGENTRUN_EVENT_MAX_MESSAGE_BYTES": "65536",
            "AGENTRUN_DEADLETTER_MAX_AGE": "3600",
            "AGENTRUN_DEADLETTER_MAX_BYTES": "1024",
        }
    ).stream_limits
    assert changed == StreamLimits(0, 65536, 3600.0, 1024)
    with pytest.raises(ValueError, match="at least 65536"):
        Settings.from_env({"AGENTRUN_EVENT_MAX_MESSAGE_BYTES": "1000"})


async def test_the_streams_get_the_limits_and_existing_streams_are_updated(
    nats_server: Service,
) -> None:
    names = NatsNames(f"t{uuid.uuid4().hex[:12]}")
    urls = [f"nats://{nats_server.address}"]

    async def open_link(limits: StreamLimits) -> NatsLink:
        link = NatsLink(urls, name="limits-test", event_retention=DAY, names=names, limits=limits)
        await link.start(wait=30)
        assert link.is_connected
        return link

    # Streams as an earlier version made them: no limits.
    first = await open_link(StreamLimits(0, 0, 0.0, 0))
    try:
        events = (await first.js.stream_info(names.events_stream)).config
        assert (events.max_bytes, events.max_msg_size) == (-1, -1)
        await first.js.publish(names.events_subject("r1"), b"kept")
    finally:
        await first.close()

    limits = StreamLimits(
        events_max_bytes=8 * MIB,
        events_max_message_bytes=256 * 1024,
        deadletter_max_age=DAY,
        deadletter_max_bytes=MIB,
    )
    second = await open_link(limits)
    try:
        events_info = await second.js.stream_info(names.events_stream)
        events = events_info.config
        assert (events.max_bytes, events.max_msg_size) == (8 * MIB, 256 * 1024)
        assert events.discard == DiscardPolicy.OLD
        assert events_info.state.messages == 1  # updated in place, messages kept
        dead = (await second.js.stream_info(names.deadletter_stream)).config
        assert (dead.max_age, dead.max_bytes) == (DAY, MIB)
        assert dead.discard == DiscardPolicy.OLD
        # The server holds the streams to them: a message over the limit is refused ...
        with pytest.raises(nats.js.errors.BadRequestError, match="message size exceeds"):
            await second.js.publish(names.events_subject("r2"), b"x" * (300 * 1024))
        # ... and the oldest messages make way for new ones.
        for i in range(12):
            await second.js.publish(names.events_subject(f"big{i}"), b"y" * (200 * 1024))
        for i in range(40):
            await second.js.publish(names.events_subject(f"more{i}"), b"z" * (200 * 1024))
        state = (await second.js.stream_info(names.events_stream)).state
        assert state.bytes <= 8 * MIB
        assert state.first_seq > 1
    finally:
        for stream in (names.events_stream, names.dispatch_stream, names.deadletter_stream):
            await second.js.delete_stream(stream)
        await second.close()


@pytest.mark.timeout(120)
async def test_events_larger_than_the_message_limit_go_out_in_parts_that_fit(
    empty_stack: Stack,
) -> None:
    """An executor with a small per-message limit publishes a long answer whole: the live
    client and the published stream agree."""
    empty_stack.start_executor(AGENTRUN_EVENT_MAX_MESSAGE_BYTES=str(64 * 1024))
    empty_stack.start_gateway()
    channel = grpc.aio.insecure_channel(empty_stack.gateways[0].address)
    client = Client(channel)
    answer = "".join(f"word{i} " for i in range(40_000))  # about 300 KB in one event
    agent = await client.create_agent(scripted_agent(turns=[(answer, [])]))
    live = await client.run(agent.id, "hi")
    assert text_of(live) == answer
    assert await published_events(empty_stack, live[0].run_id, wait_for_end=10) == live
    await channel.close(grace=None)


@pytest.mark.timeout(120)
async def test_a_run_whose_events_were_discarded_is_out_of_range_and_still_listed(
    empty_stack: Stack,
) -> None:
    """At its size limit the events stream discards its oldest runs' events: WatchRun of such a
    run answers OUT_OF_RANGE (instead of waiting for events that will never come), while GetRun
    still tells how it ended."""
    empty_stack.start_executor(AGENTRUN_EVENT_STREAM_MAX_BYTES=str(MIB))
    empty_stack.start_gateway()
    channel = grpc.aio.insecure_channel(empty_stack.gateways[0].address)
    client = Client(channel)
    answer = "".join(f"word{i} " for i in range(40_000))  # about 300 KB
    agent = await client.create_agent(scripted_agent(turns=[(answer, [])]))
    oldest = (await client.run(agent.id, "first"))[0].run_id
    for i in range(4):  # 1.2 MB more: the first run's events make way
        await client.run(agent.id, f"then {i}")
    assert await published_events(empty_stack, oldest) == []
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        async with asyncio.timeout(30):  # it used to wait for ever
            await client.watch_all(oldest)
    assert gone.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "no longer retained" in (gone.value.details() or "")
    assert (await client.get_run(oldest)).output == answer
    # Their histories are gone on purpose: the stack's check of them at its end is skipped.
    empty_stack.verified_until = time.time()
    await channel.close(grace=None)
