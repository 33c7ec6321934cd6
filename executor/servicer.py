"""ExecutorService: translates between the internal API and the executor's use cases. Only that."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from agentrun.v1 import (
    agent_service_pb2,
    executor_service_pb2_grpc,
    run_service_pb2,
)
from agentrun.v1 import (
    executor_service_pb2 as pb,
)
from common.errors import InvalidArgument
from common.rpc import stream_errors, unary_errors
from eventstore.run_list import RunFilter
from executor.classic import ClassicRun
from executor.context import ExecutorContext
from executor.runs import DurableStart, RunManager, RunSpec
from executor.translation import (
    HISTORY_BATCH_BYTES,
    STATUSES,
    agent_from_proto,
    history_batches,
    mode_of,
    record_to_proto,
    stored_agent_to_proto,
)

Context = grpc.aio.ServicerContext[Any, Any]


def spec_of(
    tenant: str,
    run_id: str,
    request: run_service_pb2.StreamRunRequest | run_service_pb2.StartRunRequest,
) -> RunSpec:
    return RunSpec(
        tenant=tenant,
        run_id=run_id,
        agent_id=request.agent_id,
        input=request.input,
        request_id=request.request_id,
        conversation_id=request.conversation_id,
        execution_mode=mode_of(request.execution_mode),
        cancel_on_disconnect=getattr(request, "cancel_on_disconnect", False),
    )


class ExecutorServicer(executor_service_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, ctx: ExecutorContext, runs: RunManager) -> None:
        self.ctx = ctx
        self.runs = runs

    # -- runs ------------------------------------------------------------------------------------

    @stream_errors
    async def ExecuteRun(
        self, request_iterator: AsyncIterator[pb.ExecuteRunRequest], context: Context
    ) -> AsyncIterator[pb.ExecuteRunResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("start"):
            raise InvalidArgument("start", "the first message must start the run")
        start = first.start
        spec = spec_of(start.tenant, start.run_id, start.request)
        outcome = await self.runs.start(spec)
        if isinstance(outcome, DurableStart):
            yield pb.ExecuteRunResponse(relayed_run=record_to_proto(outcome.record))
            await asyncio.shield(outcome.queued)  # the gateway leaving must not stop the queueing
            return
        if not isinstance(outcome, ClassicRun):
            yield pb.ExecuteRunResponse(relayed_run=record_to_proto(outcome))
            return
        stream = outcome.stream
        if not stream.attach():
            raise InvalidArgument("run_id", "the run is already being streamed")
        # Let the run's loop start before the first write: whatever it emits without waiting
        # (with a fast model, the first tokens) shares the first message with RunStarted.
        await asyncio.sleep(0)
        steering = asyncio.create_task(self._steer(request_iterator, spec))
        try:
            while batch := await stream.next_batch():
                yield pb.ExecuteRunResponse(events=batch)
        finally:
            stream.detach()
            steering.cancel()
            if spec.cancel_on_disconnect and not stream.ended:
                with contextlib.suppress(Exception):
                    outcome.cancel(spec.tenant, "the client disconnected")

    async def _steer(
        self, request_iterator: AsyncIterator[pb.ExecuteRunRequest], spec: RunSpec
    ) -> None:
        """Applies the approvals and cancellation that arrive on an ExecuteRun stream."""
        classic = self.runs.local(spec.tenant, spec.run_id)
        assert classic is not None
        try:
            async for request in request_iterator:
                if request.HasField("tool_approval"):
                    decision = request.tool_approval
                    await self.runs.decide(
                        spec.tenant,
                        spec.run_id,
                        decision.tool_call_id,
                        decision.approved,
                        decision.reason,
                    )
                elif request.HasField("cancel"):
                    await self.runs.cancel(spec.tenant, spec.run_id, request.cancel.reason)
                else:
                    raise InvalidArgument("message", "only approvals and cancel may follow start")
        except Exception as exc:
            classic.stream.interrupt(exc)

    @unary_errors
    async def StartRun(
        self, request: pb.ExecutorServiceStartRunRequest, context: Context
    ) -> pb.ExecutorServiceStartRunResponse:
        outcome = await self.runs.start(spec_of(request.tenant, request.run_id, request.request))
        if isinstance(outcome, ClassicRun):
            run = outcome.started
        elif isinstance(outcome, DurableStart):
            await outcome.queued
            run = record_to_proto(outcome.record)
        else:
            run = record_to_proto(outcome)
        return pb.ExecutorServiceStartRunResponse(
            response=run_service_pb2.StartRunResponse(run=run)
        )

    @unary_errors
    async def SubmitToolApproval(
        self, request: pb.ExecutorServiceSubmitToolApprovalRequest, context: Context
    ) -> pb.ExecutorServiceSubmitToolApprovalResponse:
        decision = request.request.decision
        await self.runs.decide(
            request.tenant,
            request.request.run_id,
            decision.tool_call_id,
            decision.approved,
            decision.reason,
        )
        return pb.ExecutorServiceSubmitToolApprovalResponse(
            response=run_service_pb2.SubmitToolApprovalResponse()
        )

    @unary_errors
    async def CancelRun(
        self, request: pb.ExecutorServiceCancelRunRequest, context: Context
    ) -> pb.ExecutorServiceCancelRunResponse:
        await self.runs.cancel(request.tenant, request.request.run_id, request.request.reason)
        return pb.ExecutorServiceCancelRunResponse(response=run_service_pb2.CancelRunResponse())

    @unary_errors
    async def GetRun(
        self, request: pb.ExecutorServiceGetRunRequest, context: Context
    ) -> pb.ExecutorServiceGetRunResponse:
        if request.request.version < 0:
            raise InvalidArgument("version", "must not be negative")
        record = await self.runs.get_current(
            request.tenant, request.request.run_id, request.request.version
        )
        return pb.ExecutorServiceGetRunResponse(
            response=run_service_pb2.GetRunResponse(run=record_to_proto(record))
        )

    @unary_errors
    async def ListRuns(
        self, request: pb.ExecutorServiceListRunsRequest, context: Context
    ) -> pb.ExecutorServiceListRunsResponse:
        req = request.request
        statuses = []
        for status in req.statuses:
            if status not in STATUSES:
                raise InvalidArgument("statuses", f"unknown run status {status}")
            statuses.append(STATUSES[status])
        run_filter = RunFilter(
            agent_id=req.agent_id,
            conversation_id=req.conversation_id,
            statuses=tuple(statuses),
            execution_mode=mode_of(req.execution_mode) or "",
        )
        records, token = await self.runs.list_runs(
            request.tenant, run_filter, req.page_size, req.page_token
        )
        return pb.ExecutorServiceListRunsResponse(
            response=run_service_pb2.ListRunsResponse(
                runs=[record_to_proto(r) for r in records], next_page_token=token
            )
        )

    @stream_errors
    async def ListRunEvents(
        self, request: pb.ExecutorServiceListRunEventsRequest, context: Context
    ) -> AsyncIterator[pb.ExecutorServiceListRunEventsResponse]:
        req = request.request
        events = await self.runs.history(
            request.tenant, req.run_id, req.from_version, req.to_version
        )
        for batch in history_batches(events, HISTORY_BATCH_BYTES):
            yield pb.ExecutorServiceListRunEventsResponse(response=batch)

    @unary_errors
    async def ForkRun(
        self, request: pb.ExecutorServiceForkRunRequest, context: Context
    ) -> pb.ExecutorServiceForkRunResponse:
        req = request.request
        if req.at_version < 0:
            raise InvalidArgument("at_version", "must not be negative")
        record = await self.runs.fork(
            request.tenant, req.run_id, req.at_version, request.run_id, req.request_id
        )
        return pb.ExecutorServiceForkRunResponse(
            response=run_service_pb2.ForkRunResponse(run=record_to_proto(record))
        )

    @unary_errors
    async def ReportRunLost(
        self, request: pb.ReportRunLostRequest, context: Context
    ) -> pb.ReportRunLostResponse:
        record = await self.runs.reconciler.lost.settle(
            request.tenant, request.run_id, relayed=request.relayed
        )
        return pb.ReportRunLostResponse(run=record_to_proto(record))

    # -- agents ----------------------------------------------------------------------------------

    @unary_errors
    async def CreateAgent(
        self, request: pb.ExecutorServiceCreateAgentRequest, context: Context
    ) -> pb.ExecutorServiceCreateAgentResponse:
        config = agent_from_proto(request.request.agent)
        created = await asyncio.to_thread(self.ctx.agents.create, request.tenant, config)
        await self.ctx.agent_cache.announce_change(request.tenant, created.config.agent_id)
        return pb.ExecutorServiceCreateAgentResponse(
            response=agent_service_pb2.CreateAgentResponse(agent=stored_agent_to_proto(created))
        )

    @unary_errors
    async def GetAgent(
        self, request: pb.ExecutorServiceGetAgentRequest, context: Context
    ) -> pb.ExecutorServiceGetAgentResponse:
        req = request.request
        stored = await asyncio.to_thread(
            self.ctx.agents.get_stored, request.tenant, req.agent_id, req.version
        )
        return pb.ExecutorServiceGetAgentResponse(
            response=agent_service_pb2.GetAgentResponse(agent=stored_agent_to_proto(stored))
        )

    @unary_errors
    async def ListAgents(
        self, request: pb.ExecutorServiceListAgentsRequest, context: Context
    ) -> pb.ExecutorServiceListAgentsResponse:
        req = request.request
        agents, token = await asyncio.to_thread(
            self.ctx.agents.list_agents, request.tenant, req.page_size, req.page_token
        )
        return pb.ExecutorServiceListAgentsResponse(
            response=agent_service_pb2.ListAgentsResponse(
                agents=[stored_agent_to_proto(a) for a in agents], next_page_token=token
            )
        )

    @unary_errors
    async def UpdateAgent(
        self, request: pb.ExecutorServiceUpdateAgentRequest, context: Context
    ) -> pb.ExecutorServiceUpdateAgentResponse:
        req = request.request
        updated = await asyncio.to_thread(
            self.ctx.agents.update,
            request.tenant,
            agent_from_proto(req.agent),
            list(req.update_mask.paths),
            req.expected_version,
        )
        await self.ctx.agent_cache.announce_change(request.tenant, updated.config.agent_id)
        return pb.ExecutorServiceUpdateAgentResponse(
            response=agent_service_pb2.UpdateAgentResponse(agent=stored_agent_to_proto(updated))
        )

    @unary_errors
    async def DeleteAgent(
        self, request: pb.ExecutorServiceDeleteAgentRequest, context: Context
    ) -> pb.ExecutorServiceDeleteAgentResponse:
        await asyncio.to_thread(self.ctx.agents.delete, request.tenant, request.request.agent_id)
        await self.ctx.agent_cache.announce_change(request.tenant, request.request.agent_id)
        return pb.ExecutorServiceDeleteAgentResponse(
            response=agent_service_pb2.DeleteAgentResponse()
        )
