"""Server metrics of gRPC calls, on both services: calls by method and status code, and their
latency (a streaming call's latency is its whole life)."""

from __future__ import annotations

import asyncio
import time

import grpc
from prometheus_client import Counter, Histogram

from common.interceptors import AnyHandler, Context, HandlerWrapping, observed
from common.metrics import LATENCY_BUCKETS

CALLS = Counter(
    "agentrun_grpc_server_handled",
    "gRPC calls handled, by method and status code.",
    ["method", "code"],
)
LATENCY = Histogram(
    "agentrun_grpc_server_handling_seconds",
    "gRPC calls, from their start to their status.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)


class CallMetrics(HandlerWrapping):
    """Counts and times every call (the outermost interceptor: what it sees is what the caller
    gets). Methods it does not know (no handler) are left to gRPC's UNIMPLEMENTED."""

    def wrap(self, handler: AnyHandler, method: str) -> AnyHandler:
        return _measured_handler(handler, method)


def status_code_of(context: Context, exc: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if exc is None:
        return "OK"
    # The client went away: the handler is cancelled while it awaits, or closed while it waits
    # at a yield for its response to be taken.
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) or context.cancelled():
        return "CANCELLED"
    return "UNKNOWN"


def _measured_handler(handler: AnyHandler, method: str) -> AnyHandler:
    calls: dict[str, Counter] = {}  # by code, as they occur: no series for codes never seen
    latency = LATENCY.labels(method)

    def began(context: Context) -> float:
        return time.perf_counter()

    def done(began: float, context: Context, exc: BaseException | None) -> None:
        latency.observe(time.perf_counter() - began)
        code = status_code_of(context, exc)
        counter = calls.get(code)
        if counter is None:
            counter = calls[code] = CALLS.labels(method, code)
        counter.inc()

    return observed(handler, began, done)
