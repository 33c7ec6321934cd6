"""Agents: the list, one version of an agent, and an edit form whose refusals are the API's
own validation messages."""

from __future__ import annotations

import json

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from agentrun.v1 import agent_pb2, agent_service_pb2
from cli.render import MODE_CHOICES
from console.csrf import checked_form
from console.gateway import CALL_TIMEOUT, status_message
from console.pages import flash, message_json, render
from console.session import user_calls

# What the edit form changes (the API's names, for the update mask); the rest stays.
EDITED_FIELDS = (
    "display_name",
    "execution_mode",
    "model",
    "instructions",
    "tools",
    "approval_timeout",
    "max_model_calls",
)
AGENTS_LIMIT = 500


async def agent_list(request: Request) -> Response:
    calls = user_calls(request)
    response = await calls.agents.ListAgents(
        agent_service_pb2.ListAgentsRequest(
            page_size=AGENTS_LIMIT, page_token=request.query_params.get("page_token", "")
        ),
        metadata=calls.metadata,
        timeout=CALL_TIMEOUT,
    )
    context = {"agents": list(response.agents), "next_token": response.next_page_token}
    return render(request, "agents.html", context)


async def _get_agent(request: Request, version: int = 0) -> agent_pb2.Agent:
    calls = user_calls(request)
    response = await calls.agents.GetAgent(
        agent_service_pb2.GetAgentRequest(
            agent_id=request.path_params["agent_id"], version=version
        ),
        metadata=calls.metadata,
        timeout=CALL_TIMEOUT,
    )
    agent: agent_pb2.Agent = response.agent
    return agent


def _version_param(request: Request) -> int:
    try:
        return max(int(request.query_params.get("version", "0")), 0)
    except ValueError:
        return 0


async def agent_view(request: Request) -> Response:
    agent = await _get_agent(request, _version_param(request))
    latest = await _get_agent(request) if _version_param(request) else agent
    return render(request, "agent.html", {"agent": agent, "latest": latest.version})


def form_of(agent: agent_pb2.Agent) -> dict[str, str]:
    """The edit form's fields for ``agent``."""
    tools = [MessageToDict(t, preserving_proto_field_name=True) for t in agent.tools]
    return {
        "display_name": agent.display_name,
        "execution_mode": next(
            (k for k, v in MODE_CHOICES.items() if v == agent.execution_mode), ""
        ),
        "instructions": agent.instructions,
        "model": message_json(agent.model),
        "tools": json.dumps(tools, indent=2, ensure_ascii=False),
        "approval_timeout": agent.approval_timeout.ToJsonString()
        if agent.HasField("approval_timeout")
        else "",
        "max_model_calls": str(agent.max_model_calls or ""),
        "expected_version": str(agent.version),
    }


def agent_from_form(agent_id: str, form: FormData) -> agent_pb2.Agent:
    """The agent the form describes; ValueError names a field the console cannot even read
    (everything else is for the API to judge)."""
    agent = agent_pb2.Agent(id=agent_id, display_name=str(form.get("display_name", "")))
    mode = str(form.get("execution_mode", ""))
    agent.execution_mode = MODE_CHOICES.get(mode, agent_pb2.EXECUTION_MODE_UNSPECIFIED)
    agent.instructions = str(form.get("instructions", ""))
    for name in ("model", "tools"):
        text = str(form.get(name, "")).strip() or ("[]" if name == "tools" else "{}")
        try:
            ParseDict({name: json.loads(text)}, agent, ignore_unknown_fields=False)
        except (ValueError, ParseError) as exc:
            raise ValueError(f"{name}: {exc}") from None
    timeout = str(form.get("approval_timeout", "")).strip()
    if timeout:
        try:
            agent.approval_timeout.FromJsonString(
                timeout if timeout.endswith("s") else timeout + "s"
            )
        except ValueError:
            raise ValueError(
                f"approval_timeout: not a duration such as 600s: {timeout!r}"
            ) from None
    calls_text = str(form.get("max_model_calls", "")).strip() or "0"
    try:
        agent.max_model_calls = int(calls_text)
    except ValueError:
        raise ValueError(f"max_model_calls: not a whole number: {calls_text!r}") from None
    return agent


async def agent_edit(request: Request) -> Response:
    agent = await _get_agent(request)
    context = {"agent": agent, "form": form_of(agent), "modes": list(MODE_CHOICES)}
    return render(request, "agent_edit.html", context)


async def agent_update(request: Request) -> Response:
    form = await checked_form(request)
    calls = user_calls(request)
    agent_id = request.path_params["agent_id"]
    fields = {name: str(form.get(name, "")) for name in (*EDITED_FIELDS, "expected_version")}
    try:
        agent = agent_from_form(agent_id, form)
        expected = int(fields["expected_version"] or "0")
        response = await calls.agents.UpdateAgent(
            agent_service_pb2.UpdateAgentRequest(
                agent=agent,
                update_mask=FieldMask(paths=list(EDITED_FIELDS)),
                expected_version=expected,
            ),
            metadata=calls.metadata,
            timeout=CALL_TIMEOUT,
        )
    except ValueError as exc:
        error, status = str(exc), 400
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise
        error, status = status_message(exc), 400
    else:
        flash(request, f"saved: version {response.agent.version}", kind="info")
        return RedirectResponse(f"/agents/{agent_id}", status_code=303)
    context = {
        "agent": await _get_agent(request),
        "form": fields,
        "modes": list(MODE_CHOICES),
        "error": error,
    }
    return render(request, "agent_edit.html", context, status_code=status)


routes = [
    Route("/agents", agent_list, methods=["GET"]),
    Route("/agents/{agent_id}", agent_view, methods=["GET"]),
    Route("/agents/{agent_id}/edit", agent_edit, methods=["GET"]),
    Route("/agents/{agent_id}", agent_update, methods=["POST"]),
]
