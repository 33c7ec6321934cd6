"""The executor process: agentrun.internal.v1.ExecutorService and, for its gateways, the public
RunService and AgentService, over gRPC, with health and reflection."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from agentrun.internal.v1 import executor_service_pb2, executor_service_pb2_grpc
from agentrun.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
)
from common import tracing
from common.internal_access import executor_server_security
from common.metrics import serve_metrics
from common.rpc import internal_server_options, serve
from common.settings import Settings
from executor.api.agent_service import REQUEST_LIMITS, AgentService
from executor.api.execute_run import ExecutorService
from executor.api.run_service import RunService
from executor.cluster_metrics import ClusterGauges
from executor.context import ExecutorContext
from executor.durable.dispatch import WorkQueue
from executor.durable.taking import Taker
from executor.lost_runs import LostRuns
from executor.modes import Classic, Durable, Modes
from executor.reconciler import Reconciler
from executor.retention import RetentionJob
from executor.run_list_projection import RunListProjection
from executor.runs import Runs
from executor.session.sessions import Sessions
from executor.steering import Steering
from executor.watching import Watching

log = logging.getLogger(__name__)

# The store is synchronous: every commit and read holds a thread while it waits on the database.
# asyncio's default pool has cpu_count + 4 threads (6 here), too few for the runs one executor
# drives at once; waiting threads cost little CPU.
STORE_THREADS = 32


@dataclass
class Executor:
    """An executor's parts, wired together."""

    ctx: ExecutorContext
    sessions: Sessions
    runs: Runs
    steering: Steering
    watching: Watching
    taker: Taker
    reconciler: Reconciler
    projection: RunListProjection
    retention: RetentionJob

    @staticmethod
    def of(ctx: ExecutorContext) -> Executor:
        settings = ctx.settings
        queue = WorkQueue(ctx.link, settings.dispatch_ack_wait)
        sessions = Sessions()
        modes = Modes(Classic(ctx, sessions), Durable(ctx, queue))
        lost = LostRuns(ctx, sessions.holds, lambda mode: modes[mode].movable)
        projection = RunListProjection(ctx)
        runs = Runs(ctx, modes, lost, projection)
        steering = Steering(ctx, sessions, queue, lost, runs.get)
        watching = Watching(
            ctx.link,
            lost,
            runs.get,
            lambda mode: modes[mode].movable,
            liveness_interval=settings.liveness_interval,
            event_retention=settings.event_retention,
        )
        return Executor(
            ctx=ctx,
            sessions=sessions,
            runs=runs,
            steering=steering,
            watching=watching,
            taker=Taker(ctx, queue, modes.durable, sessions, settings.max_durable_runs),
            reconciler=Reconciler(ctx, queue, sessions, lost, steering),
            projection=projection,
            retention=RetentionJob.of(ctx),
        )

    def start(self) -> None:
        self.reconciler.start()
        self.retention.start()
        self.projection.start()
        self.taker.start()

    async def drain(self) -> None:
        """Takes no more durable runs, hands back those it holds for immediate redelivery, and
        lets classic runs (which cannot move) finish for a while before they fail."""
        self.retention.stop()
        self.reconciler.stop()
        await self.taker.stop()
        grace = self.ctx.settings.drain_grace
        await self.sessions.drain(grace)
        await self.taker.wait_taken(grace)
        self.projection.stop()

    def register(self, server: grpc.aio.Server) -> list[str]:
        executor_service_pb2_grpc.add_ExecutorServiceServicer_to_server(
            ExecutorService(self.runs, self.steering, self.watching), server
        )
        run_service_pb2_grpc.add_RunServiceServicer_to_server(
            RunService(self.runs, self.steering), server
        )
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(AgentService(self.ctx), server)
        return [
            executor_service_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name,
            run_service_pb2.DESCRIPTOR.services_by_name["RunService"].full_name,
            agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
        ]


async def run_executor(
    settings: Settings,
    *,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serves until SIGTERM/SIGINT (or ``stop``); then drains (see Executor.drain)."""
    # Before anything opens: an executor whose port is open to strangers does not start.
    credentials, interceptors = executor_server_security(settings)
    stop_tracing = tracing.configure(
        "agentrun-executor", content=settings.trace_content, instance_id=settings.executor_id
    )
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="store")
    )
    # Every PostgreSQL connection of this executor says whose it is (pg_stat_activity's
    # application_name): libpq reads PGAPPNAME when it connects.
    os.environ.setdefault("PGAPPNAME", settings.executor_id[:63])
    ctx = await ExecutorContext.open(settings)
    executor = Executor.of(ctx)
    executor.start()
    metrics = serve_metrics(
        settings.metrics_listen,
        [ClusterGauges(ctx.run_list, executor.taker.queue, asyncio.get_running_loop())],
    )

    def on_ready(port: int) -> None:
        log.info(
            "executor %s listening on port %d (store %s)",
            settings.executor_id,
            port,
            ctx.store.describe(),
        )
        if ready is not None:
            ready(port)

    try:
        await serve(
            settings.executor_listen,
            executor.register,
            ready=on_ready,
            stop=stop,
            grace=settings.drain_grace,
            on_stopping=executor.drain,
            options=internal_server_options(settings.internal_ping_interval),
            credentials=credentials,
            interceptors=interceptors,
            reflection=settings.reflection,
            request_limits=REQUEST_LIMITS,
            call_metrics=bool(settings.metrics_listen),
        )
    finally:
        metrics.close()
        await ctx.close()
        await asyncio.to_thread(stop_tracing)  # sends the spans it holds
