"""The shape of our gRPC server interceptors."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

if TYPE_CHECKING:
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    AnyHandler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]
else:  # not subscriptable at run time
    ServerInterceptor = grpc.aio.ServerInterceptor
    AnyHandler = grpc.RpcMethodHandler
    Context = grpc.aio.ServicerContext
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


State = TypeVar("State")
_NO_CONTEXT: AbstractContextManager[None] = contextlib.nullcontext()


def observed(
    handler: AnyHandler,
    begin: Callable[[Context], State],
    done: Callable[[State, Context, BaseException | None], None],
    within: Callable[[State], AbstractContextManager[Any]] | None = None,
) -> AnyHandler:
    """The handler with each call observed: ``begin`` when it starts, ``done`` with how it
    ended (the exception, or None), and ``within`` around its work (a stream's whole life).
    A behavior that is not asynchronous is left as it is."""

    def awaited(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def observing(request: Any, context: Context) -> Any:
            state = begin(context)
            try:
                with within(state) if within is not None else _NO_CONTEXT:
                    response = await behavior(request, context)
            except BaseException as exc:
                done(state, context, exc)
                raise
            done(state, context, None)
            return response

        return observing

    def streamed(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def observing(request: Any, context: Context) -> AsyncIterator[Any]:
            state = begin(context)
            try:
                with within(state) if within is not None else _NO_CONTEXT:
                    async for response in behavior(request, context):
                        yield response
            except BaseException as exc:
                done(state, context, exc)
                raise
            done(state, context, None)

        return observing

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
