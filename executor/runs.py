"""The run use cases of an executor: starting runs and reading them, for both modes.

A start reads the agent and the conversation (one round trip, in parallel), then its mode
stores the run (the idempotency check: the run id derives from tenant + request_id, so a repeat
finds the run of the first start) and sets it going (executor.modes). Steering is
executor.steering; streaming, executor.watching and the sessions' live streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from dataclasses import dataclass, replace
from typing import Any, cast

from common import tracing
from common.errors import (
    AgentrunError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from eventstore.agent_config import AgentConfig, ExecutionMode
from eventstore.run import Run
from eventstore.run_list import RunFilter, RunRecord
from eventstore.run_store import StoredEvent
from executor import run_metrics
from executor.context import ExecutorContext
from executor.lost_runs import SETTLING_TIME, LostRuns
from executor.modes import Modes, Started
from executor.run_list_projection import RunListProjection
from executor.translation import record_of
from executor.watching import Watching

_RUN_NAMESPACE = uuid.UUID("3a0c1c52-9a8e-4f0b-9df5-5e0f5f7d8c41")


def run_id_for(tenant: str, request_id: str) -> str:
    """A new run's id: derived from the request_id, so that a repeated start names the same run."""
    if not request_id:
        return str(uuid.uuid4())
    return str(uuid.uuid5(_RUN_NAMESPACE, f"run\x00{tenant}\x00{request_id}"))


def checked_run_id(run_id: str, field: str = "run_id") -> str:
    """A run id in its canonical form (run ids name NATS subjects and rows: one spelling)."""
    try:
        return str(uuid.UUID(run_id))
    except ValueError:
        raise InvalidArgument(field, "must be a run id (a UUID)") from None


@dataclass(frozen=True)
class RunSpec:
    """A request to start a run, as the domain sees it."""

    tenant: str
    agent_id: str
    input: str
    request_id: str = ""
    conversation_id: str = ""
    execution_mode: ExecutionMode | None = None
    cancel_on_disconnect: bool = False

    @functools.cached_property
    def run_id(self) -> str:
        return run_id_for(self.tenant, self.request_id)


class Runs:
    """The run use cases (see module docstring)."""

    def __init__(
        self,
        ctx: ExecutorContext,
        modes: Modes,
        lost: LostRuns,
        projection: RunListProjection,
    ) -> None:
        self.ctx = ctx
        self.modes = modes
        self.lost = lost
        self.projection = projection

    # -- starting ------------------------------------------------------------------------------

    async def start(self, spec: RunSpec, *, watching: Watching | None = None) -> Started:
        """Starts a run, or finds the run of a repeated request_id. ``watching``: the caller
        streams the run; for a run it may have to read from its published stream, the first
        message published is noticed (see watching.FirstPublished)."""
        self._validate(spec)
        conversation_id = spec.conversation_id or str(uuid.uuid4())
        agent, history = await asyncio.gather(
            self._agent(spec),
            asyncio.to_thread(self.ctx.conversations.history, spec.tenant, conversation_id)
            if spec.conversation_id
            else _no_history(),
            return_exceptions=True,
        )
        if isinstance(agent, NotFound):
            with contextlib.suppress(NotFound):  # a repeat outlives its agent
                return Started(await self.get(spec.tenant, spec.run_id))
        if isinstance(agent, BaseException):
            raise agent
        if isinstance(history, BaseException):
            raise history
        config = cast(AgentConfig, agent)
        mode = self.modes[spec.execution_mode or config.execution_mode]
        run = Run(
            run_id=spec.run_id,
            tenant=spec.tenant,
            request_id=spec.request_id,
            agent=config.to_json(),
            input=spec.input,
            conversation_id=conversation_id,
            history=cast(list[Any], history),
            execution_mode=mode.name,
            trace_context=tracing.carrier(),
        )
        run.know_agent(config)
        await self._admit(run.tenant, run.run_id)
        published = (
            await watching.first_published(run.run_id)
            if watching and not mode.streams_live
            else None
        )
        try:
            try:
                existing = await mode.store(run)
            except BaseException:
                await self._withdraw(run.run_id)
                raise
            streamed = watching is not None
            started = (
                Started(existing)
                if existing is not None
                else await mode.launch(run, config, streamed=streamed)
            )
            if existing is None:
                run_metrics.started(run)
        except BaseException:
            if published is not None:
                published.close()
            raise
        if started.here is None and published is not None:
            published.close()  # (a repeat: its watch reads the run's subject)
            published = None
        return replace(started, published=published)

    async def _admit(self, tenant: str, run_id: str) -> None:
        """Admits a new run under its tenant's quotas (ResourceExhausted if over one)."""
        quotas = self.ctx.settings.tenant_quotas
        if not quotas.enabled:
            return

        def admit() -> None:
            if quotas.max_concurrent_runs:
                # Durable runs' rows follow the store: count the runs as they are now.
                self.projection.catch_up()
            self.ctx.run_list.admit(tenant, run_id, quotas)

        await asyncio.to_thread(admit)

    async def _withdraw(self, run_id: str) -> None:
        """Gives back the admission of a run that was not stored (best effort: a leftover
        counts as a running run for a few minutes)."""
        if self.ctx.settings.tenant_quotas.enabled:
            with contextlib.suppress(AgentrunError):
                await asyncio.to_thread(self.ctx.run_list.withdraw, run_id)

    async def _agent(self, spec: RunSpec) -> AgentConfig:
        cache = self.ctx.agent_cache
        cached, token = cache.get(spec.tenant, spec.agent_id), cache.token()
        if cached is not None:
            return cached
        agent = await asyncio.to_thread(self.ctx.agents.get, spec.tenant, spec.agent_id)
        cache.put(spec.tenant, agent, token)
        return agent

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

    # -- reading -------------------------------------------------------------------------------

    async def get(self, tenant: str, run_id: str) -> RunRecord:
        """The run's row in the run list; a durable run the run list has not caught up with
        yet (it was stored a moment ago) is read from the store."""
        run_id = checked_run_id(run_id)

        def read() -> RunRecord:
            try:
                return self.ctx.run_list.get(tenant, run_id)
            except NotFound:
                run = self.ctx.run_store.load_for(tenant, run_id, to_change=False)
                return record_of(run, "")

        return await asyncio.to_thread(read)

    async def get_current(self, tenant: str, run_id: str, version: int = 0) -> RunRecord:
        """The run as it is now (or at ``version`` of a stored run's history): a stored run is
        read from its history; a run that cannot move, seems active, and whose executor is gone
        is settled first, so a reader never sees a dead run as running."""
        if version < 0:
            raise InvalidArgument("version", "must not be negative")
        record = await self.get(tenant, run_id)
        if self.modes[record.execution_mode].stored:
            read = functools.partial(
                self.ctx.run_store.load_for, tenant, record.run_id, version or None, to_change=False
            )
            current = record_of(await asyncio.to_thread(read), "")
            current.created_at = record.created_at
            return current
        if version:
            raise FailedPrecondition(
                f"run {record.run_id} is a classic run: it has no stored history to read from"
            )
        return await self.lost.settle(tenant, record.run_id, min_age=SETTLING_TIME)

    async def list_runs(
        self, tenant: str, run_filter: RunFilter, page_size: int, page_token: str
    ) -> tuple[list[RunRecord], str]:
        """The run list, including everything stored runs recorded before the call."""

        def read() -> tuple[list[RunRecord], str]:
            self.projection.catch_up()
            return self.ctx.run_list.list_runs(tenant, run_filter, page_size, page_token)

        return await asyncio.to_thread(read)

    async def history(
        self, tenant: str, run_id: str, from_version: int, to_version: int
    ) -> list[StoredEvent]:
        if from_version < 0 or to_version < 0:
            raise InvalidArgument("from_version", "versions are not negative")
        record = await self._stored(tenant, run_id, "ListRunEvents reads")
        return await asyncio.to_thread(
            self.ctx.run_store.history, record.run_id, from_version, to_version
        )

    async def fork(self, tenant: str, run_id: str, at_version: int, request_id: str) -> RunRecord:
        """A new durable run from a stored run's history up to ``at_version``; queued at once.
        Admitted under the tenant's quotas as a start is; a repeated request_id returns the
        fork it made before."""
        if at_version < 0:
            raise InvalidArgument("at_version", "must not be negative")
        source = await self._stored(tenant, run_id, "ForkRun forks")
        new_run_id = run_id_for(tenant, request_id)
        await self._admit(tenant, new_run_id)  # a fork is a new run, under the quotas too
        claim = RunRecord(
            run_id=new_run_id,
            tenant=tenant,
            agent_id=source.agent_id,
            request_id=request_id,
            agent_version=source.agent_version,
            conversation_id=source.conversation_id,
            execution_mode=self.modes.durable.name,
            input=source.input,
            executor_id=self.ctx.executor_id,
            forked_from_run_id=source.run_id,
            forked_at_version=at_version,
        )
        try:
            existing = await asyncio.to_thread(self.ctx.run_list.claim, claim)
        except BaseException:
            await self._withdraw(new_run_id)
            raise
        if existing is not None:
            return existing
        try:
            fork = await asyncio.to_thread(
                self.ctx.run_store.fork,
                tenant,
                source.run_id,
                at_version,
                new_run_id,
                request_id,
                tracing.carrier(),
            )
        except BaseException:
            with contextlib.suppress(AgentrunError):
                await asyncio.to_thread(self.ctx.run_list.remove, new_run_id)
            await self._withdraw(new_run_id)
            raise
        await asyncio.to_thread(
            self.ctx.run_list.update,
            new_run_id,
            forked_at_version=fork.forked_at_version,
            status=fork.status,
            version=fork.version,
        )
        if fork.waits:
            return record_of(fork, "")  # it waits for a decision: nothing to run yet
        started = await self.modes.durable.launch(fork, fork.agent_config)
        run_metrics.started(fork)
        return started.record

    async def _stored(self, tenant: str, run_id: str, what: str) -> RunRecord:
        record = await self.get(tenant, run_id)
        if not self.modes[record.execution_mode].stored:
            raise FailedPrecondition(
                f"{what} a durable run's stored history; run {record.run_id} is a classic run, "
                "which has none (WatchRun streams its events)"
            )
        return record


async def _no_history() -> list[Any]:
    return []
