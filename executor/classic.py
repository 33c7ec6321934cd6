"""Classic runs: one in-process agent loop per run, held in this executor's memory.

A ClassicRun owns its loop task, its event stream and its JetStream publisher. It outlives the
RPC that started it (disconnecting is not cancelling), answers control requests for its run on
NATS (approvals and cancellation from any gateway, liveness probes), and is the RunHost of its
loop: nothing is committed per step, approvals wait in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from common.errors import AgentrunError, FailedPrecondition, NotFound
from eventstore.run import Run
from eventstore.run_steps import AwaitApprovals
from executor.agent_loop import AgentLoop
from executor.context import ExecutorContext
from executor.control import answering
from executor.event_publisher import RunPublisher
from executor.lost_runs import end_event_of
from executor.run_stream import RunStream
from executor.translation import record_of, run_to_proto

log = logging.getLogger(__name__)


class EndedElsewhere(Exception):
    """The run's row already records an end: it was settled as lost while it ran here."""


class ClassicRun:
    """A classic run in this executor's memory (see module docstring)."""

    def __init__(
        self, ctx: ExecutorContext, run: Run, *, on_done: Callable[[ClassicRun], None]
    ) -> None:
        self.ctx = ctx
        self.run = run
        self.publisher = RunPublisher(
            ctx.link, run.run_id, run.tenant, on_fenced=self._declared_lost
        )
        self.stream = RunStream(
            run.run_id, on_taken=self.publisher.enqueue, pace=self.publisher.pace
        )
        self.loop = AgentLoop(run, self.stream, self, ctx.models, ctx.settings.data_dir)
        self._decided = asyncio.Event()
        self._cancel_reason: str | None = None
        self._shutting_down = False
        self._row_lock = asyncio.Lock()
        self._on_done = on_done
        self.started = run_to_proto(run, ctx.executor_id)
        self.stream.run_started(self.started)
        self.task = asyncio.create_task(self._main(), name=f"classic-{run.run_id}")

    @property
    def run_id(self) -> str:
        return self.run.run_id

    async def start_control(self) -> None:
        await self.ctx.link.subscribe_control(
            self.run_id, answering(self._control, self.ctx.executor_id)
        )

    # -- steering ------------------------------------------------------------------------------

    def decide(self, tenant: str, tool_call_id: str, approved: bool, reason: str) -> None:
        """Records a decision; repeating the recorded decision is accepted and changes nothing."""
        self._check_tenant(tenant)
        if self.run.check_decision(tool_call_id, approved):
            self.run.decide(tool_call_id, approved, reason, False)
            self.loop.emit_recorded(self.run.collect_events())
            self._decided.set()

    def cancel(self, tenant: str, reason: str) -> None:
        self._check_tenant(tenant)
        if self.run.is_finished or self._cancel_reason is not None:
            raise FailedPrecondition(f"run {self.run_id} has already ended ({self.run.status})")
        self._cancel_reason = reason
        self.task.cancel()

    def abandon(self) -> None:
        """Ends the run because this executor is shutting down: it fails with EXECUTOR_LOST."""
        if not self.run.is_finished:
            self._shutting_down = True
            self.task.cancel()

    def _declared_lost(self) -> None:
        """Another process appended EXECUTOR_LOST to the run's stream (this executor was out of
        its reach): the run is over for everyone, so it stops here too, failed the same way."""
        self.abandon()

    def _check_tenant(self, tenant: str) -> None:
        if tenant != self.run.tenant:
            raise NotFound("run", self.run_id)

    # -- the run's life ------------------------------------------------------------------------

    async def _main(self) -> None:
        try:
            try:
                await self.loop.drive()
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
                if self._cancel_reason is not None:
                    await self.loop.cancel(self._cancel_reason)
                elif self._shutting_down:
                    await self.loop.fail(
                        "EXECUTOR_LOST", "the executor running the run shut down", retryable=True
                    )
                else:
                    raise
            except EndedElsewhere:
                await self._end_as_recorded()
            except Exception as exc:
                log.exception("run %s failed unexpectedly", self.run_id)
                if not self.run.is_finished:
                    await self.loop.fail(
                        "INTERNAL", f"internal error: {type(exc).__name__}", retryable=True
                    )
            await self.stream.wait_ended()
            # The run stays held (its control subject answers) until its stream is published
            # whole, however long NATS is away: otherwise it would be settled as lost.
            await self.publisher.close(None)
        finally:
            await self.stream.close()
            await self.ctx.link.unsubscribe_control(self.run_id)
            self._on_done(self)

    async def _end_as_recorded(self) -> None:
        """Ends the stream as the run's row says the run ended (settled as lost meanwhile)."""
        record = await asyncio.to_thread(self.ctx.run_list.get, self.run.tenant, self.run_id)
        log.warning("run %s: settled as %s while it ran here", self.run_id, record.status)
        self.stream.end(end_event_of(record))

    def _control(self, op: str, request: dict[str, Any]) -> None:
        if op == "decide":
            self.decide(
                str(request["tenant"]),
                str(request["tool_call_id"]),
                bool(request["approved"]),
                str(request.get("reason", "")),
            )
        elif op == "cancel":
            self.cancel(str(request["tenant"]), str(request.get("reason", "")))
        else:
            raise FailedPrecondition(f"unknown control operation {op!r}")

    # -- RunHost ---------------------------------------------------------------------------------

    def attempt(self, step_index: int) -> int:
        return 1

    async def commit(self, run: Run) -> None:
        run.collect_events()  # classic runs keep no per-step history

    async def status_changed(self, run: Run) -> None:
        await self.update_index(
            status=run.status,
            pending_approvals=run.awaiting_decision(),
            decisions={call_id: d["approved"] for call_id, d in run.decisions.items()},
        )

    async def wait_for_decisions(self, run: Run, step: AwaitApprovals) -> bool:
        while undecided := run.awaiting_decision():
            now = time.time()
            expired = [c for c in undecided if run.approvals_required[c["id"]] <= now]
            for call in expired:
                run.decide(call["id"], False, "no decision before the approval timeout", True)
            self.loop.emit_recorded(run.collect_events())
            if expired:
                continue
            deadline = min(run.approvals_required[c["id"]] for c in undecided)
            self._decided.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._decided.wait(), max(deadline - now, 0.0))
        await self.status_changed(run)
        return True

    async def finished(self, run: Run) -> None:
        """Records the ended run before its terminal event goes out: a client that sees the
        end and asks again (GetRun, the next run of the conversation) sees it recorded.

        Raises EndedElsewhere if the run's row was settled as lost meanwhile (this executor
        was out of reach for a while): the row decides how the run ended (see
        executor.lost_runs)."""
        record = record_of(run, self.ctx.executor_id)
        fields = {
            k: v for k, v in vars(record).items() if k not in ("run_id", "tenant", "created_at")
        }
        work = [self.update_index(**fields)]
        if run.status == "completed":
            work.append(self._record_turn(run))
        if not (await asyncio.gather(*work))[0]:
            raise EndedElsewhere

    async def _record_turn(self, run: Run) -> bool:
        try:
            await asyncio.to_thread(
                self.ctx.conversations.record_turn,
                run.tenant,
                run.conversation_id,
                run.run_id,
                run.messages,
                probably_new=not run.history,
            )
        except AgentrunError as exc:
            log.error("run %s: could not record its turn: %s", self.run_id, exc.message)
        return True

    async def update_index(self, **fields: object) -> bool:
        """Updates the run's row unless it records an end already (False then); updates of one
        run apply in the order they were made. A row that cannot be written now is left as it
        is: once this executor lets the run go, whoever settles it takes the end from its
        stream (see executor.lost_runs)."""
        async with self._row_lock:
            try:
                return await asyncio.to_thread(
                    self.ctx.run_list.update_active, self.run_id, **fields
                )
            except AgentrunError as exc:
                log.error("run %s: could not update the run list: %s", self.run_id, exc.message)
                return True
