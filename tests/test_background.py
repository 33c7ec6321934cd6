"""Background: tasks started and not awaited are held until they end."""

from __future__ import annotations

import asyncio
import gc

from common.background import Background


async def test_a_task_nobody_else_holds_runs_to_its_end() -> None:
    background = Background()
    release = asyncio.Event()
    done: list[str] = []

    async def work() -> None:
        await release.wait()
        done.append("done")

    background.start(work())
    gc.collect()
    assert len(background) == 1
    release.set()
    while len(background):
        await asyncio.sleep(0)
    assert done == ["done"]


async def test_start_returns_the_task() -> None:
    background = Background()

    async def answer() -> int:
        return 42

    assert await background.start(answer()) == 42
