"""Publishing what was recorded in the store while nobody held the run (a decision, a
cancellation, an approval that timed out, a run failed for good): its client events go after
the run's last published event, fenced, and are retried from a fresh read if the stream moved
meanwhile. An executor that takes the run up later publishes whatever is still missing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import nats.js.errors

from common.event_streams import WRONG_LAST_SEQUENCE, Outgoing, Published, published
from common.nats_link import TENANT_HEADER, NatsLink, message_id
from eventstore.run import Run
from executor.client_events import Announcements, emit_recorded
from executor.event_publisher import marks_headers
from executor.run_stream import Marks, RunStream

log = logging.getLogger(__name__)

ATTEMPTS = 10


def marks_of(state: Published) -> Marks:
    """The marks a run's published stream has reached."""
    return Marks(state.version, state.step, state.attempt)


async def publish_recorded(link: NatsLink, run: Run, events: Sequence[Any]) -> None:
    """Publishes the client events of ``events``, recorded events of ``run`` (see module
    docstring)."""
    for _ in range(ATTEMPTS):
        state = await published(link, run.run_id)
        pending = [e for e in events if e.originator_version > state.version]
        if not pending:
            return
        stream = RunStream(run.run_id, first_sequence=state.last_sequence + 1, drain=False)
        announce = Announcements(stream, run.attempt_of, state.step, state.attempt)
        emit_recorded(run, stream, pending, announce, catching_up=True)
        batch = stream.take_now()
        if not batch:
            return
        marks = stream.marks.merge(Marks(step=state.step, attempt=state.attempt))
        message = Outgoing(
            link,
            run.run_id,
            batch,
            message_id=f"{message_id(run.run_id, batch[0].sequence)}:recorded",
            after=state.stream_sequence,
            headers={TENANT_HEADER: run.tenant},
            marks=marks_headers(marks),
            marks_before=marks_headers(marks_of(state)),
        )
        try:
            await message.publish()
            return
        except nats.js.errors.APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
    log.warning("run %s: its stream kept moving; recorded events not published", run.run_id)
