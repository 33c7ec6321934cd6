"""A help desk as an MCP server, to try agentrun's MCP tools with (the official `mcp` SDK's
server, over Streamable HTTP at /mcp).

`agentrun up` starts it beside the stack, with the demo agent `demo-tools` that uses it. By hand:

    python examples/mcp_server.py --port 8765 --data-dir /tmp/helpdesk

Its tools:

- `open_ticket(title, details)` opens a ticket: a side effect, written to `tickets.jsonl` in the
  data directory. agentrun sends every attempt of one tool call with the same idempotency key
  (`_meta["agentrun/idempotency_key"]`, `<run id>:<tool call id>`), for example when a durable
  run's executor died during the call and another executor calls again. A call whose key opened
  a ticket already answers with that ticket and opens no other.
- `list_tickets()` lists the tickets opened.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer

IDEMPOTENCY_KEY = "agentrun/idempotency_key"
READY = "MCP server ready:"


class HelpDesk:
    """Tickets, one JSON line each in ``tickets.jsonl``, found again after a restart."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._path = data_dir / "tickets.jsonl"
        self._tickets: list[dict[str, Any]] = []
        if self._path.exists():
            with self._path.open() as lines:
                self._tickets = [json.loads(line) for line in lines if line.strip()]
        self._by_key = {t["idempotency_key"]: t for t in self._tickets if t["idempotency_key"]}
        self._lock = asyncio.Lock()

    async def open(self, title: str, details: str, key: str | None) -> dict[str, Any]:
        async with self._lock:  # (two attempts of one call may arrive together)
            if key and key in self._by_key:
                return self._by_key[key]
            ticket = {
                "id": f"T-{len(self._tickets) + 1:04d}",
                "title": title,
                "details": details,
                "opened_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "idempotency_key": key,
            }
            with self._path.open("a") as out:
                out.write(json.dumps(ticket) + "\n")
            self._tickets.append(ticket)
            if key:
                self._by_key[key] = ticket
            return ticket

    def all(self) -> list[dict[str, Any]]:
        return list(self._tickets)


def help_desk_server(desk: HelpDesk) -> MCPServer:
    server = MCPServer("helpdesk")

    @server.tool()
    async def open_ticket(title: str, ctx: Context, details: str = "") -> str:
        """Opens a help desk ticket; answers with its id."""
        key = dict(ctx.request_context.meta or {}).get(IDEMPOTENCY_KEY)
        ticket = await desk.open(title, details, key if isinstance(key, str) else None)
        return json.dumps({"ticket": ticket["id"], "title": ticket["title"], "status": "open"})

    @server.tool()
    async def list_tickets() -> str:
        """The tickets opened so far."""
        return json.dumps([{"ticket": t["id"], "title": t["title"]} for t in desk.all()])

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--data-dir", type=Path, default=Path(".helpdesk"))
    args = parser.parse_args()
    app = help_desk_server(HelpDesk(args.data_dir)).streamable_http_app()
    # Listening before it says so: whoever waits for the line can connect at once.
    listener = socket.create_server((args.host, args.port))
    print(f"{READY} http://{args.host}:{args.port}/mcp", flush=True)
    config = uvicorn.Config(app, log_level="warning")
    uvicorn.Server(config).run(sockets=[listener])


if __name__ == "__main__":
    main()
