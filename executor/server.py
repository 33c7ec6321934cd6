"""The executor process: ExecutorService over gRPC, with health and reflection."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from agentrun.v1 import executor_service_pb2, executor_service_pb2_grpc
from common.rpc import serve
from common.settings import Settings
from executor.context import ExecutorContext
from executor.dispatch import WorkQueue
from executor.durable import DurableRunner
from executor.retention import RetentionJob
from executor.run_list_projection import RunListProjection
from executor.runs import RunManager
from executor.servicer import ExecutorServicer

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 10.0
# The store is synchronous: every commit and read holds a thread while it waits on the database.
# asyncio's default pool has cpu_count + 4 threads (6 here), too few for the runs one executor
# drives at once; waiting threads cost little CPU.
STORE_THREADS = 32


async def run_executor(
    settings: Settings,
    *,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serves until SIGTERM/SIGINT (or ``stop``); then drains: takes no more durable runs, hands
    back those it holds for immediate redelivery, and lets classic runs finish for a while."""
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="store")
    )
    # Every PostgreSQL connection of this executor says whose it is (pg_stat_activity's
    # application_name): libpq reads PGAPPNAME when it connects.
    os.environ.setdefault("PGAPPNAME", settings.executor_id[:63])
    ctx = await ExecutorContext.open(settings)
    queue = WorkQueue(ctx.link, settings.dispatch_ack_wait)
    durable = DurableRunner(ctx, queue, settings.max_durable_runs)
    projection = RunListProjection(ctx)
    runs = RunManager(ctx, queue, durable, projection)
    runs.reconciler.start()
    retention = RetentionJob.of(ctx)
    retention.start()
    projection.start()
    durable.start()
    servicer = ExecutorServicer(ctx, runs)

    def register(server: grpc.aio.Server) -> list[str]:
        executor_service_pb2_grpc.add_ExecutorServiceServicer_to_server(servicer, server)
        return [executor_service_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name]

    def on_ready(port: int) -> None:
        log.info(
            "executor %s listening on port %d (store %s)",
            settings.executor_id,
            port,
            ctx.store.describe(),
        )
        if ready is not None:
            ready(port)

    async def on_stopping() -> None:
        retention.stop()
        # Durable runs go to other executors at once; classic runs cannot move, so they get
        # the grace period to finish before they fail with EXECUTOR_LOST.
        await durable.drain(SHUTDOWN_GRACE)
        await runs.shutdown(SHUTDOWN_GRACE)
        projection.stop()

    try:
        await serve(
            settings.executor_listen,
            register,
            ready=on_ready,
            stop=stop,
            grace=SHUTDOWN_GRACE,
            on_stopping=on_stopping,
        )
    finally:
        await ctx.close()
