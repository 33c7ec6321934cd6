"""An MCP server for tests, run as a process of its own (``python -m tests.mcp_server PORT``),
built on the official SDK's server over Streamable HTTP at /mcp.

Its tools: ``lookup`` answers at once; ``held`` answers once the test releases it (to kill an
executor while its call is in flight); ``hang`` never answers; ``failing`` answers with isError;
``big`` answers a long text. At /raw/<mode>/mcp a hand-written endpoint misbehaves (see
``raw``). The test steers and reads the server over HTTP: POST /control/add_tool adds ``extra``,
POST /control/remove_tool removes ``lookup``, POST /control/release releases held calls, GET
/control/calls?count=N returns the calls received (tool, arguments, idempotency key) once there
are N, GET /control/connections how many client connections (address and port) they came over.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

GUARD = 60.0  # seconds; only bounds a hang
KEY = "agentrun/idempotency_key"

server = MCPServer("agentrun-test")
calls: list[dict[str, Any]] = []
connections: set[tuple[str, int]] = set()
arrived = asyncio.Condition()
released = asyncio.Event()


async def record(tool: str, arguments: dict[str, Any], ctx: Context) -> None:
    meta = ctx.request_context.meta or {}
    request = ctx.request_context.request
    if isinstance(request, Request) and request.client is not None:
        connections.add((request.client.host, request.client.port))
    async with arrived:
        calls.append({"tool": tool, "arguments": arguments, "key": dict(meta).get(KEY)})
        arrived.notify_all()


@server.tool()
async def lookup(query: str, ctx: Context) -> str:
    """Looks a word up."""
    await record("lookup", {"query": query}, ctx)
    return f"found {query}"


@server.tool()
async def held(query: str, ctx: Context) -> str:
    """Looks a word up, once the test lets it."""
    await record("held", {"query": query}, ctx)
    await asyncio.wait_for(released.wait(), GUARD)
    return f"held {query}"


@server.tool()
async def hang(ctx: Context) -> str:
    """Never answers."""
    await record("hang", {}, ctx)
    await asyncio.Event().wait()
    return "never"


@server.tool()
async def failing(ctx: Context) -> str:
    """Always fails."""
    await record("failing", {}, ctx)
    raise ToolError("the lookup service is down")


@server.tool()
async def big(size: int, ctx: Context) -> str:
    """Answers ``size`` two-byte characters."""
    await record("big", {"size": size}, ctx)
    return "é" * size


async def extra(ctx: Context) -> str:
    """A tool added while a run goes on."""
    await record("extra", {}, ctx)
    return "extra"


@server.custom_route("/control/add_tool", methods=["POST"])  # type: ignore[untyped-decorator]
async def add_tool(request: Request) -> Response:
    server.add_tool(extra, name="extra")
    return JSONResponse({})


@server.custom_route("/control/remove_tool", methods=["POST"])  # type: ignore[untyped-decorator]
async def remove_tool(request: Request) -> Response:
    server.remove_tool("lookup")
    return JSONResponse({})


@server.custom_route("/control/release", methods=["POST"])  # type: ignore[untyped-decorator]
async def release(request: Request) -> Response:
    released.set()
    return JSONResponse({})


@server.custom_route("/control/calls", methods=["GET"])  # type: ignore[untyped-decorator]
async def received(request: Request) -> Response:
    count = int(request.query_params.get("count", "0"))
    async with arrived:
        await asyncio.wait_for(arrived.wait_for(lambda: len(calls) >= count), GUARD)
        return JSONResponse(calls)


@server.custom_route("/control/connections", methods=["GET"])  # type: ignore[untyped-decorator]
async def connections_used(request: Request) -> Response:
    return JSONResponse(len(connections))


slow_starts: list[int] = []
tool_calls_by_mode: dict[str, int] = {}
HUGE_BYTES = 10 * 1024 * 1024
LATE_END = 0.3  # seconds: how long ``lateend`` keeps a response's stream open after the result


async def raw(request: Request) -> Response:
    """A hand-written Streamable HTTP endpoint (JSON responses) at /raw/<mode>/mcp: ``broken``
    answers tools/call with a malformed result; ``slowstart`` never answers its first
    initialize (later ones at once); ``many`` lists 200 tools; ``badlist`` answers tools/list with
    a malformed result; ``flaky`` answers its first two tools/call with HTTP 503; ``dropped``
    breaks the connection in the middle of its first tools/call's response; ``huge`` answers
    tools/call with a text of HUGE_BYTES; ``lateend`` answers tools/call with an SSE stream that
    it ends LATE_END after the result. The connections of tools/call requests are counted."""
    if request.method != "POST":
        return Response(status_code=405)
    mode = request.path_params["mode"]
    message = await request.json()
    method = message.get("method")
    if "id" not in message:  # a notification
        return Response(status_code=202)
    if method == "tools/call" and request.client is not None:
        connections.add((request.client.host, request.client.port))
    result: dict[str, Any]
    if method == "initialize":
        if mode == "slowstart" and not slow_starts:
            slow_starts.append(1)
            await asyncio.Event().wait()
        result = {
            "protocolVersion": message["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": mode, "version": "1"},
        }
    elif method == "tools/list" and mode == "badlist":
        result = {"tools": "not a list of tools"}
    elif method == "tools/list":
        count = 200 if mode == "many" else 1
        result = {
            "tools": [
                {
                    "name": f"mangled{i}" if mode == "many" else "mangled",
                    "description": "Answers nonsense.",
                    "inputSchema": {"type": "object"},
                }
                for i in range(count)
            ]
        }
    elif method == "tools/call" and mode in ("flaky", "dropped"):
        calls_before = tool_calls_by_mode.get(mode, 0)
        tool_calls_by_mode[mode] = calls_before + 1
        if mode == "flaky" and calls_before < 2:
            return Response("overloaded", status_code=503, headers={"Retry-After": "0"})
        if mode == "dropped" and calls_before < 1:
            return StreamingResponse(_broken_body(), media_type="application/json")
        result = {"content": [{"type": "text", "text": "started"}]}
    elif method == "tools/call" and mode == "lateend":
        result = {"content": [{"type": "text", "text": "started"}]}
        answer = {"jsonrpc": "2.0", "id": message["id"], "result": result}
        return StreamingResponse(_ended_late(answer), media_type="text/event-stream")
    elif method == "tools/call" and mode == "huge":
        result = {"content": [{"type": "text", "text": "x" * HUGE_BYTES}]}
    elif method == "tools/call" and mode == "broken":
        result = {"content": "not a list of content blocks", "isError": "perhaps"}
    elif method == "tools/call":
        result = {"content": [{"type": "text", "text": "started"}]}
    else:
        result = {}
    return JSONResponse({"jsonrpc": "2.0", "id": message["id"], "result": result})


async def _ended_late(answer: dict[str, Any]) -> AsyncIterator[bytes]:
    yield f"event: message\ndata: {json.dumps(answer)}\n\n".encode()
    await asyncio.sleep(LATE_END)


async def _broken_body() -> AsyncIterator[bytes]:
    yield b'{"jsonrpc": "2.0", '
    raise ConnectionAbortedError("the test server breaks the connection")


def main() -> None:
    port = int(sys.argv[1])
    app = server.streamable_http_app()
    app.router.routes.append(Route("/raw/{mode}/mcp", raw, methods=["POST", "GET", "DELETE"]))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
