"""The executor's MCP client sessions: one per server (URL and headers), shared by every run,
opened on first use and opened again after it breaks.

The SDK's Streamable HTTP transport must be entered and left in one task, so each session is
held open by a task of its own; calls from any run's task go through it concurrently.

The SDK is imported on first use (``load_sdk``), in a worker thread: importing it takes longer
than the rest of an executor's start (seconds on a loaded machine), most deployments' agents
name no MCP server, and the event loop must not stop for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from mcp import types
    from mcp.client.session import ClientSession

from executor.tools.mcp_transport import Exchange, McpHttpTransport, exchange

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY = "agentrun/idempotency_key"
"""The key, in an MCP tools/call request's ``_meta``, of ``<run id>:<tool call id>``."""


SDK_MODULES = (
    "pydantic",
    "mcp.types",
    "mcp.shared.exceptions",
    "mcp.client.session",
    "mcp.client.streamable_http",
)
_loading: asyncio.Future[None] | None = None


async def load_sdk() -> None:
    """Imports the MCP SDK, the first time in a worker thread (callers start their timeouts
    after it: an import is not the server's slowness)."""
    global _loading
    if SDK_MODULES[-1] in sys.modules:
        return
    if _loading is None or (_loading.done() and _loading.exception() is not None):
        _loading = asyncio.ensure_future(asyncio.to_thread(_import_sdk))
    await asyncio.shield(_loading)


def _import_sdk() -> None:
    for name in SDK_MODULES:
        importlib.import_module(name)


class McpUnreachable(Exception):
    """The server could not be reached (or the session to it broke): a retry may cure it."""


class McpHttpError(Exception):
    """The server answered HTTP 429 or 5xx: a retry may cure it (after ``retry_after`` s)."""

    def __init__(self, status: int, retry_after: float) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


class McpResponseTooLong(Exception):
    """The server's response was longer than the sessions read: not read further."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"longer than {limit:,} bytes")
        self.limit = limit


class _Connection:
    """One session, held open by its task until closed or broken."""

    def __init__(self, url: str, headers: dict[str, str], max_response_bytes: int) -> None:
        self.url = url
        self._headers = headers
        self._max_response_bytes = max_response_bytes
        self._session: asyncio.Future[ClientSession] = asyncio.get_running_loop().create_future()
        self._closing = asyncio.Event()
        self.broken = False
        # Whether the server ends a POST's SSE stream right after its response (see _request):
        # until one is not read to its end within the transport's bound.
        self.ends_streams = True
        self._task = asyncio.create_task(self._hold(), name=f"mcp session {url}")

    async def _hold(self) -> None:
        import httpx2
        from mcp.client.session import ClientSession
        from mcp.client.streamable_http import streamable_http_client

        try:
            async with (
                httpx2.AsyncClient(
                    headers=self._headers,
                    timeout=None,
                    transport=McpHttpTransport(self._max_response_bytes),
                ) as http,
                streamable_http_client(
                    self.url, http_client=http, max_sse_event_size=self._max_response_bytes
                ) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                self._session.set_result(session)
                await self._closing.wait()
        except BaseException as exc:  # (a task group's ExceptionGroup, a cancellation)
            if not self._session.done():
                self._session.set_exception(McpUnreachable(_reason(exc)))
            if not isinstance(exc, Exception | BaseExceptionGroup):
                raise
        finally:
            self.broken = True
            if not self._session.done():
                self._session.set_exception(McpUnreachable("the session closed"))

    async def session(self) -> ClientSession:
        return await asyncio.shield(self._session)

    async def aclose(self) -> None:
        self._closing.set()
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


def _reason(exc: BaseException) -> str:
    """The innermost cause of ``exc`` (a task group wraps the transport's in groups)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _raise_what_http_saw(seen: Exchange, limit: int) -> None:
    """The failure of a request as its HTTP exchange tells it, if it does (the SDK reports
    either as an error of its own)."""
    if seen.too_long:
        raise McpResponseTooLong(limit) from None
    if seen.status == 429 or seen.status >= 500:
        raise McpHttpError(seen.status, seen.retry_after) from None


class McpSessions:
    """The executor's sessions to MCP servers, by URL and headers. A response (of a tools/list
    or tools/call request) longer than ``max_response_bytes`` is not read further."""

    def __init__(self, max_response_bytes: int) -> None:
        self._max_response_bytes = max_response_bytes
        self._connections: dict[tuple[str, tuple[tuple[str, str], ...]], _Connection] = {}

    def _connection(self, url: str, headers: dict[str, str]) -> _Connection:
        key = (url, tuple(sorted(headers.items())))
        connection = self._connections.get(key)
        if connection is None or connection.broken:
            connection = _Connection(url, headers, self._max_response_bytes)
            self._connections[key] = connection
        return connection

    async def _request(self, url: str, headers: dict[str, str], call: Any) -> Any:
        """Runs ``call(session)``, and returns once the responses it read are closed (their
        connection back in the pool, for the next request). A session the server no longer
        knows (it restarted) is replaced and the request made once more on the new one: the
        server refused it without running it. A broken session is dropped (the next request
        opens another) and raises McpUnreachable; HTTP 429 or 5xx raises McpHttpError; a
        response too long to read, McpResponseTooLong."""
        import httpx2
        from mcp.shared.exceptions import MCPError
        from mcp.types import CONNECTION_CLOSED, INVALID_REQUEST

        for fresh in (False, True):
            connection = self._connection(url, headers)
            try:
                session = await connection.session()
            except BaseException:
                # (the caller's timeout, say: a server that hangs while the session opens must
                # not keep every later request waiting on it)
                await self._drop(connection)
                raise
            try:
                with exchange() as seen:
                    try:
                        result = await call(session)
                    except Exception:
                        _raise_what_http_saw(seen, self._max_response_bytes)
                        raise
                    # (the SDK returns the result before the stream that carried it ends: the
                    # next request would find its connection still taken and open another. A
                    # server that does not end its streams costs that wait once, then its
                    # connections; so does a caller's timeout that ends the wait)
                    if connection.ends_streams:
                        try:
                            kept = await seen.settled()
                        except BaseException:
                            connection.ends_streams = False
                            raise
                        if not kept:
                            connection.ends_streams = False
                    return result
            except (httpx2.TransportError, OSError, McpUnreachable) as exc:
                await self._drop(connection)
                raise McpUnreachable(_reason(exc)) from None
            except MCPError as exc:
                if exc.code == CONNECTION_CLOSED:
                    await self._drop(connection)
                    raise McpUnreachable(exc.message) from None
                if exc.code != INVALID_REQUEST or fresh:
                    raise
                await self._drop(connection)  # ("Session not found": ask a new session)
            except Exception as exc:
                if type(exc).__module__.startswith("anyio"):  # (a closed or broken stream)
                    await self._drop(connection)
                    raise McpUnreachable(_reason(exc)) from None
                raise
        raise AssertionError("unreachable")  # (the second pass returns or raises)

    async def _drop(self, connection: _Connection) -> None:
        connection.broken = True
        await connection.aclose()

    async def list_tools(self, url: str, headers: dict[str, str]) -> list[types.Tool]:
        """Every tool the server lists (all pages)."""
        from mcp import types

        async def listing(session: ClientSession) -> list[types.Tool]:
            tools: list[types.Tool] = []
            cursor: str | None = None
            while True:
                params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
                page = await session.list_tools(params=params)
                tools.extend(page.tools)
                cursor = page.next_cursor
                if not cursor:
                    return tools

        result: list[types.Tool] = await self._request(url, headers, listing)
        return result

    async def call_tool(
        self, url: str, headers: dict[str, str], name: str, arguments: dict[str, Any], key: str
    ) -> types.CallToolResult:
        meta = cast("types.RequestParamsMeta", {IDEMPOTENCY_KEY: key})

        async def calling(session: ClientSession) -> types.CallToolResult:
            return await session.call_tool(name, arguments, meta=meta)

        result: types.CallToolResult = await self._request(url, headers, calling)
        return result

    async def aclose(self) -> None:
        connections = list(self._connections.values())
        self._connections.clear()
        for connection in connections:
            await connection.aclose()
