"""The tools an agent can use: the built-in ones by name, and the agents' own by kind.

Each built-in tool registers itself in its module (base.register_tool), and each kind of tool
too (base.register_kind); executor.extensions loads the shipped ones.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from common.url_allow import UrlAllowList
from eventstore.agent_config import ToolSettings
from eventstore.run import PinnedTool
from executor.tools.base import KINDS, TOOLS, Tool, ToolRuntime
from executor.tools.mcp import McpListings, McpTool
from executor.tools.mcp_sessions import McpSessions

DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024
# An MCP response carries the result as JSON (its text escaped, often a structured copy beside
# it): it is read up to this many times the largest tool output, and no further.
MCP_RESPONSE_FACTOR = 16
# Connections to tools' endpoints kept open between calls, shared by all runs of an executor.
MAX_CONNECTIONS = 100


def get_tool(name: str) -> Tool | None:
    """The registered built-in tool called ``name``, or None if there is none."""
    return TOOLS.get(name)


class Tools:
    """The tools of an executor: what a run's tool settings resolve to, and the resources the
    tools share (closed with the executor)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        url_allow: UrlAllowList | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        client = httpx.AsyncClient(
            follow_redirects=False,  # a redirect would lead around the URL allow list
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS),
        )
        self.runtime = ToolRuntime(client, url_allow or UrlAllowList(), data_dir, max_output_bytes)
        self.mcp_sessions = McpSessions(MCP_RESPONSE_FACTOR * max_output_bytes)
        self.mcp = McpListings(self.mcp_sessions, self.runtime)

    @property
    def data_dir(self) -> Path:
        return self.runtime.data_dir

    def resolve(self, settings: ToolSettings) -> Tool | None:
        """The tool an agent's settings name; None if this executor has no such tool."""
        if settings.kind == "builtin":
            return get_tool(settings.name)
        make = KINDS.get(settings.kind)
        return make(settings, self.runtime) if make is not None else None

    def resolve_pinned(self, settings: ToolSettings, pinned: PinnedTool) -> Tool:
        """The tool of an MCP server that a run pinned (``settings``: the server's)."""
        return McpTool(settings, pinned, self.mcp_sessions, self.runtime)

    async def aclose(self) -> None:
        await self.mcp_sessions.aclose()
        await self.runtime.http.aclose()
