"""A stream of items and a task beside it that may fail: yields the items until they end, and
ends with the task's error if one comes first (a refused approval sent on the same call as the
run's events, say). Both stop when the stream is closed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ReportError = Callable[[BaseException], None]


async def side_by_side(
    items: AsyncIterator[T], beside: Callable[[ReportError], Coroutine[Any, Any, None]]
) -> AsyncIterator[T]:
    """``items``, ended early by the first error ``beside`` reports (see module docstring)."""
    queue: asyncio.Queue[tuple[T] | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in items:
                queue.put_nowait((item,))
        except Exception as exc:
            queue.put_nowait(exc)
            return
        queue.put_nowait(None)

    tasks = [asyncio.create_task(pump()), asyncio.create_task(beside(queue.put_nowait))]
    try:
        while (entry := await queue.get()) is not None:
            if isinstance(entry, BaseException):
                raise entry
            yield entry[0]
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
