"""MCP servers as tools: their tool lists, pinned in a run when it starts, and the calls.

A run's MCP tools are listed once, at its start (cached a few seconds per agent version, so a
burst of runs asks each server once), and recorded in the run (Run.ToolsListed): the model is
offered exactly those tools for the whole run, wherever it resumes. A call carries
``_meta["agentrun/idempotency_key"]`` = ``<run id>:<tool call id>``, the same for every
attempt. A server that cannot be reached ("transport") or that answers HTTP 429 or 5xx
("http_<status>") is an attempt a retry may cure; a result with isError, an MCP error, a
malformed response and a response too long to read go to the model as tool errors.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from common.json_values import json_size
from eventstore.agent_config import MAX_AGENT_BYTES, AgentConfig, McpServerSettings, ToolSettings
from eventstore.run import PinnedTool
from eventstore.tool_validation import (
    MAX_DESCRIPTION_LENGTH,
    MAX_MCP_TOOL_NAMES,
    MAX_SCHEMA_BYTES,
    TOOL_NAME,
)
from executor.tools.base import (
    RetryableToolError,
    ToolContext,
    ToolError,
    ToolRuntime,
    headers_from_env,
)
from executor.tools.mcp_sessions import (
    McpHttpError,
    McpResponseTooLong,
    McpSessions,
    McpUnreachable,
    load_sdk,
)

if TYPE_CHECKING:  # (the SDK is imported on first use: see executor.tools.mcp_sessions)
    from mcp import types

# How long a listing is reused for runs of the same agent version.
LISTING_TTL = 5.0
# Bounds on what a run pins (it is recorded in the run and offered at every model call): as
# many tools as an agent may name of a server, each schema as large as an HTTP tool's, and the
# whole as large as an agent.
MAX_PINNED_TOOLS = MAX_MCP_TOOL_NAMES
MAX_PINNED_BYTES = MAX_AGENT_BYTES


class ToolUnavailable(Exception):
    """The run cannot have its MCP tools: it fails (RUN_ERROR_CODE_TOOL_UNAVAILABLE)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class McpListings:
    """Lists the tools of an agent's MCP servers for a run, through the executor's sessions."""

    def __init__(self, sessions: McpSessions, runtime: ToolRuntime) -> None:
        self._sessions = sessions
        self._runtime = runtime
        self._cache: dict[tuple[str, str, int], tuple[float, list[PinnedTool]]] = {}

    async def pin(self, tenant: str, config: AgentConfig) -> list[PinnedTool]:
        """The tools to pin in a run of ``config``; ToolUnavailable names the server that
        could not be listed, or a name that clashes."""
        key = (tenant, config.agent_id, config.version)
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        pinned: list[PinnedTool] = []
        names = {t.name for t in config.tools if t.kind != "mcp"}
        for index, settings in config.mcp_servers:
            assert settings.mcp is not None  # (validated with the agent)
            server = settings.mcp
            for tool in await self._list(settings, server):
                if server.tool_names and tool.name not in server.tool_names:
                    continue
                name = server.name_prefix + tool.name
                if not TOOL_NAME.fullmatch(name):
                    raise ToolUnavailable(
                        f"the MCP server {server.url} lists a tool {name!r} whose name breaks "
                        "the tool-name rule (1-64 characters of a-z, A-Z, 0-9, _ and -)",
                        retryable=False,
                    )
                if name in names:
                    raise ToolUnavailable(
                        f"the MCP server {server.url} lists a tool {name!r}, which is already "
                        "the name of another tool of the agent: give the server a name_prefix",
                        retryable=False,
                    )
                names.add(name)
                parameters = dict(tool.input_schema or {"type": "object"})
                if json_size(parameters) > MAX_SCHEMA_BYTES:
                    raise ToolUnavailable(
                        f"the MCP server {server.url} lists a tool {name!r} whose input schema "
                        f"is larger than {MAX_SCHEMA_BYTES:,} bytes",
                        retryable=False,
                    )
                pinned.append(
                    {
                        "name": name,
                        "server": index,
                        "server_name": tool.name,
                        "description": (tool.description or "")[:MAX_DESCRIPTION_LENGTH],
                        "parameters": parameters,
                    }
                )
                if len(pinned) > MAX_PINNED_TOOLS:
                    raise ToolUnavailable(
                        f"the MCP server {server.url} lists more than {MAX_PINNED_TOOLS} tools "
                        "(with the agent's other servers): name the ones to offer in tool_names",
                        retryable=False,
                    )
        if json_size(pinned) > MAX_PINNED_BYTES:
            raise ToolUnavailable(
                f"the tools of the agent's MCP servers take more than {MAX_PINNED_BYTES:,} bytes "
                "(names, descriptions and schemas): name fewer in tool_names",
                retryable=False,
            )
        self._cache[key] = (now + LISTING_TTL, pinned)
        return pinned

    async def _list(self, settings: ToolSettings, server: McpServerSettings) -> list[types.Tool]:
        await load_sdk()
        from mcp.shared.exceptions import MCPError
        from pydantic import ValidationError

        if not self._runtime.url_allow.allows(server.url):
            raise ToolUnavailable(
                f"this executor does not allow the MCP server {server.url} "
                "(AGENTRUN_TOOL_URL_ALLOW)",
                retryable=False,
            )
        try:
            headers = headers_from_env(server.headers_from_env)
        except ToolError as exc:
            raise ToolUnavailable(f"the MCP server {server.url}: {exc}", retryable=False) from None
        try:
            async with asyncio.timeout(settings.timeout):
                return await self._sessions.list_tools(server.url, headers)
        except TimeoutError:
            raise ToolUnavailable(
                f"the MCP server {server.url} did not list its tools within {settings.timeout:g} s",
                retryable=True,
            ) from None
        except (McpUnreachable, McpHttpError) as exc:
            raise ToolUnavailable(
                f"the MCP server {server.url} could not be reached: {exc}", retryable=True
            ) from None
        except McpResponseTooLong as exc:
            raise ToolUnavailable(
                f"the MCP server {server.url} listed its tools in a response {exc}",
                retryable=False,
            ) from None
        except (MCPError, ValidationError) as exc:
            raise ToolUnavailable(
                f"the MCP server {server.url} did not list its tools: {exc}", retryable=True
            ) from None


class McpTool:
    """One tool of an MCP server, as pinned in a run."""

    def __init__(
        self,
        settings: ToolSettings,
        pinned: PinnedTool,
        sessions: McpSessions,
        runtime: ToolRuntime,
    ) -> None:
        assert settings.mcp is not None  # (validated with the agent)
        self._server = settings.mcp
        self._pinned = pinned
        self._sessions = sessions
        self._runtime = runtime

    @property
    def name(self) -> str:
        return self._pinned["name"]

    @property
    def description(self) -> str:
        return self._pinned["description"]

    @property
    def parameters(self) -> dict[str, Any]:
        return self._pinned["parameters"]

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> str:
        await load_sdk()
        from mcp.shared.exceptions import MCPError
        from pydantic import ValidationError

        url = self._server.url
        self._runtime.check_allowed(url)
        headers = headers_from_env(self._server.headers_from_env)
        try:
            result = await self._sessions.call_tool(
                url, headers, self._pinned["server_name"], arguments, context.idempotency_key
            )
        except McpUnreachable as exc:
            raise RetryableToolError(
                "transport", f"the MCP server {url} could not be reached: {exc}"
            ) from None
        except McpHttpError as exc:
            raise RetryableToolError(
                f"http_{exc.status}", f"the MCP server {url} answered {exc}", exc.retry_after
            ) from None
        except McpResponseTooLong as exc:
            raise ToolError(
                f"the MCP server {url} answered with a response {exc} (16 times "
                "AGENTRUN_MAX_TOOL_OUTPUT_BYTES): the result is not read further"
            ) from None
        except MCPError as exc:
            raise ToolError(f"the MCP server {url} answered with an error: {exc}") from None
        except (ValidationError, RuntimeError, ValueError) as exc:
            raise ToolError(f"the MCP server {url} sent a malformed response: {exc}") from None
        text = _text_of(result)
        if result.is_error:
            raise ToolError(text or "the tool failed")
        return text


def _text_of(result: types.CallToolResult) -> str:
    """What the model reads of a result: its text content; without any, its structured content
    as JSON; other content (images, resources) as their JSON form."""
    from mcp import types

    parts: list[str] = []
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
        else:
            parts.append(block.model_dump_json(exclude_none=True))
    if not parts and result.structured_content is not None:
        return json.dumps(result.structured_content)
    return "\n".join(parts)
