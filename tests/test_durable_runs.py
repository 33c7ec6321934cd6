"""Durable runs end to end: the same client-visible stream as classic runs, approvals that
suspend the run in the store, cancellation, history, forks, time travel."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from executor.tools.send_email import read_outbox
from tests.client import Client, kinds, rest, scripted_agent, text_of, until
from tests.stack import Stack

DURABLE = agent_pb2.EXECUTION_MODE_DURABLE
EMAIL_ARGS = json.dumps({"to": "ada@example.com", "subject": "Hi", "body": "Hello Ada"})
EMAIL_TURNS = [
    ("I will send the email.", [("send_email", EMAIL_ARGS)]),
    ("The email went out.", []),
]


def shape(events: list[run_pb2.RunEvent]) -> list[str]:
    """The kinds of a stream's events, a run of text deltas counted as one."""
    collapsed: list[str] = []
    for kind in kinds(events):
        if not (kind == "text_delta" and collapsed and collapsed[-1] == kind):
            collapsed.append(kind)
    return collapsed


def assert_gap_free(events: list[run_pb2.RunEvent]) -> None:
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))


async def history(client: Client, run_id: str, **bounds: int) -> list[run_pb2.StoredRunEvent]:
    call = client.runs.ListRunEvents(
        run_service_pb2.ListRunEventsRequest(run_id=run_id, **bounds), metadata=client.metadata
    )
    return [event async for response in call for event in response.events]


async def test_a_durable_run_streams_the_same_events_as_a_classic_one(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    turns = [("Let me look.", [("calculator", '{"expression": "6*7"}')]), ("It is 42.", [])]
    durable = await client.create_agent(scripted_agent(turns=turns, mode=DURABLE))
    classic = await client.create_agent(scripted_agent(turns=turns))
    durable_events = await client.run(durable.id, "what is 6*7")
    classic_events = await client.run(classic.id, "what is 6*7")
    # The same kinds in the same order (how text is cut into deltas depends on timing).
    assert shape(durable_events) == shape(classic_events)
    assert_gap_free(durable_events)
    assert text_of(durable_events) == text_of(classic_events) == "Let me look.It is 42."
    started = durable_events[0].run_started.run
    assert started.execution_mode == DURABLE
    assert durable_events[-1].run_completed.output == "It is 42."
    run = await client.get_run(started.id)
    assert run.status == run_pb2.RUN_STATUS_COMPLETED
    assert run.execution_mode == DURABLE
    assert run.output == "It is 42."
    stored = await history(client, started.id)
    assert [e.type for e in stored] == [
        "Requested",
        "ModelCallCompleted",
        "ToolCallCompleted",
        "ModelCallCompleted",
        "Completed",
    ]
    assert [e.version for e in stored] == [1, 2, 3, 4, 5]
    assert run.version == 5
    assert json.loads(stored[2].payload_json)["output"] == '{"expression": "6*7", "result": 42}'


async def test_an_approval_suspends_a_durable_run_until_the_decision(
    channels: list[grpc.aio.Channel], stack: Stack
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=EMAIL_TURNS, mode=DURABLE))
    call = client.runs.Converse()
    await call.write(
        run_service_pb2.ConverseRequest(
            start=run_service_pb2.StreamRunRequest(agent_id=agent.id, input="email Ada")
        )
    )
    before = await until(call, "tool_approval_required")
    run_id = before[0].run_id
    suspended = await client.get_run(run_id)
    assert suspended.status == run_pb2.RUN_STATUS_AWAITING_APPROVAL
    assert [c.name for c in suspended.pending_approvals] == ["send_email"]
    tool_call_id = before[-1].tool_approval_required.tool_call.id
    await call.write(
        run_service_pb2.ConverseRequest(
            tool_approval=run_service_pb2.ToolApprovalDecision(
                tool_call_id=tool_call_id, approved=True
            )
        )
    )
    after = await until(call, "run_completed")
    await call.done_writing()
    assert_gap_free(before + after)
    assert kinds(after)[0] == "tool_approval_resolved"
    assert after[-1].run_completed.output == "The email went out."
    sent = [m for m in read_outbox(stack.data_dir) if m["run_id"] == run_id]
    assert [m["idempotency_key"] for m in sent] == [f"{run_id}:{tool_call_id}"]
    # A repeated decision agrees and is accepted; a different one is refused.
    await Client(channels[1]).approve(run_id, tool_call_id, approved=True)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.approve(run_id, tool_call_id, approved=False)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already approved" in (refused.value.details() or "")


async def test_a_durable_approval_times_out_as_a_denial(channels: list[grpc.aio.Channel]) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(
        scripted_agent(turns=EMAIL_TURNS, mode=DURABLE, approval_timeout_s=0.5)
    )
    events = await client.run(agent.id, "email Ada")
    resolved = next(
        e.tool_approval_resolved for e in events if e.HasField("tool_approval_resolved")
    )
    assert resolved.timed_out
    assert not resolved.approved
    assert next(e.tool_result for e in events if e.HasField("tool_result")).is_error
    assert kinds(events)[-1] == "run_completed"
    assert_gap_free(events)


async def test_cancel_stops_a_suspended_and_a_running_durable_run(
    channels: list[grpc.aio.Channel],
) -> None:
    client, other = Client(channels[0]), Client(channels[1])
    waiting = await client.create_agent(scripted_agent(turns=EMAIL_TURNS, mode=DURABLE))
    live = client.stream(waiting.id, "email Ada")
    before = await until(live, "tool_approval_required")
    await other.runs.CancelRun(
        run_service_pb2.CancelRunRequest(run_id=before[0].run_id, reason="no")
    )
    after = await rest(live)
    assert kinds(after) == ["run_cancelled"]
    assert after[-1].run_cancelled.reason == "no"
    assert (await client.get_run(before[0].run_id)).status == run_pb2.RUN_STATUS_CANCELLED

    talking = await client.create_agent(
        scripted_agent(turns=[(" ".join(["word"] * 2000), [])], token_delay_ms=5, mode=DURABLE)
    )
    live = client.stream(talking.id, "talk")
    before = await until(live, "text_delta")
    await other.runs.CancelRun(
        run_service_pb2.CancelRunRequest(run_id=before[0].run_id, reason="stop")
    )
    after = await rest(live)
    assert kinds(after)[-1] == "run_cancelled"
    assert_gap_free(before + after)
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await client.runs.CancelRun(run_service_pb2.CancelRunRequest(run_id=before[0].run_id))
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_history_time_travel_and_a_fork_with_another_decision(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    turns = [
        ("I will send the email.", [("send_email", EMAIL_ARGS)]),
        ("Sent.", []),
    ]
    agent = await client.create_agent(scripted_agent(turns=turns, mode=DURABLE))
    live = client.stream(agent.id, "email Ada")
    before = await until(live, "tool_approval_required")
    run_id = before[0].run_id
    await client.approve(run_id, before[-1].tool_approval_required.tool_call.id, approved=True)
    await rest(live)
    stored = await history(client, run_id)
    types = [e.type for e in stored]
    assert types == [
        "Requested",
        "ModelCallCompleted",
        "ToolApprovalRequired",
        "ToolApprovalDecided",
        "ToolCallCompleted",
        "ModelCallCompleted",
        "Completed",
    ]
    assert [e.type for e in await history(client, run_id, from_version=3, to_version=4)] == [
        "ToolApprovalRequired",
        "ToolApprovalDecided",
    ]
    then = (await client.runs.GetRun(run_service_pb2.GetRunRequest(run_id=run_id, version=3))).run
    assert then.status == run_pb2.RUN_STATUS_AWAITING_APPROVAL
    assert then.version == 3
    assert [c.name for c in then.pending_approvals] == ["send_email"]

    request_id = str(uuid.uuid4())
    forked = (
        await client.runs.ForkRun(
            run_service_pb2.ForkRunRequest(run_id=run_id, at_version=3, request_id=request_id)
        )
    ).run
    assert forked.id != run_id
    assert forked.forked_from_run_id == run_id
    assert forked.forked_at_version == 3
    again = await client.runs.ForkRun(
        run_service_pb2.ForkRunRequest(run_id=run_id, at_version=3, request_id=request_id)
    )
    assert again.run.id == forked.id
    fork_history = await history(client, forked.id)
    assert [e.type for e in fork_history] == types[:3]
    assert (await client.get_run(forked.id)).status == run_pb2.RUN_STATUS_AWAITING_APPROVAL
    tool_call_id = json.loads(fork_history[2].payload_json)["tool_call_id"]
    await client.approve(forked.id, tool_call_id, approved=False, reason="not this time")
    events = await client.watch_all(forked.id)
    assert kinds(events)[-1] == "run_completed"
    result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert result.is_error
    assert "not this time" in result.output
    assert (await client.get_run(run_id)).status == run_pb2.RUN_STATUS_COMPLETED  # untouched
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await client.runs.ForkRun(run_service_pb2.ForkRunRequest(run_id=run_id, at_version=7))
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_watch_a_durable_run_from_the_middle_and_a_repeated_request_id(
    channels: list[grpc.aio.Channel],
) -> None:
    client, watcher = Client(channels[0]), Client(channels[1])
    agent = await client.create_agent(scripted_agent(turns=EMAIL_TURNS, mode=DURABLE))
    request_id = str(uuid.uuid4())
    live = client.stream(agent.id, "email Ada", request_id=request_id)
    before = await until(live, "tool_approval_required")
    run_id = before[0].run_id
    watch = watcher.watch(run_id, after=2)
    assert await until(watch, "tool_approval_required") == before[2:]
    repeated = watcher.stream(agent.id, "email Ada", request_id=request_id)
    assert await until(repeated, "tool_approval_required") == before
    await watcher.approve(run_id, before[-1].tool_approval_required.tool_call.id)
    tail = await rest(live)
    assert await rest(watch) == tail
    assert await rest(repeated) == tail
    assert kinds(tail)[-1] == "run_completed"


async def test_the_second_durable_run_of_a_conversation_sees_the_first(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(mode=DURABLE))
    first = await client.run(agent.id, "My name is Ada")
    conversation_id = first[0].run_started.run.conversation_id
    second = await client.run(agent.id, "recall", conversation_id=conversation_id)
    assert '"My name is Ada"' in second[-1].run_completed.output


async def test_list_runs_shows_durable_runs_as_they_are(channels: list[grpc.aio.Channel]) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=EMAIL_TURNS, mode=DURABLE))
    live = client.stream(agent.id, "email Ada")
    before = await until(live, "tool_approval_required")
    listed = await client.runs.ListRuns(run_service_pb2.ListRunsRequest(agent_id=agent.id))
    assert [(r.id, r.status) for r in listed.runs] == [
        (before[0].run_id, run_pb2.RUN_STATUS_AWAITING_APPROVAL)
    ]
    await client.approve(before[0].run_id, before[-1].tool_approval_required.tool_call.id)
    await rest(live)
    listed = await client.runs.ListRuns(
        run_service_pb2.ListRunsRequest(agent_id=agent.id, execution_mode=DURABLE)
    )
    assert [(r.status, r.version, r.output) for r in listed.runs] == [
        (run_pb2.RUN_STATUS_COMPLETED, 7, "The email went out.")
    ]
