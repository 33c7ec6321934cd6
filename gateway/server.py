"""The gateway process: RunService and AgentService over gRPC, with health and reflection."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import grpc

from agentrun.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
)
from common.nats_link import NatsLink
from common.rpc import serve
from common.settings import Settings
from gateway.executors import open_executors
from gateway.relay import Relay
from gateway.servicer import AgentServicer, RunServicer

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0
SHUTTING_DOWN = (
    "the gateway is shutting down: reconnect (to any gateway) and resume with WatchRun "
    "after the last sequence received"
)


async def run_gateway(
    settings: Settings,
    *,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serves until SIGTERM/SIGINT (or ``stop``); then ends open streams with UNAVAILABLE, telling
    clients to resume elsewhere (runs go on: disconnecting is not cancelling)."""
    link = NatsLink(
        list(settings.nats_urls),
        name=f"gateway-{uuid.uuid4().hex[:8]}",
        event_retention=settings.event_retention,
        names=settings.nats_names,
        replicas=settings.nats_replicas,
    )
    await link.start()
    channel, executors = open_executors(settings.executor_target)
    relay = Relay(
        link,
        executors,
        liveness_interval=settings.liveness_interval,
        event_retention=settings.event_retention,
    )

    def register(server: grpc.aio.Server) -> list[str]:
        run_service_pb2_grpc.add_RunServiceServicer_to_server(RunServicer(settings, relay), server)
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(settings, relay), server
        )
        return [
            run_service_pb2.DESCRIPTOR.services_by_name["RunService"].full_name,
            agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
        ]

    def on_ready(port: int) -> None:
        log.info("gateway listening on port %d (executors at %s)", port, settings.executor_target)
        if ready is not None:
            ready(port)

    try:
        await serve(
            settings.gateway_listen,
            register,
            ready=on_ready,
            stop=stop,
            grace=SHUTDOWN_GRACE,
            end_streams_with=SHUTTING_DOWN,
        )
    finally:
        await relay.calls.close()
        await channel.close(grace=None)
        await link.close()
