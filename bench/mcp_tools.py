"""What agentrun adds to one MCP tool call, classic and durable (about a minute).

    python -m bench.mcp_tools [--runs N] [--database-url URL]

One nats-server, one executor, one gateway and an MCP server (bench.mcp_endpoint), each a
process of its own. A run lists the server's tools (cached for 5 s per agent version, so almost
every run reuses the listing), makes a model call that asks for the MCP tool, the call, and a
model call that completes the run (scripted model, no delays). The direct call is the same call
made with the SDK's ClientSession, over the executor's HTTP transport (which keeps connections
for the next call: executor.tools.mcp_transport), so that the difference is agentrun's. How the
step is timed: bench.tool_overhead.
"""

from __future__ import annotations

import time
from typing import cast

import httpx2
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from bench.tool_overhead import ARGUMENTS, ToolKindBench, main
from eventstore.agent_config import McpServerSettings, ToolSettings
from executor.tools import DEFAULT_MAX_OUTPUT_BYTES, MCP_RESPONSE_FACTOR
from executor.tools.mcp_sessions import IDEMPOTENCY_KEY
from executor.tools.mcp_transport import McpHttpTransport

META = cast(types.RequestParamsMeta, {IDEMPOTENCY_KEY: "bench:1"})


def mcp_tool(url: str) -> ToolSettings:
    return ToolSettings("", kind="mcp", mcp=McpServerSettings(url=url))


async def direct_calls(url: str, runs: int) -> list[float]:
    times: list[float] = []
    async with (
        httpx2.AsyncClient(
            timeout=None,
            transport=McpHttpTransport(MCP_RESPONSE_FACTOR * DEFAULT_MAX_OUTPUT_BYTES),
        ) as http,
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


MCP = ToolKindBench("mcp", mcp_tool, direct_calls, "bench.mcp_endpoint", "/mcp")

if __name__ == "__main__":
    main(MCP, __doc__)
