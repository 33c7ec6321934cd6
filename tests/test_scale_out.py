"""Scale out: three executors and two gateways, each a separate process, against PostgreSQL and
one nats-server.

- 50 durable runs at once while executors are killed with SIGKILL and restarted at random
  moments (a seeded choice of how many streamed events to wait for) and one gateway is killed:
  the clients of the dead gateway reconnect to the other one and resume with WatchRun after the
  last sequence they saw. Every run ends with exactly the output of an uninterrupted run, no
  recorded tool call runs again, and every client's stream is gap-free without repeats. The
  gateway dies while a run is known to be streaming through it: a witness run, waiting for an
  approval that its client has received through that gateway, is approved only after the kill.
- Classic runs are spread over the executors by the gateway (client-side round robin over the
  target list), and those on an executor that is killed fail with EXECUTOR_LOST while the
  others complete.

PostgreSQL only: several executors share one store.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from agentrun.v1 import agent_pb2, run_pb2
from cli.launcher import Service, free_port, start_agentrun
from common.event_streams import is_terminal
from common.nats_link import NatsNames
from executor.tools.send_email import read_outbox
from tests.client import EOF, Client, kinds, rest, scripted_agent, text_of, until
from tests.conftest import database_url_for, drop_schema
from tests.stack import Stack
from tests.test_durable_crashes import CRASH_ENV, TOOLS, TURNS, check_run, describe, stored_history

DURABLE = agent_pb2.EXECUTION_MODE_DURABLE
RUNS = 50
EXECUTOR_KILLS = 5
POOLS = "&pool_size=2&max_overflow=2"
MAX_SPREAD_RUNS = 12
RETRY_PAUSE = 0.05
PING_RETRY = 0.05
GUARD = 60.0  # seconds: a bound on waiting for what must happen, never a pace
# The witness of the gateway kill: a run that waits for an approval, then ends.
WITNESS_EMAIL = json.dumps({"to": "w@example.com", "subject": "w", "body": "witness"})
WITNESS_TURNS = [("Asking.", [("send_email", WITNESS_EMAIL)]), ("Witnessed.", [])]


@dataclass
class Cluster:
    """Executors that listen on fixed ports (a restarted one comes back where it was, so the
    gateways' target lists stay valid) and gateways that list all of them."""

    stack: Stack
    ports: list[int]
    current: dict[int, Service] = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict)  # executor id -> slot
    _started: int = 0
    _starting: threading.Lock = field(default_factory=threading.Lock)

    def start_executor(self, slot: int) -> Service:
        """Starts the executor of ``slot`` (one start at a time: executors starting together on
        one PostgreSQL database can fail with "tuple concurrently updated", as each creates
        the store's tables and functions; that is not what this test is about)."""
        with self._starting:
            self._started += 1
            executor_id = f"executor-{slot}-{self._started}"
            env = self.stack.env(
                AGENTRUN_EXECUTOR_LISTEN=f"127.0.0.1:{self.ports[slot]}",
                AGENTRUN_EXECUTOR_ID=executor_id,
                **CRASH_ENV,
            )
            service = start_agentrun("executor", env, self.stack.tmp / "logs", executor_id)
        self.stack.executors.append(service)
        self.current[slot] = service
        self.ids[executor_id] = slot
        return service

    @property
    def target(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)


@pytest.fixture
def cluster(nats_server: Service, tmp_path: Path) -> Iterator[Cluster]:
    # Small connection pools: three executors (and a restarted one while a killed one's
    # connections close) must fit a default PostgreSQL's max_connections of 100.
    url = database_url_for("postgres", tmp_path / "data") + POOLS
    stack = Stack(database_url=url, nats=nats_server, tmp=tmp_path)
    cluster = Cluster(stack, [free_port() for _ in range(3)])
    try:
        for slot in range(3):
            cluster.start_executor(slot)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: stack.start_gateway(cluster.target, **CRASH_ENV), [0, 1]))
        yield cluster
    finally:
        stack.stop()
        drop_schema(url)


@pytest.fixture
async def clients(cluster: Cluster) -> AsyncIterator[list[Client]]:
    channels = [grpc.aio.insecure_channel(g.address) for g in cluster.stack.gateways]
    yield [Client(channel) for channel in channels]
    for channel in channels:
        await channel.close(grace=None)


class Progress:
    """The events all clients have received so far, to pick moments by."""

    def __init__(self) -> None:
        self.events = 0
        self.finished = 0
        self._changed = asyncio.Condition()

    async def add(self, events: int, finished: int = 0) -> None:
        async with self._changed:
            self.events += events
            self.finished += finished
            self._changed.notify_all()

    async def until(self, condition: Callable[[], bool]) -> None:
        """Waits until ``condition`` holds (checked whenever a client received something)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(condition), GUARD)

    async def reach(self, events: int, runs: int) -> bool:
        """Waits until ``events`` events were received (True), or all ``runs`` finished first."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: self.events >= events or self.finished >= runs),
                GUARD,
            )
            return self.events >= events


class Reader:
    """A client streaming one durable run through its home gateway. When its call fails with
    UNAVAILABLE (its gateway died, or something behind it), it goes to the other gateway and
    resumes with WatchRun after the last sequence it saw, or repeats its start with the same
    request_id if it saw nothing yet. While ``pinned``, it asks its home gateway again instead."""

    def __init__(
        self,
        clients: list[Client],
        home: int,
        agent_id: str,
        progress: Progress,
        pinned: bool = False,
    ) -> None:
        self.events: list[run_pb2.RunEvent] = []
        self.home = home
        self.gateway = home
        self.pinned = pinned
        self.resumed_on: list[tuple[int, int]] = []  # (gateway, after sequence) of each resume
        self._clients = clients
        self._agent_id = agent_id
        self._progress = progress
        self._request_id = str(uuid.uuid4())
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        failures = 0  # calls failed in a row
        try:
            while not self.events or not is_terminal(self.events[-1]):
                client = self._clients[self.gateway]
                if self.events:
                    call = client.watch(self.events[0].run_id, after=self.events[-1].sequence)
                else:
                    call = client.stream(self._agent_id, "work", request_id=self._request_id)
                try:
                    while (response := await call.read()) is not EOF:
                        self.events.extend(response.events)
                        failures = 0
                        await self._progress.add(len(response.events))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    if not self.pinned:
                        self.gateway = 1 - self.gateway
                    after = self.events[-1].sequence if self.events else 0
                    self.resumed_on.append((self.gateway, after))
                    failures += 1
                    if failures >= len(self._clients):
                        # Both gateways failed in a row: back off before asking again, as a
                        # client should (a pause between retries, not a wait for anything).
                        await asyncio.sleep(RETRY_PAUSE * min(failures, 10))
        finally:
            await self._progress.add(0, finished=1)

    async def result(self) -> list[run_pb2.RunEvent]:
        try:
            await asyncio.wait_for(asyncio.shield(self.task), GUARD)
        except TimeoutError:
            run = self.events[0].run_id if self.events else "(not started)"
            raise AssertionError(f"run {run} did not end: {describe(self.events)}") from None
        return self.events


@pytest.mark.timeout(300)
async def test_durable_runs_complete_exactly_once_while_executors_and_a_gateway_die(
    cluster: Cluster, clients: list[Client]
) -> None:
    rng = random.Random(20261202)
    agent = await clients[0].create_agent(
        scripted_agent(turns=TURNS, tools=TOOLS, mode=DURABLE, token_delay_ms=100)
    )
    gated = await clients[0].create_agent(
        scripted_agent(turns=WITNESS_TURNS, tools=(("send_email", True),), mode=DURABLE)
    )
    # An undisturbed run: how many events a run has, for choosing moments.
    calm = await clients[1].run(agent.id, "work")
    check_run(calm, cluster.stack.data_dir, await stored_history(clients[1], calm[0].run_id))
    total = RUNS * len(calm)

    progress = Progress()
    readers = [Reader(clients, i % 2, agent.id, progress) for i in range(RUNS)]
    moments = sorted(int(total * rng.uniform(0.03, 0.8)) for _ in range(EXECUTOR_KILLS))
    gateway_moment = int(total * rng.uniform(0.15, 0.4))
    plan = sorted([(m, "executor") for m in moments] + [(gateway_moment, "gateway")])
    done: list[tuple[int, str]] = []
    witness: Reader | None = None
    resumed_before_kill = 0
    restarts: dict[int, asyncio.Task[Service]] = {}
    for moment, what in plan:
        if not await progress.reach(moment, RUNS + (witness is not None)):
            break  # every run ended first
        if what == "gateway":
            # The witness streams through gateway 0 (only, until the kill) and stops at an
            # approval: once its client has that event, its run cannot end until approved, so
            # its call through gateway 0 is open when the gateway dies.
            witness = Reader(clients, 0, gated.id, progress, pinned=True)
            await progress.until(functools.partial(asked_or_ended, witness))
            pending = asking(witness)
            assert pending is not None, describe(witness.events)
            witness.pinned = False
            resumed_before_kill = len(witness.resumed_on)
            cluster.stack.gateways[0].kill()
            await approve(clients[1], pending)
        else:
            # A victim among the executors that are up, as long as another one stays up; it is
            # killed now and comes back in the background (starting takes a while).
            def up() -> list[int]:
                return [slot for slot in range(3) if slot not in restarts or restarts[slot].done()]

            if len(up()) < 2:
                restarting = [t for t in restarts.values() if not t.done()]
                await asyncio.wait(restarting, return_when=asyncio.FIRST_COMPLETED)
            slot = rng.choice(up())
            cluster.current[slot].kill()
            restarts[slot] = asyncio.create_task(asyncio.to_thread(cluster.start_executor, slot))
        done.append((progress.events, what))
    finished = [await reader.result() for reader in readers]
    await asyncio.gather(*restarts.values())

    assert [w for _, w in done].count("gateway") == 1, done
    assert [w for _, w in done].count("executor") >= 3, done
    stored_by = clients[1]
    for events in finished:
        check_run(events, cluster.stack.data_dir, await stored_history(stored_by, events[0].run_id))
    # Some kills interrupted steps, which then ran again as a new attempt on another executor.
    attempts = [
        e.step_started.attempt for run in finished for e in run if e.HasField("step_started")
    ]
    assert max(attempts) > 1, done
    # The witness, streaming through gateway 0 when it died, went on through gateway 1 from
    # where it was (at least its approval request) to the end, without a gap or a repeat.
    assert witness is not None, done
    seen = await witness.result()
    assert [e.sequence for e in seen] == list(range(1, len(seen) + 1)), kinds(seen)
    assert seen[-1].HasField("run_completed"), describe(seen)
    assert seen[-1].run_completed.output == "Witnessed."
    asked = asking(witness)
    assert asked is not None
    after_kill = witness.resumed_on[resumed_before_kill:]
    assert after_kill, "the witness's call through the killed gateway did not fail"
    gateway, after = after_kill[0]
    assert gateway == 1, witness.resumed_on
    assert after >= asked.sequence, witness.resumed_on


def asking(reader: Reader) -> run_pb2.RunEvent | None:
    """The first approval request the reader received."""
    return next((e for e in reader.events if e.HasField("tool_approval_required")), None)


def asked_or_ended(reader: Reader) -> bool:
    return asking(reader) is not None or reader.task.done()


async def approve(client: Client, asked: run_pb2.RunEvent) -> None:
    """Approves the tool call of an approval request. While the gateway answers UNAVAILABLE (the
    executor it asked is down: killed, not back yet), asks again after a pause, as a client
    should (bounded by GUARD)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GUARD
    failures = 0
    while True:
        try:
            await client.approve(asked.run_id, asked.tool_approval_required.tool_call.id)
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or loop.time() > deadline:
                raise
            failures += 1
            await asyncio.sleep(RETRY_PAUSE * min(failures, 10))


async def holder_of(nc: NatsClient, names: NatsNames, run_id: str) -> str:
    """The executor holding a run, as its control subject answers. An executor subscribes to a
    run's control subject as the run starts, which NATS may learn a moment after the run's first
    events reached the client: "no responders" is asked again (bounded by GUARD)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GUARD
    while True:
        try:
            answer = await nc.request(names.control_subject(run_id), b'{"op": "ping"}', GUARD)
        except nats.errors.NoRespondersError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(PING_RETRY)
            continue
        holder: str = json.loads(answer.data)["executor"]
        return holder


@pytest.mark.timeout(120)
async def test_classic_runs_are_spread_over_the_executors_and_lost_with_theirs(
    cluster: Cluster, clients: list[Client]
) -> None:
    email = json.dumps({"to": "c@example.com", "subject": "s", "body": "b"})
    agent = await clients[0].create_agent(
        scripted_agent(turns=[("Asking.", [("send_email", email)]), ("Sent.", [])])
    )
    # Each run waits for approval in its executor's memory: it stays where it is until decided.
    # Through each gateway, runs are started until all three executors hold some of them, or
    # MAX_SPREAD_RUNS were started (round robin covers the executors the gateway is connected to,
    # and calls are opened ahead of need: the first few runs need not reach all three).
    names = NatsNames(cluster.stack.namespace)
    calls: list[Any] = []
    before: list[list[run_pb2.RunEvent]] = []
    slots: list[int] = []
    gateways: list[int] = []
    nc = await nats.connect(f"nats://{cluster.stack.nats.address}")
    try:
        for gateway in (0, 1):
            reached: set[int] = set()
            for _ in range(MAX_SPREAD_RUNS):
                call = clients[gateway].stream(agent.id, "mail")
                events = await until(call, "tool_approval_required")
                slot = cluster.ids[await holder_of(nc, names, events[0].run_id)]
                calls.append(call)
                before.append(events)
                slots.append(slot)
                gateways.append(gateway)
                reached.add(slot)
                if reached == {0, 1, 2}:
                    break
            assert reached == {0, 1, 2}, f"gateway {gateway} used only executors {reached}"
    finally:
        await nc.close()

    victim = slots[0]
    cluster.current[victim].kill()
    for i, (call, events) in enumerate(zip(calls, before, strict=True)):
        run_id = events[0].run_id
        if slots[i] == victim:
            events += await rest(call)
            assert events[-1].HasField("run_failed"), kinds(events)
            assert events[-1].run_failed.error.code == run_pb2.RUN_ERROR_CODE_EXECUTOR_LOST
        else:
            tool_call = events[-1].tool_approval_required.tool_call
            # Approved through the other gateway than the one streaming the run.
            await clients[1 - gateways[i]].approve(run_id, tool_call.id)
            events += await rest(call)
            assert events[-1].HasField("run_completed"), kinds(events)
            assert events[-1].run_completed.output == "Sent."
            assert text_of(events) == "Asking.Sent."
        assert [e.sequence for e in events] == list(range(1, len(events) + 1)), kinds(events)
    sent = read_outbox(cluster.stack.data_dir)
    survivors = {b[0].run_id for b, slot in zip(before, slots, strict=True) if slot != victim}
    assert sorted(m["run_id"] for m in sent) == sorted(survivors)
