"""What agentrun adds to one HTTP tool call, classic and durable (about a minute).

    python -m bench.http_tools [--runs N] [--database-url URL]

One nats-server, one executor, one gateway and a tool endpoint (bench.tool_endpoint), each a
process of its own. A run is a model call that asks for the HTTP tool, the call, and a model
call that completes the run (scripted model, no delays). The direct call is the same request
made with httpx. How the step is timed: bench.tool_overhead.
"""

from __future__ import annotations

import json
import time

import httpx

from bench.tool_overhead import ARGUMENTS, ToolKindBench, main
from eventstore.agent_config import HttpToolSettings, ToolSettings


def http_tool(url: str) -> ToolSettings:
    return ToolSettings(
        "weather",
        kind="http",
        http=HttpToolSettings(
            url=url,
            description="The weather now in a city.",
            parameters={"type": "object", "properties": {"city": {"type": "string"}}},
        ),
    )


async def direct_calls(url: str, runs: int) -> list[float]:
    times: list[float] = []
    async with httpx.AsyncClient() as client:
        for _ in range(runs):
            started = time.perf_counter()
            response = await client.post(
                url,
                content=json.dumps(ARGUMENTS).encode(),
                headers={"Content-Type": "application/json", "Idempotency-Key": "bench:1"},
            )
            response.read()
            times.append(time.perf_counter() - started)
    return times


HTTP = ToolKindBench("http", http_tool, direct_calls, "bench.tool_endpoint", "/weather")

if __name__ == "__main__":
    main(HTTP, __doc__)
