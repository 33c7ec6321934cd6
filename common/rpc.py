"""gRPC plumbing shared by the gateway and the executor.

- One table maps domain errors to status codes; every servicer method is wrapped by
  ``unary_errors`` or ``stream_errors`` so that error handling lives here and nowhere else.
- ``serve`` builds a grpc.aio server with health, reflection (v1 and v1alpha), keepalive
  tolerance and message limits, and stops it gracefully. Its servers decode requests
  themselves (``RequestDecoding``): an undecodable request is INVALID_ARGUMENT. A server that
  cannot keep its streams through a restart (the gateway) ends them on stop with UNAVAILABLE
  and a message saying how to resume (``StreamDrain``), so that clients reconnect elsewhere
  instead of hanging or seeing CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, NoReturn, ParamSpec, TypeVar, cast

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common import errors, tracing
from common.grpc_metrics import CallMetrics
from common.grpc_tracing import CallSpans
from common.interceptors import AnyHandler, HandlerWrapping, ServerInterceptor
from common.reflection import enable_server_reflection

log = logging.getLogger(__name__)

ERROR_DOMAIN = "agentrun"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# gRPC's retry pushback: a negative value tells the client's retry policy not to retry.
NO_RETRY = ("grpc-retry-pushback-ms", "-1")

STATUS_CODES: dict[type[errors.AgentrunError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


def internal_channel_options(ping_interval: float) -> list[tuple[str, Any]]:
    """A gateway's channel to its executors: a frozen executor (a stopped process, a paused VM)
    is noticed within twice ``ping_interval`` (a ping, unanswered that long again), so that the
    streams it carried resume on another executor."""
    ping_ms = round(ping_interval * 1000)
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", ping_ms),
        ("grpc.keepalive_timeout_ms", ping_ms),
        # An unanswered ping ends the connection after this long, whatever the keepalive
        # timeout says (gRPC's default is a minute: a frozen executor went unnoticed that long).
        ("grpc.http2.ping_timeout_ms", ping_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Tolerate clients that keep idle streams alive with pings every 10 s or more.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.so_reuseport", 0),
]


def internal_server_options(ping_interval: float) -> list[tuple[str, Any]]:
    """An executor's server: it accepts its gateways' pings every ``ping_interval`` (with some
    leeway for timers that fire early)."""
    return [
        *(option for option in SERVER_OPTIONS if not option[0].endswith("without_data_ms")),
        ("grpc.http2.min_ping_interval_without_data_ms", round(ping_interval * 800)),
    ]


def status_code_of(error: errors.AgentrunError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def status_details(code: grpc.StatusCode, error: errors.AgentrunError) -> bytes:
    """A google.rpc.Status with an ErrorInfo (reason, domain, structured fields), and a
    RetryInfo when the error says when to try again."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata()
    )
    details = [any_pb2.Any()]
    details[0].Pack(info)
    if error.retry_delay is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(max(0, round(error.retry_delay * 1e9)))
        details.append(any_pb2.Any())
        details[-1].Pack(retry)
    status = status_pb2.Status(code=code.value[0], message=error.message, details=details)
    serialized: bytes = status.SerializeToString()
    return serialized


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """Ends the call with the status that ``exc`` maps to."""
    error = errors.as_agentrun_error(exc)
    if error is not None:
        code = status_code_of(error)
        trailing: list[tuple[str, str | bytes]] = [
            (STATUS_DETAILS_KEY, status_details(code, error))
        ]
        if code == grpc.StatusCode.UNAVAILABLE:
            # A dependency's outage, answered on purpose: a gateway's transport retries (meant
            # for an executor that cannot be reached) must not ask again and again.
            trailing.append(NO_RETRY)
        await context.abort(code, error.message, trailing_metadata=tuple(trailing))
    if isinstance(exc, grpc.aio.AioRpcError):
        # An error from a downstream call (gateway -> executor) passes through unchanged,
        # except that an unreachable executor is reported as such.
        code, message = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE and not _has_details(exc):
            message = f"the executor is unavailable: {message}"
        trailing = [(k, v) for k, v in metadata_pairs(exc) if k == STATUS_DETAILS_KEY]
        await context.abort(code, message, trailing_metadata=tuple(trailing))
    log.exception("internal error", exc_info=exc)
    # With the status details like any status chosen here: a gateway passes it on as it is,
    # rather than taking it for an executor that went away.
    await abort_with(context, errors.Internal(f"internal error: {type(exc).__name__}"))


def metadata_pairs(exc: grpc.aio.AioRpcError) -> list[tuple[str, Any]]:
    """The trailing metadata of a failed call as (key, value) pairs."""
    return [(str(k), v) for k, v in cast("Iterable[Any]", exc.trailing_metadata() or ())]


def _has_details(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the error carries agentrun's structured details (a status chosen on purpose)."""
    return any(k == STATUS_DETAILS_KEY for k, _ in metadata_pairs(exc))


P = ParamSpec("P")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]


def unary_errors(method: Callable[P, Awaitable[Resp]]) -> Callable[P, Awaitable[Resp]]:
    """Wraps a unary handler (its last argument is the call's context): domain errors become
    their status; bugs become INTERNAL."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Resp:
        try:
            return await method(*args, **kwargs)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(cast(Context, args[-1]), exc)

    return wrapper


def stream_errors(method: Callable[P, AsyncIterator[Resp]]) -> Callable[P, AsyncIterator[Resp]]:
    """Wraps a streaming handler (server or bidi streaming) like ``unary_errors``."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[Resp]:
        try:
            async for response in method(*args, **kwargs):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(cast(Context, args[-1]), exc)

    return wrapper


class StreamDrain(HandlerWrapping):
    """Tracks a server's open streaming calls (server streaming and bidi) so that ``drain`` can
    end them all with UNAVAILABLE and ``message``; once draining, new ones are refused so."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message
        self.draining = False
        self._open: set[_OpenCall] = set()

    def wrap(self, handler: AnyHandler, method: str) -> AnyHandler:
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                self._tracked(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(
                self._tracked(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _tracked(self, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        async def tracked(request: Any, context: Context) -> AsyncIterator[Any]:
            if self.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, self.message)
            task = asyncio.current_task()
            assert task is not None
            call = _OpenCall(task)
            self._open.add(call)
            responses = behavior(request, context)
            try:
                while True:
                    call.waiting = True
                    try:
                        response = await anext(responses)
                    except StopAsyncIteration:
                        return
                    except asyncio.CancelledError:
                        if not self.draining:
                            raise  # the client went away
                        task.uncancel()
                        break
                    finally:
                        call.waiting = False
                    yield response
                    if self.draining:
                        break  # drained while gRPC sent the response
            finally:
                self._open.discard(call)
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.message)

        return tracked

    async def drain(self, wait: float) -> None:
        """Refuses new streams and ends the open ones (waiting up to ``wait`` seconds).

        Only a call waiting for its next response is cancelled: a cancellation that landed
        while gRPC sends a response would end the call without a status. A call that is
        sending ends once the send completes."""
        self.draining = True
        open_calls = list(self._open)
        for call in open_calls:
            if call.waiting:
                call.task.cancel()
        if open_calls:
            await asyncio.wait([call.task for call in open_calls], timeout=wait)


@dataclass(eq=False)
class _OpenCall:
    task: asyncio.Task[Any]
    waiting: bool = False


@dataclass(frozen=True)
class RequestLimit:
    """The largest request (``max_bytes``) a method decodes: a larger one is refused unread,
    with InvalidArgument naming ``field`` and its bound as the domain states it (``bound``
    bytes). Decoding holds the GIL even in a worker thread: megabytes of a Struct would stall
    the event loop for a second to be refused afterwards."""

    max_bytes: int
    field: str
    bound: int


class RequestDecoding(HandlerWrapping):
    """Decodes every method's requests in place of gRPC, so that a request that cannot be
    decoded (garbage, a string that is not UTF-8, nesting deeper than protobuf allows) is
    answered INVALID_ARGUMENT, where gRPC answers UNKNOWN "Unexpected DecodeError". Methods that
    take raw bytes (a gateway's forwarding) are left alone: the executor they forward to
    decodes. ``limits``: the RequestLimit of some methods, by full method name
    (``/package.Service/Method``).

    Requests are decoded on the event loop: protobuf's decoder holds the GIL, so a worker
    thread would not spare the loop (measured: a 1.5 MB Struct took 15 ms in a thread and held
    the loop 15 ms). What bounds the stall is the size of the requests (RequestLimit)."""

    def __init__(self, limits: Mapping[str, RequestLimit] | None = None) -> None:
        super().__init__()
        self._limits = dict(limits or {})

    def wrap(self, handler: AnyHandler, method: str) -> AnyHandler:
        return _decoding_handler(handler, self._limits.get(method))


def _decoding_handler(handler: AnyHandler, limit: RequestLimit | None) -> AnyHandler:
    """``handler`` taking raw requests that it decodes itself (unchanged if it takes raw bytes
    already, or if its behaviour is not asynchronous)."""
    if handler.request_deserializer is None:
        return handler
    deserialize = handler.request_deserializer
    serialize = handler.response_serializer

    def decode(raw: bytes) -> Any:
        if limit is not None and len(raw) > limit.max_bytes:
            raise errors.InvalidArgument(
                limit.field, f"must be at most {limit.bound:,} bytes ({len(raw):,} given)"
            )
        return deserialize(raw)

    if handler.unary_unary is not None:
        if inspect.iscoroutinefunction(handler.unary_unary):
            behavior = _decoded_request(handler.unary_unary, decode)
            return grpc.unary_unary_rpc_method_handler(behavior, response_serializer=serialize)
    elif handler.unary_stream is not None:
        if inspect.isasyncgenfunction(handler.unary_stream):
            streaming = _decoded_request_streaming(handler.unary_stream, decode)
            return grpc.unary_stream_rpc_method_handler(streaming, response_serializer=serialize)
        if inspect.iscoroutinefunction(handler.unary_stream):
            behavior = _decoded_request(handler.unary_stream, decode)
            return grpc.unary_stream_rpc_method_handler(behavior, response_serializer=serialize)
    elif handler.stream_unary is not None:
        if inspect.iscoroutinefunction(handler.stream_unary):
            consuming = _decoded_requests(handler.stream_unary, decode)
            return grpc.stream_unary_rpc_method_handler(consuming, response_serializer=serialize)
    elif handler.stream_stream is not None:
        if inspect.isasyncgenfunction(handler.stream_stream):
            bidi = _decoded_requests_streaming(handler.stream_stream, decode)
            return grpc.stream_stream_rpc_method_handler(bidi, response_serializer=serialize)
        if inspect.iscoroutinefunction(handler.stream_stream):
            consuming = _decoded_requests(handler.stream_stream, decode)
            return grpc.stream_stream_rpc_method_handler(consuming, response_serializer=serialize)
    return handler


def _decode(raw: bytes, decode: Callable[[bytes], Any]) -> Any:
    """The request ``raw`` encodes; raises InvalidArgument if it cannot be decoded (or is
    larger than its method's limit)."""
    try:
        return decode(raw)
    except DecodeError as exc:
        raise errors.InvalidArgument("request", f"cannot be decoded: {exc}") from None


async def _decode_all(
    raw_requests: AsyncIterator[bytes], decode: Callable[[bytes], Any]
) -> AsyncIterator[Any]:
    """The requests of a stream. One that cannot be decoded raises InvalidArgument to whoever
    reads it: a servicer that reads in a task of its own ends its call with it, as it does with
    its own errors (a status sent from another task than the call's can be lost)."""
    async for raw in raw_requests:
        yield _decode(raw, decode)


def _decoded_request(
    behavior: Callable[..., Awaitable[Any]], decode: Callable[[bytes], Any]
) -> Callable[[bytes, Context], Awaitable[Any]]:
    async def decoded(raw: bytes, context: Context) -> Any:
        try:
            request = _decode(raw, decode)
        except errors.InvalidArgument as exc:
            await abort_with(context, exc)
        return await behavior(request, context)

    return decoded


def _decoded_request_streaming(
    behavior: Callable[..., AsyncGenerator[Any, None]], decode: Callable[[bytes], Any]
) -> Callable[[bytes, Context], AsyncIterator[Any]]:
    async def decoded(raw: bytes, context: Context) -> AsyncIterator[Any]:
        try:
            request = _decode(raw, decode)
        except errors.InvalidArgument as exc:
            await abort_with(context, exc)
        async with contextlib.aclosing(behavior(request, context)) as responses:
            async for response in responses:
                yield response

    return decoded


def _decoded_requests(
    behavior: Callable[..., Awaitable[Any]], decode: Callable[[bytes], Any]
) -> Callable[[AsyncIterator[bytes], Context], Awaitable[Any]]:
    async def decoded(raw_requests: AsyncIterator[bytes], context: Context) -> Any:
        try:
            return await behavior(_decode_all(raw_requests, decode), context)
        except errors.InvalidArgument as exc:  # a servicer that does not map our errors
            await abort_with(context, exc)

    return decoded


def _decoded_requests_streaming(
    behavior: Callable[..., AsyncGenerator[Any, None]], decode: Callable[[bytes], Any]
) -> Callable[[AsyncIterator[bytes], Context], AsyncIterator[Any]]:
    async def decoded(raw_requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
        try:
            requests = _decode_all(raw_requests, decode)
            async with contextlib.aclosing(behavior(requests, context)) as responses:
                async for response in responses:
                    yield response
        except errors.InvalidArgument as exc:  # a servicer that does not map our errors
            await abort_with(context, exc)

    return decoded


async def serve(
    listen: str,
    register: Callable[[grpc.aio.Server], Sequence[str]],
    *,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    grace: float = 5.0,
    on_stopping: Callable[[], Awaitable[None]] | None = None,
    end_streams_with: str | None = None,
    options: Sequence[tuple[str, Any]] = SERVER_OPTIONS,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[ServerInterceptor] = (),
    reflection: bool = True,
    request_limits: Mapping[str, RequestLimit] | None = None,
    call_metrics: bool = False,
) -> None:
    """Runs a grpc.aio server on ``listen`` until SIGTERM/SIGINT or ``stop`` is set.

    ``register`` adds the servicers and returns their full service names (for reflection and
    health). ``ready`` receives the bound port. ``credentials``: TLS (None: plaintext);
    ``interceptors`` see every call first; ``reflection``: whether to answer server reflection.
    On stop: health turns NOT_SERVING, open
    streams end with UNAVAILABLE and ``end_streams_with`` if it is given (new ones are
    refused so), ``on_stopping`` runs while in-flight calls still flow, then they get
    ``grace`` seconds. ``request_limits``: the largest requests of some methods (RequestLimit).
    ``call_metrics``: every call is counted and timed (common.grpc_metrics). With tracing on,
    every call gets a span (common.grpc_tracing).
    """
    drain = [StreamDrain(end_streams_with)] if end_streams_with is not None else []
    measured = [CallMetrics()] if call_metrics else []
    traced = [CallSpans()] if tracing.enabled() else []
    server = grpc.aio.server(
        options=list(options),
        interceptors=[*measured, *traced, *interceptors, *drain, RequestDecoding(request_limits)],
    )
    service_names = list(register(server))
    health_servicer: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection:
        enable_server_reflection(
            [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name], server
        )
    port = (
        server.add_secure_port(listen, credentials)
        if credentials is not None
        else server.add_insecure_port(listen)
    )
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if ready is not None:
        ready(port)
    stop = stop or asyncio.Event()
    _stop_on_signals(stop, (signal.SIGTERM, signal.SIGINT))
    await stop.wait()
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    for streams in drain:
        await streams.drain(grace)
    if on_stopping is not None:
        await on_stopping()  # while in-flight streams still flow
    await server.stop(grace)


def _stop_on_signals(stop: asyncio.Event, signals: Iterable[signal.Signals]) -> None:
    loop = asyncio.get_running_loop()
    for sig in signals:
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            return


# The metadata key that carries the caller's tenant from a gateway to an executor. A gateway sets
# it after authenticating the caller; an executor believes it (only gateways reach executors:
# common.internal_access).
TENANT_METADATA = "agentrun-tenant"


def tenant_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The tenant a gateway named in a call to an executor."""
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_METADATA and value:
            return str(value)
    raise errors.Unauthenticated(f"an internal call must name its tenant ({TENANT_METADATA})")
