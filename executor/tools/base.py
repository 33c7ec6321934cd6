"""The interface of tools, and how a tool registers."""

from __future__ import annotations

import email.utils
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import httpx

from common.url_allow import UrlAllowList
from eventstore.agent_config import ToolSettings
from eventstore.extensions import BUILTIN_SCHEMAS
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


class RetryableToolError(ToolError):
    """The attempt failed in a way a retry may cure (a connection error, a timeout, HTTP 429 or
    5xx). ``code`` is what a retry policy's non_retryable_error_codes name ("transport",
    "timeout", "http_<status>"); ``retry_after``: the seconds the tool asked to wait, 0 if it
    did not. The tool's retry policy decides whether the call is tried again; if not, the model
    gets the error."""

    def __init__(self, code: str, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


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


class SchemaText:
    """A built-in tool's JSON Schema, kept as text so that each caller gets a copy of its own
    (the schema is offered to the model on every call: ``json.loads`` copies it several times
    faster than ``copy.deepcopy``)."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self._text = json.dumps(schema)

    def copy(self) -> dict[str, Any]:
        copied: dict[str, Any] = json.loads(self._text)
        return copied


_TOOLS: dict[str, Tool] = {}
TOOLS: Mapping[str, Tool] = MappingProxyType(_TOOLS)
"""The registered tools by name."""


def register_tool(tool: Tool, check: Callable[[ToolSettings], None] | None = None) -> None:
    """Makes ``tool`` available to agents under its name: the domain then accepts agents
    listing it (after ``check`` accepts their settings of it) and the loop offers and calls it.
    Called by the tool's module, where it is defined."""
    TOOL_NAMES.register(tool.name, check)
    BUILTIN_SCHEMAS[tool.name] = tool.parameters
    _TOOLS[tool.name] = tool


@dataclass(frozen=True)
class ToolRuntime:
    """What an executor shares between the calls of every run's tools: its HTTP client (one
    connection pool), the tool URLs it allows, its directory for local state, and the longest
    result a tool may return."""

    http: httpx.AsyncClient
    url_allow: UrlAllowList
    data_dir: Path
    max_output_bytes: int

    def check_allowed(self, url: str) -> None:
        """ToolError unless this executor allows calls to ``url`` (an agent may have been
        accepted under another allow list, or by an executor without one)."""
        if not self.url_allow.allows(url):
            raise ToolError(
                f"this executor does not allow calls to {url} (AGENTRUN_TOOL_URL_ALLOW)"
            )


def headers_from_env(headers: Mapping[str, str]) -> dict[str, str]:
    """Request headers whose values are the executor's environment variables (header name ->
    variable name): ToolError naming a variable that is not set."""
    values = {}
    for header, variable in headers.items():
        value = os.environ.get(variable)
        if value is None:
            raise ToolError(
                f"the executor has no environment variable {variable} (for the header "
                f"{header}): ask its operator to set it"
            )
        values[header] = value
    return values


def retry_after_seconds(value: str | None) -> float:
    """Seconds to wait that a Retry-After header asks for (delay seconds or an HTTP date); 0
    if there is none or it is malformed."""
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 0.0
        seconds = when.timestamp() - time.time()
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


ToolKind = Callable[[ToolSettings, ToolRuntime], Tool]
"""Makes the tool of an agent's settings of one kind (an HTTP tool from its URL, say)."""

_KINDS: dict[str, ToolKind] = {}
KINDS: Mapping[str, ToolKind] = MappingProxyType(_KINDS)


def register_kind(kind: str, make: ToolKind) -> None:
    """Makes the agents' tools of ``kind`` callable. Called by the kind's module."""
    if _KINDS.get(kind, make) is not make:
        raise ValueError(f"another tool kind is registered as {kind!r}")
    _KINDS[kind] = make
