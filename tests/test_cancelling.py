"""raise_if_cancelled: a cancellation that asyncio.wait_for swallowed (Python 3.11) still ends
the task."""

from __future__ import annotations

import asyncio
import sys

import pytest

from common.cancelling import raise_if_cancelled


async def wait_then(check: bool, future: asyncio.Future[int]) -> int:
    result = await asyncio.wait_for(future, 10)
    if check:
        raise_if_cancelled()
    return result


async def cancelled_as_its_wait_ends(check: bool) -> asyncio.Task[int]:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wait_then(check, future))
    await asyncio.sleep(0)  # (one turn of the loop: the task is in wait_for now)
    future.set_result(1)
    task.cancel()
    return task


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for keeps it from 3.12 on")
async def test_wait_for_swallows_a_cancellation_that_arrives_as_its_wait_ends() -> None:
    assert await (await cancelled_as_its_wait_ends(check=False)) == 1


async def test_the_task_ends_as_it_was_asked() -> None:
    task = await cancelled_as_its_wait_ends(check=True)
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_task_not_cancelled_goes_on() -> None:
    raise_if_cancelled()
