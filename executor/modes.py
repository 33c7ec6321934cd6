"""The execution modes: the one place that chooses what makes a run classic or durable.

A mode says how a new run is stored (the start's idempotency check), where it runs, and which
ports its session holds (executor.session.recording, executor.session.waiting):

- classic: the run claims its row in the run list and runs in a session here, its events in
  memory, its decisions awaited in memory; it cannot move, so its holder's liveness is watched;
- durable: the run is stored (its first event is the claim) and queued; whichever executor
  takes it from the queue holds it in a session whose events are committed to the store and
  which suspends to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import nats.errors
from opentelemetry.trace import SpanKind

from common import tracing
from common.errors import AlreadyExists, NotFound, Unavailable
from common.event_streams import Published
from eventstore.agent_config import AgentConfig
from eventstore.run import Run
from eventstore.run_list import RunRecord
from executor.context import ExecutorContext
from executor.durable.dispatch import Dispatch, WorkQueue
from executor.event_publisher import PublishedTap
from executor.session import recording, waiting
from executor.session.recording import store_span
from executor.session.session import RunSession
from executor.session.sessions import Sessions
from executor.translation import record_of

if TYPE_CHECKING:
    from executor.watching import FirstPublished

log = logging.getLogger(__name__)

RECENT_RUNS = 1000


@dataclass(frozen=True)
class Started:
    """A run just started (or found again: a repeated request_id). ``session``: it runs here,
    and its live stream can be attached to; ``queued``: a durable run being queued;
    ``here``: a queued run's events as its session on this executor publishes them, if this
    executor is the one that takes it up (cancel it to stop waiting); ``published``: notices
    the first message published to the run's subject, to tell when another executor took it
    up (close it when done)."""

    record: RunRecord
    session: RunSession | None = None
    queued: asyncio.Task[None] | None = None
    here: asyncio.Future[PublishedTap] | None = None
    published: FirstPublished | None = None


class Mode(Protocol):
    name: str
    stored: bool  # its runs' histories are in the run store (else only their streams tell)
    movable: bool  # another executor can take its runs up (else a run dies with its holder)
    streams_live: bool  # a new run's stream is taken live from its session here (else the
    # run's events reach its client through its published stream)

    async def store(self, run: Run) -> RunRecord | None:
        """Stores a new run; the existing run instead if its id is taken (a repeat)."""
        ...

    async def launch(self, run: Run, config: AgentConfig, *, streamed: bool = False) -> Started:
        """Sets a stored run going (``config``: its agent, as pinned in the run; ``streamed``:
        the caller streams the run's events to its client)."""
        ...


class Classic:
    name = "classic"
    stored = False
    movable = False
    streams_live = True

    def __init__(self, ctx: ExecutorContext, sessions: Sessions) -> None:
        self.ctx = ctx
        self.sessions = sessions

    async def store(self, run: Run) -> RunRecord | None:
        claim = record_of(run, self.ctx.executor_id)
        return await asyncio.to_thread(self.ctx.run_list.claim, claim)

    async def launch(self, run: Run, config: AgentConfig, *, streamed: bool = False) -> Started:
        run.collect_events()
        session = RunSession(
            self.ctx, run, recording.InMemory(self.ctx), waiting.InMemory(), config=config
        )
        self.sessions.start(session)
        return Started(record_of(run, self.ctx.executor_id), session=session)


class Durable:
    name = "durable"
    stored = True
    movable = True
    streams_live = False

    def __init__(self, ctx: ExecutorContext, queue: WorkQueue) -> None:
        self.ctx = ctx
        self.queue = queue
        # Runs this executor just stored: taking one from the queue here needs no read back
        # (when another executor takes it, or it changed meanwhile, the store decides: a stale
        # copy's first commit conflicts and the run is taken up again).
        self._recent: dict[str, Run] = {}
        # Streams waiting for the session of a run stored here, should this executor take it:
        # its events then reach the client as they are published, not read back from NATS.
        self._here: dict[str, asyncio.Future[PublishedTap]] = {}

    async def store(self, run: Run) -> RunRecord | None:
        store = self.ctx.run_store

        def create() -> RunRecord | None:
            if run.request_id:  # a repeat may name a classic run (the agent's mode changed since)
                with contextlib.suppress(NotFound):
                    return self.ctx.run_list.get(run.tenant, run.run_id)
            try:
                store.create(run)
            except AlreadyExists:
                return record_of(store.load_for(run.tenant, run.run_id, to_change=False), "")
            return None

        with store_span(self.ctx, run, "store run"):
            return await asyncio.to_thread(create)

    async def launch(self, run: Run, config: AgentConfig, *, streamed: bool = False) -> Started:
        self._recent[run.run_id] = run
        while len(self._recent) > RECENT_RUNS:
            del self._recent[next(iter(self._recent))]
        here = self._wait_here(run.run_id) if streamed else None
        return Started(
            record_of(run, ""), queued=asyncio.create_task(self._dispatch(run)), here=here
        )

    def _wait_here(self, run_id: str) -> asyncio.Future[PublishedTap]:
        here: asyncio.Future[PublishedTap] = asyncio.get_running_loop().create_future()
        self._here[run_id] = here
        here.add_done_callback(lambda _: self._here.pop(run_id, None))
        return here

    def recent(self, run_id: str) -> Run | None:
        """A run this executor stored a moment ago (taken: it is not kept after that)."""
        return self._recent.pop(run_id, None)

    async def _dispatch(self, run: Run) -> None:
        """Queues a stored run. If NATS is down the run stays stored: the reconciler dispatches
        it once NATS is back. Its span is not made current: the message carries it as the
        parent of the run's take-up."""
        attributes = (
            {
                "messaging.system": "nats",
                "messaging.operation.type": "send",
                "messaging.destination.name": self.queue.subject,
                "agentrun.run.id": run.run_id,
            }
            if tracing.enabled()
            else None
        )
        try:
            with tracing.leaf(
                "dispatch run", kind=SpanKind.PRODUCER, attributes=attributes
            ) as dispatching:
                await self.queue.dispatch(
                    run.run_id, run.tenant, run.version, trace_context=tracing.carrier(dispatching)
                )
        except (TimeoutError, Unavailable, nats.errors.Error) as exc:
            log.warning("run %s stored, not yet dispatched: %s", run.run_id, exc)

    def session(
        self,
        run: Run,
        dispatch: Dispatch,
        stream_state: Published,
        config: AgentConfig,
        *,
        fresh: bool,
    ) -> RunSession:
        """The session of a durable run taken from the queue (``fresh``: its first taking up,
        nothing published yet)."""
        session = RunSession(
            self.ctx,
            run,
            recording.InStore(self.ctx, self.queue, dispatch),
            waiting.Suspending(),
            config=config,
            stream_state=stream_state,
        )
        here = self._here.get(run.run_id)
        if fresh and here is not None and not here.done():
            here.set_result(session.publisher.tap())
        return session


@dataclass(frozen=True)
class Modes:
    """The modes of this executor, by name."""

    classic: Classic
    durable: Durable

    def __getitem__(self, name: str) -> Mode:
        return self.durable if name == "durable" else self.classic
