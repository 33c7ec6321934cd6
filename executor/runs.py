"""The run use cases of an executor: start, steer and read runs of both modes.

Classic runs this executor holds are steered in memory; classic runs held elsewhere over their
NATS control subject. Durable runs are steered through the store when nobody holds them, through
their holder otherwise (see executor.stored_runs and executor.durable).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, cast

import nats.errors

from common.errors import (
    AgentrunError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from eventstore.agent_config import AgentConfig, ExecutionMode
from eventstore.run import TERMINAL_STATUSES, Run
from eventstore.run_list import RunFilter, RunRecord
from eventstore.run_store import StoredEvent
from executor import stored_runs
from executor.classic import ClassicRun
from executor.context import ExecutorContext
from executor.control import raise_for_answer
from executor.dispatch import WorkQueue
from executor.durable import DurableRunner
from executor.reconciler import SETTLING_TIME, Reconciler
from executor.run_list_projection import RunListProjection
from executor.translation import record_of

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = 5.0


@dataclass(frozen=True)
class RunSpec:
    """A request to start a run, as the domain sees it."""

    tenant: str
    run_id: str
    agent_id: str
    input: str
    request_id: str = ""
    conversation_id: str = ""
    execution_mode: ExecutionMode | None = None
    cancel_on_disconnect: bool = False


@dataclass(frozen=True)
class DurableStart:
    """A durable run, stored and being queued: ``record`` is the run as it starts; ``queued``
    completes once it is queued (or left to the reconciler, NATS being down)."""

    record: RunRecord
    queued: asyncio.Task[None]


class RunManager:
    """The run use cases (see module docstring)."""

    def __init__(
        self,
        ctx: ExecutorContext,
        queue: WorkQueue,
        durable: DurableRunner,
        projection: RunListProjection,
    ) -> None:
        self.ctx = ctx
        self.queue = queue
        self.durable = durable
        self.projection = projection
        self._classic: dict[str, ClassicRun] = {}
        self.reconciler = Reconciler(ctx, queue, self.held_here)

    def held_here(self, run_id: str) -> bool:
        return run_id in self._classic or run_id in self.durable.held

    # -- starting ------------------------------------------------------------------------------

    async def start(self, spec: RunSpec) -> ClassicRun | DurableStart | RunRecord:
        """Starts a run: a classic one here, a durable one on whichever executor takes it from
        the work queue. Returns the existing run of a repeated request_id.

        Each start has one idempotency check, one write: a classic run claims its row in the
        run list, in the same trip to a worker thread as the agent read (the claim records the
        run's mode, so it follows the read); a durable run's first stored event is its claim
        (the run list follows the store). The conversation is read meanwhile.
        """
        self._validate(spec)
        conversation_id = spec.conversation_id or str(uuid.uuid4())

        cache = self.ctx.agent_cache
        cached, token = cache.get(spec.tenant, spec.agent_id), cache.token()

        def read_agent_and_claim() -> tuple[AgentConfig | None, RunRecord | None]:
            try:
                agent = cached or self.ctx.agents.get(spec.tenant, spec.agent_id)
            except NotFound:
                with contextlib.suppress(NotFound):  # a repeat outlives its agent
                    return None, self._recorded(spec.tenant, spec.run_id)
                raise
            mode = spec.execution_mode or agent.execution_mode
            if mode == "durable":
                return agent, None  # the store is the claim
            claim = RunRecord(
                run_id=spec.run_id,
                tenant=spec.tenant,
                agent_id=spec.agent_id,
                agent_version=agent.version,
                request_id=spec.request_id,
                conversation_id=conversation_id,
                execution_mode=mode,
                input=spec.input,
                executor_id=self.ctx.executor_id,
            )
            return agent, self.ctx.run_list.claim(claim)

        claimed, history = await asyncio.gather(
            asyncio.to_thread(read_agent_and_claim)
            if cached is None or (spec.execution_mode or cached.execution_mode) != "durable"
            else _read(cached),
            asyncio.to_thread(self.ctx.conversations.history, spec.tenant, conversation_id)
            if spec.conversation_id
            else _no_history(),
            return_exceptions=True,
        )
        if isinstance(claimed, BaseException):
            raise claimed
        agent, existing = cast(tuple[AgentConfig | None, RunRecord | None], claimed)
        if agent is not None and cached is None:
            cache.put(spec.tenant, agent, token)
        if existing is not None:
            return existing
        assert agent is not None
        mode = spec.execution_mode or agent.execution_mode
        try:
            if isinstance(history, BaseException):
                raise history
            run = Run(
                run_id=spec.run_id,
                tenant=spec.tenant,
                request_id=spec.request_id,
                agent=agent.to_json(),
                input=spec.input,
                conversation_id=conversation_id,
                history=history,
                execution_mode=mode,
            )
            if mode == "durable":
                return await self._start_durable(run)
            return await self._start_classic(run)
        except BaseException:
            if mode != "durable":
                with contextlib.suppress(AgentrunError):
                    await asyncio.to_thread(self.ctx.run_list.remove, spec.run_id)
            raise

    async def _start_classic(self, run: Run) -> ClassicRun:
        run.collect_events()
        classic = ClassicRun(self.ctx, run, on_done=self._classic_done)
        self._classic[run.run_id] = classic
        await classic.start_control()
        return classic

    async def _start_durable(self, run: Run) -> DurableStart | RunRecord:
        """Stores the run (a repeat of the request finds it stored and gets it as it is now),
        then queues it while the caller tells its client about the run."""
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

        existing = await asyncio.to_thread(create)
        if existing is not None:
            return existing
        self.durable.remember(run)
        return DurableStart(record_of(run, ""), asyncio.create_task(self._dispatch_new(run)))

    async def _dispatch_new(self, run: Run) -> None:
        """Queues a stored run. If NATS is down the run stays stored: the reconciler dispatches
        it once NATS is back."""
        try:
            await self.queue.dispatch(run.run_id, run.tenant, run.version)
        except (TimeoutError, Unavailable, nats.errors.Error) as exc:
            log.warning("run %s stored, not yet dispatched: %s", run.run_id, exc)

    def _classic_done(self, classic: ClassicRun) -> None:
        self._classic.pop(classic.run_id, None)

    def _validate(self, spec: RunSpec) -> None:
        if not spec.agent_id:
            raise InvalidArgument("agent_id", "is required")
        if not spec.input.strip():
            raise InvalidArgument("input", "must not be empty")
        size = len(spec.input.encode())
        limit = self.ctx.settings.max_input_bytes
        if size > limit:
            raise InvalidArgument("input", f"is {size} bytes; the limit is {limit} bytes")
        if len(spec.request_id) > 200:
            raise InvalidArgument("request_id", "must be at most 200 characters")
        if len(spec.conversation_id) > 200:
            raise InvalidArgument("conversation_id", "must be at most 200 characters")

    # -- steering ------------------------------------------------------------------------------

    def local(self, tenant: str, run_id: str) -> ClassicRun | None:
        classic = self._classic.get(run_id)
        if classic is not None and classic.run.tenant != tenant:
            raise NotFound("run", run_id)
        return classic

    async def decide(
        self, tenant: str, run_id: str, tool_call_id: str, approved: bool, reason: str
    ) -> None:
        if not tool_call_id:
            raise InvalidArgument("decision.tool_call_id", "is required")
        classic = self.local(tenant, run_id)
        if classic is not None:
            classic.decide(tenant, tool_call_id, approved, reason)
            return
        record = await self.get(tenant, run_id)
        if record.execution_mode == "durable":
            await stored_runs.decide(
                self.ctx, self.queue, tenant, run_id, tool_call_id, approved, reason
            )
            return
        if tool_call_id in record.decisions:
            _check_repeated_decision(record, tool_call_id, approved)
            return
        request = {
            "op": "decide",
            "tenant": tenant,
            "tool_call_id": tool_call_id,
            "approved": approved,
            "reason": reason,
        }
        await self._steer_elsewhere(record, request)

    async def cancel(self, tenant: str, run_id: str, reason: str) -> None:
        classic = self.local(tenant, run_id)
        if classic is not None:
            classic.cancel(tenant, reason)
            return
        held = self.durable.held.get(run_id)
        if held is not None and held.cancel(tenant, reason):
            return
        record = await self.get(tenant, run_id)
        if record.execution_mode == "durable" and await stored_runs.cancel(
            self.ctx, tenant, run_id, reason, held_here=held is not None
        ):
            return
        await self._steer_elsewhere(record, {"op": "cancel", "tenant": tenant, "reason": reason})

    async def _steer_elsewhere(self, record: RunRecord, request: dict[str, Any]) -> None:
        """Sends a control request to the executor holding the run."""
        run_id = record.run_id
        if record.status in TERMINAL_STATUSES:
            raise FailedPrecondition(f"run {run_id} has already ended ({record.status})")
        try:
            reply = await self.ctx.link.nc.request(
                self.ctx.link.names.control_subject(run_id),
                json.dumps(request).encode(),
                timeout=CONTROL_TIMEOUT,
            )
        except nats.errors.NoRespondersError:
            if record.execution_mode == "durable":
                raise Unavailable(
                    "executor", f"run {run_id} is changing hands; try again"
                ) from None
            settled = await self.reconciler.lost.settle(record.tenant, run_id)
            if settled.status in TERMINAL_STATUSES:
                raise FailedPrecondition(
                    f"run {run_id} has already ended ({settled.status}): its executor went away"
                ) from None
            raise Unavailable(
                "executor", f"the executor holding run {run_id} did not answer; try again"
            ) from None
        except (nats.errors.TimeoutError, TimeoutError):
            raise Unavailable(
                "executor", f"the executor holding run {run_id} did not answer"
            ) from None
        raise_for_answer(run_id, reply.data)

    # -- reading -------------------------------------------------------------------------------

    async def get(self, tenant: str, run_id: str) -> RunRecord:
        _check_run_id(run_id)
        return await asyncio.to_thread(self._recorded, tenant, run_id)

    def _recorded(self, tenant: str, run_id: str) -> RunRecord:
        """The run's row in the run list; a durable run the run list has not caught up with
        yet (it was stored a moment ago) is read from the store."""
        try:
            return self.ctx.run_list.get(tenant, run_id)
        except NotFound:
            return record_of(self.ctx.run_store.load_for(tenant, run_id, to_change=False), "")

    async def get_current(self, tenant: str, run_id: str, version: int = 0) -> RunRecord:
        """The run as it is now (or at ``version`` of a durable run's history): a durable run is
        read from its history; a classic run that seems active but whose executor is gone is
        recorded as lost first, so a reader never sees a dead run as running."""
        record = await self.get(tenant, run_id)
        if record.execution_mode == "durable":
            try:
                read = functools.partial(
                    self.ctx.run_store.load_for, tenant, run_id, version or None, to_change=False
                )
                run = await asyncio.to_thread(read)
            except NotFound:
                return record  # claimed, not stored yet (its start failed or is under way)
            current = record_of(run, "")
            current.created_at = record.created_at
            return current
        if version:
            raise InvalidArgument("version", "classic runs have no stored history to read from")
        if self.reconciler.active_elsewhere(record):
            return await self.reconciler.lost.settle(tenant, run_id, min_age=SETTLING_TIME)
        return record

    async def list_runs(
        self, tenant: str, run_filter: RunFilter, page_size: int, page_token: str
    ) -> tuple[list[RunRecord], str]:
        """The run list, including everything durable runs recorded before the call."""

        def read() -> tuple[list[RunRecord], str]:
            self.projection.catch_up()
            return self.ctx.run_list.list_runs(tenant, run_filter, page_size, page_token)

        return await asyncio.to_thread(read)

    async def history(
        self, tenant: str, run_id: str, from_version: int, to_version: int
    ) -> list[StoredEvent]:
        record = await self.get(tenant, run_id)
        if record.execution_mode != "durable":
            raise Unimplemented(
                "ListRunEvents reads a durable run's stored history; a classic run has none "
                "(WatchRun streams its events)"
            )
        if from_version < 0 or to_version < 0:
            raise InvalidArgument("from_version", "versions are not negative")
        return await asyncio.to_thread(self.ctx.run_store.history, run_id, from_version, to_version)

    async def fork(
        self, tenant: str, run_id: str, at_version: int, new_run_id: str, request_id: str
    ) -> RunRecord:
        """A new durable run from a durable run's history up to ``at_version``; queued at once.
        A repeated request_id returns the fork it made before."""
        source = await self.get(tenant, run_id)
        if source.execution_mode != "durable":
            raise Unimplemented(
                "ForkRun forks a durable run's stored history; a classic run has none"
            )
        claim = RunRecord(
            run_id=new_run_id,
            tenant=tenant,
            agent_id=source.agent_id,
            request_id=request_id,
            agent_version=source.agent_version,
            conversation_id=source.conversation_id,
            execution_mode="durable",
            input=source.input,
            executor_id=self.ctx.executor_id,
            forked_from_run_id=run_id,
            forked_at_version=at_version,
        )
        existing = await asyncio.to_thread(self.ctx.run_list.claim, claim)
        if existing is not None:
            return existing
        try:
            fork = await asyncio.to_thread(
                self.ctx.run_store.fork, tenant, run_id, at_version, new_run_id, request_id
            )
        except BaseException:
            with contextlib.suppress(AgentrunError):
                await asyncio.to_thread(self.ctx.run_list.remove, new_run_id)
            raise
        record = record_of(fork, "")
        self.durable.remember(fork)
        await asyncio.to_thread(
            self.ctx.run_list.update,
            new_run_id,
            forked_at_version=fork.forked_at_version,
            status=fork.status,
            version=fork.version,
        )
        if not fork.awaiting_decision():
            with contextlib.suppress(Unavailable, nats.errors.Error, asyncio.TimeoutError):
                await self.queue.dispatch(fork.run_id, tenant, fork.version)
        return record

    # -- lifecycle -----------------------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """Lets running classic runs finish for ``grace`` seconds, then fails the rest."""
        self.reconciler.stop()
        runs = list(self._classic.values())
        if runs:
            _, pending = await asyncio.wait([r.task for r in runs], timeout=grace)
            for classic in runs:
                if classic.task in pending:
                    classic.abandon()
            if pending:
                await asyncio.wait(pending, timeout=5.0)


def _check_repeated_decision(record: RunRecord, tool_call_id: str, approved: bool) -> None:
    """A decision the run has recorded may be repeated, not changed."""
    if record.decisions[tool_call_id] != approved:
        verdict = "approved" if record.decisions[tool_call_id] else "denied"
        raise FailedPrecondition(
            f"tool call {tool_call_id!r} was already {verdict}; a decision cannot change"
        )


async def _no_history() -> list[Any]:
    return []


async def _read(agent: AgentConfig) -> tuple[AgentConfig, None]:
    """A cached agent of a durable run: nothing to read or claim in a worker thread."""
    return agent, None


def _check_run_id(run_id: str) -> None:
    try:
        uuid.UUID(run_id)
    except ValueError:
        raise InvalidArgument("run_id", "must be a run id (a UUID)") from None
