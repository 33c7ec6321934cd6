"""The HTTP transport under the executor's MCP sessions: what the SDK does not tell or bound.

- Connections kept for the next call. A Streamable HTTP server may answer a POST with an SSE
  stream that it ends right after the JSON-RPC response. The SDK closes that response as soon
  as it has read the response event, a moment before the stream's end arrives, and a response
  closed before its end takes its connection with it: every call would open a new TCP
  connection (a connect, the server's accept, and a socket left in TIME_WAIT, which at a few
  hundred calls a second runs out of ports). Such a stream is read to its end first, for a
  short bounded time, so that the connection goes back to the pool. The SDK hands the
  response to its caller before it closes the stream, so the stream's end may still be on its
  way when the caller sends its next request, which would then find the connection still
  taken and open another: the request's Exchange tells when its responses are closed
  (``settled``), and the sessions return a result only then.
- The HTTP status. The SDK turns an HTTP 429 or 5xx into an MCP error like any other; the
  request's Exchange (set by whoever sends it, see ``exchange``) keeps the status and its
  Retry-After, for the tool's retry policy.
- A bound on what is held. A POST's response body longer than the transport's limit is not
  read further (the SDK would read a JSON response whole); the Exchange says so.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import anyio
import httpx2

from executor.tools.base import retry_after_seconds

# How long (seconds) and how much a closed POST's SSE stream is read on to reach its end; a
# server that keeps it open longer costs its connection, nothing else.
DRAIN_TIMEOUT = 1.0
DRAIN_BYTES = 64 * 1024


@dataclass
class Exchange:
    """What the HTTP layer saw of one MCP request: the SDK's errors do not carry it."""

    status: int = 0
    retry_after: float = 0.0
    too_long: bool = False
    bodies: list[_Bounded] = field(default_factory=list, repr=False)

    async def settled(self) -> bool:
        """Waits until the POSTs' response bodies are closed, their connections back in the
        pool or closed; whether each was read to its end (its connection kept). A body's
        close is bounded by DRAIN_TIMEOUT; the wait here too, should one never be closed."""
        kept = True
        with anyio.move_on_after(DRAIN_TIMEOUT + 1.0) as scope:
            for body in self.bodies:
                await body.closed.wait()
                kept = kept and body.kept
        return kept and not scope.cancelled_caught


_current: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar(
    "mcp_exchange", default=None
)


@contextlib.contextmanager
def exchange() -> Iterator[Exchange]:
    """An Exchange for the MCP requests sent within (the SDK sends each with its sender's
    context, so the transport finds it)."""
    seen = Exchange()
    token = _current.set(seen)
    try:
        yield seen
    finally:
        _current.reset(token)


class ResponseTooLong(httpx2.StreamError):
    """The response is longer than the transport reads."""


class _Bounded(httpx2.AsyncByteStream):
    """A POST's response body, read up to ``limit`` bytes; an SSE stream is drained on close."""

    def __init__(
        self, inner: httpx2.AsyncByteStream, limit: int, seen: Exchange | None, drain: bool
    ) -> None:
        self._inner = inner
        self._limit = limit
        self._seen = seen
        self._drain = drain
        self._read = 0
        self.closed = anyio.Event()
        self.kept = not drain  # (an SSE stream's connection is kept once it is read to its end)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._read += len(chunk)
            if self._read > self._limit:
                if self._seen is not None:
                    self._seen.too_long = True
                self._drain = False
                raise ResponseTooLong(f"the response is longer than {self._limit:,} bytes")
            yield chunk

    async def aclose(self) -> None:
        try:
            if self._drain:
                with anyio.move_on_after(DRAIN_TIMEOUT):
                    drained = 0
                    async for chunk in self._inner:
                        drained += len(chunk)
                        if drained > DRAIN_BYTES:
                            break
                    else:
                        self.kept = True
        except Exception:  # (the connection broke: closing it below is all there is to do)
            self.kept = False
        finally:
            try:
                await self._inner.aclose()
            finally:
                self.closed.set()


class McpHttpTransport(httpx2.AsyncBaseTransport):
    """httpx2's transport, with the connection reuse, statuses and bound above."""

    def __init__(self, max_response_bytes: int) -> None:
        self._inner = httpx2.AsyncHTTPTransport()
        self._limit = max_response_bytes

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        if request.method != "POST":
            return response  # (the GET stream of server messages lasts as long as the session)
        seen = _current.get()
        if seen is not None:
            seen.status = response.status_code
            if response.status_code == 429 or response.status_code >= 500:
                seen.retry_after = retry_after_seconds(response.headers.get("retry-after"))
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        sse = response.headers.get("content-type", "").startswith("text/event-stream")
        body = _Bounded(response.stream, self._limit, seen, drain=sse)
        if seen is not None:
            seen.bodies.append(body)
        response.stream = body
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
