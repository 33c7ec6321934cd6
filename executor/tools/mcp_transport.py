"""The HTTP transport under the executor's MCP sessions: connections kept for the next call.

A Streamable HTTP server may answer a POST with an SSE stream that it ends right after the
JSON-RPC response. The SDK closes that response as soon as it has read the response event, a
moment before the stream's end arrives, and a response closed before its end takes its
connection with it: every call would open a new TCP connection (a connect, the server's
accept, and a socket left in TIME_WAIT, which at a few hundred calls a second runs out of
ports). This transport reads such a stream to its end first, for a short bounded time, so that
the connection goes back to the pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx2

# How long (seconds) and how much a closed POST's SSE stream is read on to reach its end; a
# server that keeps it open longer costs its connection, nothing else.
DRAIN_TIMEOUT = 1.0
DRAIN_BYTES = 64 * 1024


class _DrainedOnClose(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            with anyio.move_on_after(DRAIN_TIMEOUT):
                read = 0
                async for chunk in self._inner:
                    read += len(chunk)
                    if read > DRAIN_BYTES:
                        break
        except Exception:  # (the connection broke: closing it below is all there is to do)
            pass
        finally:
            await self._inner.aclose()


class ReusingTransport(httpx2.AsyncBaseTransport):
    """httpx2's transport, whose POST answered with an SSE stream keeps its connection."""

    def __init__(self) -> None:
        self._inner = httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        content_type = response.headers.get("content-type", "")
        if request.method == "POST" and content_type.startswith("text/event-stream"):
            assert isinstance(response.stream, httpx2.AsyncByteStream)
            response.stream = _DrainedOnClose(response.stream)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
