"""How long a client's tool result takes to reach the model's side, classic and durable.

    python -m bench.client_tools [--runs N] [--database-url URL]

One nats-server, one executor and one gateway, each a process of its own. A run is a model call
that asks for a tool the client executes, the client's result, and a model call that completes
the run (scripted model, no delays). Timed: from sending SubmitToolResult to the response on the
run's stream that carries the ToolResult, i.e. the result recorded and the run going on. A
classic run waits in its executor, so its result goes to the session holding it; a durable run
is suspended in the store, so its result is committed there, the run dispatched again, taken up
by an executor, and its stream published through JetStream.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from agentrun.v1 import run_service_pb2, run_service_pb2_grpc
from bench.durable import create_agent
from bench.latency import EOF
from bench.machine import loop_ms
from bench.stack import Stack, choose_store
from bench.stats import Summary
from bench.tool_overhead import WARM_UP, arguments, tool_agent
from eventstore.agent_config import (
    ClientToolSettings,
    ToolSettings,
)

RESULT = json.dumps({"sky": "clear"})


def client_tool() -> ToolSettings:
    return ToolSettings(
        "weather",
        kind="client",
        client=ClientToolSettings(
            "The weather now in a city.",
            {"type": "object", "properties": {"city": {"type": "string"}}},
        ),
    )


async def result_trips(target: str, agent_id: str, runs: int) -> list[float]:
    """The times (seconds) from submitting each run's result to its ToolResult on the stream."""
    trips: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub: Any = run_service_pb2_grpc.RunServiceStub(channel)
        for _ in range(runs):
            call = stub.StreamRun(
                run_service_pb2.StreamRunRequest(
                    agent_id=agent_id, input="go", request_id=str(uuid.uuid4())
                )
            )
            submitted: float | None = None
            while (response := await call.read()) is not EOF:
                now = time.perf_counter()
                for event in response.events:
                    if event.HasField("client_tool_call_required"):
                        submitted = time.perf_counter()
                        await stub.SubmitToolResult(
                            run_service_pb2.SubmitToolResultRequest(
                                run_id=event.run_id,
                                result=run_service_pb2.ToolResultSubmission(
                                    tool_call_id=event.client_tool_call_required.tool_call.id,
                                    output=RESULT,
                                ),
                            )
                        )
                    elif event.HasField("tool_result"):
                        if submitted is None or event.tool_result.output != RESULT:
                            raise RuntimeError(f"an unexpected result: {event.tool_result}")
                        trips.append(now - submitted)
    return trips


async def measure(url: str, tmp: Path, modes: list[str], runs: int) -> None:
    stack = Stack(url, tmp)
    try:
        _, executor = stack.executor()
        target = stack.gateway([executor]).address
        for mode in modes:
            agent_id = f"client-{mode}-{uuid.uuid4().hex[:6]}"
            await create_agent(target, tool_agent(agent_id, mode, client_tool()))  # type: ignore[arg-type]
            await result_trips(target, agent_id, WARM_UP)
            trip = Summary.of(await result_trips(target, agent_id, runs))
            print(
                f"{mode}: result to ToolResult p50 {trip.p50_ms:.2f} ms, p99 {trip.p99_ms:.2f} ms "
                f"(n {trip.count})"
            )
        print(f"the machine's speed: {loop_ms():.1f} ms for a fixed loop")
    finally:
        stack.stop()


def main() -> None:
    args, tmp, modes = arguments("bench.client_tools", __doc__)
    asyncio.run(measure(choose_store(args.database_url, tmp), tmp, modes, args.runs))


if __name__ == "__main__":
    main()
