"""The services' Prometheus metrics: the one module that owns the metric objects.

Metrics are updated where things happen (a run's session, its agent loop, the recording ports,
durable take-ups, the gRPC interceptor in common.grpc_metrics); the scrape endpoint is served
only when AGENTRUN_METRICS_LISTEN is set (``serve_metrics``). Updating a metric costs a lock
and an addition, so the instrumentation stays in place whether or not anyone scrapes.

Label sets are bounded: modes, agents, providers, tools, error codes and gRPC methods; never a
run's id. Gauges that describe the whole cluster (suspended runs, the dispatch queue) are
computed at scrape time by a collector the executor registers (executor.cluster_metrics).
Traces are common.tracing's.
"""

from __future__ import annotations

import logging
import time
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Seconds, from a millisecond first token to a run that takes minutes.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    float("inf"),
)

# -- runs ----------------------------------------------------------------------------------------

RUNS_STARTED = Counter(
    "agentrun_runs_started", "Runs started (new runs, not repeated starts).", ["mode", "agent"]
)
RUNS_COMPLETED = Counter(
    "agentrun_runs_completed", "Runs that completed, counted where they ended.", ["mode", "agent"]
)
RUNS_FAILED = Counter(
    "agentrun_runs_failed", "Runs that failed, by error code.", ["mode", "agent", "code"]
)
RUNS_CANCELLED = Counter("agentrun_runs_cancelled", "Runs cancelled.", ["mode", "agent"])
FIRST_TOKEN = Histogram(
    "agentrun_first_token_seconds",
    "From a run's start to the first text of its first model call.",
    ["mode"],
    buckets=LATENCY_BUCKETS,
)
RUN_DURATION = Histogram(
    "agentrun_run_duration_seconds",
    "From a run's start to its end (waits for approvals included).",
    ["mode"],
    buckets=LATENCY_BUCKETS,
)
RUNS_HELD = Gauge("agentrun_runs_held", "Runs this executor holds now.", ["mode"])

# -- steps ---------------------------------------------------------------------------------------

STEP_DURATION = Histogram(
    "agentrun_step_duration_seconds",
    "A step, from its start to its result recorded.",
    ["kind"],
    buckets=LATENCY_BUCKETS,
)
MODEL_CALL_DURATION = Histogram(
    "agentrun_model_call_seconds",
    "A model provider's answer to one call.",
    ["provider"],
    buckets=LATENCY_BUCKETS,
)
MODEL_CALL_ERRORS = Counter(
    "agentrun_model_call_errors", "Model calls that failed.", ["provider", "code"]
)
MODEL_TOKENS = Counter(
    "agentrun_model_tokens",
    "Tokens the model reported (direction in: the prompt; out: the answer).",
    ["provider", "direction"],
)
TOOL_CALL_DURATION = Histogram(
    "agentrun_tool_call_seconds", "One attempt of a tool call.", ["tool"], buckets=LATENCY_BUCKETS
)
TOOL_CALL_ERRORS = Counter("agentrun_tool_call_errors", "Tool call attempts that failed.", ["tool"])

# -- durable runs --------------------------------------------------------------------------------

HANDOVERS = Counter(
    "agentrun_handovers",
    "Durable runs changing hands: resumed (taken up after their executor), released (handed "
    "back by a draining executor), dead_lettered (given up on).",
    ["kind"],
)
STORE_COMMIT = Histogram(
    "agentrun_store_commit_seconds",
    "One commit of a durable run's events to the store.",
    buckets=LATENCY_BUCKETS,
)

_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)
_CHILDREN: dict[tuple[Any, tuple[str, ...]], Any] = {}


def labelled(metric: _Metric, *values: str) -> _Metric:
    """``metric.labels(*values)``, kept: prometheus-client takes a lock and checks the values
    on every ``labels()`` call, and a run makes about a dozen. (Children are never removed.)"""
    key = (metric, values)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*values)
    return child


STEP_MODEL_CALL = STEP_DURATION.labels("model_call")
STEP_TOOL_CALL = STEP_DURATION.labels("tool_call")


def model_call(provider: str, seconds: float, error_code: str | None) -> None:
    """Times a model call (``error_code``: its failure's, None if it replied)."""
    labelled(MODEL_CALL_DURATION, provider).observe(seconds)
    if error_code is not None:
        labelled(MODEL_CALL_ERRORS, provider, error_code).inc()


def model_usage(provider: str, tokens_in: int, tokens_out: int) -> None:
    """Counts the tokens of a model call (nothing if the model reported none)."""
    if tokens_in:
        labelled(MODEL_TOKENS, provider, "in").inc(tokens_in)
    if tokens_out:
        labelled(MODEL_TOKENS, provider, "out").inc(tokens_out)


def first_token(mode: str, started_at: float) -> None:
    labelled(FIRST_TOKEN, mode).observe(max(0.0, time.time() - started_at))


def tool_call(tool: str, seconds: float, *, failed: bool) -> None:
    labelled(TOOL_CALL_DURATION, tool).observe(seconds)
    if failed:
        labelled(TOOL_CALL_ERRORS, tool).inc()


def run_started(mode: str, agent: str) -> None:
    labelled(RUNS_STARTED, mode, agent).inc()


def run_ended(mode: str, agent: str, status: str, code: str, started_at: float) -> None:
    """A run ended (``status``: completed, failed or cancelled; ``code``: a failure's)."""
    if status == "completed":
        labelled(RUNS_COMPLETED, mode, agent).inc()
    elif status == "failed":
        labelled(RUNS_FAILED, mode, agent, code).inc()
    elif status == "cancelled":
        labelled(RUNS_CANCELLED, mode, agent).inc()
    else:
        return
    labelled(RUN_DURATION, mode).observe(max(0.0, time.time() - started_at))


# -- the scrape endpoint -------------------------------------------------------------------------


class Endpoint:
    """The scrape endpoint (prometheus-client's HTTP server, in a daemon thread of its own: a
    scrape never runs on the event loop) and the collectors registered with it."""

    def __init__(self, server: WSGIServer | None, collectors: list[Collector]) -> None:
        self._server = server
        self._collectors = collectors
        self.port = server.server_port if server is not None else 0

    def close(self) -> None:
        for collector in self._collectors:
            REGISTRY.unregister(collector)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def serve_metrics(listen: str, collectors: list[Collector] | None = None) -> Endpoint:
    """Serves /metrics on ``listen`` (host:port; empty: not served, and no collector is
    registered, since nobody would read them)."""
    if not listen:
        return Endpoint(None, [])
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
    for collector in collectors or []:
        REGISTRY.register(collector)
    endpoint = Endpoint(server, list(collectors or []))
    log.info("metrics on %s:%d/metrics", host or "0.0.0.0", endpoint.port)
    return endpoint
