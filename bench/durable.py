"""Durable-only figures: the cost of a step late in a long run, and the time from an executor's
death to the next token of its run on another executor."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import nats

from agentrun.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
)
from bench.latency import EOF, open_channel
from bench.workload import long_agent
from cli.launcher import Service
from common.nats_link import NatsNames
from eventstore.agent_config import AgentConfig
from executor.translation import agent_to_proto


async def create_agent(
    target: str, config: AgentConfig, credentials: grpc.ChannelCredentials | None = None
) -> None:
    async with open_channel(target, credentials) as channel:
        stub: Any = agent_service_pb2_grpc.AgentServiceStub(channel)
        await stub.CreateAgent(agent_service_pb2.CreateAgentRequest(agent=agent_to_proto(config)))


STEPS_COMPARED = 10  # steps 3-12 against the last ten


async def step_costs(target: str, steps: int, runs: int) -> tuple[list[float], list[float]]:
    """Step times (seconds) near the start (steps 3-12) and near the end (the last ten) of
    ``runs`` durable runs of ``steps`` steps, from StepCompleted to StepCompleted as the client
    sees them (zero-delay model, calculator tool: what remains is agentrun's work per step)."""
    agent_id = f"long-{uuid.uuid4().hex[:8]}"
    await create_agent(target, long_agent(agent_id, (steps + 1) // 2))
    early: list[float] = []
    late: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub: Any = run_service_pb2_grpc.RunServiceStub(channel)
        for _ in range(runs):
            completed: dict[int, float] = {}
            call = stub.StreamRun(run_service_pb2.StreamRunRequest(agent_id=agent_id, input="go"))
            while (response := await call.read()) is not EOF:
                now = time.perf_counter()
                for event in response.events:
                    if event.HasField("step_completed"):
                        completed[event.step_completed.step_index] = now
            last = max(completed)
            early += [completed[s] - completed[s - 1] for s in range(3, 3 + STEPS_COMPARED)]
            late += [
                completed[s] - completed[s - 1] for s in range(last - STEPS_COMPARED + 1, last + 1)
            ]
    return early, late


async def death_to_next_token(
    target: str,
    nats_url: str,
    names: NatsNames,
    executors: dict[str, Service],
    start_executor: Callable[[int], tuple[str, Service]],
    agent_id: str,
    trials: int,
) -> list[float]:
    """Seconds from the SIGKILL of the executor holding a durable run to the next token of that
    run (of the new attempt) reaching the client, with another executor standing by."""
    results: list[float] = []
    nc = await nats.connect(nats_url)
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub: Any = run_service_pb2_grpc.RunServiceStub(channel)
            for _ in range(trials):
                call = stub.StreamRun(
                    run_service_pb2.StreamRunRequest(agent_id=agent_id, input="go")
                )
                run_id = ""
                while not run_id:
                    response = await call.read()
                    for event in response.events:
                        if event.HasField("text_delta"):
                            run_id = event.run_id
                answer = await nc.request(names.control_subject(run_id), b'{"op": "ping"}', 2)
                victim = executors.pop(json.loads(answer.data)["executor"])
                await asyncio.to_thread(victim.kill)
                killed = time.perf_counter()
                resumed = None
                while (response := await call.read()) is not EOF:
                    for event in response.events:
                        if (
                            resumed is None
                            and event.HasField("text_delta")
                            and event.text_delta.attempt > 1
                        ):
                            resumed = time.perf_counter() - killed
                if resumed is not None:
                    results.append(resumed)
                # Its replacement listens where it did, so the gateway's targets stay valid.
                name, service = await asyncio.to_thread(start_executor, victim.port)
                executors[name] = service
    finally:
        await nc.close()
    return results


def ratio(late: list[float], early: list[float], per_run: int = STEPS_COMPARED) -> float:
    """The median over runs of each run's median late step over its median early step: each
    run takes about a second, so the machine's speed, which drifts from minute to minute
    (bench.machine), is nearly the same for both ends of one run."""
    runs = range(0, len(early), per_run)
    return statistics.median(
        statistics.median(late[i : i + per_run]) / statistics.median(early[i : i + per_run])
        for i in runs
    )
