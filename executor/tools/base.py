"""The interface of tools, and how a tool registers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from eventstore.agent_config import ToolSettings
from eventstore.extensions import TOOLS as TOOL_NAMES


@dataclass(frozen=True)
class ToolContext:
    """What a tool call knows about where it runs.

    ``idempotency_key`` is ``<run_id>:<tool_call_id>``: the same for every attempt of one call, so
    a tool with an external side effect can deduplicate across the at-least-once window.
    ``data_dir`` is the executor's directory for local state (send_email's outbox lives there).
    """

    tenant: str
    run_id: str
    tool_call_id: str
    data_dir: Path

    @property
    def idempotency_key(self) -> str:
        return f"{self.run_id}:{self.tool_call_id}"


class ToolError(Exception):
    """The call failed in a way the model should hear about (bad arguments, a failed action)."""


class Tool(Protocol):
    """A built-in tool. ``invoke`` returns the result as text (JSON by convention).

    It raises ToolError for failures the model should see; the agent loop turns any other
    exception and any timeout into a tool error too, so a tool can never crash a run.
    """

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def parameters(self) -> dict[str, Any]:
        """JSON Schema of the arguments object."""
        ...

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> str: ...


_TOOLS: dict[str, Tool] = {}
TOOLS: Mapping[str, Tool] = MappingProxyType(_TOOLS)
"""The registered tools by name."""


def register_tool(tool: Tool, check: Callable[[ToolSettings], None] | None = None) -> None:
    """Makes ``tool`` available to agents under its name: the domain then accepts agents
    listing it (after ``check`` accepts their settings of it) and the loop offers and calls it.
    Called by the tool's module, where it is defined."""
    TOOL_NAMES.register(tool.name, check)
    _TOOLS[tool.name] = tool
