"""Background jobs that run every so often (the reconciler, the retention job): one failing
round is logged, and the next comes as usual."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn

from common.errors import AgentrunError

log = logging.getLogger(__name__)


async def every(
    interval: float,
    job: Callable[[], Awaitable[object]],
    name: str,
    *,
    first_after: float | None = None,
) -> NoReturn:
    """Runs ``job`` every ``interval`` seconds, the first time after ``first_after`` seconds
    (default: one interval), until cancelled."""
    await asyncio.sleep(interval if first_after is None else first_after)
    while True:
        try:
            await job()
        except AgentrunError as exc:
            log.warning("%s: %s", name, exc.message)
        except Exception:
            log.exception("%s failed; trying again later", name)
        await asyncio.sleep(interval)
