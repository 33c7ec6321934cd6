"""A run: its summary, the live timeline (one WatchRun per open page), a durable run's stored
history version by version, forking and cancelling."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
from google.protobuf.json_format import MessageToJson
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from common.event_streams import is_terminal
from console.csrf import checked_form, csrf_token
from console.gateway import CALL_TIMEOUT, status_message
from console.pages import flash, refused_or, render, templates
from console.session import user_calls

# A history longer than this shows in pages of this many versions.
HISTORY_PAGE = 500


async def _get_run(request: Request, run_id: str) -> run_pb2.Run:
    calls = user_calls(request)
    response = await calls.runs.GetRun(
        run_service_pb2.GetRunRequest(run_id=run_id), metadata=calls.metadata, timeout=CALL_TIMEOUT
    )
    run: run_pb2.Run = response.run
    return run


def _durable(run: run_pb2.Run) -> bool:
    return run.execution_mode == agent_pb2.EXECUTION_MODE_DURABLE


async def run_view(request: Request) -> Response:
    run = await _get_run(request, request.path_params["run_id"])
    return render(request, "run.html", {"run": run, "durable": _durable(run)})


async def run_summary(request: Request) -> Response:
    run = await _get_run(request, request.path_params["run_id"])
    return templates.TemplateResponse(request, "run_summary.html", {"run": run})


async def run_history(request: Request) -> Response:
    """A durable run's stored events from version ``from`` on, a page at a time."""
    calls = user_calls(request)
    run_id = request.path_params["run_id"]
    try:
        first = max(int(request.query_params.get("from", "1")), 1)
    except ValueError:
        first = 1
    listing = calls.runs.ListRunEvents(
        run_service_pb2.ListRunEventsRequest(
            run_id=run_id, from_version=first, to_version=first + HISTORY_PAGE
        ),
        metadata=calls.metadata,
        timeout=CALL_TIMEOUT,
    )
    events: list[run_pb2.StoredRunEvent] = []
    async for response in listing:
        events.extend(response.events)
    more = len(events) > HISTORY_PAGE
    context = {
        "run_id": run_id,
        "events": events[:HISTORY_PAGE],
        "previous_from": max(first - HISTORY_PAGE, 1) if first > 1 else None,
        "next_from": first + HISTORY_PAGE if more else None,
        "csrf_token": csrf_token(request),
    }
    return templates.TemplateResponse(request, "run_history.html", context)


async def run_events(request: Request) -> Response:
    """The run's events as server-sent events: one WatchRun, from the last event the page has
    (Last-Event-ID, when the browser reconnects) or from the start; ``end`` after the terminal
    event."""
    calls = user_calls(request)
    run_id = request.path_params["run_id"]
    after = request.headers.get("last-event-id") or request.query_params.get("after", "0")
    try:
        after_sequence = max(int(after), 0)
    except ValueError:
        after_sequence = 0

    async def events() -> AsyncIterator[dict[str, str]]:
        watch = calls.runs.WatchRun(
            run_service_pb2.WatchRunRequest(run_id=run_id, after_sequence=after_sequence),
            metadata=calls.metadata,
        )
        try:
            async for response in watch:
                for event in response.events:
                    data = MessageToJson(event, preserving_proto_field_name=True, indent=None)
                    yield {"event": "run-event", "id": str(event.sequence), "data": data}
                    if is_terminal(event):
                        yield {"event": "end", "data": ""}
                        return
            yield {"event": "problem", "data": "the stream ended before the run did"}
        except grpc.aio.AioRpcError as error:
            yield {"event": "problem", "data": status_message(error)}
        finally:
            watch.cancel()  # the page went away: so does its WatchRun

    return EventSourceResponse(events())


async def fork(request: Request) -> Response:
    form = await checked_form(request)
    calls = user_calls(request)
    run_id = request.path_params["run_id"]
    try:
        at_version = int(str(form.get("at_version", "")))
    except ValueError:
        flash(request, "fork: the version must be a number")
        return RedirectResponse(f"/runs/{run_id}", status_code=303)
    response = await refused_or(
        request,
        f"fork at version {at_version}",
        calls.runs.ForkRun(
            run_service_pb2.ForkRunRequest(
                run_id=run_id,
                at_version=at_version,
                request_id=str(form.get("request_id") or uuid.uuid4()),
            ),
            metadata=calls.metadata,
            timeout=CALL_TIMEOUT,
        ),
    )
    if response is None:
        return RedirectResponse(f"/runs/{run_id}", status_code=303)
    flash(request, f"forked from {run_id} at version {at_version}", kind="info")
    return RedirectResponse(f"/runs/{response.run.id}", status_code=303)


async def cancel(request: Request) -> Response:
    form = await checked_form(request)
    calls = user_calls(request)
    run_id = request.path_params["run_id"]
    await refused_or(
        request,
        "cancel",
        calls.runs.CancelRun(
            run_service_pb2.CancelRunRequest(run_id=run_id, reason=str(form.get("reason", ""))),
            metadata=calls.metadata,
            timeout=CALL_TIMEOUT,
        ),
    )
    return RedirectResponse(f"/runs/{run_id}", status_code=303)


routes = [
    Route("/runs/{run_id}", run_view, methods=["GET"]),
    Route("/runs/{run_id}/summary", run_summary, methods=["GET"]),
    Route("/runs/{run_id}/history", run_history, methods=["GET"]),
    Route("/runs/{run_id}/events", run_events, methods=["GET"]),
    Route("/runs/{run_id}/fork", fork, methods=["POST"]),
    Route("/runs/{run_id}/cancel", cancel, methods=["POST"]),
]
