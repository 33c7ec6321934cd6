"""Graceful drain on SIGTERM, with real processes.

- An executor hands its durable runs back for immediate redelivery: the dispatch queue's
  ack_wait is set far beyond the test's guard, so only the drain's nak can explain another
  executor resuming them. They complete there with their uninterrupted output, and every
  watcher's stream is gap-free.
- An executor gives its classic runs (which cannot move) its grace period: one that ends within
  it completes, one that does not fails with EXECUTOR_LOST, and their histories say so.
- A gateway ends its open streams with UNAVAILABLE saying how to resume; the client resumes
  on another gateway with WatchRun after its last sequence and loses and repeats nothing.
"""

from __future__ import annotations

import asyncio
import json
import signal

import grpc
import pytest

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from cli.launcher import free_port
from tests.client import EOF, Client, assert_history_agrees, kinds, rest, scripted_agent, until
from tests.stack import Stack

DURABLE = agent_pb2.EXECUTION_MODE_DURABLE
CLASSIC = agent_pb2.EXECUTION_MODE_CLASSIC
ONE = " ".join(f"one{i}" for i in range(25)) + " "
TWO = " ".join(f"two{i}" for i in range(25)) + "."
TURNS = [(ONE, [("calculator", '{"expression": "6*7"}')]), (TWO, [])]
TOOLS = (("calculator", False),)
# With an approval the streams wait, open, for as long as the test needs: none of them can end
# before the gateway stops.
APPROVED_TOOLS = (("calculator", True),)
# Far longer than any guard below: a run resumed elsewhere within the guard was handed back.
NO_REDELIVERY = {"AGENTRUN_DISPATCH_ACK_WAIT": "600"}
GUARD = 90.0


def check_uninterrupted(events: list[run_pb2.RunEvent]) -> None:
    """The run's stream is gap-free and shows, attempt by attempt, exactly the scripted output;
    no step started again after it completed."""
    assert [e.sequence for e in events] == list(range(1, len(events) + 1)), kinds(events)
    assert events[-1].HasField("run_completed"), kinds(events)
    assert events[-1].run_completed.output == TWO
    completed: set[int] = set()
    texts: dict[int, tuple[int, str]] = {}
    for event in events:
        if event.HasField("step_started"):
            step = event.step_started
            assert step.step_index not in completed, "a completed step ran again"
            if step.kind == run_pb2.STEP_KIND_MODEL_CALL:
                texts[step.step_index] = (step.attempt, "")
        elif event.HasField("step_completed"):
            completed.add(event.step_completed.step_index)
        elif event.HasField("text_delta"):
            attempt, text = texts[event.text_delta.step_index]
            if event.text_delta.attempt == attempt:
                texts[event.text_delta.step_index] = (attempt, text + event.text_delta.text)
    assert [texts[s][1] for s in sorted(texts)] == [ONE, TWO]


async def read_all(call: object, started: list[run_pb2.RunEvent]) -> list[run_pb2.RunEvent]:
    return started + await rest(call)


@pytest.mark.timeout(240)
async def test_a_draining_executor_hands_its_durable_runs_over_at_once(empty_stack: Stack) -> None:
    second_port = free_port()
    first = empty_stack.start_executor(AGENTRUN_EXECUTOR_ID="executor-a", **NO_REDELIVERY)
    gateway = empty_stack.start_gateway(f"{first.address},127.0.0.1:{second_port}", **NO_REDELIVERY)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        client = Client(channel)
        agent = await client.create_agent(
            scripted_agent(turns=TURNS, tools=TOOLS, mode=DURABLE, token_delay_ms=50)
        )
        run_ids = [
            (
                await client.runs.StartRun(
                    run_service_pb2.StartRunRequest(agent_id=agent.id, input=f"run {i}")
                )
            ).run.id
            for i in range(4)
        ]
        watches = [client.watch(run_id) for run_id in run_ids]
        # Every run is held by the first executor, streaming its first model call; the second
        # executor starts once the first is draining.
        seen = [await until(watch, "text_delta") for watch in watches]
        first.process.send_signal(signal.SIGTERM)
        second = empty_stack.start_executor(
            AGENTRUN_EXECUTOR_ID="executor-b",
            AGENTRUN_EXECUTOR_LISTEN=f"127.0.0.1:{second_port}",
            **NO_REDELIVERY,
        )
        finished = await asyncio.wait_for(
            asyncio.gather(*(read_all(w, s) for w, s in zip(watches, seen, strict=True))),
            GUARD,
        )
        assert await asyncio.to_thread(first.process.wait, GUARD) == 0
    # A gateway of the second executor alone reads the stored histories (the first gateway
    # may still be backing off from the address where the second was not yet listening).
    reader = empty_stack.start_gateway(second.address)
    async with grpc.aio.insecure_channel(reader.address) as channel:
        client = Client(channel)
        for run_id, events in zip(run_ids, finished, strict=True):
            check_uninterrupted(events)
            stored = [
                event
                async for response in client.runs.ListRunEvents(
                    run_service_pb2.ListRunEventsRequest(run_id=run_id)
                )
                for event in response.events
            ]
            resumed = [json.loads(e.payload_json) for e in stored if e.type == "Resumed"]
            assert [r["executor_id"] for r in resumed] == ["executor-b"], [e.type for e in stored]
            # The hand-back is recorded, so the interrupted attempt is not counted as failed.
            released = [json.loads(e.payload_json) for e in stored if e.type == "Released"]
            assert [r["executor_id"] for r in released] == ["executor-a"], [e.type for e in stored]
            attempts = [e.step_started.attempt for e in events if e.HasField("step_started")]
            assert max(attempts) == 2  # the interrupted step ran again, as a new attempt
        line = 0
        for _ in run_ids:  # the log is written by another thread: wait for the lines
            line = first.wait_for_output("handed back for another executor", after=line)
        assert first.log().count("handed back for another executor") == len(run_ids)
        assert second.process.poll() is None


@pytest.mark.timeout(240)
async def test_a_draining_executor_gives_its_classic_runs_their_grace_then_fails_them(
    empty_stack: Stack,
) -> None:
    stopping = empty_stack.start_executor(AGENTRUN_EXECUTOR_ID="stopping", AGENTRUN_DRAIN_GRACE="5")
    staying = empty_stack.start_executor(AGENTRUN_EXECUTOR_ID="staying")
    gateway = empty_stack.start_gateway(stopping.address)
    reader = empty_stack.start_gateway(staying.address)
    short = " ".join(f"s{i}" for i in range(20))  # 2 s: ends within the grace period
    long = " ".join(f"l{i}" for i in range(600))  # 60 s: does not
    async with (
        grpc.aio.insecure_channel(gateway.address) as channel,
        grpc.aio.insecure_channel(reader.address) as reader_channel,
    ):
        client, watcher = Client(channel), Client(reader_channel)
        agents = [
            await client.create_agent(scripted_agent(turns=[(text, [])], token_delay_ms=100))
            for text in (short, long)
        ]
        calls = [client.stream(agent.id, "talk") for agent in agents]
        firsts = [await until(call, "text_delta") for call in calls]
        stopping.process.send_signal(signal.SIGTERM)
        ended, lost = [
            first + await asyncio.wait_for(rest(call), GUARD)
            for first, call in zip(firsts, calls, strict=True)
        ]
        assert ended[-1].run_completed.output == short
        assert lost[-1].run_failed.error.code == run_pb2.RUN_ERROR_CODE_EXECUTOR_LOST
        assert "shut down" in lost[-1].run_failed.error.message
        assert await asyncio.to_thread(stopping.process.wait, GUARD) == 0
        await assert_history_agrees(watcher, ended[0].run_id, ended)
        await assert_history_agrees(watcher, lost[0].run_id, lost)


async def _next_error(call: object) -> grpc.aio.AioRpcError:
    """Reads a streaming call until it fails; the failure (an AssertionError if it ends well)."""
    try:
        while await call.read() is not EOF:  # type: ignore[attr-defined]
            pass
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the stream ended without an error")


@pytest.mark.timeout(240)
async def test_a_stopping_gateway_tells_its_streams_to_resume_elsewhere(empty_stack: Stack) -> None:
    empty_stack.start_executor()
    stopping = empty_stack.start_gateway()
    staying = empty_stack.start_gateway()
    async with (
        grpc.aio.insecure_channel(stopping.address) as channel,
        grpc.aio.insecure_channel(staying.address) as other_channel,
    ):
        client, other = Client(channel), Client(other_channel)
        streams: list[object] = []
        for mode in (DURABLE, CLASSIC):
            agent = await client.create_agent(
                scripted_agent(turns=TURNS, tools=APPROVED_TOOLS, mode=mode)
            )
            streams.append(client.stream(agent.id, "go"))
        seen = [await until(call, "tool_approval_required") for call in streams]
        durable_id = seen[0][0].run_id
        streams.append(client.watch(durable_id))
        seen.append(await until(streams[-1], "tool_approval_required"))
        stopping.process.send_signal(signal.SIGTERM)
        errors = await asyncio.wait_for(asyncio.gather(*map(_next_error, streams)), GUARD)
        for error in errors:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert "WatchRun" in (error.details() or ""), error
        assert await asyncio.to_thread(stopping.process.wait, GUARD) == 0
        for before in seen[:2]:
            required = before[-1].tool_approval_required
            await other.approve(before[0].run_id, required.tool_call.id)
        for before in seen:
            # What the call delivered after ``before`` was dropped by _next_error: resuming
            # after ``before`` must give it again, and everything after it.
            after = await asyncio.wait_for(
                other.watch_all(before[0].run_id, after=before[-1].sequence), GUARD
            )
            check_uninterrupted(before + after)
