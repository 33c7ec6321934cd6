"""The one small interface every model provider implements, and how a provider registers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from eventstore.agent_config import ModelSettings
from eventstore.extensions import MODEL_PROVIDERS
from eventstore.messages import ChatMessage, ToolCall, Usage, no_usage

TextSink = Callable[[str], None]
"""Receives the model's text as it streams, one token (or chunk) at a time. Never blocks."""


@dataclass(frozen=True)
class ToolSpec:
    """A tool as offered to the model: its name, description and JSON Schema of arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ModelRequest:
    """One model call: the agent's model settings, instructions, the messages so far, the tools.

    ``messages`` holds the conversation's earlier turns followed by this run's user input and any
    assistant/tool messages of this run so far. ``call_index`` counts this run's model calls from
    0; deterministic providers (scripted) may use it.
    """

    model: ModelSettings
    instructions: str
    messages: Sequence[ChatMessage]
    tools: Sequence[ToolSpec] = ()
    call_index: int = 0
    run_id: str = ""


@dataclass(frozen=True)
class ModelReply:
    """What a finished model call produced."""

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=no_usage)
    finish_reason: str = ""  # as the provider said it ("": it did not say)


class ModelError(Exception):
    """The provider failed. ``retryable`` says whether trying the call again could succeed;
    ``code`` names the kind of failure, in the provider's terms (an agent's retry policy may
    list codes it does not retry)."""

    def __init__(self, message: str, *, code: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable


class ModelProvider(Protocol):
    """Streams one model call: text goes to ``on_text`` as it arrives; the reply is returned.

    Tool calls are returned complete in the reply (their ids unique within the run), never
    streamed. Implementations raise ModelError for provider failures and must be cancellable
    (a cancelled run cancels its model call).
    """

    async def complete(self, request: ModelRequest, on_text: TextSink) -> ModelReply: ...

    async def aclose(self) -> None:
        """Releases what the provider holds (connections); called once, when the executor
        stops."""
        ...


_FACTORIES: dict[str, Callable[[], ModelProvider]] = {}
FACTORIES: Mapping[str, Callable[[], ModelProvider]] = MappingProxyType(_FACTORIES)
"""The registered providers by name: how to make the one instance an executor shares."""


def register_provider(
    name: str,
    factory: Callable[[], ModelProvider],
    check: Callable[[ModelSettings], None] | None = None,
) -> None:
    """Makes a provider available to agents as ``model.provider = name``: the domain then
    accepts agents naming it (after ``check`` accepts their model settings) and executors
    create it with ``factory``. Called by the provider's module, where it is defined."""
    MODEL_PROVIDERS.register(name, check)
    _FACTORIES[name] = factory
