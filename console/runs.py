"""The run list: filters (agent, status, mode, conversation), newest first, pages, live."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from cli.render import MODE_CHOICES, STATUS_CHOICES
from console.gateway import CALL_TIMEOUT
from console.live import polled_fragment
from console.pages import render, templates
from console.session import user_calls

PAGE_SIZE = 25


@dataclass(frozen=True)
class RunFilters:
    agent: str = ""
    statuses: tuple[str, ...] = ()
    mode: str = ""
    conversation: str = ""
    page_token: str = ""

    @classmethod
    def of(cls, query: QueryParams) -> RunFilters:
        return cls(
            agent=query.get("agent", "").strip(),
            statuses=tuple(s for s in query.getlist("status") if s in STATUS_CHOICES),
            mode=query.get("mode", "") if query.get("mode", "") in MODE_CHOICES else "",
            conversation=query.get("conversation", "").strip(),
            page_token=query.get("page_token", ""),
        )

    def request(self) -> run_service_pb2.ListRunsRequest:
        return run_service_pb2.ListRunsRequest(
            page_size=PAGE_SIZE,
            page_token=self.page_token,
            agent_id=self.agent,
            conversation_id=self.conversation,
            statuses=[STATUS_CHOICES[s] for s in self.statuses],
            execution_mode=(
                MODE_CHOICES[self.mode] if self.mode else agent_pb2.EXECUTION_MODE_UNSPECIFIED
            ),
        )

    def query(self, page_token: str = "") -> str:
        """The query string of these filters (at another page)."""
        pairs = [("agent", self.agent), ("mode", self.mode), ("conversation", self.conversation)]
        pairs += [("status", s) for s in self.statuses]
        pairs.append(("page_token", page_token))
        return urlencode([(k, v) for k, v in pairs if v])


async def _runs_page(request: Request, filters: RunFilters) -> tuple[list[run_pb2.Run], str]:
    calls = user_calls(request)
    response = await calls.runs.ListRuns(
        filters.request(), metadata=calls.metadata, timeout=CALL_TIMEOUT
    )
    return list(response.runs), response.next_page_token


async def runs_page(request: Request) -> Response:
    filters = RunFilters.of(request.query_params)
    runs, next_token = await _runs_page(request, filters)
    context = {
        "filters": filters,
        "runs": runs,
        "next_query": filters.query(next_token) if next_token else "",
        "first_query": filters.query() if filters.page_token else None,
        "live_query": filters.query(filters.page_token),
        "statuses": list(STATUS_CHOICES),
        "modes": list(MODE_CHOICES),
    }
    return render(request, "runs.html", context)


async def runs_live(request: Request) -> Response:
    filters = RunFilters.of(request.query_params)
    user_calls(request)  # signed in, or no stream

    async def fragment() -> str:
        runs, _ = await _runs_page(request, filters)
        return templates.get_template("run_rows.html").render(runs=runs)

    return polled_fragment(fragment)


routes = [
    Route("/runs", runs_page, methods=["GET"]),
    Route("/runs/live", runs_live, methods=["GET"]),
]
