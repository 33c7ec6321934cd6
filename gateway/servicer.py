"""RunService and AgentService: authenticate, validate what the gateway itself relies on, route
to the executors, relay streams. The use cases live in the executor."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeVar

import grpc

from agentrun.v1 import (
    agent_service_pb2 as agents,
)
from agentrun.v1 import (
    agent_service_pb2_grpc,
    run_pb2,
    run_service_pb2_grpc,
)
from agentrun.v1 import (
    executor_service_pb2 as pb,
)
from agentrun.v1 import (
    run_service_pb2 as runs,
)
from common.errors import InvalidArgument
from common.rpc import stream_errors, unary_errors
from common.settings import Settings
from gateway.auth import tenant_of
from gateway.relay import AttachedRun, Relay

Context = grpc.aio.ServicerContext[Any, Any]
UNARY_TIMEOUT = 30.0
Public = TypeVar("Public", covariant=True)
_RUN_NAMESPACE = uuid.UUID("3a0c1c52-9a8e-4f0b-9df5-5e0f5f7d8c41")


def run_id_for(tenant: str, request_id: str) -> str:
    """A new run's id: derived from the request_id, so that a repeated start names the same run."""
    if not request_id:
        return str(uuid.uuid4())
    return str(uuid.uuid5(_RUN_NAMESPACE, f"run\x00{tenant}\x00{request_id}"))


def checked_run_id(run_id: str, field: str = "run_id") -> str:
    """Run ids go into NATS subjects: only a canonical UUID may pass."""
    try:
        parsed = uuid.UUID(run_id)
    except ValueError:
        raise InvalidArgument(field, "must be a run id (a UUID)") from None
    return str(parsed)


class _Steerable(Protocol):
    async def approve(self, decision: runs.ToolApprovalDecision) -> None: ...

    async def cancel(self, reason: str) -> None: ...


class RunServicer(run_service_pb2_grpc.RunServiceServicer):
    def __init__(self, settings: Settings, relay: Relay) -> None:
        self.keys = settings.api_keys
        self.relay = relay
        self.executors = relay.executors

    @stream_errors
    async def StreamRun(
        self, request: runs.StreamRunRequest, context: Context
    ) -> AsyncIterator[runs.StreamRunResponse]:
        tenant = tenant_of(context, self.keys)
        run = self.relay.execute(tenant, run_id_for(tenant, request.request_id), request)
        async for batch in run.events():
            yield runs.StreamRunResponse(events=batch)

    @stream_errors
    async def Converse(
        self, request_iterator: AsyncIterator[runs.ConverseRequest], context: Context
    ) -> AsyncIterator[runs.ConverseResponse]:
        tenant = tenant_of(context, self.keys)
        first = await anext(aiter(request_iterator), None)
        steerable: _Steerable
        if first is not None and first.HasField("start"):
            executed = self.relay.execute(
                tenant, run_id_for(tenant, first.start.request_id), first.start
            )
            steerable, events = executed, executed.events()
        elif first is not None and first.HasField("attach"):
            run_id = checked_run_id(first.attach.run_id, "attach.run_id")
            if first.attach.after_sequence < 0:
                raise InvalidArgument("attach.after_sequence", "must not be negative")
            steerable = AttachedRun(self.relay, tenant, run_id)
            events = self.relay.watch(tenant, run_id, first.attach.after_sequence)
        else:
            raise InvalidArgument("message", "the first message must be start or attach")
        queue: asyncio.Queue[list[run_pb2.RunEvent] | BaseException | None] = asyncio.Queue()
        tasks = [
            asyncio.create_task(_pump(events, queue)),
            asyncio.create_task(_steer(request_iterator, steerable, queue)),
        ]
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield runs.ConverseResponse(events=item)
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    @stream_errors
    async def WatchRun(
        self, request: runs.WatchRunRequest, context: Context
    ) -> AsyncIterator[runs.WatchRunResponse]:
        tenant = tenant_of(context, self.keys)
        run_id = checked_run_id(request.run_id)
        if request.after_sequence < 0:
            raise InvalidArgument("after_sequence", "must not be negative")
        async for batch in self.relay.watch(tenant, run_id, request.after_sequence):
            yield runs.WatchRunResponse(events=batch)

    @unary_errors
    async def StartRun(
        self, request: runs.StartRunRequest, context: Context
    ) -> runs.StartRunResponse:
        tenant = tenant_of(context, self.keys)
        run_id = run_id_for(tenant, request.request_id)
        wrapped = pb.ExecutorServiceStartRunRequest(tenant=tenant, run_id=run_id, request=request)
        return _unwrap(await self.executors.StartRun(wrapped, timeout=UNARY_TIMEOUT))

    @unary_errors
    async def SubmitToolApproval(
        self, request: runs.SubmitToolApprovalRequest, context: Context
    ) -> runs.SubmitToolApprovalResponse:
        checked_run_id(request.run_id)
        wrapped = pb.ExecutorServiceSubmitToolApprovalRequest(
            tenant=tenant_of(context, self.keys), request=request
        )
        return _unwrap(await self.executors.SubmitToolApproval(wrapped, timeout=UNARY_TIMEOUT))

    @unary_errors
    async def CancelRun(
        self, request: runs.CancelRunRequest, context: Context
    ) -> runs.CancelRunResponse:
        checked_run_id(request.run_id)
        wrapped = pb.ExecutorServiceCancelRunRequest(
            tenant=tenant_of(context, self.keys), request=request
        )
        return _unwrap(await self.executors.CancelRun(wrapped, timeout=UNARY_TIMEOUT))

    @unary_errors
    async def GetRun(self, request: runs.GetRunRequest, context: Context) -> runs.GetRunResponse:
        checked_run_id(request.run_id)
        wrapped = pb.ExecutorServiceGetRunRequest(
            tenant=tenant_of(context, self.keys), request=request
        )
        return _unwrap(await self.executors.GetRun(wrapped, timeout=UNARY_TIMEOUT))

    @unary_errors
    async def ListRuns(
        self, request: runs.ListRunsRequest, context: Context
    ) -> runs.ListRunsResponse:
        wrapped = pb.ExecutorServiceListRunsRequest(
            tenant=tenant_of(context, self.keys), request=request
        )
        return _unwrap(await self.executors.ListRuns(wrapped, timeout=UNARY_TIMEOUT))

    @stream_errors
    async def ListRunEvents(
        self, request: runs.ListRunEventsRequest, context: Context
    ) -> AsyncIterator[runs.ListRunEventsResponse]:
        checked_run_id(request.run_id)
        wrapped = pb.ExecutorServiceListRunEventsRequest(
            tenant=tenant_of(context, self.keys), request=request
        )
        async for response in self.executors.ListRunEvents(wrapped):
            yield response.response

    @unary_errors
    async def ForkRun(self, request: runs.ForkRunRequest, context: Context) -> runs.ForkRunResponse:
        tenant = tenant_of(context, self.keys)
        checked_run_id(request.run_id)
        run_id = run_id_for(tenant, request.request_id)
        wrapped = pb.ExecutorServiceForkRunRequest(tenant=tenant, run_id=run_id, request=request)
        return _unwrap(await self.executors.ForkRun(wrapped, timeout=UNARY_TIMEOUT))


async def _pump(
    events: AsyncIterator[list[run_pb2.RunEvent]],
    queue: asyncio.Queue[list[run_pb2.RunEvent] | BaseException | None],
) -> None:
    try:
        async for batch in events:
            queue.put_nowait(batch)
        queue.put_nowait(None)
    except Exception as exc:
        queue.put_nowait(exc)


async def _steer(
    request_iterator: AsyncIterator[runs.ConverseRequest],
    run: _Steerable,
    queue: asyncio.Queue[list[run_pb2.RunEvent] | BaseException | None],
) -> None:
    """Applies the approvals and cancellations a Converse client sends after its first message."""
    try:
        async for request in request_iterator:
            if request.HasField("tool_approval"):
                if not request.tool_approval.tool_call_id:
                    raise InvalidArgument("tool_approval.tool_call_id", "is required")
                await run.approve(request.tool_approval)
            elif request.HasField("cancel"):
                await run.cancel(request.cancel.reason)
            else:
                raise InvalidArgument("message", "start and attach may only be the first message")
    except Exception as exc:
        queue.put_nowait(exc)


class AgentServicer(agent_service_pb2_grpc.AgentServiceServicer):
    def __init__(self, settings: Settings, relay: Relay) -> None:
        self.keys = settings.api_keys
        self.executors = relay.executors

    @unary_errors
    async def CreateAgent(
        self, request: agents.CreateAgentRequest, context: Context
    ) -> agents.CreateAgentResponse:
        wrapped = pb.ExecutorServiceCreateAgentRequest(
            tenant=tenant_of(context, self.keys), request=request
        )
        return _unwrap(await self.executors.CreateAgent(wrapped, timeout=UNARY_TIMEOUT))

    @unary_errors
    async def GetAgent(
        self, request: agents.GetAgentRequest, context: Context
    ) -> agents.GetAgentResponse:
        wrapped = pb.ExecutorServiceGetAgentRequest(
            tenant=tenant_of(context, self.keys), request=request
        )
        return _unwrap(await self.executors.GetAgent(wrapped, timeout=UNARY_TIMEOUT))

    @unary_errors
    async def ListAgents(
        self, request: agents.ListAgentsRequest, context: Context
    ) -> agents.ListAgentsResponse:
        wrapped = pb.ExecutorServiceListAgentsRequest(
            tenant=tenant_of(context, self.keys), request=request
        )
        return _unwrap(await self.executors.ListAgents(wrapped, timeout=UNARY_TIMEOUT))

    @unary_errors
    async def UpdateAgent(
        self, request: agents.UpdateAgentRequest, context: Context
    ) -> agents.UpdateAgentResponse:
        wrapped = pb.ExecutorServiceUpdateAgentRequest(
            tenant=tenant_of(context, self.keys), request=request
        )
        return _unwrap(await self.executors.UpdateAgent(wrapped, timeout=UNARY_TIMEOUT))

    @unary_errors
    async def DeleteAgent(
        self, request: agents.DeleteAgentRequest, context: Context
    ) -> agents.DeleteAgentResponse:
        wrapped = pb.ExecutorServiceDeleteAgentRequest(
            tenant=tenant_of(context, self.keys), request=request
        )
        return _unwrap(await self.executors.DeleteAgent(wrapped, timeout=UNARY_TIMEOUT))


class _Wrapped(Protocol[Public]):
    """An ExecutorService response: the public response, wrapped."""

    @property
    def response(self) -> Public: ...


def _unwrap(wrapped: _Wrapped[Public]) -> Public:
    return wrapped.response
