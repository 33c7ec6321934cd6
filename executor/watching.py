"""Watching a run: its events after a sequence, from its JetStream subject — the ones published,
then live ones until its terminal event. This is how a durable run's events reach its client
(whichever executor drives it), and how any client resumes or watches any run.

A watch reads the run's subject through an ordered consumer, from its first message (parts of
an event too large for one message are put back together: common.event_streams), and skips
what the client has. While the stream is idle, a run that cannot move (classic) has its holder
checked every ``liveness_interval``: if nobody answers for it, it is settled (the run list and
the stream get its end: executor.lost_runs), and the watch reads that end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js.api import DeliverPolicy

from agentrun.v1 import run_pb2
from common.background import Background
from common.cancelling import raise_if_cancelled
from common.errors import Conflict, OutOfRange, Unavailable
from common.event_streams import Reassembly, is_terminal, last_published
from common.nats_link import NatsLink
from eventstore.run_list import RunRecord
from eventstore.run_status import TERMINAL_STATUSES
from executor.lost_runs import LostRuns

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

    Subscription = JetStreamContext.PushSubscription
else:
    Subscription = Any

log = logging.getLogger(__name__)

# Seconds between JetStream's heartbeats on an idle watch. A watch reads through an ephemeral
# consumer that lives on one NATS server; when that server dies, the client notices the missing
# heartbeats (after two) and recreates the consumer from the next sequence on a live server.
# Without heartbeats nothing notices, and the watch stalls until JetStream itself moves the
# consumer (15 s and more after a node of a cluster was killed).
WATCH_HEARTBEAT = 1.0

RecordOf = Callable[[str, str], Awaitable[RunRecord]]
Movable = Callable[[str], bool]


class Watching:
    """Watches of runs' event streams (see module docstring)."""

    def __init__(
        self,
        link: NatsLink,
        lost: LostRuns,
        record_of: RecordOf,
        movable: Movable,
        *,
        liveness_interval: float,
        event_retention: float,
    ) -> None:
        self.link = link
        self.lost = lost
        self.record_of = record_of
        self.movable = movable
        self.liveness_interval = liveness_interval
        self.event_retention = event_retention
        self._background = Background()

    async def _subscribe(self, run_id: str) -> Subscription:
        """A subscription to the run's events, all of them, through an ordered consumer."""
        return await self.link.js.subscribe(
            self.link.names.events_subject(run_id),
            stream=self.link.names.events_stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            idle_heartbeat=WATCH_HEARTBEAT,
        )

    async def first_published(self, run_id: str) -> FirstPublished:
        """Notices the first message published to the run's subject from now on (see
        FirstPublished)."""
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_message(msg: Msg) -> None:
            if not arrived.done():
                arrived.set_result(None)

        try:
            sub = await self.link.nc.subscribe(
                self.link.names.events_subject(run_id), cb=on_message
            )
        except (Unavailable, nats.errors.Error) as exc:  # let a watch try (and report it)
            log.debug("run %s: not subscribed to its subject: %r", run_id, exc)
            arrived.set_result(None)
            return FirstPublished(arrived, None, self._background)
        return FirstPublished(arrived, sub, self._background)

    async def watch(
        self,
        tenant: str,
        run_id: str,
        after_sequence: int,
        *,
        relayed: Sequence[run_pb2.RunEvent] = (),
        probe_first: bool = False,
        record: RunRecord | None = None,
    ) -> AsyncGenerator[list[run_pb2.RunEvent], None]:
        """The run's events after ``after_sequence`` until its terminal event, in batches.
        ``relayed``: events a client got from an executor that went away (see
        LostRuns.settle); ``probe_first``: check the holder at once (the client's stream from
        it broke); ``record``: the run's row as the caller has it (a run it started a moment
        ago), instead of reading it."""
        record = record or await self.record_of(tenant, run_id)
        if not await self._may_follow(record, after_sequence):
            return
        sub = await self._subscribe(run_id)
        check_holder = not self.movable(record.execution_mode)
        seen = after_sequence
        reassembly = Reassembly()  # the subscription reads every message, from the first
        check_at = time.monotonic() + (0.0 if probe_first else self.liveness_interval)
        try:
            while True:
                raise_if_cancelled()  # (nats-py's waits may have swallowed it)
                try:
                    msg = await sub.next_msg(timeout=max(check_at - time.monotonic(), 0.001))
                except nats.errors.TimeoutError:
                    if check_holder:
                        await self.lost.settle(tenant, run_id, relayed=relayed)
                    check_at = time.monotonic() + self.liveness_interval
                    continue
                events = reassembly.add(msg.data, msg.headers)
                _check_not_diverged(run_id, events, seen)
                batch = [e for e in events if e.sequence > seen]
                if not batch:
                    continue
                if seen and batch[0].sequence != seen + 1:
                    log.warning(
                        "run %s: events %d..%d missing", run_id, seen + 1, batch[0].sequence - 1
                    )
                seen = batch[-1].sequence
                yield batch
                if is_terminal(batch[-1]):
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _may_follow(self, record: RunRecord, after_sequence: int) -> bool:
        """Whether events may follow ``after_sequence``: False if the client has the run's end;
        OutOfRange if that lies before it, or if the run's events are no longer retained.
        (From sequence 0 on a running run, everything comes: no need to look first.)"""
        ended = record.status in TERMINAL_STATUSES
        if not after_sequence and not ended:
            return True
        _, last = await last_published(self.link, record.run_id)
        if last is None and ended and await self._discarded(record):
            raise OutOfRange(f"the events of run {record.run_id} are no longer retained")
        if last is not None and is_terminal(last) and last.sequence < after_sequence:
            raise OutOfRange(
                f"run {record.run_id} ended with event {last.sequence}: there is no event "
                f"after {after_sequence}"
            )
        return last is None or not is_terminal(last) or last.sequence > after_sequence

    async def _discarded(self, record: RunRecord) -> bool:
        """Whether an ended run that has nothing on its subject had its events removed: it
        ended before the retention, or before the oldest message the stream keeps (the stream
        discards its oldest messages at its size limit). Otherwise its events were never
        published (its executor died first), and its stream gets the end the run list
        recorded (executor.lost_runs)."""
        if time.time() - record.updated_at > self.event_retention:
            return True
        stream = self.link.names.events_stream
        state = (await self.link.js.stream_info(stream)).state
        if state.first_seq <= 1:
            return False  # the stream has removed nothing
        if not state.messages:
            return True
        try:
            oldest = await self.link.js.get_msg(stream, seq=state.first_seq)
        except nats.js.errors.NotFoundError:
            return True  # removed meanwhile: the stream is discarding
        return oldest.time is not None and oldest.time.timestamp() > record.updated_at


class FirstPublished:
    """Whether anything has been published to a run's subject since a moment: a plain NATS
    subscription, which costs NATS and the executor far less than the JetStream consumer a
    watch reads through. A durable run stored here is watched only once it turns out that
    another executor took it up; taken up here, its stream comes from its session (the usual
    case, and the only one with one executor). The subscription is made before the run is
    dispatched, over the same connection, so NATS has it before any taker publishes.

    ``arrived``: resolved by the first message (at once if the subscription failed: a watch
    then finds out why)."""

    def __init__(
        self, arrived: asyncio.Future[None], sub: NatsSubscription | None, background: Background
    ) -> None:
        self.arrived = arrived
        self._sub = sub
        self._background = background

    def close(self) -> None:
        """Unsubscribes (in the background: nothing waits for it)."""
        sub, self._sub = self._sub, None
        if not self.arrived.done():
            self.arrived.cancel()
        if sub is not None:

            async def unsubscribe() -> None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

            self._background.start(unsubscribe())


def _check_not_diverged(run_id: str, events: Sequence[run_pb2.RunEvent], seen: int) -> None:
    """An end at or before what the client has means that the run's stream ended without the
    last events the client got (a lost run settled before its client's gateway reported them;
    see executor.lost_runs): the client is told, rather than left waiting for an end it cannot
    see."""
    end = next((e for e in events if e.sequence <= seen and is_terminal(e)), None)
    if end is not None:
        raise Conflict(
            f"run {run_id} ended with event {end.sequence} ({end.WhichOneof('kind')}), which "
            "this stream had given as another event: its history is what WatchRun returns"
        )
