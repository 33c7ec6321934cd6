"""The runs this executor holds: one session per run, whatever its mode."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from executor.session.recording import Outcome
from executor.session.session import RunSession

log = logging.getLogger(__name__)


class Sessions:
    """The sessions of this executor, by run id."""

    def __init__(self) -> None:
        self._held: dict[str, RunSession] = {}

    def get(self, run_id: str) -> RunSession | None:
        return self._held.get(run_id)

    def holds(self, run_id: str) -> bool:
        return run_id in self._held

    def start(self, session: RunSession) -> None:
        """Holds the session's run in a task of its own, until it lets the run go."""
        self._held[session.run_id] = session
        session.start().add_done_callback(lambda task: self._ended(session, task))

    async def hold(self, session: RunSession, recorded_after: Sequence[Any] = ()) -> Outcome:
        """Holds the session's run in the calling task, until it lets the run go."""
        self._held[session.run_id] = session
        try:
            return await session.hold(recorded_after)
        finally:
            self._forget(session)

    def _ended(self, session: RunSession, task: asyncio.Task[Outcome]) -> None:
        self._forget(session)
        if not task.cancelled() and task.exception() is not None:
            log.error("run %s: its session failed", session.run_id, exc_info=task.exception())

    def _forget(self, session: RunSession) -> None:
        if self._held.get(session.run_id) is session:
            del self._held[session.run_id]

    async def drain(self, grace: float) -> None:
        """Lets the executor stop: runs that can move are handed back at once, the others get
        ``grace`` seconds to end and are then abandoned (they fail with EXECUTOR_LOST)."""
        sessions = list(self._held.values())
        for session in sessions:
            if session.recording.movable:
                session.hand_back()
        staying = [s for s in sessions if not s.recording.movable]
        tasks = [s.task for s in sessions if s.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for session in staying:
            if session.task in pending:
                session.abandon()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
