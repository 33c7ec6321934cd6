"""The tools an agent can use, by name.

Each tool registers itself in its module (base.register_tool); executor.extensions loads the
shipped ones.
"""

from __future__ import annotations

from executor.tools.base import TOOLS, Tool


def get_tool(name: str) -> Tool | None:
    """The registered tool called ``name``, or None if there is none."""
    return TOOLS.get(name)
