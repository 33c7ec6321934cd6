"""How a run waits for something from outside (decisions on tool calls, the results of tool
calls the client executes): the port that makes a session classic or durable (with
executor.session.recording).

- ``InMemory`` (classic): the loop waits in the session until every call is decided (or has its
  result) or its deadline passes (then it is denied as timed out, or given a tool error, by the
  same command a reconciler would send); decisions and results reach the session from any
  gateway over the run's control subject.
- ``Suspending`` (durable): the run suspends: the session lets it go, the store keeps it (no
  memory, task or worker) until a decision is recorded there and the run is dispatched again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

from eventstore.run import Run
from eventstore.run_commands import Command, TimeOutApprovals


class Waiter(Protocol):
    """What waiting needs of the session that waits (executor.session.session.RunSession)."""

    run: Run
    decided: asyncio.Event  # set whenever a decision is applied

    async def apply(self, command: Command) -> bool: ...

    async def state_changed(self) -> None: ...


class Waiting(Protocol):
    """How a run waits for decisions and results (see module docstring)."""

    @property
    def takes_decisions(self) -> bool:
        """Whether decisions are taken by the session holding the run (else by the store)."""
        ...

    async def for_decisions(self, session: Waiter) -> bool:
        """Waits until the run's awaited calls are decided. False: the run suspends (its
        session stops driving it)."""
        ...


class InMemory:
    """Classic runs (see module docstring)."""

    takes_decisions = True

    async def for_decisions(self, session: Waiter) -> bool:
        run = session.run
        while (deadline := run.approval_deadline) is not None:
            now = time.time()
            if await session.apply(TimeOutApprovals(now)):
                continue
            session.decided.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(deadline - now, 0.0)):
                    await session.decided.wait()
        await session.state_changed()
        return True


class Suspending:
    """Durable runs (see module docstring)."""

    takes_decisions = False

    async def for_decisions(self, session: Waiter) -> bool:
        return False
