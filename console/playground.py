"""The playground: chat with an agent, classic or durable. A message starts a run (StartRun);
the page then follows it like a run page, through one WatchRun, and answers its approvals."""

from __future__ import annotations

import uuid

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agentrun.v1 import agent_pb2, agent_service_pb2, run_service_pb2
from cli.render import MODE_CHOICES
from console.agents import AGENTS_LIMIT
from console.csrf import checked_form
from console.gateway import CALL_TIMEOUT, status_message
from console.pages import render
from console.session import user_calls


async def playground(request: Request) -> Response:
    calls = user_calls(request)
    response = await calls.agents.ListAgents(
        agent_service_pb2.ListAgentsRequest(page_size=AGENTS_LIMIT),
        metadata=calls.metadata,
        timeout=CALL_TIMEOUT,
    )
    context = {
        "agents": list(response.agents),
        "chosen": request.query_params.get("agent", ""),
        "modes": list(MODE_CHOICES),
    }
    return render(request, "playground.html", context)


async def send(request: Request) -> Response:
    """Starts the run of one message; answers JSON: the run and its conversation, or the
    gateway's refusal."""
    form = await checked_form(request)
    calls = user_calls(request)
    mode = str(form.get("mode", ""))
    start = run_service_pb2.StartRunRequest(
        request_id=str(form.get("request_id") or uuid.uuid4()),
        agent_id=str(form.get("agent", "")),
        input=str(form.get("input", "")),
        conversation_id=str(form.get("conversation_id", "")),
        execution_mode=MODE_CHOICES.get(mode, agent_pb2.EXECUTION_MODE_UNSPECIFIED),
    )
    try:
        response = await calls.runs.StartRun(start, metadata=calls.metadata, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        return JSONResponse({"error": status_message(error)}, status_code=400)
    run = response.run
    return JSONResponse({"run_id": run.id, "conversation_id": run.conversation_id})


routes = [
    Route("/playground", playground, methods=["GET"]),
    Route("/playground/runs", send, methods=["POST"]),
]
