"""The run use cases of an executor: start, steer, inspect, and notice lost runs.

Runs this executor holds are steered in memory; runs held by another executor are steered over
their NATS control subject. A classic run whose control subject has no responders is held by no
process: its executor died, and the run is recorded (and published) as failed, EXECUTOR_LOST.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, cast

import nats.errors

from agentrun.errors import (
    AgentrunError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from agentrun.nats_link import control_subject
from agentrun.run_events import append_executor_lost, is_terminal, last_published
from agentrun.v1 import run_pb2
from eventstore.agent_config import AgentConfig, ExecutionMode
from eventstore.run import TERMINAL_STATUSES, Run
from eventstore.run_index import RunFilter, RunRecord
from executor.classic import ClassicRun
from executor.context import ExecutorContext

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = 5.0
SETTLING_TIME = 5.0  # a run this young may not answer its control subject yet


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


class RunManager:
    """The run use cases (see module docstring)."""

    def __init__(self, ctx: ExecutorContext) -> None:
        self.ctx = ctx
        self._classic: dict[str, ClassicRun] = {}
        self._reconciler: asyncio.Task[None] | None = None

    # -- starting ------------------------------------------------------------------------------

    async def start(self, spec: RunSpec) -> ClassicRun | RunRecord:
        """Starts a run here, or returns the existing run of a repeated request_id.

        The run's row is claimed while the agent and the conversation are read (three queries
        in parallel, one round trip on the first-token path); the claim is the idempotency check.
        """
        self._validate(spec)
        conversation_id = spec.conversation_id or str(uuid.uuid4())
        claim = RunRecord(
            run_id=spec.run_id,
            tenant=spec.tenant,
            agent_id=spec.agent_id,
            request_id=spec.request_id,
            conversation_id=conversation_id,
            execution_mode=spec.execution_mode or "classic",
            input=spec.input,
            executor_id=self.ctx.executor_id,
        )
        claimed, agent, history = await asyncio.gather(
            asyncio.to_thread(self.ctx.index.claim, claim),
            asyncio.to_thread(self.ctx.agents.get, spec.tenant, spec.agent_id),
            asyncio.to_thread(self.ctx.conversations.history, spec.tenant, conversation_id)
            if spec.conversation_id
            else _no_history(),
            return_exceptions=True,
        )
        if isinstance(claimed, BaseException):
            raise claimed
        if claimed is not None:
            return cast(RunRecord, claimed)
        try:
            if isinstance(agent, BaseException):
                raise agent
            if isinstance(history, BaseException):
                raise history
            mode = spec.execution_mode or agent.execution_mode
            if mode == "durable":
                raise Unimplemented("durable runs are not available in this version")
            return await self._start_classic(spec, agent, conversation_id, history)
        except BaseException:
            with contextlib.suppress(AgentrunError):
                await asyncio.to_thread(self.ctx.index.remove, spec.run_id)
            raise

    async def _start_classic(
        self, spec: RunSpec, agent: AgentConfig, conversation_id: str, history: list[Any]
    ) -> ClassicRun:
        run = Run(
            run_id=spec.run_id,
            tenant=spec.tenant,
            request_id=spec.request_id,
            agent=agent.to_json(),
            input=spec.input,
            conversation_id=conversation_id,
            history=history,
            execution_mode="classic",
        )
        run.collect_events()
        classic = ClassicRun(self.ctx, run, on_done=self._classic_done)
        self._classic[spec.run_id] = classic
        await classic.start_control()
        # Off the first-token path; ordered before the run's later row updates by their lock.
        classic.update_index_soon(agent_version=agent.version)
        return classic

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
        request = {
            "op": "decide",
            "tenant": tenant,
            "tool_call_id": tool_call_id,
            "approved": approved,
            "reason": reason,
        }
        await self._steer_elsewhere(tenant, run_id, request)

    async def cancel(self, tenant: str, run_id: str, reason: str) -> None:
        classic = self.local(tenant, run_id)
        if classic is not None:
            classic.cancel(tenant, reason)
            return
        await self._steer_elsewhere(
            tenant, run_id, {"op": "cancel", "tenant": tenant, "reason": reason}
        )

    async def _steer_elsewhere(self, tenant: str, run_id: str, request: dict[str, Any]) -> None:
        record = await self.get(tenant, run_id)
        if request["op"] == "decide" and request["tool_call_id"] in record.decisions:
            _check_repeated_decision(record, request["tool_call_id"], request["approved"])
            return
        if record.status in TERMINAL_STATUSES:
            raise FailedPrecondition(f"run {run_id} has already ended ({record.status})")
        try:
            reply = await self.ctx.link.nc.request(
                control_subject(run_id), json.dumps(request).encode(), timeout=CONTROL_TIMEOUT
            )
        except nats.errors.NoRespondersError:
            lost = await self.report_lost(tenant, run_id)
            raise FailedPrecondition(
                f"run {run_id} has already ended ({lost.status}): its executor went away"
            ) from None
        except (nats.errors.TimeoutError, TimeoutError):
            raise Unavailable(
                "executor", f"the executor holding run {run_id} did not answer"
            ) from None
        answer = json.loads(reply.data)
        error = answer.get("error")
        if error:
            if error.get("reason") == "NOT_FOUND":
                raise NotFound("run", run_id)
            if error.get("reason") == "INVALID_ARGUMENT":
                raise InvalidArgument("request", str(error.get("message")))
            raise FailedPrecondition(str(error.get("message")))

    # -- reading -------------------------------------------------------------------------------

    async def get(self, tenant: str, run_id: str) -> RunRecord:
        _check_run_id(run_id)
        return await asyncio.to_thread(self.ctx.index.get, tenant, run_id)

    async def get_current(self, tenant: str, run_id: str) -> RunRecord:
        """The run as it is now: a classic run that seems active but whose executor is gone is
        recorded as lost first, so a reader never sees a dead run as running."""
        record = await self.get(tenant, run_id)
        if _active_elsewhere(record, self._classic):
            return await self.report_lost(tenant, run_id, min_age=SETTLING_TIME)
        return record

    async def list(
        self, tenant: str, run_filter: RunFilter, page_size: int, page_token: str
    ) -> tuple[list[RunRecord], str]:
        return await asyncio.to_thread(
            self.ctx.index.list_runs, tenant, run_filter, page_size, page_token
        )

    # -- lost runs -----------------------------------------------------------------------------

    async def report_lost(self, tenant: str, run_id: str, min_age: float = 0.0) -> RunRecord:
        """Checks whether a classic run's executor is gone; if so, records how the run ended.

        Idempotent: the check is "does any process answer the run's control subject", the
        published failure is fenced (see agentrun.run_events), and the row update is the same
        however often it is made. A run younger than ``min_age`` seconds is only recorded as
        lost if its stream already says so: its executor may not have subscribed yet.
        """
        record = await self.get(tenant, run_id)
        if not _active_elsewhere(record, self._classic) or not await self._nobody_holds(run_id):
            return record
        _, terminal = await last_published(self.ctx.link, run_id)
        if terminal is None or not is_terminal(terminal):
            if time.time() - record.created_at < min_age:
                return record
            terminal = await append_executor_lost(self.ctx.link, run_id, tenant)
        await asyncio.to_thread(self.ctx.index.update, run_id, **_ended_fields(terminal))
        return await self.get(tenant, run_id)

    async def _nobody_holds(self, run_id: str) -> bool:
        try:
            await self.ctx.link.nc.request(
                control_subject(run_id), b'{"op": "ping"}', timeout=CONTROL_TIMEOUT
            )
        except nats.errors.NoRespondersError:
            return True
        except (nats.errors.Error, TimeoutError, Unavailable):
            return False  # cannot tell: assume alive, look again later
        return False

    async def reconcile_forever(self) -> None:
        """Periodically records the classic runs whose executor died (run by every executor)."""
        while True:
            await asyncio.sleep(self.ctx.settings.reconcile_interval)
            try:
                await self.reconcile_once()
            except AgentrunError as exc:
                log.warning("reconciler: %s", exc.message)

    async def reconcile_once(self) -> None:
        if not self.ctx.link.is_connected:
            return
        for record in await asyncio.to_thread(self.ctx.index.active_classic_runs):
            if record.run_id not in self._classic:
                await self.report_lost(record.tenant, record.run_id, SETTLING_TIME)

    def start_reconciler(self) -> None:
        self._reconciler = asyncio.create_task(self.reconcile_forever(), name="reconciler")

    async def shutdown(self, grace: float) -> None:
        """Lets running classic runs finish for ``grace`` seconds, then fails the rest."""
        if self._reconciler is not None:
            self._reconciler.cancel()
        runs = list(self._classic.values())
        if runs:
            _, pending = await asyncio.wait([r.task for r in runs], timeout=grace)
            for classic in runs:
                if classic.task in pending:
                    classic.abandon()
            if pending:
                await asyncio.wait(pending, timeout=5.0)


def _active_elsewhere(record: RunRecord, local: dict[str, ClassicRun]) -> bool:
    """A classic run, not ended, not held by this executor."""
    return (
        record.execution_mode == "classic"
        and record.status not in TERMINAL_STATUSES
        and record.run_id not in local
    )


def _ended_fields(terminal: run_pb2.RunEvent | None) -> dict[str, Any]:
    """The run-list fields of a run that ended with ``terminal`` (None: it was lost)."""
    if terminal is not None and terminal.HasField("run_completed"):
        return {"status": "completed", "output": terminal.run_completed.output}
    if terminal is not None and terminal.HasField("run_cancelled"):
        return {"status": "cancelled", "pending_approvals": []}
    error = terminal.run_failed.error if terminal is not None else None
    if error is None or error.code == run_pb2.RUN_ERROR_CODE_EXECUTOR_LOST:
        return {
            "status": "failed",
            "error_code": "EXECUTOR_LOST",
            "error_message": "the executor running this classic run went away; the run is lost",
            "error_retryable": True,
            "pending_approvals": [],
        }
    return {
        "status": "failed",
        "error_code": run_pb2.RunErrorCode.Name(error.code).removeprefix("RUN_ERROR_CODE_"),
        "error_message": error.message,
        "error_retryable": error.retryable,
        "pending_approvals": [],
    }


def _check_repeated_decision(record: RunRecord, tool_call_id: str, approved: bool) -> None:
    """A decision the run has recorded may be repeated, not changed."""
    if record.decisions[tool_call_id] != approved:
        verdict = "approved" if record.decisions[tool_call_id] else "denied"
        raise FailedPrecondition(
            f"tool call {tool_call_id!r} was already {verdict}; a decision cannot change"
        )


async def _no_history() -> list[Any]:
    return []


def _check_run_id(run_id: str) -> None:
    try:
        uuid.UUID(run_id)
    except ValueError:
        raise InvalidArgument("run_id", "must be a run id (a UUID)") from None
