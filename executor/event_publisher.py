"""Publishes a run's events to its JetStream subject, off the hot path, in order, fenced.

One task per run publishes one message at a time and waits for its acknowledgement, so a run's
messages are stored in sequence order; whatever arrives meanwhile goes into the next message
(events coalesce while a publish is in flight). Every publish expects the subject's last message
to be the previous one this publisher stored (``Nats-Expected-Last-Subject-Sequence``): if
anything else was appended — another executor took the run over, or the run was declared lost —
the publish is refused, the publisher stops and ``on_fenced`` tells its owner. A failed publish
is retried with the same ``Nats-Msg-Id``, so the stream deduplicates it. The live stream never
waits for any of this: while NATS is down, events queue here until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import nats.errors
import nats.js.errors

from agentrun.v1 import executor_service_pb2, run_pb2
from common.errors import Unavailable
from common.event_streams import EXPECTED_LAST_SUBJECT_SEQUENCE, WRONG_LAST_SEQUENCE
from common.nats_link import (
    STEP_HEADER,
    TENANT_HEADER,
    VERSION_HEADER,
    NatsLink,
    message_id,
)
from executor.run_stream import Marks

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 1024
PUBLISH_TIMEOUT = 2.0
# Seconds of NATS outage after which a closing publisher gives up (its run's end is then taken
# from the run list by whoever settles the run: see executor.lost_runs).
GIVE_UP_AFTER = 3600.0


class RunPublisher:
    """The JetStream publisher of one run (see module docstring)."""

    def __init__(
        self,
        link: NatsLink,
        run_id: str,
        tenant: str,
        *,
        last_stream_sequence: int = 0,
        on_fenced: Callable[[], None] | None = None,
        max_queued: int = 100_000,
        give_up_after: float = GIVE_UP_AFTER,
        identity: str | None = None,
    ) -> None:
        self._link = link
        self._run_id = run_id
        self._tenant = tenant
        self._subject = link.names.events_subject(run_id)
        # Message ids carry this publisher's identity: a retry of its own publish is recognised
        # as such, and never confused with what another process appended at the same sequence.
        self._identity = identity or uuid.uuid4().hex[:12]
        # Each event with the stream's marks after it (set on the last event of each enqueued
        # batch): a message's marks are those of its last marked event, never more.
        self._queue: list[tuple[run_pb2.RunEvent, Marks | None]] = []
        self._published_marks = Marks()
        self._enqueued_marks = Marks()
        self._retry: tuple[list[run_pb2.RunEvent], Marks] | None = None
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
        self._task = asyncio.create_task(self._publish_loop(), name=f"publish-{run_id}")

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
            batch, marks = self._retry or self._take_batch()
            try:
                await self._publish(batch, marks)
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
                self._retry = (batch, marks)
                await asyncio.sleep(0.2)
                continue
            self._retry = None
            self._published_marks = marks
            started_waiting = None

    def _take_batch(self) -> tuple[list[run_pb2.RunEvent], Marks]:
        """The next message's events (up to MAX_MESSAGE_BYTES) and the marks they reach."""
        size = 0
        count = 0
        marks = self._published_marks
        for event, event_marks in self._queue:
            size += event.ByteSize()
            if count and size > MAX_MESSAGE_BYTES:
                break
            count += 1
            if event_marks is not None:
                marks = event_marks
        batch = [event for event, _ in self._queue[:count]]
        del self._queue[:count]
        return batch, marks

    async def _publish(self, batch: list[run_pb2.RunEvent], marks: Marks) -> None:
        payload = _payload(batch, self._link.max_payload)
        headers = {
            "Nats-Msg-Id": f"{message_id(self._run_id, batch[0].sequence)}:{self._identity}",
            TENANT_HEADER: self._tenant,
            **marks_headers(marks),
            EXPECTED_LAST_SUBJECT_SEQUENCE: str(self._stream_sequence),
        }
        js = self._link.js
        try:
            ack = await js.publish(self._subject, payload, timeout=PUBLISH_TIMEOUT, headers=headers)
        except nats.js.errors.NoStreamResponseError as exc:
            raise Unavailable("nats", "no JetStream response") from exc
        except nats.js.errors.APIError as exc:
            # JetStream checks the expected sequence before duplicates: a retry of a publish
            # that was stored after all is refused as if fenced. Tell the two apart.
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
            last = await js.get_last_msg(self._link.names.events_stream, self._subject)
            if (last.headers or {}).get("Nats-Msg-Id") != headers["Nats-Msg-Id"]:
                raise
            self._stream_sequence = last.seq or 0
            return
        self._stream_sequence = ack.seq


def _payload(batch: list[run_pb2.RunEvent], max_payload: int) -> bytes:
    """The message's payload. An event too large for one NATS message on its own (a huge tool
    result, say) goes out with its long texts cut, saying so, rather than block the stream."""
    payload: bytes = executor_service_pb2.PublishedRunEvents(events=batch).SerializeToString()
    if len(payload) <= max_payload - 4096 or len(batch) > 1:
        return payload
    event = run_pb2.RunEvent()
    event.CopyFrom(batch[0])
    _cut_texts(event, max(1024, (max_payload - 4096) // 4))
    cut: bytes = executor_service_pb2.PublishedRunEvents(events=[event]).SerializeToString()
    return cut


def _cut_texts(message: Any, limit: int) -> None:
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING and field.label != field.LABEL_REPEATED:
            if len(value) > limit:
                setattr(message, field.name, value[:limit] + " [cut: too large to publish]")
        elif field.type == field.TYPE_MESSAGE and field.label != field.LABEL_REPEATED:
            _cut_texts(value, limit)


def marks_headers(marks: Marks) -> dict[str, str]:
    return {VERSION_HEADER: str(marks.version), STEP_HEADER: f"{marks.step}/{marks.attempt}"}
