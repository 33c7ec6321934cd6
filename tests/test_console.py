"""The console over HTTP against a real stack: sign-in, CSRF, the run list's filters, the
approvals inbox, a run's event stream. The browser's view is in test_console_browser.py."""

from __future__ import annotations

import base64
import html
import json
import re
import uuid

import httpx

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from console.runs import PAGE_SIZE
from tests.client import Client, kinds, scripted_agent
from tests.console_stack import (
    API_KEY,
    GUARD,
    ConsoleStack,
    csrf_of,
    signed_in,
    wait_for_event,
)


async def test_a_wrong_api_key_is_refused(console_stack: ConsoleStack) -> None:
    async with httpx.AsyncClient(base_url=console_stack.url, timeout=GUARD) as http:
        login = await http.get("/login")
        refused = await http.post(
            "/login", data={"api_key": "not-a-key", "csrf_token": csrf_of(login.text)}
        )
        assert refused.status_code == 401
        assert "The gateway refused this API key." in refused.text
        still_out = await http.get("/runs")
        assert still_out.status_code == 303
        assert still_out.headers["location"].startswith("/login")


async def test_signing_in_keeps_the_key_encrypted_in_an_http_only_cookie(
    console_stack: ConsoleStack,
) -> None:
    async with signed_in(console_stack.url) as http:
        response = await http.get("/runs")
        assert response.status_code == 200
        assert API_KEY not in response.text
    async with httpx.AsyncClient(base_url=console_stack.url, timeout=GUARD) as http:
        login = await http.get("/login")
        response = await http.post(
            "/login",
            data={"api_key": API_KEY, "csrf_token": csrf_of(login.text), "next": "//elsewhere"},
        )
        assert response.headers["location"] == "/runs"  # never to another site
        cookie = response.cookies["agentrun_console"]
        payload = base64.b64decode(cookie.split(".")[0] + "==").decode()
        assert "api_key" in payload
        assert API_KEY not in payload  # encrypted, not only signed
        set_cookie = response.headers["set-cookie"].lower()
        assert "httponly" in set_cookie
        assert "samesite=lax" in set_cookie


async def test_a_form_without_its_csrf_token_is_refused(
    console_stack: ConsoleStack, grpc_client: Client
) -> None:
    async with httpx.AsyncClient(base_url=console_stack.url, timeout=GUARD) as http:
        await http.get("/login")
        refused = await http.post("/login", data={"api_key": API_KEY})
        assert refused.status_code == 403
    agent = await grpc_client.create_agent(scripted_agent(mode=agent_pb2.EXECUTION_MODE_DURABLE))
    events = await grpc_client.run(agent.id, "count to 2")
    run_id = events[0].run_id
    async with signed_in(console_stack.url) as http:
        without = await http.post(f"/runs/{run_id}/fork", data={"at_version": "1"})
        assert without.status_code == 403
        forged = await http.post(
            f"/runs/{run_id}/fork", data={"at_version": "1", "csrf_token": "forged"}
        )
        assert forged.status_code == 403
        listed = await grpc_client.runs.ListRuns(
            run_service_pb2.ListRunsRequest(agent_id=agent.id), metadata=grpc_client.metadata
        )
        assert len(listed.runs) == 1, "a refused fork started a run"
        page = await http.get(f"/runs/{run_id}")
        forked = await http.post(
            f"/runs/{run_id}/fork", data={"at_version": "1", "csrf_token": csrf_of(page.text)}
        )
        assert forked.status_code == 303
        assert forked.headers["location"] != f"/runs/{run_id}"


async def first_fragment(http: httpx.AsyncClient, path: str) -> str:
    """The first fragment a live page's event stream sends (it sends one at once)."""
    async with http.stream("GET", path) as stream:
        data: list[str] = []
        async for line in stream.aiter_lines():
            if line.startswith("data:"):
                data.append(line.removeprefix("data:").removeprefix(" "))
            elif not line and data:
                return "\n".join(data)
    raise AssertionError(f"{path} ended without a fragment")


def run_ids_in(page: str, candidates: set[str]) -> set[str]:
    return {run_id for run_id in candidates if f'data-run="{run_id}"' in page}


async def test_the_run_list_filters(console_stack: ConsoleStack, grpc_client: Client) -> None:
    first = await grpc_client.create_agent(scripted_agent())
    second = await grpc_client.create_agent(scripted_agent(mode=agent_pb2.EXECUTION_MODE_DURABLE))
    a = (await grpc_client.run(first.id, "count to 2"))[0].run_id
    b_events = await grpc_client.run(second.id, "count to 2")
    b = b_events[0].run_id
    conversation = b_events[0].run_started.run.conversation_id
    c = (await grpc_client.run(second.id, "count to 3", conversation_id=conversation))[0].run_id
    waiting = await grpc_client.runs.StartRun(
        run_service_pb2.StartRunRequest(agent_id=second.id, input="email bob@example.com"),
        metadata=grpc_client.metadata,
    )
    d = waiting.run.id
    await wait_for_event(grpc_client, d, "tool_approval_required")
    ours = {a, b, c, d}
    async with signed_in(console_stack.url) as http:
        everything = await http.get("/runs")
        assert run_ids_in(everything.text, ours) == ours
        by_agent = await http.get("/runs", params={"agent": second.id})
        assert run_ids_in(by_agent.text, ours) == {b, c, d}
        by_mode = await http.get("/runs", params={"mode": "classic"})
        assert run_ids_in(by_mode.text, ours) == {a}
        by_status = await http.get("/runs", params={"status": "awaiting_approval"})
        assert run_ids_in(by_status.text, ours) == {d}
        by_conversation = await http.get("/runs", params={"conversation": conversation})
        assert run_ids_in(by_conversation.text, ours) == {b, c}
        newest_first = by_conversation.text.index(c) < by_conversation.text.index(b)
        assert newest_first


async def test_approving_from_the_inbox_lets_the_run_go_on(
    console_stack: ConsoleStack, grpc_client: Client
) -> None:
    agent = await grpc_client.create_agent(scripted_agent(mode=agent_pb2.EXECUTION_MODE_DURABLE))
    started = await grpc_client.runs.StartRun(
        run_service_pb2.StartRunRequest(
            agent_id=agent.id, input="email bob@example.com", request_id=str(uuid.uuid4())
        ),
        metadata=grpc_client.metadata,
    )
    run_id = started.run.id
    events = await wait_for_event(grpc_client, run_id, "tool_approval_required")
    call = events[-1].tool_approval_required.tool_call
    async with signed_in(console_stack.url) as http:
        inbox = await http.get("/approvals")
        assert f'data-call="{call.id}"' in inbox.text
        assert call.id in await first_fragment(http, "/approvals/live")
        edited = {**json.loads(call.arguments_json), "subject": "from the console"}
        decided = await http.post(
            f"/runs/{run_id}/approvals/{call.id}",
            data={
                "csrf_token": csrf_of(inbox.text),
                "decision": "approve",
                "arguments": json.dumps(edited),
                "original_arguments": call.arguments_json,
                "next": f"/runs/{run_id}",
            },
        )
        assert decided.status_code == 303
        assert decided.headers["location"] == f"/runs/{run_id}"
    history = await grpc_client.watch_all(run_id)
    assert history[-1].HasField("run_completed"), kinds(history)
    resolved = next(
        e.tool_approval_resolved for e in history if e.HasField("tool_approval_resolved")
    )
    assert resolved.approved
    assert json.loads(resolved.edited_arguments_json)["subject"] == "from the console"
    run = await grpc_client.get_run(run_id)
    assert run.status == run_pb2.RUN_STATUS_COMPLETED


async def test_a_run_streams_its_events_and_resumes_after_the_last_one(
    console_stack: ConsoleStack, grpc_client: Client
) -> None:
    agent = await grpc_client.create_agent(scripted_agent())
    events = await grpc_client.run(agent.id, "count to 3")
    run_id = events[0].run_id
    async with signed_in(console_stack.url) as http:
        whole = await http.get(f"/runs/{run_id}/events")
        ids = [int(line[3:]) for line in whole.text.splitlines() if line.startswith("id:")]
        assert ids == [e.sequence for e in events]
        assert "event: end" in whole.text
        resumed = await http.get(f"/runs/{run_id}/events", headers={"Last-Event-ID": "3"})
        ids = [int(line[3:]) for line in resumed.text.splitlines() if line.startswith("id:")]
        assert ids == [e.sequence for e in events if e.sequence > 3]


async def test_an_edit_the_tool_refuses_is_shown_and_the_call_still_waits(
    console_stack: ConsoleStack, grpc_client: Client
) -> None:
    agent = await grpc_client.create_agent(scripted_agent(mode=agent_pb2.EXECUTION_MODE_DURABLE))
    started = await grpc_client.runs.StartRun(
        run_service_pb2.StartRunRequest(agent_id=agent.id, input="email bob@example.com"),
        metadata=grpc_client.metadata,
    )
    run_id = started.run.id
    waiting = await wait_for_event(grpc_client, run_id, "tool_approval_required")
    call = waiting[-1].tool_approval_required.tool_call
    async with signed_in(console_stack.url) as http:
        token = csrf_of((await http.get("/approvals")).text)
        form = {
            "csrf_token": token,
            "decision": "approve",
            "original_arguments": call.arguments_json,
            "back": "/approvals",
        }
        for arguments, message in [
            ("{not json", "the edited arguments are not JSON"),
            (json.dumps({"to": 42}), "INVALID_ARGUMENT: "),
        ]:
            refused = await http.post(
                f"/runs/{run_id}/approvals/{call.id}", data={**form, "arguments": arguments}
            )
            assert refused.status_code == 303
            assert refused.headers["location"] == "/approvals"
            inbox = await http.get("/approvals")
            assert message in inbox.text
            assert f'data-call="{call.id}"' in inbox.text  # still waiting
        by_fetch = await http.post(
            f"/runs/{run_id}/approvals/{call.id}",
            data={**form, "arguments": "{not json"},
            headers={"X-Console-Fetch": "1"},
        )
        assert by_fetch.status_code == 400
        assert "not JSON" in by_fetch.json()["error"]
    run = await grpc_client.get_run(run_id)
    assert run.status == run_pb2.RUN_STATUS_AWAITING_APPROVAL
    await grpc_client.runs.CancelRun(
        run_service_pb2.CancelRunRequest(run_id=run_id), metadata=grpc_client.metadata
    )


async def test_the_run_list_pages_newest_first(
    console_stack: ConsoleStack, grpc_client: Client
) -> None:
    agent = await grpc_client.create_agent(scripted_agent())
    started = [
        (await grpc_client.run(agent.id, "count to 1"))[0].run_id for _ in range(PAGE_SIZE + 2)
    ]
    async with signed_in(console_stack.url) as http:
        first = await http.get("/runs", params={"agent": agent.id})
        assert run_ids_in(first.text, set(started)) == set(started[2:])
        older = re.search(r'<a href="/runs\?([^"]+)" id="next-page">', first.text)
        assert older is not None
        second = await http.get(f"/runs?{html.unescape(older.group(1))}")
        assert run_ids_in(second.text, set(started)) == set(started[:2])
        assert 'id="next-page"' not in second.text
        assert second.text.index(started[1]) < second.text.index(started[0])
