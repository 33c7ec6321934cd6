"""Traces: gateway and executors export OTLP/gRPC to a collector stand-in in the test process
(tests/otlp_collector.py); one trace per run, across a gateway, an executor killed mid-run and
the executor that takes the run up; logs that name the trace."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from cli.launcher import Service, free_port
from tests.client import Client, kinds, scripted_agent, until
from tests.conftest import database_url_for, drop_schema
from tests.otlp_collector import Collector, ReceivedSpan
from tests.stack import Stack
from tests.test_durable_crashes import Reader
from tests.test_http_tools import DURABLE, EXECUTOR_ENV, http_tool, scripted
from tests.test_logs import CALCULATE
from tests.tool_server import Reply, ToolServer

GATEWAY = "agentrun-gateway"
EXECUTOR = "agentrun-executor"
SERVER = trace_pb2.Span.SPAN_KIND_SERVER


def traced_env(endpoint: str, **more: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_SAMPLER": "always_on",
        # Spans go out within a tenth of a second (the default waits 5 s): the test waits for
        # what an executor exported before it kills it.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **EXECUTOR_ENV,
        **more,
    }


@pytest.fixture
def collector() -> Iterator[Collector]:
    running = Collector()
    running.start()
    yield running
    running.stop()


@pytest.fixture
def server() -> Iterator[ToolServer]:
    running = ToolServer()
    running.start()
    yield running
    running.stop()


@dataclass
class TracedStack:
    stack: Stack
    port: int
    env: dict[str, str]
    client: Client

    def start_executor(self) -> Service:
        return self.stack.start_executor(
            AGENTRUN_EXECUTOR_LISTEN=f"127.0.0.1:{self.port}", **self.env
        )


@pytest.fixture
async def traced(
    nats_server: Service, tmp_path: Path, collector: Collector
) -> AsyncIterator[TracedStack]:
    """A gateway in front of one executor port (where a killed executor's successor listens),
    all exporting their spans to the collector."""
    url = database_url_for("postgres", tmp_path / "data")
    stack = Stack(database_url=url, nats=nats_server, tmp=tmp_path)
    env = traced_env(collector.start(), AGENTRUN_LOG_FORMAT="json")
    try:
        running = TracedStack(stack, free_port(), env, None)  # type: ignore[arg-type]
        running.start_executor()
        stack.start_gateway(f"127.0.0.1:{running.port}", **env)
        async with grpc.aio.insecure_channel(stack.gateways[0].address) as channel:
            running.client = Client(channel)
            yield running
    finally:
        stack.stop()
        drop_schema(url)


def of_run(spans: list[ReceivedSpan], run_id: str) -> list[ReceivedSpan]:
    """The spans of the trace that the run's start is in."""
    starts = [
        s for s in spans if s.name == "start run" and s.attributes.get("agentrun.run.id") == run_id
    ]
    if not starts:
        return []
    trace_id = starts[0].trace_id
    return [s for s in spans if s.trace_id == trace_id]


def named(spans: list[ReceivedSpan], prefix: str, service: str = EXECUTOR) -> list[ReceivedSpan]:
    return [s for s in spans if s.name.startswith(prefix) and s.service == service]


def whole(run_id: str) -> Callable[[list[ReceivedSpan]], bool]:
    """Whether a run's trace holds what the run did once it ended: both take-ups, two model
    calls, the tool call's second attempt, and the gateway's call."""

    def found(spans: list[ReceivedSpan]) -> bool:
        trace = of_run(spans, run_id)
        return (
            len(named(trace, "take run")) >= 2
            and len(named(trace, "chat ")) >= 2
            and bool(named(trace, "execute_tool "))
            and bool(named(trace, "agentrun.v1.RunService/StreamRun", GATEWAY))
        )

    return found


async def test_a_durable_run_whose_executor_is_killed_mid_tool_call_is_one_trace(
    traced: TracedStack, collector: Collector, server: ToolServer
) -> None:
    url = server.script(
        "/weather", Reply(200, b'{"temp": 1}', hold=True), Reply(200, b'{"temp": 2}')
    )
    client = traced.client
    agent = await client.create_agent(scripted(http_tool("weather", url), mode=DURABLE))
    reader = Reader(client, agent.id, kill_after=1_000_000)
    await server.wait_for("/weather", 1)  # the tool call is in flight on the first executor
    # What the first executor did before the call (the model's answer, its commit) is exported
    # (the two spans may go out in different batches).
    await collector.wait_for(
        lambda spans: bool(named(spans, "chat ")) and bool(named(spans, "commit run events"))
    )
    first = traced.stack.executors[-1]
    first.kill()
    await asyncio.to_thread(traced.start_executor)  # takes the run up
    await server.wait_for("/weather", 2)
    server.release()
    events = await reader.result()
    assert events[-1].run_completed.output == "Done.", kinds(events)
    run_id = events[0].run_id

    spans = of_run(await collector.wait_for(whole(run_id)), run_id)

    (streamed,) = named(spans, "agentrun.v1.RunService/StreamRun", GATEWAY)
    assert streamed.kind == SERVER
    assert streamed.parent_span_id == ""  # the client sent no trace: the run's trace begins here
    calls = named(spans, "agentrun.internal.v1.ExecutorService/ExecuteRun", GATEWAY)
    assert len(calls) == 2  # the start, then the stream resumed on the second executor
    assert {c.parent_span_id for c in calls} == {streamed.span_id}
    (start,) = named(spans, "start run")
    assert start.parent_span_id in {c.span_id for c in calls}
    assert named(spans, "store run")
    assert named(spans, "dispatch run")

    takes = sorted(
        named(spans, "take run"), key=lambda s: s.attributes["messaging.message.delivery_count"]
    )
    executors = {t.attributes["agentrun.executor.id"] for t in takes}
    assert len(executors) == 2, takes  # one take-up per executor
    assert [t.attributes["agentrun.step.attempt"] for t in takes] == [1, 2]

    chats = sorted(named(spans, "chat "), key=lambda s: s.attributes["agentrun.step.index"])
    first_call, last_call = chats[0], chats[-1]
    for chat in chats:
        assert chat.kind == trace_pb2.Span.SPAN_KIND_CLIENT
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.provider.name"] == "scripted"
        assert chat.attributes["gen_ai.request.model"]
        assert chat.attributes["gen_ai.usage.input_tokens"] > 0
        assert chat.attributes["gen_ai.usage.output_tokens"] > 0
        assert "gen_ai.input.messages" not in chat.attributes  # content is opt-in
    assert first_call.attributes["gen_ai.response.finish_reasons"] == ["tool_calls"]
    assert last_call.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert first_call.attributes["agentrun.step.attempt"] == 1
    assert first_call.parent_span_id == takes[0].span_id
    assert last_call.parent_span_id == takes[1].span_id

    (tool,) = named(spans, "execute_tool ")  # the first attempt's span died with its executor
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
    assert tool.attributes["gen_ai.tool.name"] == "weather"
    assert tool.attributes["gen_ai.tool.call.id"]
    assert tool.attributes["agentrun.step.attempt"] == 2
    assert tool.parent_span_id == takes[1].span_id

    commits = named(spans, "commit run events")
    assert {c.parent_span_id for c in commits} >= {takes[0].span_id, takes[1].span_id}
    assert all(c.attributes["db.system.name"] == "postgresql" for c in commits)


CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


async def test_a_client_that_sends_trace_context_gets_its_calls_in_its_trace(
    traced: TracedStack, collector: Collector
) -> None:
    client = traced.client
    agent = await client.create_agent(scripted_agent(turns=CALCULATE))
    client.metadata = (("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),)
    events = await client.run(agent.id, "6*7?")
    assert events[-1].run_completed.output == "42.", kinds(events)
    await client.get_run(events[0].run_id)

    def found(spans: list[ReceivedSpan]) -> bool:
        ours = [s for s in spans if s.trace_id == CLIENT_TRACE]
        return (
            len(named(ours, "chat ")) == 2
            and bool(named(ours, "execute_tool "))
            and bool(named(ours, "agentrun.v1.RunService/GetRun"))
            and bool(named(ours, "agentrun.v1.RunService/GetRun", GATEWAY))
            and bool(named(ours, "agentrun.v1.RunService/StreamRun", GATEWAY))
        )

    spans = [s for s in await collector.wait_for(found) if s.trace_id == CLIENT_TRACE]
    # A classic run: its steps are the start's children, on the executor the gateway called.
    (streamed,) = named(spans, "agentrun.v1.RunService/StreamRun", GATEWAY)
    assert streamed.parent_span_id == CLIENT_SPAN
    (call,) = named(spans, "agentrun.internal.v1.ExecutorService/ExecuteRun", GATEWAY)
    (start,) = named(spans, "start run")
    assert (call.parent_span_id, start.parent_span_id) == (streamed.span_id, call.span_id)
    (tool,) = named(spans, "execute_tool ")
    assert tool.attributes["gen_ai.tool.name"] == "calculator"
    assert {s.parent_span_id for s in [*named(spans, "chat "), tool]} == {start.span_id}
    # A forwarded call: the gateway's span, and the executor's beneath it.
    (asked,) = named(spans, "agentrun.v1.RunService/GetRun", GATEWAY)
    (answered,) = named(spans, "agentrun.v1.RunService/GetRun")
    assert (asked.parent_span_id, answered.parent_span_id) == (CLIENT_SPAN, asked.span_id)
    assert answered.attributes["rpc.grpc.status_code"] == 0


async def test_log_lines_of_a_run_name_its_run_and_its_trace(
    traced: TracedStack, collector: Collector
) -> None:
    traced.stack.executors[-1].stop()
    traced.env["AGENTRUN_TRACE_CONTENT"] = "on"
    await asyncio.to_thread(traced.start_executor)
    client = traced.client
    agent = await client.create_agent(
        scripted_agent(turns=CALCULATE, mode=DURABLE, token_delay_ms=200)
    )
    call = client.stream(agent.id, "6*7?")
    run_id = (await until(call, "text_delta"))[0].run_id
    executor = traced.stack.executors[-1]
    executor.stop()  # it drains: the durable run is handed back, which it logs
    call.cancel()
    spans = of_run(await collector.wait_for(lambda spans: bool(of_run(spans, run_id))), run_id)
    lines = [json.loads(line) for line in executor.log().splitlines() if line.startswith("{")]
    about = [line for line in lines if line.get("run_id") == run_id]
    assert any("handed back" in line["message"] for line in about), lines
    assert {line["trace_id"] for line in about} == {spans[0].trace_id}
    # AGENTRUN_TRACE_CONTENT=on: the prompt is on the model call's span.
    (chat,) = named(spans, "chat ")
    prompt = json.loads(chat.attributes["gen_ai.input.messages"])
    assert prompt[-1]["content"] == "6*7?"


def test_tracing_off_sets_up_no_sdk() -> None:
    """Without an endpoint (or with OTEL_SDK_DISABLED) the SDK is not even imported."""
    check = (
        "import sys; from common import tracing; "
        "tracing.configure('x', env={'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://127.0.0.1:1', "
        "'OTEL_SDK_DISABLED': 'true'}); tracing.configure('x', env={}); "
        "assert not tracing.enabled(); "
        "assert not [m for m in sys.modules if m.startswith('opentelemetry.sdk')], 'imported'"
    )
    subprocess.run([sys.executable, "-c", check], check=True, cwd=Path(__file__).parent.parent)
