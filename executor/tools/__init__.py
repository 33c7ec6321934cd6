"""The built-in tools an agent can use, by name."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from executor.tools.base import Tool
from executor.tools.calculator import CalculatorTool
from executor.tools.clock import ClockTool
from executor.tools.send_email import SendEmailTool

_TOOLS: tuple[Tool, ...] = (ClockTool(), CalculatorTool(), SendEmailTool())

BUILTIN_TOOLS: Mapping[str, Tool] = MappingProxyType({tool.name: tool for tool in _TOOLS})


def get_tool(name: str) -> Tool | None:
    """The built-in tool called ``name``, or None if there is none."""
    return BUILTIN_TOOLS.get(name)
