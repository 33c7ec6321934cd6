"""The services' OpenTelemetry traces: set up from the standard OTEL_* variables, and the few
helpers the code's spans go through.

Tracing is on when an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) and OTEL_SDK_DISABLED is not true. Then ``configure`` sets up
the SDK: a tracer provider with the sampler of OTEL_TRACES_SAMPLER, a batch span processor
(OTEL_BSP_*) and the OTLP/gRPC exporter (OTEL_EXPORTER_OTLP_*). Off, the SDK is not even
imported, and ``span`` hands out one shared no-op context without touching the context: a span
in a hot path costs a function call.

One trace per run: the context travels in W3C trace context (``traceparent``) over gRPC
metadata, in ExecuteRun's first message (its calls are opened before the run is known), over
the headers of dispatch messages, and in the run's Requested event, so that an executor that
takes a durable run up continues its trace.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, StatusCode

log = logging.getLogger(__name__)

TRACER: trace.Tracer = trace.get_tracer("agentrun")  # the SDK's own once ``configure`` ran

_enabled = False
_content = False
_NOT_TRACED: AbstractContextManager[Span] = contextlib.nullcontext(INVALID_SPAN)

Attributes = Mapping[str, Any]
ERROR = StatusCode.ERROR


def enabled() -> bool:
    return _enabled


def content_enabled() -> bool:
    """Whether spans may carry prompts, completions, tool arguments and results
    (AGENTRUN_TRACE_CONTENT=on)."""
    return _enabled and _content


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the OTEL_* variables ask for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def configure(
    service_name: str,
    *,
    content: bool = False,
    instance_id: str = "",
    env: Mapping[str, str] | None = None,
) -> Callable[[], None]:
    """Sets tracing up if the OTEL_* variables ask for it; returns what flushes and stops it
    (the exporter sends the spans it still holds). ``service_name``: the default of
    OTEL_SERVICE_NAME."""
    global _enabled, _content
    env = os.environ if env is None else env
    if not wanted(env):
        return _nothing
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:  # the API alone: its no-op tracer
        log.warning("traces are configured but the OpenTelemetry SDK is missing: %s", exc)
        return _nothing
    attributes: dict[str, str] = {}
    if not env.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service_name
    if instance_id:
        attributes["service.instance.id"] = instance_id
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol != "grpc":
        log.warning("traces are exported over OTLP/gRPC only, not %s: check the endpoint", protocol)
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    global TRACER
    TRACER = provider.get_tracer("agentrun")  # not the proxy: one call less per span
    _enabled, _content = True, content
    log.info("traces go to %s", _endpoint(env))
    return provider.shutdown


def _nothing() -> None:
    return None


def _endpoint(env: Mapping[str, str]) -> str:
    return env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )


def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes | None = None,
    parent: otel_context.Context | None = None,
) -> AbstractContextManager[Span]:
    """A span that is current within the ``with`` block and ends with it (an exception marks it
    failed). ``parent``: a context to start it in, else the current one."""
    if not _enabled:
        return _NOT_TRACED
    return _Current(TRACER.start_span(name, context=parent, kind=kind, attributes=attributes))


def leaf(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes | None = None,
    parent: otel_context.Context | None = None,
) -> AbstractContextManager[Span]:
    """A span that ends with the ``with`` block (an exception marks it failed) but is not made
    current: for work that starts no spans of its own (a span the block starts would be its
    sibling), nor passes the current context on (log lines name the same trace either way).
    Cheaper than ``span``: no context to set and restore."""
    if not _enabled:
        return _NOT_TRACED
    return _Ending(TRACER.start_span(name, context=parent, kind=kind, attributes=attributes))


def start_span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes | None = None,
    parent: otel_context.Context | None = None,
) -> Span:
    """A span that is not made current, for the caller to end (one that outlives a block)."""
    if not _enabled:
        return INVALID_SPAN
    return TRACER.start_span(name, context=parent, kind=kind, attributes=attributes)


class _Ending:
    """Ends its span when the block ends; an exception (not a cancellation) marks it failed.
    What ``trace.use_span`` does, without two generator-based context managers per span."""

    __slots__ = ("_span",)

    def __init__(self, span_: Span) -> None:
        self._span = span_

    def __enter__(self) -> Span:
        return self._span

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, Exception) and self._span.is_recording():
            self._span.record_exception(exc)
            self._span.set_status(ERROR, f"{type(exc).__name__}: {exc}")
        self._span.end()


class _Current(_Ending):
    """An ``_Ending`` whose span is current within the block."""

    __slots__ = ("_token",)

    def __enter__(self) -> Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        otel_context.detach(self._token)
        super().__exit__(kind, exc, tb)


def current(span_: Span) -> AbstractContextManager[Span]:
    """Makes ``span_`` (started with ``start_span``) current within the block, without ending
    it or recording an exception on it."""
    return _Made(span_)


class _Made:
    __slots__ = ("_span", "_token")

    def __init__(self, span_: Span) -> None:
        self._span = span_

    def __enter__(self) -> Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        otel_context.detach(self._token)


def carrier(span_: Span | None = None) -> dict[str, str]:
    """The W3C trace context of ``span_`` (or the current span) as text fields; empty when
    tracing is off."""
    if not _enabled:
        return {}
    fields: dict[str, str] = {}
    context = trace.set_span_in_context(span_) if span_ is not None else None
    propagate.inject(fields, context=context)
    return fields


def parent_from(fields: Mapping[str, str] | None) -> otel_context.Context | None:
    """The context that ``carrier`` wrote into ``fields`` (None: none, or tracing is off)."""
    if not _enabled or not fields or "traceparent" not in fields:
        return None
    return propagate.extract(fields)


def metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata (empty when tracing is off)."""
    return tuple(carrier().items())


def carry_on(parent: otel_context.Context | Span | None) -> None:
    """Makes ``parent`` the parent of the spans of the rest of the calling task (and of the
    tasks it starts). Only for a task of its own that ends with the work it traces."""
    if not _enabled or parent is None:
        return
    if isinstance(parent, Span):
        parent = trace.set_span_in_context(parent)
    otel_context.attach(parent)


def trace_id() -> str:
    """The current trace's id in hex ("" if there is none)."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def trace_id_of(fields: Mapping[str, str]) -> str:
    """The trace id in a ``carrier``'s fields ("" if none): a traceparent is
    version-traceid-spanid-flags."""
    parts = fields.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 else ""


@contextlib.contextmanager
def ended(span_: Span) -> Iterator[Span]:
    """Ends a span started with ``start_span`` when the block ends; an exception marks it
    failed. The span is not made current."""
    try:
        yield span_
    except Exception as exc:
        if span_.is_recording():
            span_.record_exception(exc)
            span_.set_status(ERROR, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        span_.end()
