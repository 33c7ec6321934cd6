"""The clock tool: the current time in UTC and in a named time zone."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from executor.tools.base import SchemaText, ToolContext, ToolError, register_tool

_MAX_ZONE_LENGTH = 64

_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "timezone": {
            "type": "string",
            "description": 'IANA time zone name such as "Europe/Paris"; defaults to "UTC".',
            "maxLength": _MAX_ZONE_LENGTH,
        },
    },
    "required": [],
    "additionalProperties": False,
}
_SCHEMA = SchemaText(_PARAMETERS)


class ClockTool:
    """Returns ``{"utc": ..., "timezone": ..., "local": ...}`` with ISO-8601 times."""

    @property
    def name(self) -> str:
        return "clock"

    @property
    def description(self) -> str:
        return (
            "Get the current date and time, in UTC and in an optional IANA time zone "
            '(for example "America/New_York"). Use it whenever you need to know the time or date.'
        )

    @property
    def parameters(self) -> dict[str, Any]:
        return _SCHEMA.copy()

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> str:
        unknown = sorted(set(arguments) - {"timezone"})
        if unknown:
            raise ToolError(f"clock: unknown argument(s): {', '.join(unknown)}")
        zone_name = arguments.get("timezone")
        if zone_name is None:
            zone_name = "UTC"
        if not isinstance(zone_name, str):
            raise ToolError("clock: argument 'timezone' must be a string")
        zone = _zone(zone_name)
        now = datetime.now(UTC)
        result = {
            "utc": now.isoformat(timespec="seconds"),
            "timezone": zone_name,
            "local": now.astimezone(zone).isoformat(timespec="seconds"),
        }
        return json.dumps(result)


def _zone(name: str) -> ZoneInfo:
    error = ToolError(
        f"clock: unknown time zone {name[:_MAX_ZONE_LENGTH]!r}; "
        'use an IANA name such as "Europe/Paris" or "UTC"'
    )
    if not name or len(name) > _MAX_ZONE_LENGTH:
        raise error
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise error from exc


register_tool(ClockTool())
