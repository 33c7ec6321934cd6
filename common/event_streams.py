"""Reading and appending a run's published event stream (JetStream), for gateways and executors.

The run's subject (``agentrun.events.<run_id>``, see common.nats_link) is read and written here
and nowhere else; this is its wire format:

- A message's payload is a PublishedRunEvents: consecutive events of the run, at most
  ``message_budget`` bytes (MAX_MESSAGE_BYTES, less if the server takes less). Its headers:
  ``Nats-Msg-Id`` (a retried publish is deduplicated), ``Agentrun-Tenant``, the marks
  ``Agentrun-Version`` and ``Agentrun-Step`` (``step/attempt``) that the stream reaches with it.
- A payload too large for one message (in practice: one event too large on its own) goes out as
  n consecutive messages, its *parts*: slices of the payload, in order, each with
  ``Agentrun-Part: i/n`` and the message's ``Nats-Msg-Id`` followed by ``:i/n``. Parts 2..n
  carry ``Agentrun-First-Part`` (part 1's stream sequence, so that the newest message's whole
  payload can be read back); parts 1..n-1 carry the marks as they were before the payload's
  events and ``Agentrun-Last-Sequence``, the sequence of the last event before them; part n
  carries the marks the stream reaches with them.
- Readers put the parts back together (``Reassembly``). A writer that died between parts leaves
  an incomplete event: readers drop it when a message that is not its next part follows, and
  ``published`` reports the stream as of the last complete event (fenced on the real last
  message), so whoever appends next starts again from there.

Every message is appended after the subject's last one with
``Nats-Expected-Last-Subject-Sequence`` (each part after the part before it): if anything else
reached the run's subject first, the append is refused and re-decided, so two processes that both
settle a lost run cannot both append an end, and two writers' parts never interleave.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js.api import RawStreamMsg

from agentrun.internal.v1 import run_events_pb2
from agentrun.v1 import run_pb2
from common.errors import Unavailable
from common.nats_link import (
    FIRST_PART_HEADER,
    LAST_SEQUENCE_HEADER,
    PART_HEADER,
    STEP_HEADER,
    TENANT_HEADER,
    VERSION_HEADER,
    NatsLink,
    message_id,
)

log = logging.getLogger(__name__)

# A run's stream ends with the event of its terminal status, RunEvent's ``run_<status>`` (the
# domain's terminal statuses: tests/test_run_status.py holds the two together).
TERMINAL_KINDS = frozenset({"run_completed", "run_failed", "run_cancelled"})
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = 10071
MAX_MESSAGE_BYTES = 512 * 1024  # the largest payload of one message
HEADER_ROOM = 4096  # what a message's headers may take of the server's max_payload


def is_terminal(event: run_pb2.RunEvent) -> bool:
    return event.WhichOneof("kind") in TERMINAL_KINDS


def message_budget(link: NatsLink) -> int:
    """The largest payload of one message on a run's subject (see module docstring)."""
    return min(MAX_MESSAGE_BYTES, link.max_payload - HEADER_ROOM)


def encode(events: list[run_pb2.RunEvent]) -> bytes:
    payload: bytes = run_events_pb2.PublishedRunEvents(events=events).SerializeToString()
    return payload


def decode(data: bytes) -> list[run_pb2.RunEvent]:
    return list(run_events_pb2.PublishedRunEvents.FromString(data).events)


def _part(headers: Mapping[str, str]) -> tuple[int, int] | None:
    """(i, n) for part i of n; None for a whole message."""
    value = headers.get(PART_HEADER)
    if value is None:
        return None
    index, _, count = value.partition("/")
    return int(index), int(count)


def _marks(headers: Mapping[str, str]) -> tuple[int, int, int]:
    """The version, step and attempt a message's headers say the stream reaches."""
    step, _, attempt = headers.get(STEP_HEADER, "0/0").partition("/")
    return int(headers.get(VERSION_HEADER, "0") or 0), int(step or 0), int(attempt or 0)


class Reassembly:
    """A run's events from its messages, fed one by one in stream order: whole messages give
    their events, parts are kept until the last one (see module docstring)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._count = 0

    def add(self, data: bytes | None, headers: Mapping[str, str] | None) -> list[run_pb2.RunEvent]:
        """The events complete with this message (none while an event's parts are arriving)."""
        part = _part(headers or {})
        if part is None:
            self._parts = []  # drops an event whose writer died between its parts
            return decode(data or b"")
        index, count = part
        if (index, count) != (len(self._parts) + 1, self._count):
            self._parts, self._count = [], count  # not the next part: start again
            if index != 1:
                return []  # the rest of an event whose beginning was not read
        self._parts.append(data or b"")
        if index < count:
            return []
        payload, self._parts = b"".join(self._parts), []
        return decode(payload)


@dataclass(frozen=True)
class Published:
    """Where a run's published stream stands: its newest message, and the last complete event."""

    stream_sequence: int = 0  # the newest message's sequence in the JetStream stream; 0: none yet
    last: run_pb2.RunEvent | None = None  # its last event; None if it is part of an incomplete one
    version: int = 0  # the run's stored version that the published events reflect
    step: int = 0  # the highest step the published events announced
    attempt: int = 0  # the highest attempt of that step they announced
    last_sequence: int = 0  # the sequence of the last complete event; 0: none yet


async def published(link: NatsLink, run_id: str) -> Published:
    """The state of the run's published stream (empty if nothing was published)."""
    names = link.names
    try:
        msg = await link.js.get_last_msg(names.events_stream, names.events_subject(run_id))
    except nats.js.errors.NotFoundError:
        return Published()
    headers = msg.headers or {}
    version, step, attempt = _marks(headers)
    part = _part(headers)
    if part is not None and part[0] < part[1]:
        # A writer is between the parts of an event, or died there: the history ends before it.
        before = int(headers[LAST_SEQUENCE_HEADER])
        return Published(msg.seq or 0, None, version, step, attempt, before)
    events = await _completed_by(link, run_id, msg)
    last = events[-1] if events else None
    return Published(msg.seq or 0, last, version, step, attempt, last.sequence if last else 0)


async def _completed_by(
    link: NatsLink, run_id: str, newest: RawStreamMsg
) -> list[run_pb2.RunEvent]:
    """The events of the run's newest message; if it is an event's last part, read together
    with the parts before it."""
    headers = newest.headers or {}
    reassembly = Reassembly()
    if _part(headers) is not None:
        names = link.names
        sequence = int(headers[FIRST_PART_HEADER])
        while sequence < (newest.seq or 0):
            earlier = await link.js.get_msg(
                names.events_stream, sequence, names.events_subject(run_id), next=True
            )
            reassembly.add(earlier.data, earlier.headers)
            sequence = (earlier.seq or sequence) + 1
    return reassembly.add(newest.data, headers)


class Outgoing:
    """A batch of a run's events on its way to the run's subject: one message, or the parts of
    one if it is too large (see module docstring). ``publish`` stores what is not stored yet,
    and may be called again after it failed: it goes on at the first message not stored."""

    def __init__(
        self,
        link: NatsLink,
        run_id: str,
        events: list[run_pb2.RunEvent],
        *,
        message_id: str,
        after: int,
        headers: dict[str, str],
        marks: dict[str, str] | None = None,
        marks_before: dict[str, str] | None = None,
    ) -> None:
        self._link = link
        self._subject = link.names.events_subject(run_id)
        self._message_id = message_id
        self._headers = headers  # every message's (the tenant)
        self._marks = marks or {}  # the stream's marks with the events
        self._marks_before = marks_before or {}  # and without them (on parts 1..n-1)
        self.events = events
        self._last_before = events[0].sequence - 1
        payload, budget = encode(events), message_budget(link)
        self._chunks = [payload[i : i + budget] for i in range(0, len(payload), budget)]
        self._stored = 0
        self._first_part = 0
        self.after = after  # the stream sequence the next message is fenced on

    async def publish(self, *, ack_wait: float | None = None, own_retries: bool = False) -> int:
        """Stores the messages not stored yet, each fenced on the one before (the first on
        ``after``); the stream sequence of the last. ``ack_wait``: how long each message's
        acknowledgement may take (the JetStream context's timeout by default). ``own_retries``:
        a message refused because the subject moved on, whose last message is this very one
        (stored by an earlier try whose acknowledgement was lost), counts as stored."""
        while self._stored < len(self._chunks):
            self.after = await self._publish_one(self._stored, ack_wait, own_retries)
            if not self._stored:
                self._first_part = self.after
            self._stored += 1
        return self.after

    async def _publish_one(self, index: int, ack_wait: float | None, own_retries: bool) -> int:
        headers = self._headers_of(index)
        js = self._link.js
        try:
            ack = await js.publish(
                self._subject, self._chunks[index], timeout=ack_wait, headers=headers
            )
        except nats.js.errors.NoStreamResponseError as exc:
            raise Unavailable("nats", "no JetStream response") from exc
        except nats.js.errors.APIError as exc:
            # JetStream checks the expected sequence before duplicates: a retry of a publish
            # that was stored after all is refused as if fenced. Tell the two apart.
            if not own_retries or exc.err_code != WRONG_LAST_SEQUENCE:
                raise
            last = await js.get_last_msg(self._link.names.events_stream, self._subject)
            if (last.headers or {}).get("Nats-Msg-Id") != headers["Nats-Msg-Id"]:
                raise
            return last.seq or 0
        return ack.seq

    def _headers_of(self, index: int) -> dict[str, str]:
        fence = {EXPECTED_LAST_SUBJECT_SEQUENCE: str(self.after)}
        count = len(self._chunks)
        if count == 1:
            return {"Nats-Msg-Id": self._message_id, **self._headers, **self._marks, **fence}
        number = f"{index + 1}/{count}"
        headers = {
            "Nats-Msg-Id": f"{self._message_id}:{number}",
            **self._headers,
            PART_HEADER: number,
            **fence,
        }
        if index:
            headers[FIRST_PART_HEADER] = str(self._first_part)
        if index + 1 == count:
            return {**headers, **self._marks}
        return {**headers, **self._marks_before, LAST_SEQUENCE_HEADER: str(self._last_before)}


async def last_published(link: NatsLink, run_id: str) -> tuple[int, run_pb2.RunEvent | None]:
    """The stream sequence of the run's newest message and its last event: (0, None) if there
    is none; the event is None if the message is a part of an event not complete yet."""
    state = await published(link, run_id)
    return state.stream_sequence, state.last


async def append_end(
    link: NatsLink,
    run_id: str,
    tenant: str,
    end: run_pb2.RunEvent,
    relayed: Sequence[run_pb2.RunEvent] = (),
) -> run_pb2.RunEvent | None:
    """Appends ``end`` (a terminal event, not yet sequenced) to the run's stream, after the last
    published event, unless the stream has ended already.

    ``relayed`` are events a gateway already gave its client; those the stream lacks (the dead
    executor did not get to publish them) are appended first, so the stream matches what the
    client saw. Returns the run's terminal event (the appended one, or the one already there),
    or None if NATS is unavailable.
    """
    try:
        for _ in range(5):
            state = await published(link, run_id)
            if state.last is not None and is_terminal(state.last):
                return state.last
            missing = [e for e in relayed if e.sequence > state.last_sequence]
            appended = run_pb2.RunEvent()
            appended.CopyFrom(end)
            appended.run_id = run_id
            appended.sequence = (missing[-1].sequence if missing else state.last_sequence) + 1
            appended.time.GetCurrentTime()
            batch = [*missing, appended]
            message = Outgoing(
                link,
                run_id,
                batch,
                message_id=f"{message_id(run_id, batch[0].sequence)}:end",
                after=state.stream_sequence,
                headers={TENANT_HEADER: tenant},
            )
            try:
                await message.publish()
            except nats.js.errors.APIError as exc:
                if exc.err_code == WRONG_LAST_SEQUENCE:
                    continue  # the stream moved on: look again
                raise
            return appended
    except (Unavailable, nats.errors.Error, TimeoutError) as exc:
        log.warning("run %s: cannot append its end: %s", run_id, exc)
        return None
    log.warning("run %s: the stream kept moving; its end was not appended", run_id)
    return None
