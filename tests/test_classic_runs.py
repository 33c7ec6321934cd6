"""Classic runs end to end: real gateways, a real executor, the real store and nats-server."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import grpc
import pytest

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from executor.tools.send_email import read_outbox
from tests.client import Client, assert_history_agrees, kinds, rest, scripted_agent, text_of, until
from tests.stack import Stack, holder_of

CLASSIC, DURABLE = agent_pb2.EXECUTION_MODE_CLASSIC, agent_pb2.EXECUTION_MODE_DURABLE

EMAIL_ARGS = json.dumps({"to": "ada@example.com", "subject": "Hi", "body": "Hello Ada"})
EMAIL_AGENT_TURNS = [
    ("I will send the email.", [("send_email", EMAIL_ARGS)]),
    ("The email went out.", []),
]


def assert_gap_free(events: list[run_pb2.RunEvent], first: int = 1) -> None:
    assert [e.sequence for e in events] == list(range(first, first + len(events)))


async def approve_to_the_end(call: Any, tool_call_id: str) -> list[run_pb2.RunEvent]:
    """Approves a tool call on a Converse stream; the events from there to the run's end."""
    await call.write(
        run_service_pb2.ConverseRequest(
            tool_approval=run_service_pb2.ToolApprovalDecision(
                tool_call_id=tool_call_id, approved=True
            )
        )
    )
    after: list[run_pb2.RunEvent] = await until(call, "run_completed")
    await call.done_writing()
    return after


async def test_stream_run_streams_a_whole_run(channels: list[grpc.aio.Channel]) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=[("Hello from a scripted model.", [])]))
    events = await client.run(agent.id, "hi")
    assert kinds(events)[:2] == ["run_started", "step_started"]
    assert kinds(events)[-2:] == ["step_completed", "run_completed"]
    assert set(kinds(events)[2:-2]) == {"text_delta"}
    assert_gap_free(events)
    assert text_of(events) == "Hello from a scripted model."
    started = events[0].run_started.run
    assert started.agent_id == agent.id
    assert started.agent_version == 1
    assert started.execution_mode == agent_pb2.EXECUTION_MODE_CLASSIC
    assert started.status == run_pb2.RUN_STATUS_RUNNING
    assert events[1].step_started.kind == run_pb2.STEP_KIND_MODEL_CALL
    assert events[1].step_started.attempt == 1
    assert all(e.run_id == started.id for e in events)
    assert events[-1].run_completed.output == "Hello from a scripted model."
    run = await client.get_run(started.id)
    assert run.status == run_pb2.RUN_STATUS_COMPLETED
    assert run.output == "Hello from a scripted model."
    assert run.agent_version == 1
    assert run.usage.output_tokens == events[-1].run_completed.usage.output_tokens > 0


async def test_converse_streams_a_run_and_takes_an_approval_on_the_stream(
    channels: list[grpc.aio.Channel], stack: Stack
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=EMAIL_AGENT_TURNS))
    call = client.runs.Converse()
    await call.write(
        run_service_pb2.ConverseRequest(
            start=run_service_pb2.StreamRunRequest(agent_id=agent.id, input="email Ada")
        )
    )
    before = await until(call, "tool_approval_required")
    required = before[-1].tool_approval_required
    assert required.tool_call.name == "send_email"
    assert json.loads(required.tool_call.arguments_json)["to"] == "ada@example.com"
    run_id = before[0].run_started.run.id
    assert (await client.get_run(run_id)).status == run_pb2.RUN_STATUS_AWAITING_APPROVAL
    assert not [m for m in read_outbox(stack.data_dir) if m["run_id"] == run_id]
    after = await approve_to_the_end(call, required.tool_call.id)
    events = before + after
    assert_gap_free(events)
    resolved = next(e.tool_approval_resolved for e in after if e.HasField("tool_approval_resolved"))
    assert resolved.approved
    assert not resolved.timed_out
    result = next(e.tool_result for e in after if e.HasField("tool_result"))
    assert not result.is_error
    assert json.loads(result.output)["status"] == "sent"
    assert after[-1].run_completed.output == "The email went out."
    sent = [m for m in read_outbox(stack.data_dir) if m["run_id"] == run_id]
    assert [m["to"] for m in sent] == ["ada@example.com"]
    assert sent[0]["idempotency_key"] == f"{run_id}:{required.tool_call.id}"


async def test_an_approval_through_another_gateway_reaches_the_run(
    channels: list[grpc.aio.Channel],
) -> None:
    first, second = Client(channels[0]), Client(channels[1])
    agent = await first.create_agent(scripted_agent(turns=EMAIL_AGENT_TURNS))
    call = first.stream(agent.id, "email Ada")
    before = await until(call, "tool_approval_required")
    run_id = before[0].run_id
    tool_call_id = before[-1].tool_approval_required.tool_call.id
    await second.approve(run_id, tool_call_id)
    after = await rest(call)
    assert kinds(after)[-1] == "run_completed"
    assert not next(e.tool_result for e in after if e.HasField("tool_result")).is_error
    assert_gap_free(before + after)


async def test_a_denied_tool_call_goes_back_to_the_model(channels: list[grpc.aio.Channel]) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=EMAIL_AGENT_TURNS))
    call = client.stream(agent.id, "email Ada")
    before = await until(call, "tool_approval_required")
    tool_call_id = before[-1].tool_approval_required.tool_call.id
    await Client(channels[1]).approve(before[0].run_id, tool_call_id, approved=False, reason="no")
    after = await rest(call)
    resolved = next(e.tool_approval_resolved for e in after if e.HasField("tool_approval_resolved"))
    assert not resolved.approved
    assert resolved.reason == "no"
    result = next(e.tool_result for e in after if e.HasField("tool_result"))
    assert result.is_error
    assert "denied" in result.output
    assert kinds(after)[-1] == "run_completed"  # the model carried on


async def test_a_repeated_decision_is_accepted_and_a_different_one_refused(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=EMAIL_AGENT_TURNS))
    call = client.stream(agent.id, "email Ada")
    before = await until(call, "tool_approval_required")
    run_id, tool_call_id = before[0].run_id, before[-1].tool_approval_required.tool_call.id
    await client.approve(run_id, tool_call_id, approved=True)
    await Client(channels[1]).approve(run_id, tool_call_id, approved=True)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.approve(run_id, tool_call_id, approved=False)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already approved" in (refused.value.details() or "")
    after = await rest(call)
    assert sum(1 for e in after if e.HasField("tool_approval_resolved")) == 1
    assert kinds(after)[-1] == "run_completed"


async def test_an_approval_timeout_counts_as_a_denial(channels: list[grpc.aio.Channel]) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(
        scripted_agent(turns=EMAIL_AGENT_TURNS, approval_timeout_s=0.2)
    )
    events = await client.run(agent.id, "email Ada")
    resolved = next(
        e.tool_approval_resolved for e in events if e.HasField("tool_approval_resolved")
    )
    assert resolved.timed_out
    assert not resolved.approved
    assert next(e.tool_result for e in events if e.HasField("tool_result")).is_error
    assert kinds(events)[-1] == "run_completed"
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await client.approve(events[0].run_id, resolved.tool_call_id)
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_watch_resumes_a_running_run_with_exactly_the_missing_events(
    channels: list[grpc.aio.Channel],
) -> None:
    live_client, watcher = Client(channels[0]), Client(channels[1])
    agent = await live_client.create_agent(scripted_agent(turns=EMAIL_AGENT_TURNS))
    live = live_client.stream(agent.id, "email Ada")
    before = await until(live, "tool_approval_required")
    run_id = before[0].run_id
    resume_after = len(before) - 3
    watch = watcher.watch(run_id, after=resume_after)
    caught_up = await until(watch, "tool_approval_required")
    assert caught_up == before[resume_after:]
    await watcher.approve(run_id, before[-1].tool_approval_required.tool_call.id)
    live_rest, watch_rest = await asyncio.gather(rest(live), rest(watch))
    assert watch_rest == live_rest
    assert kinds(watch_rest)[-1] == "run_completed"
    assert_gap_free(before + live_rest)


async def test_watch_resumes_a_finished_run_with_exactly_the_missing_events(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=[("one two three four five", [])]))
    events = await client.run(agent.id, "hi")
    run_id = events[0].run_id
    watcher = Client(channels[1])
    assert await watcher.watch_all(run_id) == events
    assert await watcher.watch_all(run_id, after=3) == events[3:]
    assert await watcher.watch_all(run_id, after=len(events)) == []


async def test_a_repeated_request_id_returns_the_same_run(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=[("only once", [])]))
    request_id = str(uuid.uuid4())
    first = await client.run(agent.id, "hi", request_id=request_id)
    again = await Client(channels[1]).run(agent.id, "hi", request_id=request_id)
    assert again == first
    started = await client.runs.StartRun(
        run_service_pb2.StartRunRequest(agent_id=agent.id, input="hi", request_id=request_id)
    )
    assert started.run.id == first[0].run_id
    listed = await client.runs.ListRuns(run_service_pb2.ListRunsRequest(agent_id=agent.id))
    assert [r.id for r in listed.runs] == [first[0].run_id]


async def test_a_repeat_of_a_live_run_takes_nothing_from_it(
    channels: list[grpc.aio.Channel], stack: Stack
) -> None:
    """A repeat of a run that is live on the same executor gets that run's events, and takes
    nothing from it: the run still answers for itself, takes its approval on its own stream,
    and sends its email once."""
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=EMAIL_AGENT_TURNS))
    request_id = str(uuid.uuid4())
    live = client.runs.Converse()
    await live.write(
        run_service_pb2.ConverseRequest(
            start=run_service_pb2.StreamRunRequest(
                agent_id=agent.id, input="email Ada", request_id=request_id
            )
        )
    )
    before = await until(live, "tool_approval_required")
    repeat = client.stream(agent.id, "email Ada", request_id=request_id)
    seen_by_repeat = await until(repeat, "tool_approval_required")
    assert seen_by_repeat == before
    # The live run still answers for itself on NATS.
    assert await holder_of(stack, before[0].run_id) is not None
    required = before[-1].tool_approval_required
    after = await approve_to_the_end(live, required.tool_call.id)
    assert_gap_free(before + after)
    assert seen_by_repeat + await rest(repeat) == before + after
    run_id = before[0].run_id
    assert await client.watch_all(run_id) == before + after
    assert len([m for m in read_outbox(stack.data_dir) if m["run_id"] == run_id]) == 1


async def test_the_second_run_of_a_conversation_sees_the_first(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent())  # the demo behaviour
    first = await client.run(agent.id, "My name is Ada")
    conversation_id = first[0].run_started.run.conversation_id
    assert conversation_id
    second = await Client(channels[1]).run(agent.id, "recall", conversation_id=conversation_id)
    assert second[0].run_started.run.conversation_id == conversation_id
    assert '"My name is Ada"' in second[-1].run_completed.output
    unrelated = await client.run(agent.id, "recall")
    assert "nothing yet" in unrelated[-1].run_completed.output


async def test_cancel_run_stops_a_running_run(channels: list[grpc.aio.Channel]) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(
        scripted_agent(turns=[(" ".join(["word"] * 2000), [])], token_delay_ms=5)
    )
    call = client.stream(agent.id, "talk")
    before = await until(call, "text_delta")
    run_id = before[0].run_id
    await Client(channels[1]).runs.CancelRun(
        run_service_pb2.CancelRunRequest(run_id=run_id, reason="enough")
    )
    after = await rest(call)
    assert kinds(after)[-1] == "run_cancelled"
    assert after[-1].run_cancelled.reason == "enough"
    assert_gap_free(before + after)
    assert (await client.get_run(run_id)).status == run_pb2.RUN_STATUS_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await client.runs.CancelRun(run_service_pb2.CancelRunRequest(run_id=run_id))
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_disconnected_client_does_not_cancel_its_run(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=EMAIL_AGENT_TURNS))
    call = client.stream(agent.id, "email Ada")
    before = await until(call, "tool_approval_required")
    call.cancel()
    run_id = before[0].run_id
    other = Client(channels[1])
    await other.approve(run_id, before[-1].tool_approval_required.tool_call.id)
    events = await other.watch_all(run_id)
    assert events[: len(before)] == before
    assert kinds(events)[-1] == "run_completed"
    assert_gap_free(events)


@pytest.mark.parametrize("mode", [CLASSIC, DURABLE], ids=["classic", "durable"])
async def test_cancel_on_disconnect_cancels_the_run(
    channels: list[grpc.aio.Channel], mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=EMAIL_AGENT_TURNS, mode=mode))
    call = client.stream(agent.id, "email Ada", cancel_on_disconnect=True)
    before = await until(call, "tool_approval_required")
    call.cancel()
    events = await Client(channels[1]).watch_all(before[0].run_id)
    assert kinds(events)[-1] == "run_cancelled"
    await assert_history_agrees(Client(channels[1]), before[0].run_id, events)


async def test_start_run_runs_in_the_background(channels: list[grpc.aio.Channel]) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=[("in the background", [])]))
    started = await client.runs.StartRun(
        run_service_pb2.StartRunRequest(agent_id=agent.id, input="go")
    )
    assert started.run.status == run_pb2.RUN_STATUS_RUNNING
    events = await Client(channels[1]).watch_all(started.run.id)
    assert text_of(events) == "in the background"
    assert kinds(events)[-1] == "run_completed"


async def test_tool_errors_and_malformed_arguments_go_back_to_the_model(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    turns = [
        ("", [("calculator", '{"expression": "1/0"}'), ("calculator", '{"expression": ')]),
        ("", [("not_a_tool", "{}")]),
        ("I could not do it.", []),
    ]
    agent = await client.create_agent(scripted_agent(turns=turns))
    events = await client.run(agent.id, "divide")
    results = [e.tool_result for e in events if e.HasField("tool_result")]
    assert [r.is_error for r in results] == [True, True, True]
    assert "division by zero" in results[0].output
    assert "malformed arguments" in results[1].output
    assert "unknown tool" in results[2].output
    assert events[-1].run_completed.output == "I could not do it."


async def test_a_run_that_needs_too_many_model_calls_fails(
    channels: list[grpc.aio.Channel],
) -> None:
    client = Client(channels[0])
    agent = scripted_agent(turns=[("again", [("clock", "{}")])])
    agent.max_model_calls = 2
    agent = await client.create_agent(agent)
    events = await client.run(agent.id, "loop forever")
    failed = events[-1].run_failed.error
    assert failed.code == run_pb2.RUN_ERROR_CODE_MAX_MODEL_CALLS
    assert not failed.retryable
    assert (await client.get_run(events[0].run_id)).status == run_pb2.RUN_STATUS_FAILED


async def test_list_runs_filters_and_pages(channels: list[grpc.aio.Channel]) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=[("ok", [])]))
    run_ids = [(await client.run(agent.id, f"run {i}"))[0].run_id for i in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = await client.runs.ListRuns(
            run_service_pb2.ListRunsRequest(agent_id=agent.id, page_size=2, page_token=token)
        )
        assert len(page.runs) <= 2
        seen.extend(r.id for r in page.runs)
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(run_ids))
    completed = await client.runs.ListRuns(
        run_service_pb2.ListRunsRequest(agent_id=agent.id, statuses=[run_pb2.RUN_STATUS_FAILED])
    )
    assert list(completed.runs) == []
