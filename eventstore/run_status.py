"""A run's status, and which statuses are ends: the one definition that the aggregate, the run
list's SQL, pruning and the event streams' end kinds all derive theirs from."""

from __future__ import annotations

from typing import Literal, get_args

RunStatus = Literal[
    "running", "awaiting_approval", "completed", "failed", "cancelled", "awaiting_tool_result"
]
RUN_STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)
# A run with an active status may still change; one with a terminal status never does.
ACTIVE_STATUSES: frozenset[RunStatus] = frozenset(
    {"running", "awaiting_approval", "awaiting_tool_result"}
)
# A run with a waiting status waits for something from outside (a decision, a client's tool
# result) until a deadline.
WAITING_STATUSES: frozenset[RunStatus] = frozenset({"awaiting_approval", "awaiting_tool_result"})
TERMINAL_STATUSES: frozenset[RunStatus] = frozenset(RUN_STATUSES) - ACTIVE_STATUSES
