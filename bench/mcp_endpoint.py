"""An MCP server for bench.mcp_tools, in a process of its own (the official SDK's server over
Streamable HTTP at /mcp): one tool, ``weather``, that answers at once. Prints its port, then
serves until killed.

    python -m bench.mcp_endpoint
"""

from __future__ import annotations

import socket

import uvicorn
from mcp.server.mcpserver import MCPServer

server = MCPServer("agentrun-bench")


@server.tool()
async def weather(city: str) -> str:
    """The weather now in a city."""
    return '{"temp": 21, "unit": "C"}'


def main() -> None:
    with socket.socket() as probe:  # (a free port: uvicorn does not say which it took)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    print(port, flush=True)
    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
