"""Durable runs under crashes: executors killed with SIGKILL at random moments, everything
restarted while a run waits for approval, two executors racing on one run, a lost dispatch.

What must hold: every run ends with exactly the output of an uninterrupted run; no recorded
step runs again (no StepStarted after a step's StepCompleted; no tool call made after its
result was recorded); each side effect happens once; every client stream is gap-free and ends
with RunCompleted.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from cli.launcher import Service, free_port, start_nats
from common.event_streams import is_terminal, published
from common.nats_link import NatsLink, NatsNames
from eventstore.persistence import StoreConfig
from executor.tools.send_email import read_attempts, read_outbox
from tests.client import EOF, Client, kinds, rest, scripted_agent, until
from tests.conftest import database_url_for, drop_schema
from tests.stack import Stack
from tests.test_client_tools import client_tool_agent, submit
from tests.test_event_publisher import publish_parts
from tests.test_postgres_recorders import connect, waiting_for_the_run_store

DURABLE = agent_pb2.EXECUTION_MODE_DURABLE
ONE = " ".join(f"one{i}" for i in range(25)) + " "
TWO = " ".join(f"two{i}" for i in range(25)) + " "
TURNS = [
    (
        ONE,
        [
            ("send_email", json.dumps({"to": "a@example.com", "subject": "1", "body": "first"})),
            ("calculator", '{"expression": "2+2"}'),
        ],
    ),
    (TWO, [("send_email", json.dumps({"to": "b@example.com", "subject": "2", "body": "second"}))]),
    ("All done.", []),
]
TOOLS = (("send_email", False), ("calculator", False))
CRASH_ENV = {
    "AGENTRUN_DISPATCH_ACK_WAIT": "1",
    "AGENTRUN_RECONCILE_INTERVAL": "0.5",
    # A frozen executor is noticed within 4 s (not 10).
    "AGENTRUN_INTERNAL_PING_INTERVAL": "2",
}
GUARD = 60.0  # seconds; only bounds a hang


@dataclass
class CrashStack:
    stack: Stack
    executor_port: int
    client: Client
    channel: grpc.aio.Channel
    executors: list[Service] = field(default_factory=list)

    def start_executor(self) -> Service:
        return self.stack.start_executor(
            AGENTRUN_EXECUTOR_LISTEN=f"127.0.0.1:{self.executor_port}", **CRASH_ENV
        )


@pytest.fixture(params=["sqlite", "postgres"])
async def crash_stack(
    request: pytest.FixtureRequest, nats_server: Service, tmp_path: Path
) -> AsyncIterator[CrashStack]:
    url = database_url_for(request.param, tmp_path / "data")
    stack = Stack(database_url=url, nats=nats_server, tmp=tmp_path)
    port = free_port()
    try:
        crash = CrashStack(stack, port, None, None)  # type: ignore[arg-type]
        crash.start_executor()
        stack.start_gateway(f"127.0.0.1:{port}", **CRASH_ENV)
        crash.channel = grpc.aio.insecure_channel(stack.gateways[0].address)
        crash.client = Client(crash.channel)
        yield crash
        await crash.channel.close(grace=None)
    finally:
        stack.stop()
        drop_schema(url)


def check_run(
    events: list[run_pb2.RunEvent], data_dir: Path, stored: list[run_pb2.StoredRunEvent]
) -> None:
    """Everything an interrupted run must still satisfy (see the module docstring)."""
    assert [e.sequence for e in events] == list(range(1, len(events) + 1)), kinds(events)
    assert events[-1].HasField("run_completed"), kinds(events)
    assert events[-1].run_completed.output == "All done."
    completed: set[int] = set()
    last_attempt_text: dict[int, tuple[int, str]] = {}
    for event in events:
        if event.HasField("step_started"):
            assert event.step_started.step_index not in completed, "a recorded step ran again"
            step = event.step_started
            if step.kind == run_pb2.STEP_KIND_MODEL_CALL:
                last_attempt_text[step.step_index] = (step.attempt, "")
        elif event.HasField("step_completed"):
            completed.add(event.step_completed.step_index)
        elif event.HasField("text_delta"):
            delta = event.text_delta
            attempt, text = last_attempt_text[delta.step_index]
            if delta.attempt == attempt:
                last_attempt_text[delta.step_index] = (attempt, text + delta.text)
    texts = [last_attempt_text[s][1] for s in sorted(last_attempt_text)]
    assert texts == [ONE, TWO, "All done."], describe(events)
    types = [e.type for e in stored]
    assert types.count("ModelCallCompleted") == 3
    assert types.count("ToolCallCompleted") == 3
    run_id = events[0].run_id
    sent = [m for m in read_outbox(data_dir) if m["run_id"] == run_id]
    assert sorted(m["to"] for m in sent) == ["a@example.com", "b@example.com"]
    recorded_at = {
        json.loads(e.payload_json)["tool_call_id"]: e.time.ToNanoseconds() / 1e9
        for e in stored
        if e.type == "ToolCallCompleted"
    }
    for made in read_attempts(data_dir):
        key = made["idempotency_key"]
        if key.startswith(run_id + ":"):
            tool_call_id = key.split(":", 1)[1]
            assert made["time"] <= recorded_at[tool_call_id], "a recorded tool call ran again"


def describe(events: list[run_pb2.RunEvent]) -> str:
    """A compact account of a stream, for assertion messages."""

    def one(event: run_pb2.RunEvent) -> str:
        if event.HasField("step_started"):
            return f"step {event.step_started.step_index}/{event.step_started.attempt}"
        if event.HasField("text_delta"):
            return f"{event.text_delta.attempt}:{event.text_delta.text!r}"
        return event.WhichOneof("kind") or "?"

    return " | ".join(f"{e.sequence} {one(e)}" for e in events)


async def stored_history(client: Client, run_id: str) -> list[run_pb2.StoredRunEvent]:
    call = client.runs.ListRunEvents(run_service_pb2.ListRunEventsRequest(run_id=run_id))
    return [event async for response in call for event in response.events]


class Reader:
    """A client reading one run's stream in the background, as a careful client would: when
    its call fails because an executor went away, it resumes with WatchRun after the last
    sequence it saw (or repeats its start, with the same request_id, if it saw nothing).
    ``reached`` fires after ``kill_after`` events."""

    def __init__(self, client: Client, agent_id: str, kill_after: int) -> None:
        self.events: list[run_pb2.RunEvent] = []
        self.reached = asyncio.Event()
        self._client = client
        self._agent_id = agent_id
        self._kill_after = kill_after
        self._request_id = str(uuid.uuid4())
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> list[run_pb2.RunEvent]:
        while not self.events or not is_terminal(self.events[-1]):
            if self.events:
                call = self._client.watch(self.events[0].run_id, after=self.events[-1].sequence)
            else:
                call = self._client.stream(self._agent_id, "work", request_id=self._request_id)
            try:
                while (response := await call.read()) is not EOF:
                    self.events.extend(response.events)
                    if len(self.events) >= self._kill_after:
                        self.reached.set()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self.retries += 1
        self.reached.set()
        return self.events

    retries = 0

    async def result(self) -> list[run_pb2.RunEvent]:
        """The run's events; if they do not end in time, what was seen (a safety net against a
        hang, so that a stuck run reports where it stuck rather than timing the test out)."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.task), 60)
        except TimeoutError:
            raise AssertionError(f"the run did not end: {describe(self.events)}") from None


@pytest.mark.timeout(400)
async def test_runs_complete_exactly_once_while_executors_are_killed(
    crash_stack: CrashStack,
) -> None:
    rng = random.Random(20261127)
    client = crash_stack.client
    agent = await client.create_agent(
        scripted_agent(turns=TURNS, tools=TOOLS, mode=DURABLE, token_delay_ms=3)
    )
    finished: list[list[run_pb2.RunEvent]] = []
    for _ in range(20):
        readers = [Reader(client, agent.id, rng.randint(1, 30)) for _ in range(2)]
        await readers[0].reached.wait()
        crash_stack.stack.executors[-1].kill()
        await asyncio.to_thread(crash_stack.start_executor)
        for reader in readers:
            finished.append(await reader.result())
    for events in finished:
        check_run(
            events, crash_stack.stack.data_dir, await stored_history(client, events[0].run_id)
        )
    attempts = [
        e.step_started.attempt for run in finished for e in run if e.HasField("step_started")
    ]
    assert max(attempts) > 1  # some kills did interrupt steps


async def test_an_approval_after_everything_restarted_resumes_the_run(tmp_path: Path) -> None:
    nats = start_nats(tmp_path / "nats", tmp_path / "logs", name="nats-a")
    stack = Stack(database_url=f"sqlite:///{tmp_path / 'data'}", nats=nats, tmp=tmp_path)
    port = free_port()
    env = {"AGENTRUN_EXECUTOR_LISTEN": f"127.0.0.1:{port}", **CRASH_ENV}
    try:
        stack.start_executor(**env)
        stack.start_gateway(f"127.0.0.1:{port}")
        email = json.dumps({"to": "c@example.com", "subject": "3", "body": "third"})
        async with grpc.aio.insecure_channel(stack.gateways[0].address) as channel:
            client = Client(channel)
            agent = await client.create_agent(
                scripted_agent(
                    turns=[("Asking.", [("send_email", email)]), ("Sent.", [])], mode=DURABLE
                )
            )
            before = await until(client.stream(agent.id, "email"), "tool_approval_required")
        for service in [*stack.gateways, *stack.executors, nats]:
            service.kill()
        stack.nats = start_nats(tmp_path / "nats", tmp_path / "logs", port=nats.port, name="nats-b")
        stack.start_executor(**env)
        gateway = stack.start_gateway(f"127.0.0.1:{port}")
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            client = Client(channel)
            run_id = before[0].run_id
            await client.approve(run_id, before[-1].tool_approval_required.tool_call.id)
            events = await client.watch_all(run_id)
        assert events[: len(before)] == before
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert events[-1].run_completed.output == "Sent."
        assert [m["to"] for m in read_outbox(stack.data_dir) if m["run_id"] == run_id] == [
            "c@example.com"
        ]
    finally:
        stack.stop()
        stack.nats.stop()


async def test_a_tool_result_after_everything_restarted_resumes_the_run(tmp_path: Path) -> None:
    nats = start_nats(tmp_path / "nats", tmp_path / "logs", name="nats-a")
    stack = Stack(database_url=f"sqlite:///{tmp_path / 'data'}", nats=nats, tmp=tmp_path)
    port = free_port()
    env = {"AGENTRUN_EXECUTOR_LISTEN": f"127.0.0.1:{port}", **CRASH_ENV}
    try:
        stack.start_executor(**env)
        first = stack.start_gateway(f"127.0.0.1:{port}")
        async with grpc.aio.insecure_channel(first.address) as channel:
            client = Client(channel)
            agent = await client.create_agent(client_tool_agent(DURABLE))
            before = await until(client.stream(agent.id, "weather?"), "client_tool_call_required")
        for service in [*stack.gateways, *stack.executors, nats]:
            service.kill()
        stack.nats = start_nats(tmp_path / "nats", tmp_path / "logs", port=nats.port, name="nats-b")
        stack.start_executor(**env)
        gateway = stack.start_gateway(f"127.0.0.1:{port}")
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            client = Client(channel)
            run_id = before[0].run_id
            tool_call_id = before[-1].client_tool_call_required.tool_call.id
            assert (await client.get_run(run_id)).status == run_pb2.RUN_STATUS_AWAITING_TOOL_RESULT
            await submit(client, run_id, tool_call_id, '{"sky": "clear"}')
            events = await client.watch_all(run_id)
        assert events[: len(before)] == before
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        results = [e.tool_result for e in events if e.HasField("tool_result")]
        assert [(r.output, r.is_error) for r in results] == [('{"sky": "clear"}', False)]
        assert events[-1].run_completed.output == "It is sunny."
    finally:
        stack.stop()
        stack.nats.stop()


async def test_two_executors_racing_on_one_run_one_wins(crash_stack: CrashStack) -> None:
    """The executor holding a run (and streaming it to the client) freezes: the run goes on
    on a second executor, and so does the client's stream (once the gateway finds the frozen
    executor not answering its pings); when the first thaws, it finds the run taken over."""
    stack = crash_stack.stack
    second_port = free_port()
    gateway = stack.start_gateway(
        f"127.0.0.1:{crash_stack.executor_port},127.0.0.1:{second_port}", **CRASH_ENV
    )
    channel = grpc.aio.insecure_channel(gateway.address)
    client = Client(channel)
    agent = await client.create_agent(
        scripted_agent(turns=TURNS, tools=TOOLS, mode=DURABLE, token_delay_ms=20)
    )
    live = client.stream(agent.id, "work")
    before = await until(live, "text_delta")
    stalled = stack.executors[-1]
    mark = stalled.lines_seen
    stalled.process.send_signal(signal.SIGSTOP)  # alive, holding the run, answering nothing
    try:
        # The second executor gets the run's message once the first stops keeping it alive.
        second = await asyncio.to_thread(
            stack.start_executor, AGENTRUN_EXECUTOR_LISTEN=f"127.0.0.1:{second_port}", **CRASH_ENV
        )
        taken: list[run_pb2.RunEvent] = []
        while not taken or taken[-1].step_started.attempt != 2:
            taken += await until(live, "step_started")
    finally:
        stalled.process.send_signal(signal.SIGCONT)
    events = before + taken + await rest(live)
    await asyncio.to_thread(stalled.wait_for_output, "taken over by another executor", after=mark)
    stored = await stored_history(client, before[0].run_id)
    check_run(events, crash_stack.stack.data_dir, stored)
    resumed = [json.loads(e.payload_json) for e in stored if e.type == "Resumed"]
    assert len(resumed) == 1
    assert second.process.poll() is None
    await channel.close(grace=None)


async def test_a_run_whose_executor_died_between_parts_goes_on_from_the_last_whole_event(
    crash_stack: CrashStack,
) -> None:
    client = crash_stack.client
    agent = await client.create_agent(
        scripted_agent(turns=TURNS, tools=TOOLS, mode=DURABLE, token_delay_ms=20)
    )
    live = client.stream(agent.id, "work")
    before = await until(live, "text_delta")
    run_id = before[0].run_id
    crash_stack.stack.executors[-1].kill()
    # What the executor would have left had it died publishing an event too large for one
    # message: its first parts (here of a made-up RunCompleted that nobody must get).
    link = NatsLink(
        [f"nats://{crash_stack.stack.nats.address}"],
        name="dying-executor",
        event_retention=60,
        names=NatsNames(crash_stack.stack.namespace),
    )
    await link.start()
    try:
        await link.wait_connected()
        sequence = (await published(link, run_id)).last_sequence + 1
        decoy = run_pb2.RunEvent(
            run_id=run_id, sequence=sequence, run_completed=run_pb2.RunCompleted(output="x" * 2**21)
        )
        await publish_parts(link, run_id, decoy, 2)
    finally:
        await link.close()
    await asyncio.to_thread(crash_stack.start_executor)  # takes the run up
    events = before + await rest(live)
    check_run(events, crash_stack.stack.data_dir, await stored_history(client, run_id))
    assert await client.watch_all(run_id) == events


async def test_a_lost_dispatch_is_recovered_by_the_reconciler(tmp_path: Path) -> None:
    nats = start_nats(tmp_path / "nats", tmp_path / "logs", name="nats-c")
    stack = Stack(database_url=f"sqlite:///{tmp_path / 'data'}", nats=nats, tmp=tmp_path)
    try:
        executor = stack.start_executor(**CRASH_ENV)
        gateway = stack.start_gateway()
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            client = Client(channel)
            agent = await client.create_agent(
                scripted_agent(turns=[("Recovered.", [])], mode=DURABLE)
            )
            mark = executor.lines_seen
            nats.kill()
            await asyncio.to_thread(executor.wait_for_output, "disconnected from NATS", after=mark)
            started = await client.runs.StartRun(
                run_service_pb2.StartRunRequest(agent_id=agent.id, input="go")
            )
            # The executor's log is read by another thread: wait for the line, do not peek.
            await asyncio.to_thread(executor.wait_for_output, "not yet dispatched", after=mark)
            stack.nats = start_nats(
                tmp_path / "nats", tmp_path / "logs", port=nats.port, name="nats-d"
            )
            await asyncio.to_thread(executor.wait_for_output, "reconnected to NATS", after=mark)
            events = await client.watch_all(started.run.id)
        assert events[-1].run_completed.output == "Recovered."
        await asyncio.to_thread(executor.wait_for_output, "dispatching it again", after=mark)
    finally:
        stack.stop()
        stack.nats.stop()


async def test_a_start_whose_executor_died_before_storing_the_run_can_be_repeated(
    tmp_path: Path, nats_server: Service
) -> None:
    """The executor dies while it stores a new run: the client is told to start again
    (UNAVAILABLE), not left waiting; the repeat, with the same request_id, stores and runs it."""
    url = database_url_for("postgres", tmp_path)
    config = StoreConfig.from_url(url)
    stack = Stack(database_url=url, nats=nats_server, tmp=tmp_path)
    try:
        names = ["executor-storing-1", "executor-storing-2"]
        executors = {name: stack.start_executor(AGENTRUN_EXECUTOR_ID=name) for name in names}
        gateway = stack.start_gateway(",".join(e.address for e in executors.values()))
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            client = Client(channel)
            agent = await client.create_agent(
                scripted_agent(turns=[("Stored at last.", [])], mode=DURABLE)
            )
            # Holding a lock on the run store's table keeps the executor from storing the run.
            with connect(config) as lock, lock.transaction():
                lock.execute("LOCK TABLE runstore_events IN EXCLUSIVE MODE")
                request_id = str(uuid.uuid4())
                call = client.stream(agent.id, "go", request_id=request_id)
                reading = asyncio.ensure_future(rest(call))
                while not (storing := await asyncio.to_thread(waiting_for_the_run_store, config)):
                    assert not reading.done(), reading
                executors[storing].kill()
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await asyncio.wait_for(reading, GUARD)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
            assert "same request_id" in (failed.value.details() or "")
            events = await asyncio.wait_for(
                client.run(agent.id, "go", request_id=request_id), GUARD
            )
        assert events[-1].run_completed.output == "Stored at last.", kinds(events)
        (survivor,) = [e for name, e in executors.items() if name != storing]
        assert survivor.process.poll() is None
    finally:
        stack.stop()
        drop_schema(url)
