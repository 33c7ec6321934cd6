"""First token and whole-run latency: through the stack, and in process.

Through the stack: a gRPC client -> gateway -> executor -> scripted model -> executor ->
gateway -> client (classic), or -> store -> work queue -> executor -> JetStream -> gateway ->
client (durable), each process separate, on loopback. In process: the same agent loop and event
stream called directly, without any service: the physical minimum the stack's overhead is
measured against.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agentrun.v1 import run_service_pb2, run_service_pb2_grpc
from bench.workload import bench_agent
from eventstore.run import Run
from eventstore.run_steps import AwaitApprovals, AwaitResults
from executor.agent_loop import AgentLoop
from executor.extensions import load_extensions
from executor.models import ModelProviders
from executor.models.scripted import tokens_of
from executor.run_stream import RunStream
from executor.tools import Tools

EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


def open_channel(
    target: str, credentials: grpc.ChannelCredentials | None = None
) -> grpc.aio.Channel:
    """A channel to a gateway: TLS with ``credentials``, else plaintext."""
    if credentials is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, credentials)


@dataclass
class RunTimes:
    first_token: list[float]
    whole_run: list[float]
    tokens: int = 0  # text-delta tokens the client received, over all runs


async def through_stack(
    target: str,
    agent_id: str,
    runs: int,
    concurrency: int = 1,
    credentials: grpc.ChannelCredentials | None = None,
) -> tuple[RunTimes, float]:
    """Runs ``runs`` runs, ``concurrency`` at a time, on one channel (TLS with
    ``credentials``); returns their times and the wall time."""
    times = RunTimes([], [])
    async with open_channel(target, credentials) as channel:
        stub: Any = run_service_pb2_grpc.RunServiceStub(channel)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(runs):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                await _one_run(stub, agent_id, times)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return times, wall


async def _one_run(stub: Any, agent_id: str, times: RunTimes) -> None:
    started = time.perf_counter()
    call = stub.StreamRun(
        run_service_pb2.StreamRunRequest(
            agent_id=agent_id, input="go", request_id=str(uuid.uuid4())
        )
    )
    first = None
    completed = False
    while not completed and (response := await call.read()) is not EOF:
        for event in response.events:
            if event.HasField("text_delta"):
                if first is None:
                    first = time.perf_counter() - started
                times.tokens += len(tokens_of(event.text_delta.text))
            completed = completed or event.HasField("run_completed")
    if not completed:
        raise RuntimeError("the run ended without RunCompleted")
    times.first_token.append(first if first is not None else float("nan"))
    times.whole_run.append(time.perf_counter() - started)


class _InMemoryHost:
    """A RunHost that keeps nothing: the loop's own cost, with no service around it."""

    def attempt(self, step_index: int) -> int:
        return 1

    async def commit(self, run: Run) -> None:
        run.collect_events()

    async def status_changed(self, run: Run) -> None:
        return None

    async def wait_for_decisions(self, run: Run, step: AwaitApprovals | AwaitResults) -> bool:
        return True

    async def finished(self, run: Run) -> None:
        return None


async def in_process(runs: int, **scripted: float) -> RunTimes:
    """``scripted`` sets the model's pace, as in bench.workload.bench_agent."""
    times = RunTimes([], [])
    load_extensions()
    models = ModelProviders()
    tools = Tools(Path("."))
    agent = bench_agent("bench", "classic", **scripted).to_json()
    for _ in range(runs):
        started = time.perf_counter()
        run = Run(
            run_id=str(uuid.uuid4()),
            tenant="bench",
            request_id="",
            agent=agent,
            input="go",
            conversation_id="c",
            history=[],
            execution_mode="classic",
        )
        stream = RunStream(run.run_id)
        stream.attach()
        loop = AgentLoop(run, stream, _InMemoryHost(), models, tools)
        task = asyncio.create_task(loop.drive())
        first = None
        while batch := await stream.next_batch():
            if first is None and any(e.HasField("text_delta") for e in batch):
                first = time.perf_counter() - started
        await task
        await stream.close()
        times.first_token.append(first if first is not None else float("nan"))
        times.whole_run.append(time.perf_counter() - started)
    await models.aclose()
    await tools.aclose()
    return times
