"""How a run's events are recorded: the port that makes a session classic or durable (with
executor.session.waiting).

- ``InMemory`` (classic): a step's events stay in the executor's memory; the run list's row
  follows the run's state and records its end (the arbiter of how a classic run ended: see
  executor.lost_runs). The stream is the only copy of what the run showed, so it is published
  whole however long NATS is away. A run cannot move: an executor that stops fails it.
- ``InStore`` (durable): a step's events are committed to the run store, in one save, before
  the next step; a conflict means that another executor took the run over. The session holds
  the run's dispatch message (kept alive while it works, acked when the run ends or suspends,
  given back when the executor drains); the store is the truth, so an unpublished stream is
  left for the next taker to complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from contextlib import AbstractContextManager
from typing import Protocol

import nats.errors
from opentelemetry.trace import Span

from common import metrics, tracing
from common.errors import AgentrunError, Conflict
from eventstore.run import Run
from executor.context import ExecutorContext
from executor.durable.dispatch import Dispatch, WorkQueue, keep_alive
from executor.translation import record_of

log = logging.getLogger(__name__)

PUBLISH_FLUSH_TIMEOUT = 10.0


class Outcome(enum.Enum):
    """How a session stopped holding its run."""

    ENDED = "ended"  # the run's terminal event went out
    SUSPENDED = "suspended"  # it waits, in the store, for a decision
    LOST = "lost"  # another executor took it over
    HANDED_BACK = "handed back"  # this executor drains: another one takes the run up
    FAILED = "failed"  # an unexpected error: whoever took the run up decides what follows


class TakenOver(Exception):
    """Another executor took the run over: this one must stop, touching nothing."""


class EndedElsewhere(Exception):
    """The run's recorded end was decided elsewhere (it was settled as lost while it ran)."""


class Recording(Protocol):
    """How a run's events are recorded (see module docstring)."""

    @property
    def movable(self) -> bool:
        """Whether another executor can take the run up (a draining executor hands it back)."""
        ...

    @property
    def publish_wait(self) -> float | None:
        """Seconds the run's stream may take to publish once the run stops (None: all it takes,
        within the publisher's own limit)."""
        ...

    @property
    def fails_on_errors(self) -> bool:
        """Whether an unexpected error fails the run here (else it propagates to whoever took
        the run up, who retries it)."""
        ...

    async def hold(self) -> None:
        """The session starts holding the run."""

    async def commit(self, run: Run) -> None:
        """Records the run's new events. Raises TakenOver if another executor took the run."""

    async def state_changed(self, run: Run) -> None:
        """The run started or stopped waiting for decisions."""

    async def ended(self, run: Run) -> None:
        """Records what outlives the ended run (before its end goes out). Raises EndedElsewhere
        if its end was recorded otherwise meanwhile."""

    async def let_go(self, run: Run, outcome: Outcome, published: bool) -> None:
        """The session stops holding the run (``published``: its stream is published whole)."""


class InMemory:
    """Classic runs (see module docstring)."""

    movable = False
    publish_wait: float | None = None
    fails_on_errors = True

    def __init__(self, ctx: ExecutorContext) -> None:
        self.ctx = ctx
        self._row_lock = asyncio.Lock()

    async def hold(self) -> None:
        return None

    async def commit(self, run: Run) -> None:
        run.collect_events()  # classic runs keep no per-step history

    async def state_changed(self, run: Run) -> None:
        await self._update_row(
            run,
            status=run.status,
            pending_approvals=run.awaiting_decision(),
            decisions={call_id: d["approved"] for call_id, d in run.decisions.items()},
        )

    async def ended(self, run: Run) -> None:
        record = record_of(run, self.ctx.executor_id)
        fields = {
            k: v for k, v in vars(record).items() if k not in ("run_id", "tenant", "created_at")
        }
        work = [self._update_row(run, **fields)]
        if run.status == "completed":
            work.append(record_turn(self.ctx, run, required=False))
        if not (await asyncio.gather(*work))[0]:
            raise EndedElsewhere

    async def let_go(self, run: Run, outcome: Outcome, published: bool) -> None:
        return None

    async def _update_row(self, run: Run, **fields: object) -> bool:
        """Updates the run's row unless it records an end already (False then); updates of one
        run apply in the order they were made. A row that cannot be written now is left as it
        is: once this executor lets the run go, whoever settles it takes the end from its
        stream (see executor.lost_runs)."""
        async with self._row_lock:
            try:
                update = self.ctx.run_list.update_active
                return await asyncio.to_thread(update, run.run_id, **fields)
            except AgentrunError as exc:
                log.error("run %s: could not update the run list: %s", run.run_id, exc.message)
                return True


class InStore:
    """Durable runs (see module docstring)."""

    movable = True
    publish_wait: float | None = PUBLISH_FLUSH_TIMEOUT
    fails_on_errors = False

    def __init__(self, ctx: ExecutorContext, queue: WorkQueue, dispatch: Dispatch) -> None:
        self.ctx = ctx
        self.queue = queue
        self.dispatch = dispatch
        self._commit: asyncio.Future[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    async def hold(self) -> None:
        self._heartbeat = asyncio.create_task(keep_alive(self.dispatch.msg, self.queue.ack_wait))

    async def commit(self, run: Run) -> None:
        # Shielded: a run handed back mid-commit waits for the commit's thread before its nak.
        self._commit = asyncio.ensure_future(asyncio.to_thread(self.ctx.run_store.commit, run))
        began = time.perf_counter()
        try:
            with store_span(self.ctx, run, "commit run events"):
                await asyncio.shield(self._commit)
        except Conflict:
            raise TakenOver from None
        metrics.STORE_COMMIT.observe(time.perf_counter() - began)

    async def state_changed(self, run: Run) -> None:
        return None  # the run list follows the store (executor.run_list_projection)

    async def ended(self, run: Run) -> None:
        if run.status == "completed":
            await record_turn(self.ctx, run, required=True)

    async def let_go(self, run: Run, outcome: Outcome, published: bool) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        msg = self.dispatch.msg
        if outcome is Outcome.LOST:
            return  # the message is someone else's now
        if outcome is Outcome.HANDED_BACK:
            await self._release(run)
            with contextlib.suppress(nats.errors.Error):
                await msg.nak()
            metrics.labelled(metrics.HANDOVERS, "released").inc()
            log.info("run %s: handed back for another executor", run.run_id)
            return
        if outcome is Outcome.FAILED:
            return  # whoever took the run up decides what becomes of the message
        if published:  # else it comes back, and its next taker publishes what is missing
            with contextlib.suppress(nats.errors.Error):
                await msg.ack()

    async def _release(self, run: Run) -> None:
        if self._commit is not None:
            with contextlib.suppress(Exception):
                # It must land before the next taker's claim, which would conflict with it
                # and make that taker drop the run.
                await self._commit
        if not run.is_finished and not run.waits:
            # Recorded so that the interrupted attempt is not counted as a failed one (see
            # eventstore.run_steps.exhausted_attempts): rolling restarts are not poison.
            run.release(self.ctx.executor_id)
            with contextlib.suppress(AgentrunError):  # then it counts as failed: no harm
                await asyncio.to_thread(self.ctx.run_store.commit, run)


async def record_turn(ctx: ExecutorContext, run: Run, *, required: bool) -> bool:
    """Records a completed run's turn in its conversation. ``required``: a failure propagates
    (a durable run is taken up again and records it then); else it is logged (a classic run
    cannot be retried)."""
    try:
        await asyncio.to_thread(
            ctx.conversations.record_turn,
            run.tenant,
            run.conversation_id,
            run.run_id,
            run.messages,
            probably_new=not run.history,
        )
    except AgentrunError as exc:
        if required:
            raise
        log.error("run %s: could not record its turn: %s", run.run_id, exc.message)
    return True


def store_span(ctx: ExecutorContext, run: Run, name: str) -> AbstractContextManager[Span]:
    """The span of a write of the run's events to the store (its attributes are built only
    when tracing is on: this is on every step's path). Not made current: a write starts no
    spans."""
    if not tracing.enabled():
        return tracing.leaf(name)
    attributes = {
        "db.system.name": ctx.store.system,
        "agentrun.run.id": run.run_id,
        "agentrun.run.version": run.version,
        "agentrun.run.events": len(run.pending_events),
    }
    return tracing.leaf(name, attributes=attributes)
