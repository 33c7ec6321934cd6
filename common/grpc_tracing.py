"""A server span for every gRPC call of agentrun's services (installed only when tracing is on),
continuing the caller's trace from the call metadata (W3C ``traceparent``).

ExecuteRun is left out: its calls are opened before the run is known, so its trace context comes
in its first message (executor.api.execute_run). Health checks and reflection are left out too:
a probe every few seconds is not worth a trace.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from common import tracing
from common.grpc_metrics import status_code_of
from common.interceptors import AnyHandler, Context, HandlerWrapping, observed

TRACED_PACKAGES = ("/agentrun.",)
EXECUTE_RUN = "/agentrun.internal.v1.ExecutorService/ExecuteRun"


class CallSpans(HandlerWrapping):
    """A SERVER span per call, named by its method (see module docstring)."""

    def __init__(self, untraced: Iterable[str] = (EXECUTE_RUN,)) -> None:
        super().__init__()
        self._untraced = frozenset(untraced)

    def wrap(self, handler: AnyHandler, method: str) -> AnyHandler:
        if not method.startswith(TRACED_PACKAGES) or method in self._untraced:
            return handler
        return _traced_handler(handler, method)


def _traced_handler(handler: AnyHandler, method: str) -> AnyHandler:
    name = method.lstrip("/")
    service, _, method_name = name.partition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method_name}

    def begin(context: Context) -> trace.Span:
        parent = propagate.extract(dict(context.invocation_metadata() or ()))
        return tracing.start_span(name, kind=SpanKind.SERVER, attributes=attributes, parent=parent)

    def done(span: trace.Span, context: Context, exc: BaseException | None) -> None:
        code = status_code_of(context, exc)
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
        if code not in ("OK", "CANCELLED"):
            span.set_status(trace.StatusCode.ERROR, code)
        span.end()

    def within(span: trace.Span) -> AbstractContextManager[trace.Span]:
        return tracing.current(span)

    return observed(handler, begin, done, within)
