"""Server-sent events: pages that follow what changes while they are open, and only then.

Lists have no stream in the API, so an open list page asks the gateway again every
POLL_INTERVAL and sends its fragment when it changed; a closed page costs nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from sse_starlette.sse import EventSourceResponse

from console.gateway import status_message

POLL_INTERVAL = 2.0


def polled_fragment(fragment: Callable[[], Awaitable[str]]) -> EventSourceResponse:
    """Sends ``fragment()`` as a ``fragment`` event whenever it differs from the last one sent,
    until the page goes away."""

    async def events() -> AsyncIterator[dict[str, str]]:
        last = None
        while True:
            try:
                html = await fragment()
            except grpc.aio.AioRpcError as error:
                yield {"event": "problem", "data": status_message(error)}
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return
            else:
                if html != last:
                    last = html
                    yield {"event": "fragment", "data": html}
            await asyncio.sleep(POLL_INTERVAL)

    return EventSourceResponse(events())
