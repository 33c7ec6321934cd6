"""The gateway's connection to the executors: one channel, round robin over their addresses."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from agentrun.rpc import CHANNEL_OPTIONS
from agentrun.v1 import executor_service_pb2_grpc

if TYPE_CHECKING:
    from agentrun.v1.executor_service_pb2_grpc import ExecutorServiceAsyncStub


def channel_target(target: str) -> str:
    """A gRPC target: a comma separated list of ip:port becomes an ``ipv4:`` address list."""
    if "," in target and ":///" not in target and not target.startswith(("ipv4:", "ipv6:")):
        return "ipv4:" + ",".join(part.strip() for part in target.split(","))
    return target


def open_executors(target: str) -> tuple[grpc.aio.Channel, ExecutorServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(
        channel_target(target),
        options=[*CHANNEL_OPTIONS, ("grpc.lb_policy_name", "round_robin")],
    )
    return channel, executor_service_pb2_grpc.ExecutorServiceStub(channel)
