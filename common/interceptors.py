"""The shape of our gRPC server interceptors."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
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


def rewrapped(
    handler: AnyHandler,
    awaited: Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]],
    streamed: Callable[[Callable[..., AsyncIterator[Any]]], Callable[..., AsyncIterator[Any]]],
) -> AnyHandler:
    """The handler with its behavior wrapped: by ``awaited`` if it returns one response, by
    ``streamed`` if it yields them. A behavior that is not asynchronous is left as it is."""
    kinds = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
    )
    for behavior, make in kinds:
        if behavior is None:
            continue
        if inspect.isasyncgenfunction(behavior):
            wrapped: Any = streamed(behavior)
        elif inspect.iscoroutinefunction(behavior):
            wrapped = awaited(behavior)
        else:
            return handler
        return make(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler
