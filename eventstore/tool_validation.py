"""The checks of an agent's tools that do not depend on the kind's registry: names, URLs, JSON
Schemas, headers and retry policies. Each failure names its field (agent.tools[2].http.url)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from common.errors import InvalidArgument

if TYPE_CHECKING:
    from eventstore.agent_config import (
        ClientToolSettings,
        HttpToolSettings,
        McpServerSettings,
        ToolSettings,
    )

# The tool-name rule of the model APIs (OpenAI's and Anthropic's function names).
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Headers the executor sets itself on every call.
RESERVED_HEADERS = frozenset(
    {"idempotency-key", "content-type", "content-length", "host", "transfer-encoding"}
)
MAX_URL_LENGTH = 2048
MAX_DESCRIPTION_LENGTH = 10_000
MAX_SCHEMA_BYTES = 64 * 1024
MAX_HEADERS = 32
MAX_MCP_TOOL_NAMES = 128
# A prefix leaves at least one character of the tool-name rule's 64 to the server's name.
NAME_PREFIX = re.compile(r"[a-zA-Z0-9_-]{0,63}")


def validate_tools(tools: Sequence[ToolSettings]) -> None:
    """Raises InvalidArgument naming the first thing wrong with one of ``tools``."""
    seen: dict[str, int] = {}
    for index, tool in enumerate(tools):
        field = f"agent.tools[{index}]"
        if tool.kind == "mcp":
            if tool.mcp is None:
                raise InvalidArgument(f"{field}.mcp", "is required for an MCP server")
            if tool.name:
                raise InvalidArgument(f"{field}.name", "must be empty for an MCP server")
            if tool.description:
                raise InvalidArgument(
                    f"{field}.description",
                    "must be empty for an MCP server (its tools have the server's descriptions)",
                )
            _validate_mcp(f"{field}.mcp", tool.mcp)
            if tool.retry_policy is not None:
                tool.retry_policy.validate(f"{field}.retry_policy")
            continue
        name_field = f"{field}.{tool.kind}.name" if tool.kind != "builtin" else f"{field}.name"
        if not TOOL_NAME.fullmatch(tool.name):
            raise InvalidArgument(name_field, "must be 1-64 characters of a-z, A-Z, 0-9, _ and -")
        if tool.name in seen:
            raise InvalidArgument(
                name_field, f"{tool.name!r} is already the name of agent.tools[{seen[tool.name]}]"
            )
        seen[tool.name] = index
        if tool.kind == "http":
            if tool.http is None:
                raise InvalidArgument(f"{field}.http", "is required for an HTTP tool")
            _validate_http(f"{field}.http", tool.http)
        if tool.kind == "client":
            if tool.client is None:
                raise InvalidArgument(f"{field}.client", "is required for a client tool")
            _validate_client(f"{field}.client", tool.client)
        if tool.retry_policy is not None:
            tool.retry_policy.validate(f"{field}.retry_policy")


def _validate_http(field: str, http: HttpToolSettings) -> None:
    check_url(f"{field}.url", http.url)
    if not http.description.strip():
        raise InvalidArgument(f"{field}.description", "is required: the model reads it")
    if len(http.description) > MAX_DESCRIPTION_LENGTH:
        raise InvalidArgument(
            f"{field}.description", f"must be at most {MAX_DESCRIPTION_LENGTH:,} characters"
        )
    check_schema(f"{field}.parameters", http.parameters)
    _validate_headers(field, http.headers_from_env)


def _validate_mcp(field: str, mcp: McpServerSettings) -> None:
    """The server's URL and headers as an HTTP tool's; its tool names and prefix under the
    tool-name rule (the prefixed names' uniqueness is checked when a run lists them)."""
    check_url(f"{field}.url", mcp.url)
    _validate_headers(field, mcp.headers_from_env)
    if not NAME_PREFIX.fullmatch(mcp.name_prefix):
        raise InvalidArgument(
            f"{field}.name_prefix", "must be 0-63 characters of a-z, A-Z, 0-9, _ and -"
        )
    if len(mcp.tool_names) > MAX_MCP_TOOL_NAMES:
        raise InvalidArgument(f"{field}.tool_names", f"must be at most {MAX_MCP_TOOL_NAMES}")
    for name in mcp.tool_names:
        if not TOOL_NAME.fullmatch(mcp.name_prefix + name):
            raise InvalidArgument(
                f"{field}.tool_names",
                f"{mcp.name_prefix + name!r} must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
            )
    if len(set(mcp.tool_names)) != len(mcp.tool_names):
        raise InvalidArgument(f"{field}.tool_names", "a tool is named twice")


def _validate_headers(field: str, headers_from_env: dict[str, str]) -> None:
    if len(headers_from_env) > MAX_HEADERS:
        raise InvalidArgument(f"{field}.headers_from_env", f"must be at most {MAX_HEADERS}")
    for header, env in headers_from_env.items():
        if not HEADER_NAME.fullmatch(header):
            raise InvalidArgument(f"{field}.headers_from_env", f"{header!r} is not a header name")
        if header.lower() in RESERVED_HEADERS:
            raise InvalidArgument(
                f"{field}.headers_from_env", f"{header!r} is set by the executor on every call"
            )
        if not ENV_NAME.fullmatch(env):
            raise InvalidArgument(
                f"{field}.headers_from_env[{header}]",
                f"{env!r} is not an environment variable name",
            )


def _validate_client(field: str, client: ClientToolSettings) -> None:
    _check_description(f"{field}.description", client.description)
    check_schema(f"{field}.parameters", client.parameters)


def _check_description(field: str, description: str) -> None:
    if not description.strip():
        raise InvalidArgument(field, "is required: the model reads it")
    if len(description) > MAX_DESCRIPTION_LENGTH:
        raise InvalidArgument(field, f"must be at most {MAX_DESCRIPTION_LENGTH:,} characters")


def check_url(field: str, url: str) -> None:
    """An http(s) URL with a host and no credentials (those belong in headers from the
    environment: an agent stores no secrets)."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidArgument(field, f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a malformed port)
    except ValueError as exc:
        raise InvalidArgument(field, f"is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidArgument(field, "must be an http or https URL")
    if not parts.hostname:
        raise InvalidArgument(field, "must name a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument(
            field, "must not hold credentials: name them in headers_from_env instead"
        )


def check_schema(field: str, schema: dict[str, Any]) -> None:
    """A JSON Schema (Draft 2020-12) of an arguments object; an empty one means any object."""
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise InvalidArgument(field, f"must be at most {MAX_SCHEMA_BYTES:,} bytes of JSON")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        at = f" at {where}" if where else ""
        raise InvalidArgument(
            field, f"is not a valid JSON Schema (Draft 2020-12){at}: {exc.message}"
        ) from None
    if schema.get("type", "object") != "object":
        raise InvalidArgument(field, 'must describe an object: "type" must be "object"')
