"""Run control over NATS: the executor holding a run answers requests on the run's control
subject (approval decisions, cancellation, liveness pings) for any gateway or executor.
Requests and answers are small JSON objects; an answer is ``{"ok": true}`` or ``{"error":
{"reason", "message"}}``, turned back into the domain error on the asking side."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg

from common.errors import AgentrunError, FailedPrecondition, InvalidArgument, NotFound
from common.nats_link import MessageHandler

Handle = Callable[[str, dict[str, Any]], None]
"""Carries out one operation (``op``, the request); raises a domain error to refuse it."""


def answering(handle: Handle, executor_id: str) -> MessageHandler:
    """A NATS message handler that answers control requests with ``handle``; it answers pings
    itself, naming the executor (so that operators can find which executor holds a run)."""

    async def answer(msg: Msg) -> None:
        try:
            request = json.loads(msg.data)
            op = str(request.get("op"))
            if op != "ping":
                handle(op, request)
            reply: dict[str, object] = {"ok": True, "executor": executor_id}
        except AgentrunError as exc:
            reply = {"error": {"reason": exc.reason, "message": exc.message}}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            reply = {"error": {"reason": "INVALID_ARGUMENT", "message": f"bad request: {exc}"}}
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(json.dumps(reply).encode())

    return answer


def raise_for_answer(run_id: str, data: bytes) -> None:
    """Raises the domain error a control answer carries, if it carries one."""
    error = json.loads(data).get("error")
    if not error:
        return
    message = str(error.get("message"))
    if error.get("reason") == "NOT_FOUND":
        raise NotFound("run", run_id)
    if error.get("reason") == "INVALID_ARGUMENT":
        raise InvalidArgument("request", message)
    raise FailedPrecondition(message)
