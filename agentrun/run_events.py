"""Reading and appending a run's published event stream (JetStream), for gateways and executors.

Appending after the last published event is fenced with ``Nats-Expected-Last-Subject-Sequence``:
if anything else reached the run's subject first, the append is refused and re-decided, so two
processes that both notice a lost run cannot both append a failure, and a late event of a run
that was not lost after all is never followed by a contradicting failure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nats.errors
import nats.js.errors

from agentrun.errors import Unavailable
from agentrun.nats_link import (
    STEP_HEADER,
    TENANT_HEADER,
    VERSION_HEADER,
    NatsLink,
    message_id,
)
from agentrun.v1 import executor_service_pb2, run_pb2

log = logging.getLogger(__name__)

TERMINAL_KINDS = frozenset({"run_completed", "run_failed", "run_cancelled"})
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = 10071


def is_terminal(event: run_pb2.RunEvent) -> bool:
    return event.WhichOneof("kind") in TERMINAL_KINDS


def decode(data: bytes) -> list[run_pb2.RunEvent]:
    return list(executor_service_pb2.PublishedRunEvents.FromString(data).events)


def executor_lost_event(run_id: str, sequence: int) -> run_pb2.RunEvent:
    event = run_pb2.RunEvent(
        run_id=run_id,
        sequence=sequence,
        run_failed=run_pb2.RunFailed(
            error=run_pb2.RunError(
                code=run_pb2.RUN_ERROR_CODE_EXECUTOR_LOST,
                message="the executor running this classic run went away; the run is lost",
                retryable=True,
            )
        ),
    )
    event.time.GetCurrentTime()
    return event


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


async def append_executor_lost(
    link: NatsLink,
    run_id: str,
    tenant: str,
    relayed: list[run_pb2.RunEvent] | None = None,
) -> run_pb2.RunEvent | None:
    """Appends RunFailed(EXECUTOR_LOST) to the run's stream, after the last published event.

    ``relayed`` are events a gateway already gave its client; those the stream lacks (the dead
    executor did not get to publish them) are appended first, so the stream matches what the
    client saw. Returns the run's terminal event (the appended one, or one already there), or
    None if NATS is unavailable.
    """
    try:
        for _ in range(5):
            stream_seq, last = await last_published(link, run_id)
            if last is not None and is_terminal(last):
                return last
            last_sequence = last.sequence if last is not None else 0
            missing = [e for e in relayed or () if e.sequence > last_sequence]
            next_sequence = (missing[-1].sequence if missing else last_sequence) + 1
            failure = executor_lost_event(run_id, next_sequence)
            batch = [*missing, failure]
            headers = {
                "Nats-Msg-Id": f"{message_id(run_id, batch[0].sequence)}:lost",
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
            return failure
    except (Unavailable, nats.errors.Error, TimeoutError) as exc:
        log.warning("run %s: cannot append EXECUTOR_LOST: %s", run_id, exc)
        return None
    log.warning("run %s: the stream kept moving; EXECUTOR_LOST not appended", run_id)
    return None
