"""The send_email tool: a harmless stand-in that records each message in an outbox file.

Each call appends one JSON line to ``<data_dir>/outbox.jsonl``, at most once per (tenant,
idempotency key): a retried call finds its line and returns the same result without sending
again. Every call, retried or not, is also logged in ``<data_dir>/attempts.jsonl`` (key and
time), so that one can see how often a call was made, not only what was sent. Read-check-append
runs under an exclusive ``flock`` so several executor processes can share one outbox, and in a
worker thread so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import time
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from executor.tools.base import SchemaText, ToolContext, ToolError, register_tool

OUTBOX_NAME = "outbox.jsonl"
ATTEMPTS_NAME = "attempts.jsonl"
MAX_ADDRESS_LENGTH = 254
MAX_SUBJECT_LENGTH = 500
MAX_BODY_LENGTH = 20_000

# Characters that would end a header line, or that no header should carry: every control
# character (Unicode category Cc: C0, DEL, C1 with NEL) and the line and paragraph separators.
_LINE_BREAKERS = frozenset("\u2028\u2029")
_HEADERS = ("to", "subject")

_ADDRESS = re.compile(r"[^@\s\x00-\x1f\x7f<>(),;:\"\[\]\\]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")

_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "to": {
            "type": "string",
            "description": "Recipient email address, for example 'ada@example.com'.",
            "maxLength": MAX_ADDRESS_LENGTH,
        },
        "subject": {
            "type": "string",
            "description": "Subject line (a single line).",
            "maxLength": MAX_SUBJECT_LENGTH,
        },
        "body": {
            "type": "string",
            "description": "Plain-text message body.",
            "maxLength": MAX_BODY_LENGTH,
        },
    },
    "required": ["to", "subject", "body"],
    "additionalProperties": False,
}
_SCHEMA = SchemaText(_PARAMETERS)


class SendEmailTool:
    """Records the email in the outbox; returns ``{"status": "sent", "to", "message_id"}``."""

    @property
    def name(self) -> str:
        return "send_email"

    @property
    def description(self) -> str:
        return (
            "Send a plain-text email to one recipient. "
            "Each call sends one message, so call it only when the user wants an email sent."
        )

    @property
    def parameters(self) -> dict[str, Any]:
        return _SCHEMA.copy()

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> str:
        to, subject, body = _validate(arguments)
        record = {
            "idempotency_key": context.idempotency_key,
            "tenant": context.tenant,
            "run_id": context.run_id,
            "tool_call_id": context.tool_call_id,
            "to": to,
            "subject": subject,
            "body": body,
            "time": datetime.now(UTC).isoformat(),
        }
        try:
            sent = await asyncio.to_thread(_append_once, context.data_dir, record)
        except OSError as exc:
            raise ToolError(f"send_email: could not write the outbox: {exc.strerror}") from exc
        result = {
            "status": "sent",
            "to": sent.get("to", to),
            "message_id": message_id(context.tenant, context.idempotency_key),
        }
        return json.dumps(result)


def message_id(tenant: str, idempotency_key: str) -> str:
    """The message id of the one email a (tenant, idempotency key) can send; stable across tries."""
    digest = hashlib.sha256(f"{tenant}\0{idempotency_key}".encode()).hexdigest()
    return f"<{digest[:32]}@outbox.agentrun>"


def read_outbox(data_dir: Path) -> list[dict[str, Any]]:
    """Every complete record in the outbox, oldest first ([] if there is none)."""
    try:
        file = (data_dir / OUTBOX_NAME).open("rb")
    except FileNotFoundError:
        return []
    with file:
        fcntl.flock(file.fileno(), fcntl.LOCK_SH)
        return list(_records(file))


def read_attempts(data_dir: Path) -> list[dict[str, Any]]:
    """Every call ever made (``idempotency_key``, ``time`` in epoch seconds), oldest first."""
    try:
        file = (data_dir / OUTBOX_NAME).open("rb")
    except FileNotFoundError:
        return []
    with file:
        fcntl.flock(file.fileno(), fcntl.LOCK_SH)
        try:
            lines = (data_dir / ATTEMPTS_NAME).read_bytes().splitlines()
        except FileNotFoundError:
            return []
    attempts = []
    for line in lines:
        try:
            attempts.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a crash
    return attempts


def _validate(arguments: dict[str, Any]) -> tuple[str, str, str]:
    unknown = sorted(set(arguments) - {"to", "subject", "body"})
    if unknown:
        raise ToolError(f"send_email: unknown argument(s): {', '.join(unknown)}")
    values: list[str] = []
    for name, limit in (
        ("to", MAX_ADDRESS_LENGTH),
        ("subject", MAX_SUBJECT_LENGTH),
        ("body", MAX_BODY_LENGTH),
    ):
        value = arguments.get(name)
        if value is None:
            raise ToolError(f"send_email: argument {name!r} is required")
        if not isinstance(value, str):
            raise ToolError(f"send_email: argument {name!r} must be a string")
        if len(value) > limit:
            raise ToolError(
                f"send_email: argument {name!r} is too long ({len(value)} characters; "
                f"the limit is {limit})"
            )
        values.append(value)
    to, subject, body = values
    for name, value in zip(_HEADERS, (to, subject), strict=True):
        _check_header(name, value)
    to = to.strip()
    if not _ADDRESS.fullmatch(to):
        raise ToolError(f"send_email: argument 'to' is not a valid email address: {to!r}")
    return to, subject, body


def _check_header(name: str, value: str) -> None:
    """Refuses a header value with a character that could break it into lines or smuggle in
    another header: a control character or a line or paragraph separator."""
    for char in value:
        if char in _LINE_BREAKERS or unicodedata.category(char) == "Cc":
            raise ToolError(
                f"send_email: argument {name!r} must be a single line without control "
                f"characters (it has U+{ord(char):04X})"
            )


def _append_once(data_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Appends ``record`` unless its (tenant, key) is already there; returns the stored record."""
    identity = (record["tenant"], record["idempotency_key"])
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / OUTBOX_NAME).open("a+b") as file:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        attempt = {"idempotency_key": record["idempotency_key"], "time": time.time()}
        with (data_dir / ATTEMPTS_NAME).open("ab") as attempts:  # guarded by the outbox lock
            attempts.write(json.dumps(attempt).encode() + b"\n")
        file.seek(0)
        for existing in _records(file):
            if (existing.get("tenant"), existing.get("idempotency_key")) == identity:
                return existing
        # A crash mid-append can leave a torn last line; start ours on a fresh line.
        size = file.seek(0, os.SEEK_END)
        if size > 0:
            file.seek(size - 1)
            if file.read(1) != b"\n":
                file.write(b"\n")
        file.write(json.dumps(record).encode() + b"\n")  # O_APPEND: always at the end
        file.flush()
        os.fsync(file.fileno())
    return record


def _records(file: IO[bytes]) -> Iterator[dict[str, Any]]:
    """The complete records in an outbox; skips torn or malformed lines."""
    for line in file:
        if not line.endswith(b"\n"):
            continue  # torn by a crash mid-write: never completed, so never sent
        try:
            value = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            continue
        if isinstance(value, dict):
            yield value


register_tool(SendEmailTool())
