"""Reading back a long durable run: ~1,000 stored events.

- ListRunEvents through the gateway: from the request to the last message, in the client.
- Rebuilding the run in process from the store, with a fresh RunStore each time (no cache):
  ``RunStore.load`` (from the latest snapshot, one every SNAPSHOT_INTERVAL events, plus the
  events after it) and a replay of every event from the first, without snapshots.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import grpc
from eventsourcing.application import project_aggregate

from agentrun.v1 import run_service_pb2, run_service_pb2_grpc
from bench.durable import create_agent
from bench.latency import EOF
from eventstore.agent_config import (
    MAX_MODEL_CALLS_LIMIT,
    AgentConfig,
    ModelSettings,
    ScriptedSettings,
    ScriptedToolCall,
    ScriptedTurn,
    ToolSettings,
)
from eventstore.persistence import StoreConfig
from eventstore.run import Run
from eventstore.run_store import RunStore

TOOL_CALLS_PER_TURN = 4  # each model call records 1 event, each of its tool calls 1 more
CALC = ScriptedToolCall("calculator", '{"expression": "1+1"}')


@dataclass
class Replay:
    events: int
    list_run_events: list[float]
    load: list[float]
    from_events: list[float]


def many_events_agent(agent_id: str, events: int) -> AgentConfig:
    """A durable agent whose run records about ``events`` events."""
    calls = min(MAX_MODEL_CALLS_LIMIT, math.ceil(events / (1 + TOOL_CALLS_PER_TURN)))
    turn = ScriptedTurn("step", (CALC,) * TOOL_CALLS_PER_TURN)
    return AgentConfig(
        agent_id=agent_id,
        version=1,
        execution_mode="durable",
        max_model_calls=calls,
        model=ModelSettings(
            provider="scripted",
            scripted=ScriptedSettings(turns=(*[turn] * (calls - 1), ScriptedTurn("done"))),
        ),
        tools=(ToolSettings("calculator"),),
    )


async def replay(target: str, url: str, events: int, tries: int) -> Replay:
    agent_id = f"history-{uuid.uuid4().hex[:8]}"
    await create_agent(target, many_events_agent(agent_id, events))
    async with grpc.aio.insecure_channel(target) as channel:
        stub: Any = run_service_pb2_grpc.RunServiceStub(channel)
        run_id = await _long_run(stub, agent_id)
        await _list_events(stub, run_id)  # warm up
        listed: list[float] = []
        for _ in range(tries):
            started = time.perf_counter()
            count = await _list_events(stub, run_id)
            listed.append(time.perf_counter() - started)
    load, from_events = await asyncio.to_thread(_rebuild, url, run_id, count, tries)
    return Replay(count, listed, load, from_events)


async def _long_run(stub: Any, agent_id: str) -> str:
    call = stub.StreamRun(run_service_pb2.StreamRunRequest(agent_id=agent_id, input="go"))
    run_id = ""
    completed = False
    while (response := await call.read()) is not EOF:
        for event in response.events:
            run_id = run_id or event.run_id
            completed = completed or event.HasField("run_completed")
    if not completed:
        raise RuntimeError(f"the long run {run_id} ended without RunCompleted")
    return run_id


async def _list_events(stub: Any, run_id: str) -> int:
    count = 0
    call = stub.ListRunEvents(run_service_pb2.ListRunEventsRequest(run_id=run_id))
    while (response := await call.read()) is not EOF:
        count += len(response.events)
    return count


def _rebuild(url: str, run_id: str, events: int, tries: int) -> tuple[list[float], list[float]]:
    load: list[float] = []
    from_events: list[float] = []
    config = StoreConfig.from_url(url)
    for _ in range(tries + 1):  # the first is a warm-up
        store = RunStore(config)
        try:
            store.load(run_id, 1)  # opens the connection; reading a version skips the cache
            started = time.perf_counter()
            run = store.load(run_id)
            loaded = time.perf_counter() - started
            started = time.perf_counter()
            replayed = project_aggregate(None, store.events.get(UUID(run_id)))
            rebuilt = time.perf_counter() - started
        finally:
            store.close()
        if run.version != events or not isinstance(replayed, Run) or replayed.version != events:
            raise RuntimeError(f"run {run_id}: rebuilt at version {run.version}, not {events}")
        load.append(loaded)
        from_events.append(rebuilt)
    return load[1:], from_events[1:]
