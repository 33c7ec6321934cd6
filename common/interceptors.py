"""The shape of our gRPC server interceptors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    AnyHandler = grpc.RpcMethodHandler[Any, Any]
else:  # not subscriptable at run time
    ServerInterceptor = grpc.aio.ServerInterceptor
    AnyHandler = grpc.RpcMethodHandler
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[AnyHandler]]


class HandlerWrapping(ServerInterceptor):
    """An interceptor that puts each method's handler in a wrapper of its own (``wrap``), made
    once per method: a server's handlers do not change once it runs."""

    def __init__(self) -> None:
        self._wrapped: dict[str, AnyHandler] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> AnyHandler:
        return await self.wrapped(continuation, handler_call_details)

    async def wrapped(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> AnyHandler:
        """The method's wrapped handler (None, as gRPC wants, for a method nobody serves)."""
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return handler
            wrapped = self._wrapped[method] = self.wrap(handler, method)
        return wrapped

    def wrap(self, handler: AnyHandler, method: str) -> AnyHandler:
        raise NotImplementedError
