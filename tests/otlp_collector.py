"""An OpenTelemetry collector stand-in: a real OTLP/gRPC receiver (the TraceService of
opentelemetry-proto) that keeps the spans the services export, for tests to look at.

    python -m tests.otlp_collector [--port N]   # a receiver process that only counts spans
                                                # (it prints how many when it is stopped)

Served by a gRPC server in threads of its own, so that it answers whatever the caller's event
loop is doing.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

GUARD = 60.0  # seconds; only bounds a hang


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: dict[str, Any]
    error: bool  # its status is ERROR


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind is None:
        return None
    return getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it (``keep``: else it only counts them)."""

    def __init__(self, *, keep: bool = True) -> None:
        self.spans: list[ReceivedSpan] = []
        self.count = 0
        self._keep = keep
        self._arrived = threading.Condition()
        self._server: grpc.Server | None = None
        self.port = 0

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(span)
                    if self._keep:
                        self.spans.append(
                            ReceivedSpan(
                                service=str(resource.get("service.name", "")),
                                name=span.name,
                                kind=span.kind,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex(),
                                attributes=_attributes(span.attributes),
                                error=span.status.code == span.status.STATUS_CODE_ERROR,
                            )
                        )
        with self._arrived:
            self.count += len(received)
            self._arrived.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self, port: int = 0) -> str:
        """Serves on 127.0.0.1; returns the endpoint to export to (http://127.0.0.1:port)."""
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        add = trace_service_pb2_grpc.add_TraceServiceServicer_to_server
        add(self, self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)

    async def wait_for(self, found: Callable[[list[ReceivedSpan]], bool]) -> list[ReceivedSpan]:
        """Returns the spans received once ``found`` says they are there (TimeoutError after
        GUARD seconds)."""

        def wait() -> list[ReceivedSpan]:
            with self._arrived:
                if not self._arrived.wait_for(lambda: found(list(self.spans)), GUARD):
                    raise TimeoutError(f"not found among {len(self.spans)} spans")
                return list(self.spans)

        return await asyncio.to_thread(wait)


def main() -> None:
    parser = argparse.ArgumentParser(prog="tests.otlp_collector", description=__doc__)
    parser.add_argument("--port", type=int, default=4317)
    args = parser.parse_args()
    collector = Collector(keep=False)
    collector.start(args.port)

    def stop(signum: int, frame: object) -> None:
        print(f"otlp-collector-received {collector.count} spans", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"otlp-collector-ready {collector.port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
