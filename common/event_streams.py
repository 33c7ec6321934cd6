"""Reading and appending a run's published event stream (JetStream), for gateways and executors.

Appending a run's end after the last published event is fenced with
``Nats-Expected-Last-Subject-Sequence``: if anything else reached the run's subject first, the
append is refused and re-decided, so two processes that both settle a lost run cannot both
append an end.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors

from agentrun.v1 import executor_service_pb2, run_pb2
from common.errors import Unavailable
from common.nats_link import (
    STEP_HEADER,
    TENANT_HEADER,
    VERSION_HEADER,
    NatsLink,
    message_id,
)

log = logging.getLogger(__name__)

TERMINAL_KINDS = frozenset({"run_completed", "run_failed", "run_cancelled"})
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = 10071


def is_terminal(event: run_pb2.RunEvent) -> bool:
    return event.WhichOneof("kind") in TERMINAL_KINDS


def decode(data: bytes) -> list[run_pb2.RunEvent]:
    return list(executor_service_pb2.PublishedRunEvents.FromString(data).events)


@dataclass(frozen=True)
class Published:
    """Where a run's published stream stands: its newest message."""

    stream_sequence: int = 0  # the message's sequence in the JetStream stream; 0: none yet
    last: run_pb2.RunEvent | None = None  # the last event of that message
    version: int = 0  # the run's stored version that the published events reflect
    step: int = 0  # the highest step the published events announced
    attempt: int = 0  # the highest attempt of that step they announced


async def published(link: NatsLink, run_id: str) -> Published:
    """The state of the run's published stream (empty if nothing was published)."""
    try:
        names = link.names
        msg = await link.js.get_last_msg(names.events_stream, names.events_subject(run_id))
    except nats.js.errors.NotFoundError:
        return Published()
    events = decode(msg.data or b"")
    headers = msg.headers or {}
    step, _, attempt = headers.get(STEP_HEADER, "0/0").partition("/")
    return Published(
        msg.seq or 0,
        events[-1] if events else None,
        int(headers.get(VERSION_HEADER, "0") or 0),
        int(step or 0),
        int(attempt or 0),
    )


async def last_published(link: NatsLink, run_id: str) -> tuple[int, run_pb2.RunEvent | None]:
    """The stream sequence and the last event of the run's newest message; (0, None) if none."""
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
            stream_seq, last = await last_published(link, run_id)
            if last is not None and is_terminal(last):
                return last
            last_sequence = last.sequence if last is not None else 0
            missing = [e for e in relayed if e.sequence > last_sequence]
            appended = run_pb2.RunEvent()
            appended.CopyFrom(end)
            appended.run_id = run_id
            appended.sequence = (missing[-1].sequence if missing else last_sequence) + 1
            appended.time.GetCurrentTime()
            batch = [*missing, appended]
            headers = {
                "Nats-Msg-Id": f"{message_id(run_id, batch[0].sequence)}:end",
                TENANT_HEADER: tenant,
                EXPECTED_LAST_SUBJECT_SEQUENCE: str(stream_seq),
            }
            payload = executor_service_pb2.PublishedRunEvents(events=batch).SerializeToString()
            try:
                await link.js.publish(link.names.events_subject(run_id), payload, headers=headers)
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
