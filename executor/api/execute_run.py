"""agentrun.internal.v1.ExecutorService.ExecuteRun: a run's events for a gateway, with the
run's steering on the same stream.

A new run that runs here live (classic) streams straight from its session: events taken while
the previous message was being written merge into the next ("flush when the previous write
completes"). Any other run (durable, a repeated start, a resumed stream) streams from its
published stream (executor.watching). Approvals, tool results and cancellation that follow on
the call go through executor.steering, wherever the run is held; a refused one ends the call
with its error.

The first message carries the gateway's trace context (the call was opened before the run was
known): a start is the span ``start run`` in the caller's trace, and the run's spans follow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry.trace import SpanKind

from agentrun.internal.v1 import executor_service_pb2 as pb
from agentrun.internal.v1 import executor_service_pb2_grpc
from agentrun.v1 import run_pb2
from common import tracing
from common.background import Background
from common.errors import AgentrunError, InvalidArgument, Unauthenticated
from common.event_streams import is_terminal
from common.rpc import stream_errors
from common.side_by_side import ReportError, side_by_side
from eventstore.run_commands import Cancel, Command
from executor.api.run_service import decide_of, result_of, spec_of
from executor.modes import Started
from executor.runs import Runs, checked_run_id
from executor.session.session import RunSession
from executor.steering import Steering
from executor.watching import Watching

Context = grpc.aio.ServicerContext[Any, Any]
Requests = AsyncIterator[pb.ExecuteRunRequest]
Batches = AsyncIterator[list[run_pb2.RunEvent]]


class ExecutorService(executor_service_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, runs: Runs, steering: Steering, watching: Watching) -> None:
        self.runs = runs
        self.steering = steering
        self.watching = watching
        self._cancelling = Background()

    @stream_errors
    async def ExecuteRun(
        self, request_iterator: Requests, context: Context
    ) -> AsyncIterator[pb.ExecuteRunResponse]:
        first = await anext(aiter(request_iterator), None)
        cancel_on_disconnect = False
        if first is not None and first.HasField("start"):
            tenant = _tenant(first.start.tenant)
            spec = spec_of(tenant, first.start.request)
            with tracing.span(
                "start run",
                kind=SpanKind.SERVER,
                parent=tracing.parent_from(first.start.trace_context),
                attributes={"agentrun.agent.id": spec.agent_id, "agentrun.tenant": tenant},
            ) as starting:
                started = await self.runs.start(spec, watching=self.watching)
                starting.set_attribute("agentrun.run.id", started.record.run_id)
                starting.set_attribute("agentrun.run.mode", started.record.execution_mode)
            run_id = started.record.run_id
            if started.session is not None:
                live = self._live(started.session, request_iterator, spec.cancel_on_disconnect)
                async for batch in live:
                    yield pb.ExecuteRunResponse(events=batch)
                return
            events = (
                self._held_here_or_published(started, tenant, run_id)
                if started.here is not None
                else self.watching.watch(tenant, run_id, 0, record=started.record)
            )
            cancel_on_disconnect = spec.cancel_on_disconnect
        elif first is not None and first.HasField("resume"):
            resume = first.resume
            tracing.carry_on(tracing.parent_from(resume.trace_context))
            tenant = _tenant(resume.tenant)
            run_id = checked_run_id(resume.run_id, "resume.run_id")
            if resume.after_sequence < 0:
                raise InvalidArgument("resume.after_sequence", "must not be negative")
            events = self.watching.watch(
                tenant,
                run_id,
                resume.after_sequence,
                relayed=resume.relayed,
                probe_first=bool(resume.relayed),
            )
        else:
            raise InvalidArgument("message", "the first message must start or resume a run")
        steering = functools.partial(self._steer, request_iterator, tenant, run_id)
        ended = False
        try:
            async for batch in side_by_side(events, steering):
                ended = is_terminal(batch[-1])
                yield pb.ExecuteRunResponse(events=batch)
        finally:
            if cancel_on_disconnect and not ended:
                self._cancel_later(tenant, run_id)

    async def _live(
        self, session: RunSession, requests: Requests, cancel_on_disconnect: bool
    ) -> Batches:
        stream = session.stream
        if not stream.attach():
            raise InvalidArgument("run_id", "the run is already being streamed")
        # Let the run's loop start before the first write: whatever it emits without waiting
        # (with a fast model, the first tokens) shares the first message with RunStarted.
        await asyncio.sleep(0)
        tenant, run_id = session.run.tenant, session.run_id
        steering = asyncio.create_task(self._steer(requests, tenant, run_id, stream.interrupt))
        try:
            while batch := await stream.next_batch():
                yield batch
        finally:
            stream.detach()
            steering.cancel()
            if cancel_on_disconnect and not stream.ended:
                with contextlib.suppress(Exception):
                    session.cancel("the client disconnected")

    async def _held_here_or_published(self, started: Started, tenant: str, run_id: str) -> Batches:
        """A durable run just queued: if this executor takes it up, its events as its session
        here publishes them (no reading back from NATS); otherwise (something is published to
        the run's subject first: another executor took it up), and after that session lets
        the run go before its end (it suspends, is handed back or taken over), from the run's
        published stream. Either way the client gets exactly the published events."""
        here, published = started.here, started.published
        assert here is not None
        assert published is not None
        try:
            await asyncio.wait((here, published.arrived), return_when=asyncio.FIRST_COMPLETED)
        finally:
            published.close()
            here.cancel()  # (no more waiting, even if the client left meanwhile: no-op if it came)
        seen = 0
        if here.done() and not here.cancelled():
            tap = here.result()
            try:
                while (batch := await tap.next()) is not None:
                    yield batch
                    if is_terminal(batch[-1]):
                        return
                    seen = batch[-1].sequence
            finally:
                tap.close()
        async for batch in self.watching.watch(tenant, run_id, seen, record=started.record):
            yield batch

    def _cancel_later(self, tenant: str, run_id: str) -> None:
        """Cancels a run whose stream ended before it (its start asked for that), off the
        ending call."""

        async def cancel() -> None:
            with contextlib.suppress(AgentrunError):  # it ended meanwhile
                await self.steering.steer(tenant, run_id, Cancel("the client disconnected"))

        self._cancelling.start(cancel())

    async def _steer(
        self,
        requests: Requests,
        tenant: str,
        run_id: str,
        on_error: ReportError,
    ) -> None:
        """Carries out the approvals, tool results and cancellation that follow on the call; the
        first one
        refused goes to ``on_error``."""
        try:
            async for request in requests:
                command = _command_of(request, self.steering.ctx.tools.runtime.max_output_bytes)
                await self.steering.steer(tenant, run_id, command)
        except Exception as exc:
            on_error(exc)


def _tenant(tenant: str) -> str:
    if not tenant:
        raise Unauthenticated("ExecuteRun's first message must name the tenant")
    return tenant


def _command_of(request: pb.ExecuteRunRequest, max_output_bytes: int) -> Command:
    if request.HasField("tool_approval"):
        return decide_of(request.tool_approval)
    if request.HasField("tool_result"):
        return result_of(request.tool_result, max_output_bytes, "tool_result")
    if request.HasField("cancel"):
        return Cancel(request.cancel.reason)
    raise InvalidArgument(
        "message", "only approvals, tool results and cancel may follow start or resume"
    )
