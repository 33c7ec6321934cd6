"""The gateway process: the public RunService and AgentService over gRPC, with health and
reflection. It authenticates callers, carries runs' streams (gateway.conversations) and
forwards every other call to the executors (gateway.forwarding); it holds no run state and does
not connect to NATS or the store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from agentrun.v1 import agent_service_pb2, run_service_pb2
from agentrun.v1 import run_service_pb2 as runs
from common import tracing
from common.metrics import serve_metrics
from common.rpc import serve
from common.settings import Settings
from common.tls import server_credentials
from gateway.auth import authenticator
from gateway.conversations import Conversations
from gateway.executors import Executors, WarmCalls, open_executors
from gateway.forwarding import Forwarding

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0
SHUTTING_DOWN = (
    "the gateway is shutting down: reconnect (to any gateway) and resume with WatchRun "
    "after the last sequence received"
)
RUN_SERVICE = run_service_pb2.DESCRIPTOR.services_by_name["RunService"]
AGENT_SERVICE = agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"]
# The methods whose streams a gateway carries over ExecuteRun (resumed on another executor when
# one goes away); every other method is forwarded.
CARRIED = ("StreamRun", "Converse", "WatchRun")


def register(
    server: grpc.aio.Server, executors: Executors, calls: WarmCalls, settings: Settings
) -> list[str]:
    """Adds the public services to ``server``; returns their names."""
    authenticate = authenticator(settings.api_keys)
    forwarding = Forwarding(executors.channel, authenticate, executors.metadata)
    conversations = Conversations(calls, authenticate)
    run_handlers = forwarding.handlers(RUN_SERVICE, carried=CARRIED)
    run_handlers["StreamRun"] = grpc.unary_stream_rpc_method_handler(
        conversations.stream_run,
        request_deserializer=runs.StreamRunRequest.FromString,
        response_serializer=runs.StreamRunResponse.SerializeToString,
    )
    run_handlers["WatchRun"] = grpc.unary_stream_rpc_method_handler(
        conversations.watch_run,
        request_deserializer=runs.WatchRunRequest.FromString,
        response_serializer=runs.WatchRunResponse.SerializeToString,
    )
    run_handlers["Converse"] = grpc.stream_stream_rpc_method_handler(
        conversations.converse,
        request_deserializer=runs.ConverseRequest.FromString,
        response_serializer=runs.ConverseResponse.SerializeToString,
    )
    services = {
        RUN_SERVICE.full_name: run_handlers,
        AGENT_SERVICE.full_name: forwarding.handlers(AGENT_SERVICE),
    }
    for name, handlers in services.items():
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    return list(services)


async def run_gateway(
    settings: Settings,
    *,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serves until SIGTERM/SIGINT (or ``stop``); then ends open streams with UNAVAILABLE, telling
    clients to resume elsewhere (runs go on: disconnecting is not cancelling)."""
    credentials = server_credentials(settings.tls) if settings.tls is not None else None
    executors = open_executors(settings)
    calls = WarmCalls(executors)

    def on_ready(port: int) -> None:
        log.info(
            "gateway listening on port %d%s (executors at %s%s)",
            port,
            " with TLS" if credentials is not None else "",
            settings.executor_target,
            " over mTLS" if settings.internal_tls is not None else "",
        )
        if ready is not None:
            ready(port)

    metrics = serve_metrics(settings.metrics_listen)
    stop_tracing = tracing.configure("agentrun-gateway")
    try:
        await serve(
            settings.gateway_listen,
            lambda server: register(server, executors, calls, settings),
            ready=on_ready,
            stop=stop,
            grace=SHUTDOWN_GRACE,
            end_streams_with=SHUTTING_DOWN,
            credentials=credentials,
            reflection=settings.reflection,
            call_metrics=bool(settings.metrics_listen),
        )
    finally:
        metrics.close()
        await calls.close()
        await executors.channel.close(grace=None)
        await asyncio.to_thread(stop_tracing)  # sends the spans it holds
