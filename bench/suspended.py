"""The executor's memory per suspended durable run.

N durable runs of an agent whose one tool (send_email) requires approval are started with
StartRun; once the run list shows all of them awaiting approval, the executor's resident set
size is read again. (RSS after - RSS before) / N is what a suspended run costs the executor;
the "before" is taken after a warm-up batch went through the same path and was cancelled.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc

from agentrun.v1 import run_pb2, run_service_pb2, run_service_pb2_grpc
from bench.durable import create_agent
from bench.stack import rss_bytes
from cli.launcher import Service
from eventstore.agent_config import (
    AgentConfig,
    ModelSettings,
    ScriptedSettings,
    ScriptedToolCall,
    ScriptedTurn,
    ToolSettings,
)

EMAIL = ScriptedToolCall("send_email", '{"to": "bob@example.com", "subject": "hi", "body": "hi"}')
CONCURRENCY = 16
PAGE = 500
SETTLE_TIMEOUT = 600.0
POLL_INTERVAL = 0.2


@dataclass
class Suspended:
    runs: int
    rss_before: int
    rss_after: int
    start_seconds: float  # from the first StartRun to all of them awaiting approval

    @property
    def bytes_per_run(self) -> float:
        return (self.rss_after - self.rss_before) / self.runs


def approval_agent(agent_id: str) -> AgentConfig:
    return AgentConfig(
        agent_id=agent_id,
        version=1,
        execution_mode="durable",
        model=ModelSettings(
            provider="scripted",
            scripted=ScriptedSettings(
                turns=(ScriptedTurn("I will send it.", (EMAIL,)), ScriptedTurn("Sent."))
            ),
        ),
        tools=(ToolSettings("send_email", requires_approval=True),),
    )


async def suspended_runs(target: str, executor: Service, runs: int, warm_up: int) -> Suspended:
    """Measures ``executor`` (the only one behind ``target``) holding ``runs`` suspended runs."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub: Any = run_service_pb2_grpc.RunServiceStub(channel)
        agent_id = f"approve-{uuid.uuid4().hex[:8]}"
        await create_agent(target, approval_agent(agent_id))
        warm = await _start(stub, agent_id, warm_up)
        await _until_all(stub, agent_id, warm_up, run_pb2.RUN_STATUS_AWAITING_APPROVAL)
        await _cancel(stub, warm)
        await _until_all(stub, agent_id, warm_up, run_pb2.RUN_STATUS_CANCELLED)
        before = rss_bytes(executor)
        started = time.perf_counter()
        ids = await _start(stub, agent_id, runs)
        await _until_all(stub, agent_id, runs, run_pb2.RUN_STATUS_AWAITING_APPROVAL)
        settled = time.perf_counter() - started
        after = rss_bytes(executor)
        await _cancel(stub, ids)
    return Suspended(runs, before, after, settled)


async def _each(count: int, job: Any) -> None:
    """Calls ``job(i)`` for i in range(count), CONCURRENCY at a time."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            await job(queue.get_nowait())

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def _start(stub: Any, agent_id: str, runs: int) -> list[str]:
    ids: list[str] = []

    async def start(_: int) -> None:
        request = run_service_pb2.StartRunRequest(
            agent_id=agent_id, input="email bob", request_id=str(uuid.uuid4())
        )
        ids.append((await stub.StartRun(request)).run.id)

    await _each(runs, start)
    return ids


async def _cancel(stub: Any, run_ids: list[str]) -> None:
    async def cancel(i: int) -> None:
        await stub.CancelRun(run_service_pb2.CancelRunRequest(run_id=run_ids[i], reason="bench"))

    await _each(len(run_ids), cancel)


async def _until_all(stub: Any, agent_id: str, runs: int, status: int) -> None:
    """Polls the run list until ``runs`` runs of the agent have ``status``. A run that reaches
    any other end (failed, completed) stops the wait with an error."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        counts = await _statuses(stub, agent_id)
        if counts.get(status, 0) >= runs:
            return
        wrong = {s: n for s, n in counts.items() if s in _UNEXPECTED and s != status}
        if wrong:
            raise RuntimeError(f"runs of {agent_id} ended otherwise: {wrong}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"runs of {agent_id}: {counts}, waiting for {runs} in {status}")
        await asyncio.sleep(POLL_INTERVAL)


_UNEXPECTED = {run_pb2.RUN_STATUS_FAILED, run_pb2.RUN_STATUS_COMPLETED}


async def _statuses(stub: Any, agent_id: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    token = ""
    while True:
        page = await stub.ListRuns(
            run_service_pb2.ListRunsRequest(agent_id=agent_id, page_size=PAGE, page_token=token)
        )
        for run in page.runs:
            counts[run.status] = counts.get(run.status, 0) + 1
        token = page.next_page_token
        if not token:
            return counts
