"""Forwarding public calls to the executors, unchanged.

Every method of agentrun.v1.RunService and AgentService that a gateway does not carry itself
(StreamRun and Converse: gateway.conversations) is forwarded as it came: the request's bytes go
to the same method of an executor, with the caller's tenant (and the trace context, when tracing
is on) in the call metadata, and the
response's bytes come back. Nothing is decoded or re-encoded, and a new public RPC is forwarded
without a line of code here. The executor answers every status; a call that finds no executor
answers UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from common import tracing
from common.internal_access import Metadata
from common.rpc import TENANT_METADATA, stream_errors, unary_errors
from gateway.auth import Authenticate

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]

UNARY_TIMEOUT = 30.0


class Forwarding:
    """Forwards methods of public services to the executors (see module docstring)."""

    def __init__(
        self, channel: grpc.aio.Channel, authenticate: Authenticate, metadata: Metadata = ()
    ) -> None:
        self.channel = channel
        self.authenticate = authenticate
        self.metadata = metadata  # sent with every call besides the tenant

    def handlers(
        self, service: ServiceDescriptor, carried: Iterable[str] = ()
    ) -> dict[str, Handler]:
        """A handler per method of ``service``, but those in ``carried``."""
        return {
            method.name: self._handler(method)
            for method in service.methods
            if method.name not in carried
        }

    def _handler(self, method: MethodDescriptor) -> Handler:
        path = f"/{method.containing_service.full_name}/{method.name}"
        if method.client_streaming:
            raise ValueError(f"{path}: client streaming calls are not forwarded")
        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(self._server_stream(path))
        return grpc.unary_unary_rpc_method_handler(self._unary(path))

    def _unary(self, path: str) -> Callable[[bytes, Context], Awaitable[bytes]]:
        call = self.channel.unary_unary(path, request_serializer=None, response_deserializer=None)

        @unary_errors
        async def forward(request: bytes, context: Context) -> bytes:
            metadata = (
                (TENANT_METADATA, self.authenticate(context)),
                *self.metadata,
                *tracing.metadata(),
            )
            response: bytes = await call(request, metadata=metadata, timeout=_timeout(context))
            return response

        return forward

    def _server_stream(self, path: str) -> Callable[[bytes, Context], AsyncIterator[bytes]]:
        call = self.channel.unary_stream(path, request_serializer=None, response_deserializer=None)

        @stream_errors
        async def forward(request: bytes, context: Context) -> AsyncIterator[bytes]:
            metadata = (
                (TENANT_METADATA, self.authenticate(context)),
                *self.metadata,
                *tracing.metadata(),
            )
            async for response in call(request, metadata=metadata):
                yield response

        return forward


def _timeout(context: Context) -> float:
    remaining = context.time_remaining()
    return UNARY_TIMEOUT if remaining is None else min(remaining, UNARY_TIMEOUT)
