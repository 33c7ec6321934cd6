"""The open seams of an agent: which model providers and tools exist.

The domain does not list them. Each provider and tool registers its name here where it is
defined (in the executor), with an optional check of its settings, and AgentConfig.validate
checks an agent against what is registered. So whoever validates agents loads them first: the
executor does at startup (executor.extensions.load_extensions), before it serves any request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from common.errors import InvalidArgument

if TYPE_CHECKING:
    from eventstore.agent_config import ModelSettings, ToolSettings

S = TypeVar("S")


class Registry(Generic[S]):
    """The registered names of one kind of extension; each may check its settings (raising
    InvalidArgument, naming the field)."""

    def __init__(self, kind: str, field: str) -> None:
        self.kind = kind
        self.field = field
        self._checks: dict[str, Callable[[S], None] | None] = {}

    def register(self, name: str, check: Callable[[S], None] | None = None) -> None:
        """Adds ``name``. Registering it again is allowed only as it was (a module that is
        imported twice); another extension under a taken name is a mistake."""
        if name in self._checks and self._checks[name] is not check:
            raise ValueError(f"another {self.kind} is registered as {name!r}")
        self._checks[name] = check

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._checks))

    def validate(self, name: str, settings: S) -> None:
        """Raises InvalidArgument unless ``name`` is registered and its check accepts
        ``settings``."""
        if not self._checks:
            # Not the agent's fault: every agent would be refused.
            raise RuntimeError(f"no {self.kind} is registered: load them before validating")
        if name not in self._checks:
            raise InvalidArgument(
                self.field, f"unknown {self.kind} {name!r}; registered: {', '.join(self.names)}"
            )
        check = self._checks[name]
        if check is not None:
            check(settings)


MODEL_PROVIDERS: Registry[ModelSettings] = Registry("model provider", "agent.model.provider")
TOOLS: Registry[ToolSettings] = Registry("tool", "agent.tools")
BUILTIN_SCHEMAS: dict[str, dict[str, Any]] = {}
"""The JSON Schema of each built-in tool's arguments, by name (an approval's edit of a call's
arguments is checked against it)."""
