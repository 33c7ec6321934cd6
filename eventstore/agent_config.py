"""An agent's configuration as the domain sees it: immutable values with a JSON-native form.

The JSON form is what the store records, both in the agent's own history and pinned into
every run that starts (a run keeps the configuration as of its start).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from common.errors import InvalidArgument
from common.json_values import json_size, nested_deeper_than
from eventstore.extensions import BUILTIN_SCHEMAS, MODEL_PROVIDERS, TOOLS
from eventstore.retry_policy import (
    DEFAULT_MODEL_RETRY_POLICY,
    DEFAULT_TOOL_RETRY_POLICY,
    RetryPolicy,
)
from eventstore.tool_validation import validate_tools

ExecutionMode = Literal["classic", "durable"]
EXECUTION_MODES: tuple[ExecutionMode, ...] = ("classic", "durable")

DEFAULT_APPROVAL_TIMEOUT = 24 * 3600.0
DEFAULT_TOOL_TIMEOUT = 30.0
DEFAULT_MAX_MODEL_CALLS = 16
MAX_MODEL_CALLS_LIMIT = 1000
# Every duration of an agent is bounded: an unbounded one overflows far from where it was
# accepted (an approval's deadline as a protobuf Timestamp, say), and waiting for years is never
# what was meant.
MAX_APPROVAL_TIMEOUT = 30 * 24 * 3600.0
MAX_TOOL_TIMEOUT = 3600.0
MAX_SCRIPTED_DELAY = 60.0
AGENT_ID_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,62}")
# Every field of an agent is bounded in size, and so is the whole: an agent is read at every
# run's start and pinned into the run, so its size is paid by every run (an 8.7 MB
# model.parameters once stalled every run of its executor for seconds). Sizes in bytes are
# those of the value as compact UTF-8 JSON, as the store keeps it.
MAX_AGENT_BYTES = 1 << 20
MAX_DISPLAY_NAME_CHARS = 256
MAX_INSTRUCTIONS_CHARS = 100_000
MAX_MODEL_NAME_CHARS = 256
MAX_BASE_URL_CHARS = 2_048
MAX_API_KEY_ENV_CHARS = 256
MAX_PARAMETERS_BYTES = 64 * 1024
MAX_PARAMETERS_DEPTH = 32
MAX_TOOLS = 64
MAX_TOOL_DESCRIPTION_CHARS = 4_096
MAX_SCRIPTED_TURNS = 1_000
MAX_SCRIPTED_TOOL_CALLS = 128
MAX_SCRIPTED_TURN_BYTES = 512 * 1024


def _check_duration(field: str, seconds: float, limit: float, *, zero_allowed: bool) -> None:
    """Raises InvalidArgument naming ``field`` unless ``seconds`` is a number of seconds that is
    positive (or zero, if allowed) and at most ``limit``."""
    if not math.isfinite(seconds):
        raise InvalidArgument(field, "must be a finite number of seconds")
    if seconds < 0 or (seconds == 0 and not zero_allowed):
        raise InvalidArgument(field, "must not be negative" if zero_allowed else "must be positive")
    if seconds > limit:
        raise InvalidArgument(field, f"must be at most {_spoken(limit)}")


def _check_length(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(field, f"must be at most {limit:,} characters")


def check_count(field: str, count: int, limit: int) -> None:
    """Raises InvalidArgument naming ``field`` if it has more than ``limit`` entries."""
    if count > limit:
        raise InvalidArgument(field, f"must have at most {limit:,} entries")


def check_bytes(field: str, size: int, limit: int, each: str = "") -> None:
    """Raises InvalidArgument naming ``field`` if its ``size`` (bytes) is over ``limit``."""
    if size > limit:
        raise InvalidArgument(
            field, f"{each + ' ' if each else ''}must be at most {limit:,} bytes ({size:,} given)"
        )


def _spoken(seconds: float) -> str:
    """A bound as people say it: "30 days", "1 hour", "60 seconds"."""
    for unit, size in (("day", 86400), ("hour", 3600)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds:g} seconds"


@dataclass(frozen=True)
class ScriptedToolCall:
    name: str
    arguments_json: str


@dataclass(frozen=True)
class ScriptedTurn:
    text: str
    tool_calls: tuple[ScriptedToolCall, ...] = ()


@dataclass(frozen=True)
class ScriptedSettings:
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    turns: tuple[ScriptedTurn, ...] = ()


@dataclass(frozen=True)
class ModelSettings:
    provider: str
    name: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    base_url: str = ""
    api_key_env: str = ""
    scripted: ScriptedSettings = ScriptedSettings()


ToolKind = Literal["builtin", "http", "client", "mcp"]


@dataclass(frozen=True)
class HttpToolSettings:
    """One HTTP endpoint as a tool: a call POSTs its arguments to ``url``. ``parameters``: the
    JSON Schema of the arguments; ``headers_from_env``: header name -> executor environment
    variable that holds its value (secrets are never stored in an agent)."""

    url: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    headers_from_env: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "description": self.description,
            "parameters": self.parameters,
            "headers_from_env": self.headers_from_env,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> HttpToolSettings:
        return HttpToolSettings(
            url=data["url"],
            description=data.get("description", ""),
            parameters=dict(data.get("parameters") or {}),
            headers_from_env=dict(data.get("headers_from_env") or {}),
        )


@dataclass(frozen=True)
class ClientToolSettings:
    """A tool that the calling program executes: the run hands it the call and waits for the
    result. ``parameters``: the JSON Schema of the arguments."""

    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"description": self.description, "parameters": self.parameters}

    @staticmethod
    def from_json(data: dict[str, Any]) -> ClientToolSettings:
        return ClientToolSettings(
            description=data.get("description", ""),
            parameters=dict(data.get("parameters") or {}),
        )


@dataclass(frozen=True)
class McpServerSettings:
    """The tools of an MCP server reached over Streamable HTTP at ``url``. Which tools, and
    their descriptions and schemas, are asked of the server when a run starts (and pinned in
    the run). ``tool_names``: the server's tools to offer, empty for all; ``name_prefix``: put
    before each of their names."""

    url: str
    headers_from_env: dict[str, str] = field(default_factory=dict)
    tool_names: tuple[str, ...] = ()
    name_prefix: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "headers_from_env": self.headers_from_env,
            "tool_names": list(self.tool_names),
            "name_prefix": self.name_prefix,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> McpServerSettings:
        return McpServerSettings(
            url=data["url"],
            headers_from_env=dict(data.get("headers_from_env") or {}),
            tool_names=tuple(data.get("tool_names") or ()),
            name_prefix=data.get("name_prefix", ""),
        )


@dataclass(frozen=True)
class ToolSettings:
    """A tool of an agent. ``name`` is what the model calls it by (a built-in tool's name, or
    the name its kind gives it); ``retry_policy`` None means the agent's tool_retry_policy.
    An MCP server's entry has no name of its own (its tools get theirs at a run's start)."""

    name: str
    description: str = ""
    requires_approval: bool = False
    timeout: float = DEFAULT_TOOL_TIMEOUT
    kind: ToolKind = "builtin"
    http: HttpToolSettings | None = None
    retry_policy: RetryPolicy | None = None
    mcp: McpServerSettings | None = None
    client: ClientToolSettings | None = None

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON Schema of the arguments (None: a kind whose schema is not known here)."""
        if self.http is not None:
            return self.http.parameters
        if self.client is not None:
            return self.client.parameters
        if self.kind == "builtin":
            return BUILTIN_SCHEMAS.get(self.name)
        return None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "requires_approval": self.requires_approval,
            "timeout": self.timeout,
        }
        if self.kind != "builtin":  # (a builtin's form is as it was before the kinds)
            data["kind"] = self.kind
        if self.http is not None:
            data["http"] = self.http.to_json()
        if self.mcp is not None:
            data["mcp"] = self.mcp.to_json()
        if self.retry_policy is not None:
            data["retry_policy"] = self.retry_policy.to_json()
        if self.client is not None:
            data["client"] = self.client.to_json()
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> ToolSettings:
        """Also the tools of agents stored before tools had kinds: built-in tools."""
        http = data.get("http")
        mcp = data.get("mcp")
        policy = data.get("retry_policy")
        client = data.get("client")
        return ToolSettings(
            name=data["name"],
            description=data.get("description", ""),
            requires_approval=bool(data.get("requires_approval", False)),
            timeout=float(data.get("timeout", DEFAULT_TOOL_TIMEOUT)),
            kind=data.get("kind", "builtin"),
            http=HttpToolSettings.from_json(http) if http is not None else None,
            mcp=McpServerSettings.from_json(mcp) if mcp is not None else None,
            retry_policy=(
                RetryPolicy.from_json(policy, DEFAULT_TOOL_RETRY_POLICY)
                if policy is not None
                else None
            ),
            client=ClientToolSettings.from_json(client) if client is not None else None,
        )


@dataclass(frozen=True)
class AgentConfig:
    """What an agent is at one version."""

    agent_id: str
    model: ModelSettings
    version: int = 0
    display_name: str = ""
    execution_mode: ExecutionMode = "classic"
    instructions: str = ""
    tools: tuple[ToolSettings, ...] = ()
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT
    max_model_calls: int = DEFAULT_MAX_MODEL_CALLS
    model_retry_policy: RetryPolicy = DEFAULT_MODEL_RETRY_POLICY
    tool_retry_policy: RetryPolicy = DEFAULT_TOOL_RETRY_POLICY

    def tool(self, name: str) -> ToolSettings | None:
        """The tool the model calls ``name`` (not an MCP server's: see Run.tool_settings_of)."""
        return next((t for t in self.tools if t.name == name and t.kind != "mcp"), None)

    @property
    def mcp_servers(self) -> list[tuple[int, ToolSettings]]:
        """The agent's MCP servers, with their index in ``tools``."""
        return [(i, t) for i, t in enumerate(self.tools) if t.kind == "mcp"]

    def tool_retry_policy_of(self, tool: ToolSettings | None) -> RetryPolicy:
        """The policy a call of ``tool`` is retried by: its own, or the agent's."""
        if tool is not None and tool.retry_policy is not None:
            return tool.retry_policy
        return self.tool_retry_policy

    def with_version(self, version: int) -> AgentConfig:
        return replace(self, version=version)

    def validate(self) -> None:
        """Raises InvalidArgument naming the first thing wrong with the configuration."""
        if not AGENT_ID_PATTERN.fullmatch(self.agent_id):
            raise InvalidArgument(
                "agent.id",
                "must be 1-63 characters of a-z, 0-9 and '-', starting with a letter",
            )
        self._check_sizes()
        MODEL_PROVIDERS.validate(self.model.provider, self.model)
        scripted = self.model.scripted
        for name, delay in (
            ("first_token_delay", scripted.first_token_delay),
            ("token_delay", scripted.token_delay),
        ):
            _check_duration(
                f"agent.model.scripted.{name}", delay, MAX_SCRIPTED_DELAY, zero_allowed=True
            )
        validate_tools(self.tools)
        names = [t.name for t in self.tools if t.kind != "mcp"]
        for tool in self.tools:
            if tool.kind == "builtin":
                TOOLS.validate(tool.name, tool)
            _check_duration(
                "agent.tools.timeout", tool.timeout, MAX_TOOL_TIMEOUT, zero_allowed=False
            )
        if len(set(names)) != len(names):
            raise InvalidArgument("agent.tools", "a tool is listed twice")
        _check_duration(
            "agent.approval_timeout",
            self.approval_timeout,
            MAX_APPROVAL_TIMEOUT,
            zero_allowed=False,
        )
        if not 1 <= self.max_model_calls <= MAX_MODEL_CALLS_LIMIT:
            raise InvalidArgument(
                "agent.max_model_calls", f"must be between 1 and {MAX_MODEL_CALLS_LIMIT}"
            )
        self.model_retry_policy.validate("agent.model_retry_policy")
        self.tool_retry_policy.validate("agent.tool_retry_policy")

    def _check_sizes(self) -> None:
        """Raises InvalidArgument naming the first field larger than its bound, or the agent if
        the whole is larger than MAX_AGENT_BYTES."""
        model = self.model
        for name, value, limit in (
            ("display_name", self.display_name, MAX_DISPLAY_NAME_CHARS),
            ("instructions", self.instructions, MAX_INSTRUCTIONS_CHARS),
            ("model.name", model.name, MAX_MODEL_NAME_CHARS),
            ("model.base_url", model.base_url, MAX_BASE_URL_CHARS),
            ("model.api_key_env", model.api_key_env, MAX_API_KEY_ENV_CHARS),
        ):
            _check_length(f"agent.{name}", value, limit)
        check_count("agent.tools", len(self.tools), MAX_TOOLS)
        for tool in self.tools:
            _check_length("agent.tools.description", tool.description, MAX_TOOL_DESCRIPTION_CHARS)
        if nested_deeper_than(model.parameters, MAX_PARAMETERS_DEPTH):
            raise InvalidArgument(
                "agent.model.parameters", f"must nest at most {MAX_PARAMETERS_DEPTH} levels deep"
            )
        check_bytes("agent.model.parameters", json_size(model.parameters), MAX_PARAMETERS_BYTES)
        turns = model.scripted.turns
        check_count("agent.model.scripted.turns", len(turns), MAX_SCRIPTED_TURNS)
        for turn in turns:
            check_count(
                "agent.model.scripted.turns.tool_calls",
                len(turn.tool_calls),
                MAX_SCRIPTED_TOOL_CALLS,
            )
            size = len(turn.text.encode()) + sum(
                len(c.name.encode()) + len(c.arguments_json.encode()) for c in turn.tool_calls
            )
            check_bytes("agent.model.scripted.turns", size, MAX_SCRIPTED_TURN_BYTES, "each")
        check_bytes("agent", json_size(self.to_json()), MAX_AGENT_BYTES)

    def to_json(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "version": self.version,
            "display_name": self.display_name,
            "execution_mode": self.execution_mode,
            "instructions": self.instructions,
            "approval_timeout": self.approval_timeout,
            "max_model_calls": self.max_model_calls,
            "model_retry_policy": self.model_retry_policy.to_json(),
            "tool_retry_policy": self.tool_retry_policy.to_json(),
            "model": {
                "provider": self.model.provider,
                "name": self.model.name,
                "parameters": self.model.parameters,
                "base_url": self.model.base_url,
                "api_key_env": self.model.api_key_env,
                "scripted": {
                    "first_token_delay": self.model.scripted.first_token_delay,
                    "token_delay": self.model.scripted.token_delay,
                    "turns": [
                        {
                            "text": turn.text,
                            "tool_calls": [
                                {"name": c.name, "arguments_json": c.arguments_json}
                                for c in turn.tool_calls
                            ],
                        }
                        for turn in self.model.scripted.turns
                    ],
                },
            },
            "tools": [t.to_json() for t in self.tools],
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> AgentConfig:
        model = data["model"]
        scripted = model.get("scripted") or {}
        return AgentConfig(
            agent_id=data["agent_id"],
            version=int(data.get("version", 0)),
            display_name=data.get("display_name", ""),
            execution_mode=data.get("execution_mode", "classic"),
            instructions=data.get("instructions", ""),
            approval_timeout=float(data.get("approval_timeout", DEFAULT_APPROVAL_TIMEOUT)),
            max_model_calls=int(data.get("max_model_calls", DEFAULT_MAX_MODEL_CALLS)),
            model_retry_policy=RetryPolicy.from_json(
                data.get("model_retry_policy", {}), DEFAULT_MODEL_RETRY_POLICY
            ),
            tool_retry_policy=RetryPolicy.from_json(
                data.get("tool_retry_policy", {}), DEFAULT_TOOL_RETRY_POLICY
            ),
            model=ModelSettings(
                provider=model["provider"],
                name=model.get("name", ""),
                parameters=dict(model.get("parameters") or {}),
                base_url=model.get("base_url", ""),
                api_key_env=model.get("api_key_env", ""),
                scripted=ScriptedSettings(
                    first_token_delay=float(scripted.get("first_token_delay", 0.0)),
                    token_delay=float(scripted.get("token_delay", 0.0)),
                    turns=tuple(
                        ScriptedTurn(
                            text=turn.get("text", ""),
                            tool_calls=tuple(
                                ScriptedToolCall(c["name"], c.get("arguments_json", ""))
                                for c in turn.get("tool_calls", [])
                            ),
                        )
                        for turn in scripted.get("turns", [])
                    ),
                ),
            ),
            tools=tuple(ToolSettings.from_json(t) for t in data.get("tools", [])),
        )
