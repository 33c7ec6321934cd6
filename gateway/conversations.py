"""StreamRun, Converse and WatchRun: a run's events carried from an executor to the client,
over the executors' internal ExecuteRun, with a Converse client's approvals and cancellation
going the other way on the same call.

A start goes on an ExecuteRun call opened ahead of need (opening one costs about a round
trip). The executor streams the run's events, whatever the run's mode. If the call breaks
because its executor went away, the gateway resumes the stream on another executor after the
last event its client got, passing the events it relayed (the executor decides whether the run
is lost and records how it ended: the gateway never does); a start that broke before its
first event is answered UNAVAILABLE (the repeat, with the same request_id, starts it once).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind

from agentrun.internal.v1 import executor_service_pb2 as pb
from agentrun.v1 import run_pb2
from agentrun.v1 import run_service_pb2 as runs
from common import tracing
from common.errors import InvalidArgument, Unavailable
from common.event_streams import is_terminal
from common.rpc import STATUS_DETAILS_KEY, metadata_pairs, stream_errors
from common.side_by_side import ReportError, side_by_side
from gateway.auth import Authenticate
from gateway.executors import ExecuteRunCall, WarmCalls

Context = grpc.aio.ServicerContext[Any, Any]
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]

EXECUTE_RUN_SPAN = "agentrun.internal.v1.ExecutorService/ExecuteRun"
RELAYED_TAIL = 1024  # the last events relayed, handed to the executor that resumes a stream
RESUMES = 3  # resumptions of one stream on other executors before the client is told
# Seconds a resumption waits for an executor to be reachable (all may be restarting).
RESUME_WAIT = 30.0


class Conversations:
    """StreamRun and Converse of a gateway (see module docstring)."""

    def __init__(self, calls: WarmCalls, authenticate: Authenticate) -> None:
        self.calls = calls
        self.authenticate = authenticate

    @stream_errors
    async def stream_run(
        self, request: runs.StreamRunRequest, context: Context
    ) -> AsyncIterator[runs.StreamRunResponse]:
        tenant = self.authenticate(context)
        carried = CarriedRun(self.calls, pb.ExecuteRunRequest(start=_start(tenant, request)))
        async for batch in carried.events():
            yield runs.StreamRunResponse(events=batch)

    @stream_errors
    async def watch_run(
        self, request: runs.WatchRunRequest, context: Context
    ) -> AsyncIterator[runs.WatchRunResponse]:
        tenant = self.authenticate(context)
        resume = pb.ExecuteRunResume(
            tenant=tenant, run_id=request.run_id, after_sequence=request.after_sequence
        )
        carried = CarriedRun(self.calls, pb.ExecuteRunRequest(resume=resume))
        async for batch in carried.events():
            yield runs.WatchRunResponse(events=batch)

    @stream_errors
    async def converse(
        self, request_iterator: AsyncIterator[runs.ConverseRequest], context: Context
    ) -> AsyncIterator[runs.ConverseResponse]:
        tenant = self.authenticate(context)
        first = await anext(aiter(request_iterator), None)
        if first is not None and first.HasField("start"):
            opening = pb.ExecuteRunRequest(start=_start(tenant, first.start))
        elif first is not None and first.HasField("attach"):
            if first.attach.after_sequence < 0:
                raise InvalidArgument("attach.after_sequence", "must not be negative")
            resume = pb.ExecuteRunResume(
                tenant=tenant,
                run_id=first.attach.run_id,
                after_sequence=first.attach.after_sequence,
            )
            opening = pb.ExecuteRunRequest(resume=resume)
        else:
            raise InvalidArgument("message", "the first message must be start or attach")
        carried = CarriedRun(self.calls, opening)

        async def steer(report: ReportError) -> None:
            try:
                async for request in request_iterator:
                    await carried.steer(request)
            except Exception as exc:
                report(exc)

        async for batch in side_by_side(carried.events(), steer):
            yield runs.ConverseResponse(events=batch)


def _start(tenant: str, request: runs.StreamRunRequest) -> pb.ExecuteRunStart:
    return pb.ExecuteRunStart(tenant=tenant, request=request)


class CarriedRun:
    """One run's stream over ExecuteRun calls, resumed on another executor when one breaks."""

    def __init__(self, calls: WarmCalls, opening: pb.ExecuteRunRequest) -> None:
        self._calls = calls
        self._opening = opening
        self._call: ExecuteRunCall | None = None
        self._tenant = opening.start.tenant or opening.resume.tenant
        self._run_id = opening.resume.run_id
        self._seen = opening.resume.after_sequence
        self._relayed: deque[run_pb2.RunEvent] = deque(maxlen=RELAYED_TAIL)
        # The call's span on this gateway (current while the carrying call runs), and a client
        # span per ExecuteRun call, whose context the executor gets in the first message.
        self._trace_parent = otel_context.get_current() if tracing.enabled() else None
        self._call_span: Span = INVALID_SPAN
        self._calls_made = 0

    async def steer(self, request: runs.ConverseRequest) -> None:
        """Sends an approval, a tool result or a cancellation on the current call."""
        if request.HasField("tool_approval"):
            if not request.tool_approval.tool_call_id:
                raise InvalidArgument("tool_approval.tool_call_id", "is required")
            message = pb.ExecuteRunRequest(tool_approval=request.tool_approval)
        elif request.HasField("tool_result"):
            if not request.tool_result.tool_call_id:
                raise InvalidArgument("tool_result.tool_call_id", "is required")
            message = pb.ExecuteRunRequest(tool_result=request.tool_result)
        elif request.HasField("cancel"):
            message = pb.ExecuteRunRequest(cancel=request.cancel)
        else:
            raise InvalidArgument("message", "start and attach may only be the first message")
        if self._call is None or self._call.done():
            raise Unavailable("executor", "the run's stream is being resumed: send it again")
        try:
            await self._call.write(message)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            raise Unavailable("executor", "the run's stream broke: send it again") from None

    async def events(self) -> AsyncIterator[list[run_pb2.RunEvent]]:
        try:
            if self._opening.HasField("start"):
                await self._open(self._opening)
            else:
                await self._reach(self._opening)
            for resumption in range(RESUMES + 1):
                try:
                    async for batch in self._read():
                        yield batch
                    return
                except grpc.aio.AioRpcError as exc:
                    if not _executor_went_away(exc):
                        raise
                    if not self._run_id:
                        raise Unavailable(
                            "executor",
                            "the executor went away before the run started: start it again "
                            "with the same request_id (the repeat does not run it twice)",
                        ) from exc
                    if resumption == RESUMES:
                        raise Unavailable(
                            "executor",
                            f"the stream from run {self._run_id}'s executor broke: resume "
                            f"with WatchRun(after_sequence={self._seen})",
                        ) from exc
                    await self._resume()
        finally:
            if self._call is not None:
                self._call.cancel()
            self._end_call_span()

    async def _read(self) -> AsyncIterator[list[run_pb2.RunEvent]]:
        assert self._call is not None
        while (read := await self._call.read()) is not EOF:
            events = list(cast(pb.ExecuteRunResponse, read).events)
            if not events:
                continue
            if not self._run_id:
                self._calls.refill()  # off the first event's path
            self._run_id = events[0].run_id
            self._seen = events[-1].sequence
            self._relayed.extend(events)
            yield events
            if is_terminal(events[-1]):
                return

    def _resumption(self) -> pb.ExecuteRunRequest:
        resume = pb.ExecuteRunResume(
            tenant=self._tenant,
            run_id=self._run_id,
            after_sequence=self._seen,
            relayed=self._relayed,
        )
        return pb.ExecuteRunRequest(resume=resume)

    async def _resume(self) -> None:
        """Resumes the stream after the last event relayed, on whichever executor is reachable
        first."""
        await self._reach(self._resumption())

    async def _reach(self, first: pb.ExecuteRunRequest) -> None:
        """Opens a call that waits for an executor to be reachable (for up to RESUME_WAIT
        seconds: all may be restarting), and sends its first message."""
        if self._call is not None:
            self._call.cancel()
        self._end_call_span()
        self._call = self._calls.open(wait_for_ready=True)
        try:
            async with asyncio.timeout(RESUME_WAIT):
                await self._call.wait_for_connection()
        except TimeoutError:
            raise Unavailable(
                "executor",
                f"no executor reachable to stream run {self._run_id} from: resume with "
                f"WatchRun(after_sequence={self._seen})",
            ) from None
        except grpc.aio.AioRpcError:
            return  # it ended already: reading it tells how (see _send)
        await _send(self._call, self._traced(first))

    async def _open(self, first: pb.ExecuteRunRequest) -> None:
        """Sends a start on a call opened ahead of need. One that broke while it waited in the
        pool (its executor went away) is replaced once by a fresh one: it never delivered the
        start, so starting on the fresh one starts the run once."""
        self._call = self._calls.take()
        first = self._traced(first)
        if await _send(self._call, first):
            return
        self._call.cancel()
        self._call = self._calls.open()
        await _send(self._call, first)

    def _traced(self, first: pb.ExecuteRunRequest) -> pb.ExecuteRunRequest:
        """``first`` with the trace context of a new client span for the call it opens (as it
        is when tracing is off)."""
        if self._trace_parent is None:
            return first
        self._end_call_span()
        self._calls_made += 1
        self._call_span = tracing.start_span(
            EXECUTE_RUN_SPAN,
            kind=SpanKind.CLIENT,
            parent=self._trace_parent,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "agentrun.internal.v1.ExecutorService",
                "rpc.method": "ExecuteRun",
                "agentrun.run.id": self._run_id,
                "agentrun.stream.call": self._calls_made,
                "agentrun.stream.after_sequence": self._seen,
            },
        )
        traced = pb.ExecuteRunRequest()
        traced.CopyFrom(first)
        opening = traced.start if traced.HasField("start") else traced.resume
        opening.trace_context.update(tracing.carrier(self._call_span))
        return traced

    def _end_call_span(self) -> None:
        if self._call_span.is_recording():
            if self._run_id:
                self._call_span.set_attribute("agentrun.run.id", self._run_id)
            self._call_span.set_attribute("agentrun.stream.last_sequence", self._seen)
            self._call_span.end()


async def _send(call: ExecuteRunCall, message: pb.ExecuteRunRequest) -> bool:
    """Writes ``message`` on ``call``; False if the call has ended. Its end is not raised here:
    reading the call gives its status, which tells an executor's answer from an executor that
    went away. (A write racing the call's end fails inside gRPC, which then ends the call with
    INTERNAL "Internal error from Core"; raised from here, that status reached the client.)"""
    try:
        await call.write(message)
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        return False
    return True


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
