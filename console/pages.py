"""What every page shares: the templates, their filters, flash messages and the gateway."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from cli.render import (
    error_code_label,
    format_clock,
    format_datetime,
    mode_label,
    status_label,
)
from console.csrf import csrf_token
from console.gateway import Gateway, status_message

T = TypeVar("T")

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))

_FLASH = "flash"


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def flash(request: Request, message: str, kind: str = "error") -> None:
    """A message for the next page this session sees (after a redirect)."""
    request.session.setdefault(_FLASH, []).append({"kind": kind, "text": message})


async def refused_or(request: Request, what: str, call: Awaitable[T]) -> T | None:
    """The call's answer, or None once the gateway's refusal is flashed for the next page (an
    unknown key still goes to the sign-in page)."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise
        flash(request, f"{what}: {status_message(error)}")
        return None


def render(
    request: Request, name: str, context: dict[str, Any] | None = None, status_code: int = 200
) -> Response:
    full = {
        "csrf_token": csrf_token(request),
        "flashes": request.session.pop(_FLASH, []),
        "signed_in": bool(request.session.get("signed_in")),
        **(context or {}),
    }
    return templates.TemplateResponse(request, name, full, status_code=status_code)


def pretty_json(text: str) -> str:
    """JSON text indented for reading (other text as is)."""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


def message_json(message: Message) -> str:
    return json.dumps(
        MessageToDict(message, preserving_proto_field_name=True), indent=2, ensure_ascii=False
    )


def _when(ts: Timestamp) -> str:
    return format_datetime(ts, UTC)


def _clock(ts: Timestamp) -> str:
    return format_clock(ts, UTC)


templates.env.filters.update(
    status=status_label,
    mode=mode_label,
    error_code=error_code_label,
    when=_when,
    clock=_clock,
    pretty_json=pretty_json,
    from_json=json.loads,
    message_json=message_json,
)
