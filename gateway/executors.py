"""The gateway's connection to the executors: one channel, round robin over their addresses."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from agentrun.internal.v1 import executor_service_pb2, executor_service_pb2_grpc
from common.internal_access import Metadata, internal_channel, internal_metadata
from common.rpc import internal_channel_options
from common.settings import Settings

if TYPE_CHECKING:
    from agentrun.internal.v1.executor_service_pb2_grpc import ExecutorServiceAsyncStub


def channel_target(target: str) -> str:
    """A gRPC target: a comma separated list of ip:port becomes an ``ipv4:`` address list."""
    if "," in target and ":///" not in target and not target.startswith(("ipv4:", "ipv6:")):
        return "ipv4:" + ",".join(part.strip() for part in target.split(","))
    return target


# An executor that went away is tried again after this backoff, growing up to the maximum. gRPC's
# defaults (1 s, growing to 120 s) leave an executor that was restarted at its address unused for
# long after it is back; meanwhile, with the others also restarting, the gateway has no executor
# at all ("connections to all backends failing").
RECONNECT_BACKOFF_MS = 250
MAX_RECONNECT_BACKOFF_MS = 2000


# Reads that find no executor ready (the one they would go to is restarting: "connection
# refused") are tried again for a few seconds, with gRPC's retries. Writes are not: the gateway
# could not tell whether a failed one took effect.
RETRIED_READS = (
    ("agentrun.v1.RunService", "GetRun"),
    ("agentrun.v1.RunService", "ListRuns"),
    ("agentrun.v1.RunService", "ListRunEvents"),
    ("agentrun.v1.AgentService", "GetAgent"),
    ("agentrun.v1.AgentService", "ListAgents"),
)
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": service, "method": method} for service, method in RETRIED_READS
                ],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.5s",
                    "maxBackoff": "4s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


@dataclass(frozen=True)
class Executors:
    """The channel to the executors, their internal service on it, and the metadata that every
    call to them carries (the internal token, if any)."""

    channel: grpc.aio.Channel
    service: ExecutorServiceAsyncStub
    metadata: Metadata


def open_executors(settings: Settings) -> Executors:
    """The channel to the executors of ``settings.executor_target`` (mTLS if configured)."""
    channel = internal_channel(
        settings,
        channel_target(settings.executor_target),
        options=[
            *internal_channel_options(settings.internal_ping_interval),
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
            ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ("grpc.service_config", SERVICE_CONFIG),
        ],
    )
    return Executors(
        channel, executor_service_pb2_grpc.ExecutorServiceStub(channel), internal_metadata(settings)
    )


ExecuteRunCall = grpc.aio.StreamStreamCall[
    executor_service_pb2.ExecuteRunRequest, executor_service_pb2.ExecuteRunResponse
]


class WarmCalls:
    """ExecuteRun calls opened ahead of need: starting a run is then one message on a stream
    that is already open (opening a call costs about as much as a round trip). The pool refills
    off the first-token path; a call whose executor went away is passed over."""

    def __init__(self, executors: Executors, size: int = 4) -> None:
        self._executors = executors.service
        self._metadata = executors.metadata
        self._size = size
        self._ready: deque[ExecuteRunCall] = deque()
        self._refilling: asyncio.Task[None] | None = None

    def take(self) -> ExecuteRunCall:
        """A ready call (or a new one). Call ``refill`` once the first-token path is past."""
        while self._ready:
            call = self._ready.popleft()
            if not call.done():
                return call
        return self.open()

    def open(self, *, wait_for_ready: bool = False) -> ExecuteRunCall:
        """A new call (``wait_for_ready``: it waits for an executor to be reachable rather than
        failing at once)."""
        # No request iterator: the requests are written to the call as they come.
        call: ExecuteRunCall = self._executors.ExecuteRun(  # type: ignore[call-arg]
            metadata=self._metadata, wait_for_ready=wait_for_ready
        )
        return call

    def refill(self) -> None:
        """Opens calls up to the pool's size, in the background."""
        if self._refilling is None or self._refilling.done():
            self._refilling = asyncio.create_task(self._refill())

    async def _refill(self) -> None:
        while len(self._ready) < self._size:
            call = self.open()
            try:
                await call.wait_for_connection()
            except grpc.aio.AioRpcError:
                return  # no executor to be had right now: calls are opened on demand meanwhile
            self._ready.append(call)

    async def close(self) -> None:
        if self._refilling is not None:
            self._refilling.cancel()
        while self._ready:
            self._ready.popleft().cancel()
