"""The console's one channel to its gateway, and the stubs a request calls with its user's key.

The console holds no state of its own: every page is made of gRPC calls, each carrying the API
key of the browser session that asked (never a key of the console's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from agentrun.v1 import agent_service_pb2_grpc, run_service_pb2_grpc
from cli.client import ClientTls, Metadata, call_metadata, connect, rpc_error_message

if TYPE_CHECKING:
    from agentrun.v1.agent_service_pb2_grpc import AgentServiceAsyncStub
    from agentrun.v1.run_service_pb2_grpc import RunServiceAsyncStub

# Unary calls answer within this; a gateway that does not is reported as unavailable.
CALL_TIMEOUT = 30.0


@dataclass(frozen=True)
class GatewayCalls:
    """The services of the gateway, for one user: pass ``metadata`` with every call."""

    runs: RunServiceAsyncStub
    agents: AgentServiceAsyncStub
    metadata: Metadata


class Gateway:
    """A channel to the gateway at ``target``, opened on the server's event loop."""

    def __init__(self, target: str, tls: ClientTls | None = None) -> None:
        self.target = target
        self._tls = tls
        self._channel: grpc.aio.Channel | None = None

    async def open(self) -> None:
        self._channel, _ = connect(self.target, None, self._tls)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)

    def calls(self, api_key: str | None) -> GatewayCalls:
        if self._channel is None:
            raise RuntimeError("the gateway channel is not open")
        return GatewayCalls(
            runs=run_service_pb2_grpc.RunServiceStub(self._channel),
            agents=agent_service_pb2_grpc.AgentServiceStub(self._channel),
            metadata=call_metadata(api_key),
        )


def status_message(error: grpc.aio.AioRpcError) -> str:
    """What the API said, for a person: ``INVALID_ARGUMENT: agent.max_model_calls ...``."""
    return rpc_error_message(error).removeprefix("error: ")
