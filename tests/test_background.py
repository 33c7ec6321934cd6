"""Background: tasks started and not awaited are held until they end."""

from __future__ import annotations

import asyncio
import gc

from common.background import Background


async def test_a_task_nobody_else_holds_runs_to_its_end() -> None:
    background = Background()
    release = asyncio.Event()
    finished = asyncio.Event()

    async def work() -> None:
        await release.wait()
        finished.set()

    background.start(work())
    gc.collect()
    assert len(background) == 1
    release.set()
    await asyncio.wait_for(finished.wait(), 10.0)


async def test_start_returns_the_task() -> None:
    background = Background()

    async def answer() -> int:
        return 42

    assert await background.start(answer()) == 42
