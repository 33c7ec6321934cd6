"""How a gateway gets a run's events to its client: live from an executor, or from JetStream.

- ``ExecutedRun``: a run started on an executor over one ExecuteRun call; its events stream
  straight through. If the call breaks before the run's end, the client continues from
  JetStream without a gap, after the last event it saw.
- ``Relay.watch``: a run's events after a sequence, from JetStream: the stored ones, then live.
  While it waits it checks every ``liveness_interval`` that some process answers for a classic
  run; when none does, it asks an executor to settle the run (an executor decides whether the
  run is lost and appends its end to the stream; see executor.lost_runs), and reads on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import grpc
import nats.errors
from nats.js.api import DeliverPolicy

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from agentrun.v1 import executor_service_pb2 as pb
from common.errors import OutOfRange, Unavailable
from common.event_streams import Reassembly, is_terminal, last_published
from common.nats_link import NatsLink
from common.rpc import STATUS_DETAILS_KEY, metadata_pairs
from gateway.executors import WarmCalls
from gateway.run_modes import RunModes

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

    from agentrun.v1.executor_service_pb2_grpc import ExecutorServiceAsyncStub

    Subscription = JetStreamContext.PushSubscription

log = logging.getLogger(__name__)

TERMINAL_STATUSES = frozenset(
    {run_pb2.RUN_STATUS_COMPLETED, run_pb2.RUN_STATUS_FAILED, run_pb2.RUN_STATUS_CANCELLED}
)
RELAYED_TAIL = 1024
# Seconds between JetStream's heartbeats on an idle watch. A watch reads through an ephemeral
# consumer that lives on one NATS server; when that server dies, the client notices the missing
# heartbeats (after two) and recreates the consumer from the next sequence on a live server.
# Without heartbeats nothing notices, and the watch stalls until JetStream itself moves the
# consumer (15 s and more after a node of a cluster was killed).
WATCH_HEARTBEAT = 1.0
REPORT_TIMEOUT = 10.0
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


class Relay:
    """A gateway's access to runs' event streams (see module docstring)."""

    def __init__(
        self,
        link: NatsLink,
        executors: ExecutorServiceAsyncStub,
        *,
        liveness_interval: float,
        event_retention: float,
    ) -> None:
        self.link = link
        self.executors = executors
        self.calls = WarmCalls(executors)
        self.liveness_interval = liveness_interval
        self.event_retention = event_retention
        self.modes = RunModes()
        self._background: set[asyncio.Task[None]] = set()

    def execute(
        self, tenant: str, run_id: str, request: run_service_pb2.StreamRunRequest
    ) -> ExecutedRun:
        return ExecutedRun(self, tenant, run_id, request)

    async def get_run(self, tenant: str, run_id: str) -> run_pb2.Run:
        response = await self.executors.GetRun(
            pb.ExecutorServiceGetRunRequest(
                tenant=tenant, request=run_service_pb2.GetRunRequest(run_id=run_id)
            )
        )
        return response.response.run

    def subscribe(self, run_id: str) -> asyncio.Task[Subscription]:
        """Starts subscribing to the run's events, all of them (the subscription reads them in
        order, from the first; ``watch`` takes it, or ``drop`` it)."""
        return asyncio.ensure_future(
            self.link.js.subscribe(
                self.link.names.events_subject(run_id),
                stream=self.link.names.events_stream,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
                idle_heartbeat=WATCH_HEARTBEAT,
            )
        )

    def drop(self, subscribing: asyncio.Task[Subscription]) -> None:
        """Ends a subscription that ``watch`` did not take (or stops it being made)."""

        async def unsubscribe() -> None:
            with contextlib.suppress(Exception):
                await (await subscribing).unsubscribe()

        task = asyncio.create_task(unsubscribe())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def watch(
        self,
        tenant: str,
        run_id: str,
        after_sequence: int,
        *,
        run: run_pb2.Run | None = None,
        relayed: list[run_pb2.RunEvent] | None = None,
        probe_first: bool = False,
        subscribing: asyncio.Task[Subscription] | None = None,
    ) -> AsyncIterator[list[run_pb2.RunEvent]]:
        """The run's events after ``after_sequence`` until its terminal event, in batches
        (through ``subscribing``, a ``subscribe`` begun earlier, if given)."""
        sub = None
        try:
            if run is None:
                run = await self.get_run(tenant, run_id)
            if after_sequence or run.status in TERMINAL_STATUSES:
                # Nothing may come after what the watcher asks for (it ended, or expired): look.
                # (From sequence 0 on a running run, everything comes: no need to look first.)
                _, last = await last_published(self.link, run_id)
                ended_long_ago = time.time() - run.update_time.seconds > self.event_retention
                if last is None and run.status in TERMINAL_STATUSES and ended_long_ago:
                    raise OutOfRange(f"the events of run {run_id} are no longer retained")
                if last is not None and is_terminal(last) and last.sequence <= after_sequence:
                    return
            sub = await (subscribing or self.subscribe(run_id))
        finally:
            if sub is None and subscribing is not None:
                self.drop(subscribing)
        assert sub is not None
        classic = run.execution_mode == agent_pb2.EXECUTION_MODE_CLASSIC
        seen = after_sequence
        reassembly = Reassembly()  # the subscription reads every message, from the first
        check_at = time.monotonic() if probe_first else time.monotonic() + self.liveness_interval
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=max(check_at - time.monotonic(), 0.001))
                except nats.errors.TimeoutError:
                    if classic:
                        await self._check_holder(tenant, run_id, relayed)
                    check_at = time.monotonic() + self.liveness_interval
                    continue
                events = reassembly.add(msg.data, msg.headers)
                batch = [e for e in events if e.sequence > seen]
                if not batch:
                    continue
                if seen and batch[0].sequence != seen + 1:
                    log.warning(
                        "run %s: events %d..%d missing", run_id, seen + 1, batch[0].sequence - 1
                    )
                seen = batch[-1].sequence
                yield batch
                if is_terminal(batch[-1]):
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _check_holder(
        self, tenant: str, run_id: str, relayed: list[run_pb2.RunEvent] | None
    ) -> None:
        """If no process seems to hold the run, asks an executor to settle it (an executor
        decides whether the run is lost and records its end; the watch then delivers it)."""
        if await self.link.holder_answers(run_id) is not False:
            return
        try:
            await self.executors.ReportRunLost(
                pb.ReportRunLostRequest(tenant=tenant, run_id=run_id, relayed=relayed or ()),
                timeout=REPORT_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            # No executor to ask now: the executors' reconciler settles the run once one is.
            log.warning("run %s: cannot report its executor gone: %s", run_id, exc.code().name)


class AttachedRun:
    """Steers a run that this gateway does not stream from its executor: through any executor."""

    def __init__(self, relay: Relay, tenant: str, run_id: str) -> None:
        self._executors = relay.executors
        self.tenant = tenant
        self.run_id = run_id

    async def approve(self, decision: run_service_pb2.ToolApprovalDecision) -> None:
        await self._executors.SubmitToolApproval(
            pb.ExecutorServiceSubmitToolApprovalRequest(
                tenant=self.tenant,
                request=run_service_pb2.SubmitToolApprovalRequest(
                    run_id=self.run_id, decision=decision
                ),
            )
        )

    async def cancel(self, reason: str) -> None:
        await self._executors.CancelRun(
            pb.ExecutorServiceCancelRunRequest(
                tenant=self.tenant,
                request=run_service_pb2.CancelRunRequest(run_id=self.run_id, reason=reason),
            )
        )


class ExecutedRun:
    """A run started on an executor over one ExecuteRun call (see module docstring)."""

    def __init__(
        self,
        relay: Relay,
        tenant: str,
        run_id: str,
        request: run_service_pb2.StreamRunRequest,
    ) -> None:
        self._relay = relay
        self.tenant = tenant
        self.run_id = run_id
        self._request = request
        self._call = relay.calls.take()
        self._detached = False  # the events come from JetStream, not from the call
        self._elsewhere = AttachedRun(relay, tenant, run_id)

    async def approve(self, decision: run_service_pb2.ToolApprovalDecision) -> None:
        if self._detached:
            await self._elsewhere.approve(decision)
        else:
            await self._call.write(pb.ExecuteRunRequest(tool_approval=decision))

    async def cancel(self, reason: str) -> None:
        if self._detached:
            await self._elsewhere.cancel(reason)
        else:
            await self._call.write(
                pb.ExecuteRunRequest(cancel=run_service_pb2.ConverseCancel(reason=reason))
            )

    async def events(self) -> AsyncIterator[list[run_pb2.RunEvent]]:
        start = pb.ExecuteRunStart(tenant=self.tenant, run_id=self.run_id, request=self._request)
        relayed: deque[run_pb2.RunEvent] = deque(maxlen=RELAYED_TAIL)
        modes = self._relay.modes
        early: asyncio.Task[Subscription] | None = None
        try:
            await self._start(start)
            if modes.probably_durable(self.tenant, self._request):
                # Subscribed to while the executor stores the run (see gateway.run_modes).
                early = self._relay.subscribe(self.run_id)
            while (read := await self._call.read()) is not EOF:
                response = cast(pb.ExecuteRunResponse, read)
                if response.HasField("relayed_run"):
                    run = response.relayed_run
                    durable = run.execution_mode == agent_pb2.EXECUTION_MODE_DURABLE
                    modes.saw(self.tenant, self._request, durable)
                    self._detached = True
                    # The run is stored (the executor says so only then): from here on its
                    # events come from JetStream, whatever becomes of this call. (``early`` is
                    # dropped when this ends, whatever the watch did with it.)
                    watch = self._relay.watch(
                        self.tenant, self.run_id, 0, run=run, subscribing=early
                    )
                    async for batch in watch:
                        yield batch
                    return
                if not relayed:
                    modes.saw(self.tenant, self._request, False)
                    if early is not None:
                        self._relay.drop(early)
                        early = None
                relayed.extend(response.events)
                yield list(response.events)
                self._relay.calls.refill()
        except grpc.aio.AioRpcError as exc:
            if not _executor_went_away(exc):
                raise
            if not relayed:
                raise Unavailable(
                    "executor",
                    "the executor went away before the run started: start it again with the "
                    "same request_id (the repeat does not run it twice)",
                ) from exc
            if is_terminal(relayed[-1]):
                return
            log.warning("run %s: lost the executor stream (%s)", self.run_id, exc.code().name)
            async for batch in self._continue_after_loss(list(relayed)):
                yield batch
        finally:
            self._call.cancel()
            if early is not None:
                self._relay.drop(early)

    async def _start(self, start: pb.ExecuteRunStart) -> None:
        """Sends the start; a call that broke before it (its executor went away while the call
        waited, ready, in the pool) is replaced once by a fresh one. Starting twice is safe: the
        run id is the same, and a start is idempotent by run id."""
        try:
            await self._call.write(pb.ExecuteRunRequest(start=start))
            return
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            self._call.cancel()
        self._call = self._relay.calls.open()
        await self._call.write(pb.ExecuteRunRequest(start=start))

    async def _continue_after_loss(
        self, relayed: list[run_pb2.RunEvent]
    ) -> AsyncIterator[list[run_pb2.RunEvent]]:
        self._detached = True
        last = relayed[-1].sequence
        try:
            async for batch in self._relay.watch(
                self.tenant,
                self.run_id,
                last,
                relayed=relayed,
                probe_first=True,
                run=_classic_placeholder(self.run_id),
            ):
                yield batch
        except Unavailable as exc:
            raise Unavailable(
                "nats",
                f"the stream from run {self.run_id}'s executor broke and NATS is unavailable: "
                f"resume with WatchRun(after_sequence={last})",
            ) from exc


def _classic_placeholder(run_id: str) -> run_pb2.Run:
    """What the watch needs to know of a run this gateway was streaming: it is classic and
    still running (no need to ask an executor, which may be the one that is gone)."""
    return run_pb2.Run(
        id=run_id,
        execution_mode=agent_pb2.EXECUTION_MODE_CLASSIC,
        status=run_pb2.RUN_STATUS_RUNNING,
    )


def _executor_went_away(exc: grpc.aio.AioRpcError) -> bool:
    """Whether an error ended the call because the executor (or the path to it) failed,
    rather than being a status the executor chose to send."""
    deliberate = any(k == STATUS_DETAILS_KEY for k, _ in metadata_pairs(exc))
    return not deliberate and exc.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    )
