"""agentrun.v1.RunService on an executor, for the tenant its gateway names: every method but
StreamRun, Converse and WatchRun, which gateways carry over the internal ExecuteRun."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from agentrun.v1 import run_service_pb2 as runs
from agentrun.v1 import run_service_pb2_grpc
from common.errors import InvalidArgument, Unimplemented
from common.rpc import stream_errors, tenant_metadata, unary_errors
from eventstore.run_commands import Cancel, Decide, SubmitResult
from eventstore.run_list import RunFilter
from executor.agent_loop import cut_output
from executor.runs import Runs, RunSpec, checked_run_id
from executor.steering import Steering
from executor.translation import (
    HISTORY_BATCH_BYTES,
    STATUSES,
    history_batches,
    mode_of,
    record_to_proto,
    run_to_proto,
)

Context = grpc.aio.ServicerContext[Any, Any]
CARRIED = "gateways carry StreamRun, Converse and WatchRun over agentrun.internal.v1.ExecuteRun"


def spec_of(tenant: str, request: runs.StreamRunRequest | runs.StartRunRequest) -> RunSpec:
    return RunSpec(
        tenant=tenant,
        agent_id=request.agent_id,
        input=request.input,
        request_id=request.request_id,
        conversation_id=request.conversation_id,
        execution_mode=mode_of(request.execution_mode),
        cancel_on_disconnect=getattr(request, "cancel_on_disconnect", False),
    )


def decide_of(decision: runs.ToolApprovalDecision, field: str = "decision") -> Decide:
    if not decision.tool_call_id:
        raise InvalidArgument(f"{field}.tool_call_id", "is required")
    return Decide(
        decision.tool_call_id, decision.approved, decision.reason, decision.edited_arguments_json
    )


def result_of(
    result: runs.ToolResultSubmission, max_output_bytes: int, field: str = "result"
) -> SubmitResult:
    """The command of a client's tool result, cut as any tool's result is."""
    if not result.tool_call_id:
        raise InvalidArgument(f"{field}.tool_call_id", "is required")
    output = cut_output(result.output, max_output_bytes)
    return SubmitResult(result.tool_call_id, output, result.is_error)


class RunService(run_service_pb2_grpc.RunServiceServicer):
    def __init__(self, runs_: Runs, steering: Steering) -> None:
        self.runs = runs_
        self.steering = steering

    @unary_errors
    async def StartRun(
        self, request: runs.StartRunRequest, context: Context
    ) -> runs.StartRunResponse:
        started = await self.runs.start(spec_of(tenant_metadata(context), request))
        if started.session is not None:
            return runs.StartRunResponse(run=run_to_proto(started.session.run))
        if started.queued is not None:
            await asyncio.shield(started.queued)
        return runs.StartRunResponse(run=record_to_proto(started.record))

    @stream_errors
    async def StreamRun(
        self, request: runs.StreamRunRequest, context: Context
    ) -> AsyncIterator[runs.StreamRunResponse]:
        raise Unimplemented(CARRIED)
        yield runs.StreamRunResponse()  # an async generator, like the method it stands for

    @stream_errors
    async def Converse(
        self, request_iterator: AsyncIterator[runs.ConverseRequest], context: Context
    ) -> AsyncIterator[runs.ConverseResponse]:
        raise Unimplemented(CARRIED)
        yield runs.ConverseResponse()

    @unary_errors
    async def SubmitToolApproval(
        self, request: runs.SubmitToolApprovalRequest, context: Context
    ) -> runs.SubmitToolApprovalResponse:
        command = decide_of(request.decision)
        run_id = checked_run_id(request.run_id)
        await self.steering.steer(tenant_metadata(context), run_id, command)
        return runs.SubmitToolApprovalResponse()

    @unary_errors
    async def SubmitToolResult(
        self, request: runs.SubmitToolResultRequest, context: Context
    ) -> runs.SubmitToolResultResponse:
        command = result_of(request.result, self.steering.ctx.tools.runtime.max_output_bytes)
        run_id = checked_run_id(request.run_id)
        await self.steering.steer(tenant_metadata(context), run_id, command)
        return runs.SubmitToolResultResponse()

    @unary_errors
    async def CancelRun(
        self, request: runs.CancelRunRequest, context: Context
    ) -> runs.CancelRunResponse:
        run_id = checked_run_id(request.run_id)
        await self.steering.steer(tenant_metadata(context), run_id, Cancel(request.reason))
        return runs.CancelRunResponse()

    @unary_errors
    async def GetRun(self, request: runs.GetRunRequest, context: Context) -> runs.GetRunResponse:
        record = await self.runs.get_current(
            tenant_metadata(context), request.run_id, request.version
        )
        return runs.GetRunResponse(run=record_to_proto(record))

    @unary_errors
    async def ListRuns(
        self, request: runs.ListRunsRequest, context: Context
    ) -> runs.ListRunsResponse:
        statuses = []
        for status in request.statuses:
            if status not in STATUSES:
                raise InvalidArgument("statuses", f"unknown run status {status}")
            statuses.append(STATUSES[status])
        run_filter = RunFilter(
            agent_id=request.agent_id,
            conversation_id=request.conversation_id,
            statuses=tuple(statuses),
            execution_mode=mode_of(request.execution_mode) or "",
        )
        records, token = await self.runs.list_runs(
            tenant_metadata(context), run_filter, request.page_size, request.page_token
        )
        return runs.ListRunsResponse(
            runs=[record_to_proto(r) for r in records], next_page_token=token
        )

    @stream_errors
    async def ListRunEvents(
        self, request: runs.ListRunEventsRequest, context: Context
    ) -> AsyncIterator[runs.ListRunEventsResponse]:
        events = await self.runs.history(
            tenant_metadata(context), request.run_id, request.from_version, request.to_version
        )
        for batch in history_batches(events, HISTORY_BATCH_BYTES):
            yield batch

    @unary_errors
    async def ForkRun(self, request: runs.ForkRunRequest, context: Context) -> runs.ForkRunResponse:
        record = await self.runs.fork(
            tenant_metadata(context), request.run_id, request.at_version, request.request_id
        )
        return runs.ForkRunResponse(run=record_to_proto(record))

    @stream_errors
    async def WatchRun(
        self, request: runs.WatchRunRequest, context: Context
    ) -> AsyncIterator[runs.WatchRunResponse]:
        raise Unimplemented(CARRIED)
        yield runs.WatchRunResponse()
