"""What agentrun adds to one MCP tool call, classic and durable (about a minute).

    python -m bench.mcp_tools [--runs N] [--database-url URL]

One nats-server, one executor, one gateway and an MCP server (bench.mcp_endpoint), each a
process of its own. A run lists the server's tools (cached for 5 s per agent version, so almost
every run reuses the listing), makes a model call that asks for the MCP tool, the call, and a
model call that completes the run (scripted model, no delays). The tool step as a client sees it is
the time from the response that carries ToolCallRequested to the one that carries ToolResult:
both go the same way (executor -> gateway -> client; durable: after the step is committed,
through JetStream), so what is left is the step: the call and what agentrun does around it
(resolving the tool, the request, recording the result: a commit to the store for a durable
run). The same call made directly from this process with the SDK's ClientSession (a session
kept open, as the executor keeps one) is the call alone. Added = the step's percentile - the
direct call's.

Samples whose two events came in one response (nothing to time) are counted and left out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

import grpc
import httpx2
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from agentrun.v1 import run_service_pb2, run_service_pb2_grpc
from bench.durable import create_agent
from bench.latency import EOF
from bench.machine import loop_ms
from bench.stack import Stack, choose_store
from bench.stats import Summary
from eventstore.agent_config import (
    AgentConfig,
    ExecutionMode,
    McpServerSettings,
    ModelSettings,
    ScriptedSettings,
    ScriptedToolCall,
    ScriptedTurn,
    ToolSettings,
)
from executor.tools.mcp_sessions import IDEMPOTENCY_KEY

ARGUMENTS = {"city": "Paris"}
WARM_UP = 30
META = cast(types.RequestParamsMeta, {IDEMPOTENCY_KEY: "bench:1"})


def mcp_tool_agent(agent_id: str, mode: ExecutionMode, url: str) -> AgentConfig:
    return AgentConfig(
        agent_id=agent_id,
        version=1,
        execution_mode=mode,
        model=ModelSettings(
            provider="scripted",
            scripted=ScriptedSettings(
                turns=(
                    ScriptedTurn("asking", (ScriptedToolCall("weather", json.dumps(ARGUMENTS)),)),
                    ScriptedTurn("done"),
                ),
            ),
        ),
        tools=(ToolSettings("", kind="mcp", mcp=McpServerSettings(url=url)),),
    )


async def tool_steps(target: str, agent_id: str, runs: int) -> tuple[list[float], int]:
    """The tool step's times (seconds), and how many runs had both events in one response."""
    steps: list[float] = []
    merged = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub: Any = run_service_pb2_grpc.RunServiceStub(channel)
        for _ in range(runs):
            call = stub.StreamRun(
                run_service_pb2.StreamRunRequest(
                    agent_id=agent_id, input="go", request_id=str(uuid.uuid4())
                )
            )
            requested = result = None
            while (response := await call.read()) is not EOF:
                now = time.perf_counter()
                for event in response.events:
                    if event.HasField("tool_call_requested"):
                        requested = now
                    elif event.HasField("tool_result"):
                        result = now
                        if event.tool_result.is_error:
                            raise RuntimeError(f"the tool failed: {event.tool_result.output}")
            if requested is None or result is None:
                raise RuntimeError("a run without its tool call")
            if result == requested:
                merged += 1
            else:
                steps.append(result - requested)
    return steps, merged


async def direct_calls(url: str, runs: int) -> list[float]:
    times: list[float] = []
    async with (
        httpx2.AsyncClient(timeout=None) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        for _ in range(runs):
            started = time.perf_counter()
            result = await session.call_tool("weather", ARGUMENTS, meta=META)
            times.append(time.perf_counter() - started)
            if result.is_error:
                raise RuntimeError(f"the tool failed: {result.content}")
    return times


async def measure(url: str, tmp: Path, modes: list[str], runs: int, tool_url: str) -> None:
    stack = Stack(url, tmp)
    try:
        _, executor = stack.executor()
        target = stack.gateway([executor]).address
        await direct_calls(tool_url, WARM_UP)
        for mode in modes:
            agent_id = f"mcp-{mode}-{uuid.uuid4().hex[:6]}"
            await create_agent(target, mcp_tool_agent(agent_id, mode, tool_url))  # type: ignore[arg-type]
            await tool_steps(target, agent_id, WARM_UP)
            # Interleaved in blocks, so that a change of the machine's speed hits both alike.
            steps: list[float] = []
            direct: list[float] = []
            merged = 0
            for _ in range(10):
                more, merged_now = await tool_steps(target, agent_id, runs // 10)
                steps += more
                merged += merged_now
                direct += await direct_calls(tool_url, runs // 10)
            step, call = Summary.of(steps), Summary.of(direct)
            print(
                f"{mode}: tool step p50 {step.p50_ms:.2f} ms, p99 {step.p99_ms:.2f} ms (n "
                f"{step.count}, {merged} merged); direct call p50 {call.p50_ms:.2f} ms, p99 "
                f"{call.p99_ms:.2f} ms; added p50 {step.p50_ms - call.p50_ms:.2f} ms, p99 "
                f"{step.p99_ms - call.p99_ms:.2f} ms"
            )
        print(f"the machine's speed: {loop_ms():.1f} ms for a fixed loop")
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.mcp_tools", description=__doc__)
    parser.add_argument("--mode", choices=("classic", "durable", "both"), default="both")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--database-url", default=os.environ.get("AGENTRUN_BENCH_DATABASE_URL", ""))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="agentrun-mcp-tools-"))
    modes = ["classic", "durable"] if args.mode == "both" else [args.mode]
    endpoint = subprocess.Popen(
        [sys.executable, "-m", "bench.mcp_endpoint"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert endpoint.stdout is not None
        tool_url = f"http://127.0.0.1:{endpoint.stdout.readline().strip()}/mcp"
        store = choose_store(args.database_url, tmp)
        asyncio.run(measure(store, tmp, modes, args.runs, tool_url))
    finally:
        endpoint.kill()
        endpoint.wait()


if __name__ == "__main__":
    main()
