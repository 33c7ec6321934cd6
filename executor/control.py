"""Run control over NATS: the executor holding a run answers requests on the run's control
subject for any executor: commands (see eventstore.run_commands) and liveness pings.

A request is a small JSON object: ``{"op": "ping"}``, or a command's JSON form with the caller's
``tenant``. The answer is ``{"ok": true, "executor": <id>}``; ``{"not_here": true}`` when the
holder cannot take the command now (it is letting the run go: the caller records it in the
store instead); or ``{"error": {"reason", "message"}}``, turned back into the domain error on
the asking side.
"""

from __future__ import annotations

import contextlib
import enum
import json
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.msg import Msg

from common.errors import AgentrunError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from common.nats_link import MessageHandler, NatsLink
from eventstore.run_commands import Command, from_json, to_json

CONTROL_TIMEOUT = 5.0

Handle = Callable[[str, Command], Awaitable[bool]]
"""Carries out a command for a tenant; False if it cannot be taken here now; raises a domain
error to refuse it."""


class Answer(enum.Enum):
    DONE = "done"  # the holder carried the command out
    NOT_HERE = "not here"  # the holder is letting the run go
    NO_HOLDER = "no holder"  # no process holds the run


def answering(handle: Handle, executor_id: str) -> MessageHandler:
    """A NATS message handler that answers control requests with ``handle``; it answers pings
    itself, naming the executor (so that operators can find which executor holds a run)."""

    async def answer(msg: Msg) -> None:
        try:
            request = json.loads(msg.data)
            reply: dict[str, object] = {"ok": True, "executor": executor_id}
            if request.get("op") != "ping":
                command = from_json(request)
                if not await handle(str(request["tenant"]), command):
                    reply = {"not_here": True}
        except AgentrunError as exc:
            reply = {"error": {"reason": exc.reason, "message": exc.message}}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            reply = {"error": {"reason": "INVALID_ARGUMENT", "message": f"bad request: {exc}"}}
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(json.dumps(reply).encode())

    return answer


async def request(link: NatsLink, run_id: str, tenant: str, command: Command) -> Answer:
    """Sends ``command`` to whoever holds the run; raises the domain error it answers with."""
    body = {**to_json(command), "tenant": tenant}
    try:
        reply = await link.nc.request(
            link.names.control_subject(run_id), json.dumps(body).encode(), timeout=CONTROL_TIMEOUT
        )
    except nats.errors.NoRespondersError:
        return Answer.NO_HOLDER
    except (nats.errors.TimeoutError, TimeoutError):
        raise Unavailable("executor", f"the executor holding run {run_id} did not answer") from None
    answer: dict[str, Any] = json.loads(reply.data)
    if answer.get("not_here"):
        return Answer.NOT_HERE
    _raise_error(run_id, answer.get("error"))
    return Answer.DONE


def _raise_error(run_id: str, error: dict[str, Any] | None) -> None:
    if not error:
        return
    message = str(error.get("message"))
    if error.get("reason") == "NOT_FOUND":
        raise NotFound("run", run_id)
    if error.get("reason") == "INVALID_ARGUMENT":
        raise InvalidArgument("request", message)
    raise FailedPrecondition(message)
