"""Publishing a run's events to JetStream, on a real nats-server: RunPublisher (ordered,
coalescing, fenced), reading the stream's state back, appending EXECUTOR_LOST, and asking
whether a process holds a run. Every test has a NATS namespace of its own."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import pytest
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

from agentrun.internal.v1 import run_events_pb2
from agentrun.v1 import run_pb2
from cli.launcher import Service
from common.event_streams import (
    MAX_MESSAGE_BYTES,
    WRONG_LAST_SEQUENCE,
    Published,
    Reassembly,
    append_end,
    decode,
    encode,
    message_budget,
    published,
)
from common.nats_link import NatsLink, NatsNames
from eventstore.messages import ToolCall
from executor.event_publisher import RunPublisher
from executor.run_stream import Marks, RunStream

TENANT = "acme"
WAIT = 10.0  # the longest any single step may take before the test fails (never expected)
RETENTION = 3600.0


def new_names(prefix: str = "p") -> NatsNames:
    return NatsNames(f"{prefix}{uuid.uuid4().hex[:10]}")


def new_link(
    nats_server: Service, names: NatsNames, name: str = "test", settle_after: float = 0.0
) -> NatsLink:
    return NatsLink(
        [f"nats://{nats_server.address}"],
        name=name,
        event_retention=RETENTION,
        names=names,
        settle_after=settle_after,
    )


async def started(link: NatsLink) -> NatsLink:
    await link.start()
    await link.wait_connected()
    return link


async def remove(link: NatsLink) -> None:
    """Deletes the link's streams (each test's namespace is its own), then closes it."""
    if link.is_connected:
        for stream in (link.names.events_stream, link.names.dispatch_stream):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await link.js.delete_stream(stream)
    await link.close()


@pytest.fixture
async def streamless(nats_server: Service) -> AsyncIterator[NatsLink]:
    """A link to a namespace whose streams do not exist (until a test ensures them). Not made
    by deleting streams: nats-server can fail to create a stream it has just deleted ("error
    creating store for stream") while it still removes the old one's store."""
    bare = NatsLink(
        [f"nats://{nats_server.address}"],
        name="streamless",
        event_retention=RETENTION,
        names=new_names(),
        manage_streams=False,
    )
    opened = await started(bare)
    yield opened
    for close in reversed(_opened.pop(opened, [])):
        await close()
    await remove(opened)


# What each test's link opened (publishers, readers), closed after the test even if it fails.
_opened: dict[NatsLink, list[Callable[[], Awaitable[object]]]] = {}


@pytest.fixture
async def link(nats_server: Service) -> AsyncIterator[NatsLink]:
    opened = await started(new_link(nats_server, new_names()))
    yield opened
    for close in reversed(_opened.pop(opened, [])):
        await close()
    await remove(opened)


@dataclass(frozen=True)
class Stored:
    """One message of a run's stream."""

    seq: int
    headers: dict[str, str]
    data: bytes

    @property
    def events(self) -> list[run_pb2.RunEvent]:
        """A whole message's events (none for a part of one)."""
        return [] if "Agentrun-Part" in self.headers else decode(self.data)

    @property
    def sequences(self) -> list[int]:
        return [e.sequence for e in self.events]


async def stored(link: NatsLink, run_id: str) -> list[Stored]:
    """Every message of the run's subject, in stream order."""
    names = link.names
    subject = names.events_subject(run_id)
    found: list[Stored] = []
    seq = 1
    while True:
        try:
            msg = await link.js.get_msg(names.events_stream, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return found
        assert msg.seq is not None
        found.append(Stored(msg.seq, dict(msg.headers or {}), msg.data or b""))
        seq = msg.seq + 1


async def history(link: NatsLink, run_id: str) -> list[run_pb2.RunEvent]:
    """The run's events as a reader of its whole stream gets them (parts put back together)."""
    reassembly = Reassembly()
    return [e for m in await stored(link, run_id) for e in reassembly.add(m.data, m.headers)]


class Reader:
    """Reads a run's messages as they are stored (an ordered consumer)."""

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub
        self._reassembly = Reassembly()

    @staticmethod
    async def open(link: NatsLink, run_id: str) -> Reader:
        sub = await link.js.subscribe(
            link.names.events_subject(run_id),
            stream=link.names.events_stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        reader = Reader(sub)
        _opened.setdefault(link, []).append(reader.close)
        return reader

    async def next(self) -> Stored:
        msg = await self._sub.next_msg(timeout=WAIT)
        return Stored(msg.metadata.sequence.stream, dict(msg.headers or {}), msg.data)

    async def next_events(self) -> list[run_pb2.RunEvent]:
        """The events of the next messages, once there are any (as Relay.watch reads them)."""
        while True:
            message = await self.next()
            if events := self._reassembly.add(message.data, message.headers):
                return events

    async def close(self) -> None:
        with contextlib.suppress(nats.errors.BadSubscriptionError):
            await self._sub.unsubscribe()


def tool_result(run_id: str, sequence: int, output: str = "ok") -> run_pb2.RunEvent:
    event = run_pb2.RunEvent(
        run_id=run_id,
        sequence=sequence,
        tool_result=run_pb2.ToolResult(
            step_index=2, tool_call_id=f"c{sequence}", tool_name="clock", output=output
        ),
    )
    event.time.GetCurrentTime()
    return event


def events(run_id: str, first: int, last: int) -> list[run_pb2.RunEvent]:
    return [tool_result(run_id, s) for s in range(first, last + 1)]


def completed(run_id: str, sequence: int) -> run_pb2.RunEvent:
    return run_pb2.RunEvent(
        run_id=run_id, sequence=sequence, run_completed=run_pb2.RunCompleted(output="done")
    )


class Fenced:
    """An on_fenced callback that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.called = asyncio.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.called.set()

    async def wait(self) -> None:
        await asyncio.wait_for(self.called.wait(), WAIT)


def publisher(
    link: NatsLink,
    run_id: str,
    *,
    after: int = 0,
    marks: Marks | None = None,
    on_fenced: Callable[[], None] | None = None,
    identity: str | None = None,
) -> RunPublisher:
    created = RunPublisher(
        link,
        run_id,
        TENANT,
        last_stream_sequence=after,
        published_marks=marks,
        on_fenced=on_fenced,
        identity=identity,
    )

    async def close() -> None:
        # A publisher whose close timed out has its task cancelled: closing it again re-raises.
        with contextlib.suppress(asyncio.CancelledError):
            await created.close(0.1)

    _opened.setdefault(link, []).append(close)
    return created


async def publish_all(
    link: NatsLink, run_id: str, batch: list[run_pb2.RunEvent], identity: str | None = None
) -> Stored:
    """Publishes ``batch`` with a publisher of its own; the message it stored."""
    state = await published(link, run_id)
    own = publisher(link, run_id, after=state.stream_sequence, identity=identity)
    own.enqueue(batch, Marks(version=len(batch)))
    assert await own.close(WAIT)
    return (await stored(link, run_id))[-1]


def huge_result(run_id: str, sequence: int, letter: str = "x") -> run_pb2.RunEvent:
    """An event larger than the server takes in one message (1 MiB by default)."""
    return tool_result(run_id, sequence, letter * 1_500_000)


async def publish_parts(
    link: NatsLink, run_id: str, event: run_pb2.RunEvent, stop_after: int, identity: str = "dead"
) -> list[int]:
    """Publishes the first ``stop_after`` parts of ``event`` after the run's last message, as a
    publisher that then died would have (its headers, each part fenced on the one before); the
    parts' stream sequences. Looks again if the stream moved before the first part."""
    while True:
        state = await published(link, run_id)
        payload, budget = encode([event]), message_budget(link)
        chunks = [payload[i : i + budget] for i in range(0, len(payload), budget)]
        assert 0 < stop_after < len(chunks)
        stored_at: list[int] = []
        try:
            for index, chunk in enumerate(chunks[:stop_after]):
                number = f"{index + 1}/{len(chunks)}"
                headers = {
                    "Nats-Msg-Id": f"{run_id}:{event.sequence}:{identity}:{number}",
                    "Agentrun-Tenant": TENANT,
                    "Agentrun-Part": number,
                    "Agentrun-Version": str(state.version),
                    "Agentrun-Step": f"{state.step}/{state.attempt}",
                    "Agentrun-Last-Sequence": str(state.last_sequence),
                    "Nats-Expected-Last-Subject-Sequence": str(
                        stored_at[-1] if stored_at else state.stream_sequence
                    ),
                }
                if stored_at:
                    headers["Agentrun-First-Part"] = str(stored_at[0])
                subject = link.names.events_subject(run_id)
                stored_at.append((await link.js.publish(subject, chunk, headers=headers)).seq)
        except nats.js.errors.APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE or stored_at:
                raise
            continue
        return stored_at


# -- RunPublisher -------------------------------------------------------------------------------


async def test_batches_are_published_in_order_with_their_ids_and_marks(link: NatsLink) -> None:
    run_id = str(uuid.uuid4())
    reader = await Reader.open(link, run_id)
    fenced = Fenced()
    pub = publisher(link, run_id, on_fenced=fenced)

    batch = events(run_id, 1, 6)
    pub.enqueue(batch[:2], Marks(version=2, step=1, attempt=1))
    first = await reader.next()
    assert first.events == batch[:2]
    assert first.sequences == [1, 2]
    assert first.headers["Nats-Msg-Id"].startswith(f"{run_id}:1:")
    assert first.headers["Agentrun-Tenant"] == TENANT
    assert first.headers["Agentrun-Version"] == "2"
    assert first.headers["Agentrun-Step"] == "1/1"

    # Batches enqueued together (before the publisher takes its next batch) share a message.
    pub.enqueue(batch[2:3], Marks(version=3, step=2, attempt=1))
    pub.enqueue(batch[3:5], Marks(version=3, step=2, attempt=2))
    second = await reader.next()
    assert second.events == batch[2:5]
    assert second.headers["Nats-Msg-Id"].startswith(f"{run_id}:3:")
    assert (second.headers["Agentrun-Version"], second.headers["Agentrun-Step"]) == ("3", "2/2")

    pub.enqueue([], Marks(version=9))  # nothing to publish: ignored
    pub.enqueue(batch[5:], Marks(version=1, step=1, attempt=1))  # marks never go back
    third = await reader.next()
    assert third.events == batch[5:]
    assert third.headers["Nats-Msg-Id"].startswith(f"{run_id}:6:")
    assert (third.headers["Agentrun-Version"], third.headers["Agentrun-Step"]) == ("3", "2/2")
    assert first.seq < second.seq < third.seq

    assert await pub.close(WAIT) is True
    assert not pub.fenced
    assert fenced.calls == 0
    assert await stored(link, run_id) == [first, second, third]
    assert await published(link, run_id) == Published(
        stream_sequence=third.seq, last=batch[-1], version=3, step=2, attempt=2, last_sequence=6
    )
    await reader.close()


async def test_a_tap_gets_the_stored_events_in_order_and_then_the_end(link: NatsLink) -> None:
    run_id = str(uuid.uuid4())
    pub = publisher(link, run_id)
    tap = pub.tap()
    batch = events(run_id, 1, 2)
    pub.enqueue(batch, Marks(version=2))
    assert await asyncio.wait_for(tap.next(), WAIT) == batch
    big = "x" * (MAX_MESSAGE_BYTES // 3)
    backlog = [tool_result(run_id, s, big) for s in range(3, 8)]
    pub.enqueue(backlog, Marks(version=7))
    assert await pub.close(WAIT) is True
    assert [m.sequences for m in await stored(link, run_id)] == [[1, 2], [3, 4], [5, 6], [7]]
    assert await asyncio.wait_for(tap.next(), WAIT) == backlog  # stored while it was not read
    assert await asyncio.wait_for(tap.next(), WAIT) is None
    assert await asyncio.wait_for(pub.tap().next(), WAIT) is None  # a stopped publisher's


async def test_a_fenced_publisher_ends_its_taps_without_what_it_could_not_store(
    link: NatsLink,
) -> None:
    run_id = str(uuid.uuid4())
    pub = publisher(link, run_id, on_fenced=Fenced())
    tap = pub.tap()
    foreign = run_events_pb2.PublishedRunEvents(events=events(run_id, 1, 1))
    await link.js.publish(
        link.names.events_subject(run_id),
        foreign.SerializeToString(),
        stream=link.names.events_stream,
        headers={"Nats-Msg-Id": f"{run_id}:1-elsewhere"},
    )
    pub.enqueue(events(run_id, 1, 2), Marks(version=2))
    assert await asyncio.wait_for(tap.next(), WAIT) is None
    assert pub.fenced


async def test_published_reads_back_the_state_of_a_runs_stream(link: NatsLink) -> None:
    run_id, other = str(uuid.uuid4()), str(uuid.uuid4())
    assert await published(link, run_id) == Published()
    await publish_all(link, other, events(other, 1, 3))
    assert await published(link, run_id) == Published()  # another run's stream
    batch = [*events(run_id, 1, 2), completed(run_id, 3)]
    message = await publish_all(link, run_id, batch)
    state = await published(link, run_id)
    assert state.stream_sequence == message.seq
    assert state.last is not None
    assert state.last.HasField("run_completed")
    assert state.last.sequence == 3
    assert (state.version, state.step, state.attempt) == (3, 0, 0)


async def test_events_taken_from_a_stream_arrive_once_in_order_however_they_coalesce(
    link: NatsLink,
) -> None:
    """The executor's wiring: the stream's drain, paced by the publisher, takes batches and
    enqueues them; events added while a publish is in flight share the next message."""
    run_id = str(uuid.uuid4())
    pub = publisher(link, run_id)
    stream = RunStream(run_id, on_taken=pub.enqueue, pace=pub.pace)
    groups = 12
    for group in range(groups):
        stream.step_started(group + 1, run_pb2.STEP_KIND_TOOL_CALLS, 1)
        for n in range(4):
            call: ToolCall = {"id": f"c{group}-{n}", "name": "clock", "arguments_json": "{}"}
            stream.tool_result(group + 1, call, f"output {group}-{n}", False)
        stream.mark_version(group + 2)
        await link.nc.flush()  # a round trip to the server: the drain and publisher go on
    stream.run_completed("done", {"input_tokens": 1, "output_tokens": 1})
    await stream.wait_ended()
    await stream.close()
    assert await pub.close(WAIT) is True

    messages = await stored(link, run_id)
    total = groups * 5 + 1
    assert [s for m in messages for s in m.sequences] == list(range(1, total + 1))
    assert 1 <= len(messages) <= groups + 1  # never more messages than the stream's batches
    for message in messages:
        assert message.headers["Nats-Msg-Id"].startswith(f"{run_id}:{message.sequences[0]}:")
    assert messages[-1].events[-1].run_completed.output == "done"
    state = await published(link, run_id)
    assert (state.version, state.step, state.attempt) == (groups + 1, groups, 1)


async def test_events_enqueued_before_the_next_take_go_in_one_message(link: NatsLink) -> None:
    run_id = str(uuid.uuid4())
    reader = await Reader.open(link, run_id)
    pub = publisher(link, run_id)
    pub.enqueue(events(run_id, 1, 1), Marks(version=1))
    assert (await reader.next()).sequences == [1]  # taken alone: stored
    # The publisher may still be waiting for that message's acknowledgement, or be idle:
    # either way what is enqueued now goes in one message.
    for sequence in range(2, 12):
        pub.enqueue(events(run_id, sequence, sequence), Marks(version=sequence))
    assert (await reader.next()).sequences == list(range(2, 12))
    assert await pub.close(WAIT)
    assert len(await stored(link, run_id)) == 2
    await reader.close()


async def test_a_large_backlog_is_split_into_bounded_messages_in_order(link: NatsLink) -> None:
    run_id = str(uuid.uuid4())
    pub = publisher(link, run_id)
    big = "x" * (MAX_MESSAGE_BYTES // 3)
    pub.enqueue([tool_result(run_id, s, big) for s in range(1, 6)], Marks(version=5))
    assert await pub.close(WAIT)
    messages = await stored(link, run_id)
    assert [m.sequences for m in messages] == [[1, 2], [3, 4], [5]]
    for message in messages:
        payload = run_events_pb2.PublishedRunEvents(events=message.events)
        assert payload.ByteSize() <= MAX_MESSAGE_BYTES + 64
        assert message.headers["Nats-Msg-Id"].startswith(f"{run_id}:{message.sequences[0]}:")


async def test_a_message_split_off_a_backlog_claims_only_the_marks_of_its_events(
    link: NatsLink,
) -> None:
    run_id = str(uuid.uuid4())
    pub = publisher(link, run_id)
    big = "x" * (MAX_MESSAGE_BYTES // 3)
    pub.enqueue([tool_result(run_id, s, big) for s in (1, 2)], Marks(version=2, step=1, attempt=1))
    pub.enqueue([tool_result(run_id, s, big) for s in (3, 4)], Marks(version=4, step=2, attempt=1))
    assert await pub.close(WAIT)
    first, second = await stored(link, run_id)
    assert (first.sequences, second.sequences) == ([1, 2], [3, 4])
    assert (second.headers["Agentrun-Version"], second.headers["Agentrun-Step"]) == ("4", "2/1")
    assert (first.headers["Agentrun-Version"], first.headers["Agentrun-Step"]) == ("2", "1/1")


async def test_an_append_by_another_process_fences_the_publisher(link: NatsLink) -> None:
    run_id = str(uuid.uuid4())
    reader = await Reader.open(link, run_id)
    fenced = Fenced()
    pub = publisher(link, run_id, on_fenced=fenced)
    pub.enqueue(events(run_id, 1, 2), Marks(version=2))
    mine = await reader.next()

    # Another executor took the run over and appended to its stream.
    foreign = run_events_pb2.PublishedRunEvents(events=events(run_id, 3, 3))
    ack = await link.js.publish(
        link.names.events_subject(run_id),
        foreign.SerializeToString(),
        stream=link.names.events_stream,
        headers={"Nats-Msg-Id": f"{run_id}:3-elsewhere"},
    )
    assert ack.stream == link.names.events_stream
    assert (await reader.next()).seq == ack.seq

    pub.enqueue(events(run_id, 3, 4), Marks(version=4))  # the publisher's next publish
    await fenced.wait()
    assert pub.fenced
    pub.enqueue(events(run_id, 5, 5), Marks(version=5))  # ignored once fenced
    assert await pub.close(WAIT) is False
    assert fenced.calls == 1
    messages = await stored(link, run_id)
    assert [m.seq for m in messages] == [mine.seq, ack.seq]
    assert [m.sequences for m in messages] == [[1, 2], [3]]
    await reader.close()


async def test_a_publisher_with_a_stale_view_of_the_stream_is_fenced_at_once(
    link: NatsLink,
) -> None:
    run_id = str(uuid.uuid4())
    await publish_all(link, run_id, events(run_id, 1, 3))
    fenced = Fenced()
    stale = publisher(link, run_id, after=0, on_fenced=fenced)
    stale.enqueue(events(run_id, 4, 4), Marks(version=4))
    await fenced.wait()
    assert await stale.close(WAIT) is False
    assert fenced.calls == 1
    assert [m.sequences for m in await stored(link, run_id)] == [[1, 2, 3]]


async def test_a_retried_publish_that_was_stored_after_all_is_not_taken_for_a_fence(
    link: NatsLink,
) -> None:
    """A publisher whose publish was stored but whose acknowledgement was lost retries the
    same message (same Nats-Msg-Id) expecting the old last sequence: it is refused, and the
    publisher recognizes its own message and goes on. (A second publisher, in the state the
    first would be in after the lost acknowledgement, stands in for the retrying one.)"""
    run_id = str(uuid.uuid4())
    batch = events(run_id, 1, 2)
    original = await publish_all(link, run_id, batch, identity="the-one")
    fenced = Fenced()
    retrying = publisher(link, run_id, after=0, on_fenced=fenced, identity="the-one")
    retrying.enqueue(batch, Marks(version=2))
    assert await retrying.close(WAIT) is True
    assert not retrying.fenced
    assert fenced.calls == 0
    assert await stored(link, run_id) == [original]


async def test_a_retry_of_a_stored_publish_does_not_lose_the_events_queued_since(
    link: NatsLink,
) -> None:
    run_id = str(uuid.uuid4())
    reader = await Reader.open(link, run_id)
    batch = events(run_id, 1, 2)
    await publish_all(link, run_id, batch, identity="the-one")  # stored; its ack "lost"
    # The publisher's state after that failure: it still expects the old last sequence and
    # retries the failed batch as it was; an event enqueued since goes in the next message.
    retrying = publisher(link, run_id, after=0, identity="the-one")
    retrying.enqueue(batch, Marks(version=2))
    await reader.next()
    retrying.enqueue(events(run_id, 3, 3), Marks(version=3))
    assert await retrying.close(WAIT) is True
    assert [s for m in await stored(link, run_id) for s in m.sequences] == [1, 2, 3]
    await reader.close()


async def test_closing_an_idle_publisher_reports_everything_published(link: NatsLink) -> None:
    pub = publisher(link, str(uuid.uuid4()))
    assert await pub.close(WAIT) is True
    assert not pub.fenced


async def test_when_the_backlog_is_full_the_oldest_events_are_dropped(link: NatsLink) -> None:
    run_id = str(uuid.uuid4())
    pub = RunPublisher(link, run_id, TENANT, max_queued=3)
    pub.enqueue(events(run_id, 1, 2), Marks(version=2))
    pub.enqueue(events(run_id, 3, 5), Marks(version=5))
    assert await pub.close(WAIT) is True
    messages = await stored(link, run_id)
    assert [m.sequences for m in messages] == [[3, 4, 5]]
    assert messages[0].headers["Nats-Msg-Id"].startswith(f"{run_id}:3:")


async def test_events_wait_while_the_stream_is_missing_and_go_once_it_is_back(
    streamless: NatsLink,
) -> None:
    run_id = str(uuid.uuid4())
    pub = publisher(streamless, run_id)
    batch = events(run_id, 1, 3)
    pub.enqueue(batch, Marks(version=3))
    await streamless.ensure_streams()
    assert await pub.close(WAIT) is True
    assert [m.events for m in await stored(streamless, run_id)] == [batch]


async def test_a_link_that_does_not_manage_streams_leaves_their_settings(
    link: NatsLink, nats_server: Service
) -> None:
    observer = NatsLink(
        [f"nats://{nats_server.address}"],
        name="observer",
        event_retention=60,
        names=link.names,
        manage_streams=False,
    )
    await started(observer)
    try:
        info = await observer.js.stream_info(link.names.events_stream)
        assert info.config.max_age == RETENTION
    finally:
        await observer.close()


async def test_close_reports_what_it_could_not_publish_in_time(streamless: NatsLink) -> None:
    run_id = str(uuid.uuid4())
    pub = publisher(streamless, run_id)
    pub.enqueue(events(run_id, 1, 3), Marks(version=3))
    assert await pub.close(0.5) is False
    assert not pub.fenced
    await streamless.ensure_streams()
    assert await stored(streamless, run_id) == []


async def test_a_publisher_that_gives_up_does_not_report_everything_published(
    streamless: NatsLink,
) -> None:
    run_id = str(uuid.uuid4())
    pub = RunPublisher(streamless, run_id, TENANT, give_up_after=0.0)
    pub.enqueue(events(run_id, 1, 3), Marks(version=3))
    assert await pub.close(WAIT) is False


async def test_an_event_too_large_for_a_message_does_not_stall_the_stream(
    link: NatsLink,
) -> None:
    run_id = str(uuid.uuid4())
    pub = publisher(link, run_id)
    stream = RunStream(run_id, on_taken=pub.enqueue, drain=False)
    stream.text(1, 2, "x" * 1_500_000)
    stream.take_now()
    stream.run_completed("done", {"input_tokens": 1, "output_tokens": 1})
    stream.take_now()
    await pub.close(WAIT)
    last = (await published(link, run_id)).last
    assert last is not None
    assert last.run_completed.output == "done"


async def test_an_event_larger_than_a_message_goes_out_in_parts_and_reads_back_whole(
    link: NatsLink,
) -> None:
    run_id = str(uuid.uuid4())
    reader = await Reader.open(link, run_id)
    pub = publisher(link, run_id, identity="big")
    small, huge = events(run_id, 1, 2), huge_result(run_id, 3)
    pub.enqueue(small, Marks(version=2, step=1, attempt=1))
    pub.enqueue([huge], Marks(version=3, step=2, attempt=1))
    assert await pub.close(WAIT)

    whole, *parts = await stored(link, run_id)
    assert whole.events == small
    assert [p.headers["Agentrun-Part"] for p in parts] == ["1/3", "2/3", "3/3"]
    assert [p.headers["Nats-Msg-Id"] for p in parts] == [
        f"{run_id}:3:big:{n}/3" for n in range(1, 4)
    ]
    assert all(len(p.data) <= MAX_MESSAGE_BYTES for p in parts)
    assert b"".join(p.data for p in parts) == encode([huge])
    for part in parts[:2]:  # the stream's marks and last event before the event
        assert (part.headers["Agentrun-Version"], part.headers["Agentrun-Step"]) == ("2", "1/1")
        assert part.headers["Agentrun-Last-Sequence"] == "2"
    assert (parts[2].headers["Agentrun-Version"], parts[2].headers["Agentrun-Step"]) == ("3", "2/1")
    assert "Agentrun-Last-Sequence" not in parts[2].headers
    assert "Agentrun-First-Part" not in parts[0].headers
    assert {p.headers["Agentrun-First-Part"] for p in parts[1:]} == {str(parts[0].seq)}

    assert await published(link, run_id) == Published(
        stream_sequence=parts[2].seq, last=huge, version=3, step=2, attempt=1, last_sequence=3
    )
    assert await history(link, run_id) == [*small, huge]
    assert await reader.next_events() == small
    assert await reader.next_events() == [huge]


@pytest.mark.parametrize("stop_after", [1, 2])
async def test_a_publisher_that_died_between_parts_is_followed_from_the_last_whole_event(
    link: NatsLink, stop_after: int
) -> None:
    run_id = str(uuid.uuid4())
    reader = await Reader.open(link, run_id)
    before = events(run_id, 1, 3)
    first = await publish_all(link, run_id, before)
    parts = await publish_parts(link, run_id, huge_result(run_id, 4, "x"), stop_after)
    # The stream's history ends at event 3; whoever appends next is fenced on the last part.
    state = await published(link, run_id)
    assert state == Published(
        stream_sequence=parts[-1], last=None, version=3, step=0, attempt=0, last_sequence=3
    )
    assert first.seq < state.stream_sequence

    # The run's next executor goes on from there (a step run again may say something else).
    again, done = huge_result(run_id, 4, "y"), completed(run_id, 5)
    successor = publisher(
        link,
        run_id,
        after=state.stream_sequence,
        marks=Marks(state.version, state.step, state.attempt),
    )
    successor.enqueue([again, done], Marks(version=5))
    assert await successor.close(WAIT) is True
    assert not successor.fenced

    assert await history(link, run_id) == [*before, again, done]
    assert [await reader.next_events() for _ in range(3)] == [before, [again], [done]]
    assert (await published(link, run_id)).last == done


async def test_a_retried_part_that_was_stored_after_all_is_not_published_twice(
    link: NatsLink,
) -> None:
    """The acknowledgement of an event's first part was lost: the publisher publishes it again
    as it was, recognizes it stored, and goes on with the next part."""
    run_id = str(uuid.uuid4())
    huge = huge_result(run_id, 1)
    await publish_parts(link, run_id, huge, 1, identity="the-one")
    fenced = Fenced()
    retrying = publisher(link, run_id, after=0, on_fenced=fenced, identity="the-one")
    retrying.enqueue([huge], Marks())
    assert await retrying.close(WAIT) is True
    assert fenced.calls == 0
    messages = await stored(link, run_id)
    assert [m.headers["Agentrun-Part"] for m in messages] == ["1/3", "2/3", "3/3"]
    assert await history(link, run_id) == [huge]


# -- append_end (of EXECUTOR_LOST) -----------------------------------------------------------


# -- append_end --------------------------------------------------------------------------------


async def append_executor_lost(
    link: NatsLink, run_id: str, tenant: str, relayed: Sequence[run_pb2.RunEvent] = ()
) -> run_pb2.RunEvent | None:
    error = run_pb2.RunError(code=run_pb2.RUN_ERROR_CODE_EXECUTOR_LOST, retryable=True)
    lost = run_pb2.RunEvent(run_failed=run_pb2.RunFailed(error=error))
    return await append_end(link, run_id, tenant, lost, relayed)


def assert_executor_lost(event: run_pb2.RunEvent | None, run_id: str, sequence: int) -> None:
    assert event is not None
    assert event.HasField("run_failed")
    assert event.run_failed.error.code == run_pb2.RUN_ERROR_CODE_EXECUTOR_LOST
    assert event.run_failed.error.retryable
    assert (event.run_id, event.sequence) == (run_id, sequence)
    assert event.time.seconds > 0


async def test_executor_lost_is_appended_after_the_last_event(link: NatsLink) -> None:
    run_id = str(uuid.uuid4())
    before = await publish_all(link, run_id, events(run_id, 1, 3))
    failure = await append_executor_lost(link, run_id, TENANT)
    assert_executor_lost(failure, run_id, 4)
    messages = await stored(link, run_id)
    assert messages[0] == before
    assert len(messages) == 2
    appended = messages[1]
    assert appended.events == [failure]
    assert appended.headers["Nats-Msg-Id"] == f"{run_id}:4:end"
    assert appended.headers["Agentrun-Tenant"] == TENANT
    state = await published(link, run_id)
    assert (state.stream_sequence, state.last) == (appended.seq, failure)


async def test_executor_lost_on_an_empty_stream_is_its_first_event(link: NatsLink) -> None:
    run_id = str(uuid.uuid4())
    failure = await append_executor_lost(link, run_id, TENANT)
    assert_executor_lost(failure, run_id, 1)
    assert [m.events for m in await stored(link, run_id)] == [[failure]]


async def test_relayed_events_the_stream_lacks_are_appended_before_the_failure(
    link: NatsLink,
) -> None:
    """The gateway relayed events 1 to 5 to its client; the dead executor published 1 to 3."""
    run_id = str(uuid.uuid4())
    await publish_all(link, run_id, events(run_id, 1, 3))
    relayed = events(run_id, 1, 5)
    failure = await append_executor_lost(link, run_id, TENANT, relayed)
    assert_executor_lost(failure, run_id, 6)
    messages = await stored(link, run_id)
    assert [m.sequences for m in messages] == [[1, 2, 3], [4, 5, 6]]
    assert messages[1].events == [*relayed[3:], failure]
    assert messages[1].headers["Nats-Msg-Id"] == f"{run_id}:4:end"

    # Relayed events the stream already has are not appended again.
    other = str(uuid.uuid4())
    await publish_all(link, other, events(other, 1, 3))
    failure = await append_executor_lost(link, other, TENANT, events(other, 1, 2))
    assert_executor_lost(failure, other, 4)
    assert [m.sequences for m in await stored(link, other)] == [[1, 2, 3], [4]]


async def test_a_stream_that_ended_gets_nothing_appended(link: NatsLink) -> None:
    run_id = str(uuid.uuid4())
    done = completed(run_id, 3)
    await publish_all(link, run_id, [*events(run_id, 1, 2), done])
    before = await stored(link, run_id)
    assert await append_executor_lost(link, run_id, TENANT, events(run_id, 1, 4)) == done
    assert await stored(link, run_id) == before

    failure = await append_executor_lost(link, str(uuid.uuid4()), TENANT)
    assert failure is not None
    assert await append_executor_lost(link, failure.run_id, TENANT) == failure
    assert len(await stored(link, failure.run_id)) == 1


async def test_executor_lost_after_an_event_cut_short_follows_the_last_whole_event(
    link: NatsLink,
) -> None:
    """A classic run's executor died between the parts of event 4, which the gateway had
    relayed to its client: the stream gets event 4 whole, then the failure."""
    run_id = str(uuid.uuid4())
    before, huge = events(run_id, 1, 3), huge_result(run_id, 4)
    await publish_all(link, run_id, before)
    await publish_parts(link, run_id, huge, 2)
    failure = await append_executor_lost(link, run_id, TENANT, [*before, huge])
    assert_executor_lost(failure, run_id, 5)
    assert await history(link, run_id) == [*before, huge, failure]
    assert (await published(link, run_id)).last == failure

    # Without the relayed events, the failure follows the last whole event.
    other = str(uuid.uuid4())
    await publish_all(link, other, events(other, 1, 3))
    await publish_parts(link, other, huge_result(other, 4), 1)
    failure = await append_executor_lost(link, other, TENANT)
    assert_executor_lost(failure, other, 4)
    assert [e.sequence for e in await history(link, other)] == [1, 2, 3, 4]


FENCE_BY_MESSAGE_ID = (
    "BUG: RunPublisher tells a retry of its own stored publish from a fence by the last "
    "message's Nats-Msg-Id alone, and ids are '<run>:<first sequence>': whoever appends next "
    "to the run's stream (append_executor_lost, or the executor that took the run over) uses "
    "the very id the publisher's next message has, so the publisher takes that message for "
    "its own, is not fenced, drops its events and goes on publishing after it"
)


async def test_executor_lost_fences_the_runs_publisher(link: NatsLink) -> None:
    run_id = str(uuid.uuid4())
    reader = await Reader.open(link, run_id)
    fenced = Fenced()
    pub = publisher(link, run_id, on_fenced=fenced)
    pub.enqueue(events(run_id, 1, 2), Marks(version=2))
    await reader.next()
    failure = await append_executor_lost(link, run_id, TENANT)
    assert_executor_lost(failure, run_id, 3)
    pub.enqueue(events(run_id, 3, 4), Marks(version=4))  # the executor was not dead after all
    assert await pub.close(WAIT) is False
    assert pub.fenced
    assert fenced.calls == 1
    assert (await published(link, run_id)).last == failure
    assert [m.sequences for m in await stored(link, run_id)] == [[1, 2], [3]]
    await reader.close()


async def test_the_executor_that_took_a_run_over_fences_the_previous_one(link: NatsLink) -> None:
    run_id = str(uuid.uuid4())
    reader = await Reader.open(link, run_id)
    fenced = Fenced()
    previous = publisher(link, run_id, on_fenced=fenced)
    previous.enqueue(events(run_id, 1, 2), Marks(version=2))
    first = await reader.next()
    # The run's new executor reads the stream's state and goes on from its last event.
    state = await published(link, run_id)
    assert state.stream_sequence == first.seq
    taker = publisher(link, run_id, after=state.stream_sequence)
    taken_over = run_pb2.RunEvent(
        run_id=run_id,
        sequence=3,
        step_started=run_pb2.StepStarted(
            step_index=2, kind=run_pb2.STEP_KIND_TOOL_CALLS, attempt=2
        ),
    )
    taker.enqueue([taken_over], Marks(version=3, step=2, attempt=2))
    assert (await reader.next()).events == [taken_over]

    previous.enqueue(events(run_id, 3, 4), Marks(version=3))  # the stale executor goes on
    assert await previous.close(WAIT) is False
    assert fenced.calls == 1
    assert await taker.close(WAIT) is True
    assert [m.events[0] for m in await stored(link, run_id)][1:] == [taken_over]
    await reader.close()


async def test_executor_lost_cannot_be_told_without_nats() -> None:
    nowhere = NatsLink(["nats://127.0.0.1:1"], name="nowhere", event_retention=60)
    assert await append_executor_lost(nowhere, str(uuid.uuid4()), TENANT) is None


# -- holders and names --------------------------------------------------------------------------


async def test_holder_answers_tells_whether_a_process_answers_for_the_run(
    link: NatsLink, nats_server: Service
) -> None:
    run_id = str(uuid.uuid4())
    assert await link.holder_answers(run_id, wait=WAIT) is False

    holder = await started(new_link(nats_server, link.names, name="holder"))
    requests: list[bytes] = []

    async def answer(msg: Msg) -> None:
        requests.append(msg.data)
        await msg.respond(b'{"ok": true}')

    try:
        await holder.subscribe_control(run_id, answer)
        await holder.flush()
        assert await link.holder_answers(run_id, wait=WAIT) is True
        assert requests == [b'{"op": "ping"}']
        assert await link.holder_answers(str(uuid.uuid4()), wait=WAIT) is False  # another run

        await holder.unsubscribe_control(run_id)
        await holder.flush()
        assert await link.holder_answers(run_id, wait=WAIT) is False
    finally:
        await holder.close()


async def test_a_flush_comes_back_after_the_server_has_what_was_sent_before_it(
    link: NatsLink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush's PING goes out after the subscriptions made and removed before it, so its PONG
    means the server has them. (nats-py's own flush writes its PING straight to the socket,
    ahead of the SUB and UNSUB still in its pending buffer: a holder's ping right after could
    still reach the removed subscription, and go unanswered, or miss the new one.)"""
    written: list[bytes] = []
    transport = link.nc._transport
    assert transport is not None
    write, writelines = transport.write, transport.writelines

    def record(data: bytes) -> None:
        written.append(bytes(data))
        write(data)

    def record_lines(lines: list[bytes]) -> None:
        written.extend(bytes(line) for line in lines)
        writelines(lines)

    monkeypatch.setattr(transport, "write", record)
    monkeypatch.setattr(transport, "writelines", record_lines)

    async def answer(msg: Msg) -> None:
        await msg.respond(b"{}")

    run_id = str(uuid.uuid4())
    await link.subscribe_control(run_id, answer)
    await link.unsubscribe_control(run_id)
    await link.flush()
    sent = [line.split(b" ")[0].strip() for line in written]
    assert sent == [b"SUB", b"UNSUB", b"PING"], written


async def test_holder_answers_cannot_tell_when_nobody_answers_in_time_or_nats_is_down(
    link: NatsLink,
) -> None:
    run_id = str(uuid.uuid4())

    async def silent(msg: Msg) -> None:
        return None

    await link.subscribe_control(run_id, silent)
    await link.flush()
    assert await link.holder_answers(run_id, wait=0.2) is None
    await link.unsubscribe_control(run_id)

    nowhere = NatsLink(["nats://127.0.0.1:1"], name="nowhere", event_retention=60)
    assert await nowhere.holder_answers(run_id) is None


async def test_silence_heard_right_after_connecting_means_nothing(
    link: NatsLink, nats_server: Service
) -> None:
    """After a NATS outage every process reconnects within about a second: until then a live
    holder's silence must not be taken for its death."""
    fresh = await started(new_link(nats_server, link.names, name="fresh", settle_after=3600))
    try:
        assert not fresh.settled
        assert await fresh.holder_answers(str(uuid.uuid4())) is None
        assert await link.holder_answers(str(uuid.uuid4())) is False
    finally:
        await fresh.close()


async def test_a_runs_holder_in_another_namespace_does_not_answer(
    link: NatsLink, nats_server: Service
) -> None:
    run_id = str(uuid.uuid4())
    elsewhere = await started(new_link(nats_server, new_names("q"), name="elsewhere"))

    async def answer(msg: Msg) -> None:
        await msg.respond(b"{}")

    try:
        await elsewhere.subscribe_control(run_id, answer)
        await elsewhere.flush()
        assert await elsewhere.holder_answers(run_id) is True
        assert await link.holder_answers(run_id) is False
    finally:
        await remove(elsewhere)


def test_names_are_distinct_per_namespace() -> None:
    default = NatsNames()
    assert default.namespace == "agentrun"
    assert default.events_stream == "AGENTRUN_RUN_EVENTS"
    assert default.events_subject("r1") == "agentrun.events.r1"
    assert default.control_subject("r1") == "agentrun.control.r1"
    assert default.dispatch_stream == "AGENTRUN_DISPATCH"
    assert default.dispatch_subject == "agentrun.dispatch"
    assert default.agent_changes_subject == "agentrun.agents.changed"

    staging = NatsNames("staging_2")
    assert staging.events_stream == "STAGING_2_RUN_EVENTS"
    assert staging.events_subject("r1") == "staging_2.events.r1"
    assert staging.control_subject("r1") == "staging_2.control.r1"
    assert staging.dispatch_stream == "STAGING_2_DISPATCH"
    assert staging.dispatch_subject == "staging_2.dispatch"

    spaces = [NatsNames(n) for n in ("agentrun", "staging_2", "prod", "p_1", "a")]

    def every(name_of: Callable[[NatsNames], str]) -> set[str]:
        return {name_of(names) for names in spaces}

    for name_of in (
        lambda n: n.events_stream,
        lambda n: n.dispatch_stream,
        lambda n: n.events_subject("r1"),
        lambda n: n.control_subject("r1"),
        lambda n: n.dispatch_subject,
        lambda n: n.agent_changes_subject,
    ):
        assert len(every(name_of)) == len(spaces)


@pytest.mark.parametrize(
    "namespace",
    [
        "",
        "Agentrun",
        "1st",
        "-a",
        "_a",
        "a-b",
        "a.b",
        "a*",
        "a>",
        "a b",
        "a/b",
        "x" * 33,
        "agentrün",
    ],
)
def test_bad_namespaces_are_refused(namespace: str) -> None:
    with pytest.raises(ValueError, match="NATS namespace"):
        NatsNames(namespace)


def test_the_longest_namespace_is_accepted() -> None:
    assert NatsNames("x" * 32).events_stream == "X" * 32 + "_RUN_EVENTS"


async def test_namespaces_differing_by_dash_and_underscore_keep_their_streams_apart(
    nats_server: Service,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    try:
        dashed_names, underscored_names = NatsNames(f"d-{suffix}"), NatsNames(f"d_{suffix}")
    except ValueError:
        return  # one of the spellings is refused: they cannot collide
    dashed = await started(new_link(nats_server, dashed_names, name="dashed"))
    underscored = await started(new_link(nats_server, underscored_names, name="under"))
    try:
        run_id = str(uuid.uuid4())
        first = tool_result(run_id, 1)
        payload = run_events_pb2.PublishedRunEvents(events=[first]).SerializeToString()
        for each in (dashed, underscored):
            await each.js.publish(each.names.events_subject(run_id), payload)
            assert (await published(each, run_id)).last == first
        assert dashed.names.events_stream != underscored.names.events_stream
    finally:
        await remove(underscored)
        await remove(dashed)


async def test_a_short_event_retention_still_sets_up_the_streams(nats_server: Service) -> None:
    try:
        short = NatsLink(
            [f"nats://{nats_server.address}"],
            name="short-retention",
            event_retention=60,
            names=new_names("s"),
        )
    except ValueError:
        return  # refused up front: fine too
    await short.start(wait=3.0)
    try:
        assert short.is_connected
        await short.ensure_streams()
    finally:
        await remove(short)
