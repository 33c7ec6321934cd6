"""What agentrun adds to one tool call: the part shared by bench.http_tools and bench.mcp_tools.

The tool step as a client sees it is the time from the response that carries ToolCallRequested
to the one that carries ToolResult: both go the same way (executor -> gateway -> client;
durable: after the step is committed, through JetStream), so what is left is the step: the call
and what agentrun does around it (resolving the tool, the request, recording the result: a
commit to the store for a durable run). The same call made directly from this process (a
client kept open, as the executor keeps one) is the call alone. Added = the step's percentile -
the direct call's. Samples whose two events came in one response (nothing to time) are counted
and left out.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agentrun.v1 import run_service_pb2, run_service_pb2_grpc
from bench.durable import create_agent
from bench.latency import EOF
from bench.machine import loop_ms
from bench.stack import Stack, choose_store
from bench.stats import Summary
from eventstore.agent_config import (
    AgentConfig,
    ExecutionMode,
    ModelSettings,
    ScriptedSettings,
    ScriptedToolCall,
    ScriptedTurn,
    ToolSettings,
)

ARGUMENTS = {"city": "Paris"}
WARM_UP = 30


@dataclass(frozen=True)
class ToolKindBench:
    """One kind of tool to measure: ``tool(url)`` is the agent's tool named "weather" (or
    offering it); ``direct_calls(url, n)`` makes n calls from this process and times each;
    ``endpoint`` is the module serving the tool (it prints its port), ``path`` its URL path."""

    name: str
    tool: Callable[[str], ToolSettings]
    direct_calls: Callable[[str, int], Awaitable[list[float]]]
    endpoint: str
    path: str


def tool_agent(agent_id: str, mode: ExecutionMode, tool: ToolSettings) -> AgentConfig:
    """A scripted agent that calls "weather" once, then completes."""
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
        tools=(tool,),
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


async def measure(
    kind: ToolKindBench, url: str, tmp: Path, modes: list[str], runs: int, tool_url: str
) -> None:
    stack = Stack(url, tmp)
    try:
        _, executor = stack.executor()
        target = stack.gateway([executor]).address
        await kind.direct_calls(tool_url, WARM_UP)
        for mode in modes:
            agent_id = f"{kind.name}-{mode}-{uuid.uuid4().hex[:6]}"
            agent = tool_agent(agent_id, mode, kind.tool(tool_url))  # type: ignore[arg-type]
            await create_agent(target, agent)
            await tool_steps(target, agent_id, WARM_UP)
            # Interleaved in blocks, so that a change of the machine's speed hits both alike.
            steps: list[float] = []
            direct: list[float] = []
            merged = 0
            for _ in range(10):
                more, merged_now = await tool_steps(target, agent_id, runs // 10)
                steps += more
                merged += merged_now
                direct += await kind.direct_calls(tool_url, runs // 10)
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


def arguments(prog: str, doc: str | None) -> tuple[argparse.Namespace, Path, list[str]]:
    """The command line of a tool bench: its arguments, a scratch directory and the modes."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--mode", choices=("classic", "durable", "both"), default="both")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--database-url", default=os.environ.get("AGENTRUN_BENCH_DATABASE_URL", ""))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix=f"agentrun-{prog.removeprefix('bench.')}-"))
    return args, tmp, ["classic", "durable"] if args.mode == "both" else [args.mode]


def main(kind: ToolKindBench, doc: str | None) -> None:
    args, tmp, modes = arguments(f"bench.{kind.name}_tools", doc)
    endpoint = subprocess.Popen(
        [sys.executable, "-m", kind.endpoint], stdout=subprocess.PIPE, text=True
    )
    try:
        assert endpoint.stdout is not None
        tool_url = f"http://127.0.0.1:{endpoint.stdout.readline().strip()}{kind.path}"
        store = choose_store(args.database_url, tmp)
        asyncio.run(measure(kind, store, tmp, modes, args.runs, tool_url))
    finally:
        endpoint.kill()
        endpoint.wait()
