"""A tool call's arguments as a model sent them: a JSON object, bounded in depth.

Models send anything: text that is not JSON, or JSON nested deeper than any tool needs (100,000
levels raise RecursionError in the parser, and again in whatever walks the value). Either is
a tool error the model sees, never a failure of the run.
"""

from __future__ import annotations

import json
from typing import Any

from common.json_values import nested_deeper_than
from executor.tools.base import ToolError

# Deeper than any tool's arguments need, far below Python's recursion limit.
MAX_ARGUMENTS_DEPTH = 64


def parse_arguments(arguments_json: str) -> dict[str, Any]:
    """The arguments object; raises ToolError if they are not JSON, not an object, or nested
    more than MAX_ARGUMENTS_DEPTH levels deep (the object itself is level 1)."""
    try:
        arguments = json.loads(arguments_json or "{}")
    except RecursionError:
        raise ToolError(_too_deep()) from None
    except ValueError as exc:
        raise ToolError(f"malformed arguments (not JSON): {exc}") from None
    if not isinstance(arguments, dict):
        raise ToolError("malformed arguments: expected a JSON object")
    if nested_deeper_than(arguments, MAX_ARGUMENTS_DEPTH):
        raise ToolError(_too_deep())
    return arguments


def _too_deep() -> str:
    return f"malformed arguments: nested more than {MAX_ARGUMENTS_DEPTH} levels deep"
