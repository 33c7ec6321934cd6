"""Publishes a run's events to its JetStream subject, off the hot path, in order, fenced.

One task per run publishes one message at a time and waits for its acknowledgement, so a run's
messages are stored in sequence order; whatever arrives meanwhile goes into the next message
(events coalesce while a publish is in flight, up to common.event_streams.message_budget bytes
a message). An event larger than that on its own goes out as consecutive parts, each waiting for
the acknowledgement of the one before (the wire format is in common.event_streams). Every publish
expects the subject's last message to be the previous one this publisher stored
(``Nats-Expected-Last-Subject-Sequence``): if anything else was appended — another executor took
the run over, or the run was declared lost — the publish is refused, the publisher stops and
``on_fenced`` tells its owner. A failed publish is retried with the same ``Nats-Msg-Id`` (an
event in parts from its first part not stored), so the stream deduplicates it. The live stream
never waits for any of this: while NATS is down, events queue here until it is back.

A tap (``tap``) gets the batches as they are stored: the run's published stream without reading
it back from NATS, for a client of a run held on the same executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

import nats.errors
import nats.js.errors

from agentrun.v1 import run_pb2
from common.errors import Unavailable
from common.event_streams import WRONG_LAST_SEQUENCE, Outgoing, message_budget
from common.nats_link import STEP_HEADER, TENANT_HEADER, VERSION_HEADER, NatsLink, message_id
from executor.run_stream import Marks

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 2.0
# Seconds of NATS outage after which a closing publisher gives up (its run's end is then taken
# from the run list by whoever settles the run: see executor.lost_runs).
GIVE_UP_AFTER = 3600.0
FRAMING_BYTES = 6  # what an event adds to a message besides itself: its field tag and length
# How much a tap merges into one read at most (its reader's next message stays bounded).
TAP_MERGE_BYTES = 1024 * 1024


class RunPublisher:
    """The JetStream publisher of one run (see module docstring)."""

    def __init__(
        self,
        link: NatsLink,
        run_id: str,
        tenant: str,
        *,
        last_stream_sequence: int = 0,
        published_marks: Marks | None = None,
        on_fenced: Callable[[], None] | None = None,
        max_queued: int = 100_000,
        give_up_after: float = GIVE_UP_AFTER,
        identity: str | None = None,
    ) -> None:
        self._link = link
        self._run_id = run_id
        self._tenant = tenant
        # Message ids carry this publisher's identity: a retry of its own publish is recognised
        # as such, and never confused with what another process appended at the same sequence.
        self._identity = identity or uuid.uuid4().hex[:12]
        # Each event with the stream's marks after it (set on the last event of each enqueued
        # batch): a message's marks are those of its last marked event, never more.
        self._queue: list[tuple[run_pb2.RunEvent, Marks | None]] = []
        # The marks of the stream as this publisher last left it (or found it).
        self._published_marks = published_marks or Marks()
        self._enqueued_marks = Marks()
        self._retry: tuple[Outgoing, Marks] | None = None
        self._stream_sequence = last_stream_sequence
        self._on_fenced = on_fenced
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._gave_up = False
        self.fenced = False
        self._max_queued = max_queued
        self._give_up_after = give_up_after
        self._taps: set[PublishedTap] = set()
        self._task = asyncio.create_task(self._publish(), name=f"publish-{run_id}")

    def tap(self) -> PublishedTap:
        """The batches this publisher stores from now on, in order (see PublishedTap)."""
        tap = PublishedTap(self._taps)
        if self._task.done():
            tap.end()
        else:
            self._taps.add(tap)
        return tap

    def enqueue(self, events: list[run_pb2.RunEvent], marks: Marks) -> None:
        if not events or self.fenced:
            return
        self._enqueued_marks = self._enqueued_marks.merge(marks)  # marks never go back
        self._queue.extend((event, None) for event in events[:-1])
        self._queue.append((events[-1], self._enqueued_marks))
        if len(self._queue) > self._max_queued:
            dropped = len(self._queue) - self._max_queued
            del self._queue[:dropped]
            log.warning("run %s: NATS backlog full, dropped %d events", self._run_id, dropped)
        self._idle.clear()
        self._wake.set()

    async def pace(self) -> None:
        """Waits (briefly) for the publish in flight, so that more events share the next message."""
        # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives as the
        # wait ends (here: as the publisher goes idle), and the stream's drain task, cancelled
        # by RunStream.close, would then wait for events forever.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                await self._idle.wait()

    async def close(self, wait: float | None) -> bool:
        """Publishes what is queued (waiting at most ``wait`` seconds; None: until it is
        published or the publisher gives up, ``give_up_after`` seconds into an outage), then
        stops. True if everything was published."""
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), wait)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            return False
        return not self._queue and self._retry is None and not self.fenced and not self._gave_up

    async def _publish(self) -> None:
        try:
            await self._publish_loop()
        finally:
            for tap in list(self._taps):
                tap.end()

    async def _publish_loop(self) -> None:
        started_waiting: float | None = None
        while True:
            if self._retry is None and not self._queue:
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # A failed publish is retried as it was (its id may be stored already).
            message, marks = self._retry or self._take_message()
            events = message.events
            try:
                await message.publish(ack_wait=PUBLISH_TIMEOUT, own_retries=True)
            except nats.js.errors.APIError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
                log.warning("run %s: its stream moved on elsewhere; stopping", self._run_id)
                self.fenced = True
                self._queue.clear()
                self._retry = None
                self._idle.set()
                if self._on_fenced is not None:
                    self._on_fenced()
                return
            except (TimeoutError, Unavailable, nats.errors.Error) as exc:
                now = time.monotonic()
                started_waiting = started_waiting or now
                if self._closing and now - started_waiting > self._give_up_after:
                    log.error("run %s: giving up publishing to NATS: %s", self._run_id, exc)
                    self._gave_up = True
                    return
                self._retry = (message, marks)
                await asyncio.sleep(0.2)
                continue
            self._retry = None
            self._stream_sequence = message.after
            self._published_marks = marks
            started_waiting = None
            for tap in self._taps:
                tap.stored(events)

    def _take_message(self) -> tuple[Outgoing, Marks]:
        """The next message (or parts of one) and the marks the stream reaches with it."""
        batch, marks = self._take_batch()
        message = Outgoing(
            self._link,
            self._run_id,
            batch,
            message_id=f"{message_id(self._run_id, batch[0].sequence)}:{self._identity}",
            after=self._stream_sequence,
            headers={TENANT_HEADER: self._tenant},
            marks=marks_headers(marks),
            marks_before=marks_headers(self._published_marks),
        )
        return message, marks

    def _take_batch(self) -> tuple[list[run_pb2.RunEvent], Marks]:
        """The next message's events (a message's worth, or one event however large) and the
        marks they reach."""
        budget = message_budget(self._link)
        size = 0
        count = 0
        marks = self._published_marks
        for event, event_marks in self._queue:
            size += event.ByteSize() + FRAMING_BYTES
            if count and size > budget:
                break
            count += 1
            if event_marks is not None:
                marks = event_marks
        batch = [event for event, _ in self._queue[:count]]
        del self._queue[:count]
        return batch, marks


class PublishedTap:
    """The events a run's publisher stores, as it stores them; ``next`` gives None once the
    publisher has stopped (the session let the run go, another executor's events fenced it, or
    NATS stayed away)."""

    def __init__(self, taps: set[PublishedTap]) -> None:
        self._taps = taps
        self._batches: asyncio.Queue[list[run_pb2.RunEvent] | None] = asyncio.Queue()
        self._ended = False

    def stored(self, events: list[run_pb2.RunEvent]) -> None:
        self._batches.put_nowait(events)

    def end(self) -> None:
        self._taps.discard(self)
        self._batches.put_nowait(None)

    async def next(self) -> list[run_pb2.RunEvent] | None:
        """The events of every message stored since the last call (waiting for one); None at
        the end. (Messages stored while the reader was busy go out together.)"""
        if self._ended:
            return None
        events = await self._batches.get()
        merged = 0
        while events is not None and not self._batches.empty() and merged < TAP_MERGE_BYTES:
            more = self._batches.get_nowait()
            if more is None:
                self._ended = True
                break
            events = events + more
            merged += sum(event.ByteSize() for event in more)
        if events is None:
            self._ended = True
        return events

    def close(self) -> None:
        """Stops taking batches (its reader is gone)."""
        self._taps.discard(self)


def marks_headers(marks: Marks) -> dict[str, str]:
    return {VERSION_HEADER: str(marks.version), STEP_HEADER: f"{marks.step}/{marks.attempt}"}
