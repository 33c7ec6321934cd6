"""Poison runs, with real processes: a durable run whose model call kills its executor (SIGKILL,
through the scripted model's test hook) is taken up again after each death, until its step has
had AGENTRUN_MAX_STEP_ATTEMPTS attempts; the next executor to take it up fails it with
ATTEMPTS_EXHAUSTED and dead-letters it. Meanwhile 20 healthy durable runs, started before and
after each death, complete with their exact output. The test restarts every executor that dies.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
import nats
import pytest

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from cli.launcher import Service, free_port
from common.event_streams import is_terminal
from common.nats_link import NatsNames
from eventstore.run import Run
from eventstore.run_steps import ATTEMPTS_EXHAUSTED, exhausted_attempts
from executor.models.scripted import CRASH_EXECUTOR_TURN, CRASH_HOOK_VARIABLE
from tests.client import EOF, Client, kinds, scripted_agent
from tests.stack import Stack
from tests.test_run_steps import USAGE, new_run

DURABLE = agent_pb2.EXECUTION_MODE_DURABLE
MAX_ATTEMPTS = 3
ENV = {
    "AGENTRUN_MAX_STEP_ATTEMPTS": str(MAX_ATTEMPTS),
    CRASH_HOOK_VARIABLE: "1",
    "AGENTRUN_DISPATCH_ACK_WAIT": "1",
    "AGENTRUN_RECONCILE_INTERVAL": "0.5",
}
ANSWER = " ".join(f"word{i}" for i in range(20)) + " "
FINAL = "Healthy and done."
HEALTHY_TURNS = [(ANSWER, [("calculator", '{"expression": "1+1"}')]), (FINAL, [])]
GUARD = 150.0


@dataclass
class Executors:
    """Executors on fixed ports (the gateway's target), each restarted when it dies."""

    stack: Stack
    deaths: int = 0
    died: asyncio.Condition = field(default_factory=asyncio.Condition)
    done: bool = False

    def start(self, port: int) -> Service:
        return self.stack.start_executor(AGENTRUN_EXECUTOR_LISTEN=f"127.0.0.1:{port}", **ENV)

    async def keep_up(self, service: Service, port: int) -> None:
        while not self.done:
            await asyncio.to_thread(service.process.wait)
            if self.done:
                return
            async with self.died:
                self.deaths += 1
                self.died.notify_all()
            service = await asyncio.to_thread(self.start, port)
        service.stop()  # restarted while the test was ending

    async def wait_for_deaths(self, count: int) -> None:
        async with self.died:
            await self.died.wait_for(lambda: self.deaths >= count)


async def start_run(client: Client, agent_id: str) -> str:
    """StartRun as a careful client makes it: repeated (same request id) with a backoff while
    no executor answers (the gateway's connections to restarted executors back off too)."""
    request = run_service_pb2.StartRunRequest(
        agent_id=agent_id, input="go", request_id=str(uuid.uuid4())
    )
    for _ in range(100):
        try:
            response = await client.runs.StartRun(request)
            return str(response.run.id)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        await asyncio.sleep(0.3)  # the client's retry backoff
    raise AssertionError("no executor accepted the run")


async def watch_to_end(client: Client, run_id: str) -> list[run_pb2.RunEvent]:
    """The run's whole stream, resumed after the last sequence seen whenever the call fails."""
    events: list[run_pb2.RunEvent] = []
    while not events or not is_terminal(events[-1]):
        call = client.watch(run_id, after=events[-1].sequence if events else 0)
        try:
            while (response := await call.read()) is not EOF:
                events.extend(response.events)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
    return events


def check_healthy(events: list[run_pb2.RunEvent]) -> None:
    """Gap-free, completed, and the last attempt of each model call streamed the script."""
    assert [e.sequence for e in events] == list(range(1, len(events) + 1)), kinds(events)
    assert events[-1].HasField("run_completed"), kinds(events)
    assert events[-1].run_completed.output == FINAL
    texts: dict[int, tuple[int, str]] = {}
    for event in events:
        if event.HasField("step_started") and event.step_started.kind == (
            run_pb2.STEP_KIND_MODEL_CALL
        ):
            texts[event.step_started.step_index] = (event.step_started.attempt, "")
        elif event.HasField("text_delta"):
            attempt, text = texts[event.text_delta.step_index]
            if event.text_delta.attempt == attempt:
                texts[event.text_delta.step_index] = (attempt, text + event.text_delta.text)
    assert [texts[s][1] for s in sorted(texts)] == [ANSWER, FINAL]


def rebuilt_from_events(run: Run) -> Run:
    """The run as its events alone make it (what an executor that loads it sees)."""
    rebuilt = None
    for event in run.collect_events():
        rebuilt = event.mutate(rebuilt)
    assert isinstance(rebuilt, Run)
    return rebuilt


def test_a_step_is_given_up_on_after_its_attempts_counted_from_the_events() -> None:
    run = new_run()
    run.record_model_call(1, "", [{"id": "c1", "name": "clock", "arguments_json": "{}"}], USAGE)
    for _ in range(MAX_ATTEMPTS - 1):
        assert exhausted_attempts(run, MAX_ATTEMPTS) is None
        run.resume("e")  # step 2 was interrupted: it runs again as a new attempt
    assert run.attempt_of(2) == MAX_ATTEMPTS
    verdict = exhausted_attempts(run, MAX_ATTEMPTS)
    assert verdict is not None
    assert verdict.code == ATTEMPTS_EXHAUSTED
    assert "step 2 (tool call 'clock')" in verdict.message
    assert f"attempted {MAX_ATTEMPTS} times" in verdict.message
    # Counted from the events alone: the run rebuilt from them decides the same.
    rebuilt = rebuilt_from_events(run)
    assert exhausted_attempts(rebuilt, MAX_ATTEMPTS) == verdict
    assert exhausted_attempts(rebuilt, MAX_ATTEMPTS + 1) is None


def test_attempts_handed_back_by_a_drain_do_not_count() -> None:
    run = new_run()
    run.record_model_call(1, "", [{"id": "c1", "name": "clock", "arguments_json": "{}"}], USAGE)
    for _ in range(2 * MAX_ATTEMPTS):  # rolling restarts: each drain hands the step back
        run.release("draining")
        assert exhausted_attempts(run, MAX_ATTEMPTS) is None
        run.resume("next")
    assert run.releases_of(2) == 2 * MAX_ATTEMPTS
    for _ in range(MAX_ATTEMPTS - 1):  # then the step crashes its executors
        assert exhausted_attempts(run, MAX_ATTEMPTS) is None
        run.resume("next")
    verdict = exhausted_attempts(run, MAX_ATTEMPTS)
    assert verdict is not None
    assert f"attempted {MAX_ATTEMPTS} times" in verdict.message
    rebuilt = rebuilt_from_events(run)
    assert exhausted_attempts(rebuilt, MAX_ATTEMPTS) == verdict


@pytest.mark.timeout(400)
async def test_a_poison_run_is_dead_lettered_while_healthy_runs_complete(
    empty_stack: Stack,
) -> None:
    executors = Executors(empty_stack)
    ports = [free_port() for _ in range(3)]
    keepers: list[asyncio.Task[None]] = []
    try:
        for port in ports:
            service = await asyncio.to_thread(executors.start, port)
            keepers.append(asyncio.create_task(executors.keep_up(service, port)))
        gateway = empty_stack.start_gateway(",".join(f"127.0.0.1:{p}" for p in ports), **ENV)
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            client = Client(channel)
            poison_agent = await client.create_agent(
                scripted_agent(
                    turns=[(CRASH_EXECUTOR_TURN, [])], mode=DURABLE, first_token_delay_ms=1000
                )
            )
            healthy_agent = await client.create_agent(
                scripted_agent(
                    turns=HEALTHY_TURNS,
                    tools=(("calculator", False),),
                    mode=DURABLE,
                    token_delay_ms=3,
                )
            )
            poison_id = await start_run(client, poison_agent.id)
            poison = asyncio.create_task(watch_to_end(client, poison_id))
            healthy: list[asyncio.Task[list[run_pb2.RunEvent]]] = []
            for deaths in range(MAX_ATTEMPTS + 1):
                # Five healthy runs at the start and after each death, so that some are held
                # by the executors the poison run kills.
                await asyncio.wait_for(executors.wait_for_deaths(deaths), GUARD)
                for _ in range(5):
                    run_id = await start_run(client, healthy_agent.id)
                    healthy.append(asyncio.create_task(watch_to_end(client, run_id)))
            poisoned = await asyncio.wait_for(poison, GUARD)
            finished = await asyncio.wait_for(asyncio.gather(*healthy), GUARD)

            failed = poisoned[-1]
            assert failed.HasField("run_failed"), kinds(poisoned)
            error = failed.run_failed.error
            assert error.code == run_pb2.RUN_ERROR_CODE_ATTEMPTS_EXHAUSTED
            assert "step 1 (model call)" in error.message
            assert f"attempted {MAX_ATTEMPTS} times" in error.message
            assert not error.retryable
            assert [e.sequence for e in poisoned] == list(range(1, len(poisoned) + 1))
            assert executors.deaths == MAX_ATTEMPTS  # one per attempt, none after
            record = await client.get_run(poison_id)
            assert record.status == run_pb2.RUN_STATUS_FAILED
            assert record.error.code == run_pb2.RUN_ERROR_CODE_ATTEMPTS_EXHAUSTED

            assert len(finished) == 20
            for events in finished:
                check_healthy(events)

        dead_letters = await read_dead_letters(empty_stack)
        assert [d["run_id"] for d in dead_letters] == [poison_id]
        assert dead_letters[0]["attempts"] == MAX_ATTEMPTS
        assert dead_letters[0]["step_index"] == 1
        assert dead_letters[0]["error"]["code"] == "ATTEMPTS_EXHAUSTED"
    finally:
        executors.done = True
        empty_stack.stop()
        await asyncio.gather(*keepers, return_exceptions=True)
        empty_stack.stop()  # an executor a keeper was restarting meanwhile


async def read_dead_letters(stack: Stack) -> list[dict[str, Any]]:
    """Every record in the stack's dead-letter stream, as an operator would read them."""
    names = NatsNames(stack.namespace)
    nc = await nats.connect(f"nats://{stack.nats.address}")
    try:
        js = nc.jetstream()
        info = await js.stream_info(names.deadletter_stream)
        records = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(names.deadletter_stream, seq)
            records.append(json.loads(msg.data or b"{}"))
        return records
    finally:
        await nc.close()
