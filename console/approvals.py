"""The approvals inbox (every run waiting for a human, across agents) and the one endpoint that
decides a tool call: approve (with the arguments as the model gave them, or edited) or deny."""

from __future__ import annotations

import json

import grpc
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from agentrun.v1 import run_pb2, run_service_pb2
from console.csrf import checked_form, csrf_token
from console.gateway import CALL_TIMEOUT, status_message
from console.live import polled_fragment
from console.pages import flash, render, templates
from console.session import safe_next, user_calls

# The inbox shows this many waiting runs, the oldest decisions last (newest first).
INBOX_LIMIT = 500
FETCH_HEADER = "x-console-fetch"


async def _waiting_runs(request: Request) -> list[run_pb2.Run]:
    calls = user_calls(request)
    response = await calls.runs.ListRuns(
        run_service_pb2.ListRunsRequest(
            page_size=INBOX_LIMIT, statuses=[run_pb2.RUN_STATUS_AWAITING_APPROVAL]
        ),
        metadata=calls.metadata,
        timeout=CALL_TIMEOUT,
    )
    return [run for run in response.runs if run.pending_approvals]


async def inbox(request: Request) -> Response:
    return render(request, "approvals.html", {"runs": await _waiting_runs(request)})


async def inbox_live(request: Request) -> Response:
    user_calls(request)

    async def fragment() -> str:
        runs = await _waiting_runs(request)
        return templates.get_template("approval_cards.html").render(
            runs=runs, csrf_token=csrf_token(request)
        )

    return polled_fragment(fragment)


def edited_arguments(form: FormData) -> str:
    """The edited arguments to send: empty when the form's arguments are the model's."""
    text = str(form.get("arguments", "")).strip()
    if not text:
        return ""
    try:
        edited = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"the edited arguments are not JSON: {exc}") from None
    try:
        original = json.loads(str(form.get("original_arguments", "")))
    except ValueError:
        original = None
    if edited == original:
        return ""
    return json.dumps(edited, separators=(",", ":"), ensure_ascii=False)


async def decide(request: Request) -> Response:
    form = await checked_form(request)
    calls = user_calls(request)
    run_id = request.path_params["run_id"]
    approved = form.get("decision") == "approve"
    answered_by_fetch = FETCH_HEADER in request.headers
    error = ""
    status = 200
    try:
        decision = run_service_pb2.ToolApprovalDecision(
            tool_call_id=request.path_params["call_id"],
            approved=approved,
            reason=str(form.get("reason", "")).strip(),
            edited_arguments_json=edited_arguments(form) if approved else "",
        )
        await calls.runs.SubmitToolApproval(
            run_service_pb2.SubmitToolApprovalRequest(run_id=run_id, decision=decision),
            metadata=calls.metadata,
            timeout=CALL_TIMEOUT,
        )
    except ValueError as exc:
        error, status = str(exc), 400
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED and not answered_by_fetch:
            raise
        refused = exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        error, status = status_message(exc), 400 if refused else 409
    if answered_by_fetch:
        return JSONResponse({"error": error} if error else {"ok": True}, status_code=status)
    if error:
        flash(request, f"{'approve' if approved else 'deny'}: {error}")
        return RedirectResponse(safe_next(str(form.get("back", ""))), status_code=303)
    verdict = "approved" if approved else "denied"
    flash(request, f"{verdict} the call; the run goes on", kind="info")
    return RedirectResponse(safe_next(str(form.get("next", ""))), status_code=303)


routes = [
    Route("/approvals", inbox, methods=["GET"]),
    Route("/approvals/live", inbox_live, methods=["GET"]),
    Route("/runs/{run_id}/approvals/{call_id}", decide, methods=["POST"]),
]
