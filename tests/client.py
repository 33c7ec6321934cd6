"""Test helpers for talking to a gateway like a client would."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import grpc

from agentrun.v1 import (
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
)
from common.event_streams import TERMINAL_KINDS

Metadata = tuple[tuple[str, str], ...]
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


def kinds(events: Sequence[run_pb2.RunEvent]) -> list[str]:
    return [e.WhichOneof("kind") or "" for e in events]


def text_of(events: Sequence[run_pb2.RunEvent]) -> str:
    return "".join(e.text_delta.text for e in events if e.HasField("text_delta"))


def scripted_agent(
    *,
    turns: Sequence[tuple[str, Sequence[tuple[str, str]]]] = (),
    tools: Sequence[tuple[str, bool]] = (
        ("clock", False),
        ("calculator", False),
        ("send_email", True),
    ),
    mode: agent_pb2.ExecutionMode.ValueType = agent_pb2.EXECUTION_MODE_CLASSIC,
    token_delay_ms: int = 0,
    first_token_delay_ms: int = 0,
    approval_timeout_s: float | None = None,
    agent_id: str | None = None,
) -> agent_pb2.Agent:
    """An agent on the scripted model. ``turns`` are (text, [(tool, arguments_json), ...])."""
    agent = agent_pb2.Agent(
        id=agent_id or f"test-{uuid.uuid4().hex[:12]}",
        execution_mode=mode,
        model=agent_pb2.ModelConfig(provider="scripted"),
        tools=[agent_pb2.Tool(name=n, requires_approval=a) for n, a in tools],
    )
    for text, calls in turns:
        agent.model.scripted.turns.add(
            text=text,
            tool_calls=[agent_pb2.ScriptedToolCall(name=n, arguments_json=a) for n, a in calls],
        )
    agent.model.scripted.token_delay.FromMilliseconds(token_delay_ms)
    agent.model.scripted.first_token_delay.FromMilliseconds(first_token_delay_ms)
    if approval_timeout_s is not None:
        agent.approval_timeout.FromNanoseconds(int(approval_timeout_s * 1e9))
    return agent


class Client:
    """RunService and AgentService of one gateway, with an optional API key."""

    def __init__(self, channel: grpc.aio.Channel, api_key: str | None = None) -> None:
        self.runs: Any = run_service_pb2_grpc.RunServiceStub(channel)
        self.agents: Any = agent_service_pb2_grpc.AgentServiceStub(channel)
        self.metadata: Metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def create_agent(self, agent: agent_pb2.Agent | None = None) -> agent_pb2.Agent:
        response = await self.agents.CreateAgent(
            agent_service_pb2.CreateAgentRequest(agent=agent or scripted_agent()),
            metadata=self.metadata,
        )
        created: agent_pb2.Agent = response.agent
        return created

    def stream(self, agent_id: str, text: str, **fields: Any) -> Any:
        return self.runs.StreamRun(
            run_service_pb2.StreamRunRequest(agent_id=agent_id, input=text, **fields),
            metadata=self.metadata,
        )

    async def run(self, agent_id: str, text: str, **fields: Any) -> list[run_pb2.RunEvent]:
        """A whole run through StreamRun."""
        return await rest(self.stream(agent_id, text, **fields))

    def watch(self, run_id: str, after: int = 0) -> Any:
        return self.runs.WatchRun(
            run_service_pb2.WatchRunRequest(run_id=run_id, after_sequence=after),
            metadata=self.metadata,
        )

    async def watch_all(self, run_id: str, after: int = 0) -> list[run_pb2.RunEvent]:
        return await rest(self.watch(run_id, after))

    async def get_run(self, run_id: str) -> run_pb2.Run:
        response = await self.runs.GetRun(
            run_service_pb2.GetRunRequest(run_id=run_id), metadata=self.metadata
        )
        run: run_pb2.Run = response.run
        return run

    async def approve(
        self, run_id: str, tool_call_id: str, approved: bool = True, reason: str = ""
    ) -> None:
        await self.runs.SubmitToolApproval(
            run_service_pb2.SubmitToolApprovalRequest(
                run_id=run_id,
                decision=run_service_pb2.ToolApprovalDecision(
                    tool_call_id=tool_call_id, approved=approved, reason=reason
                ),
            ),
            metadata=self.metadata,
        )


_unread: dict[int, list[run_pb2.RunEvent]] = {}


async def _next_events(call: Any) -> list[run_pb2.RunEvent] | None:
    """The call's next events: those left over from an earlier read, else the next message's."""
    left = _unread.pop(id(call), None)
    if left:
        return left
    response = await call.read()
    if response is EOF:
        return None
    return list(response.events)


async def until(call: Any, kind: str) -> list[run_pb2.RunEvent]:
    """Reads a streaming call's events up to the first event of ``kind`` (inclusive); the rest of
    that message is kept for the next read."""
    events: list[run_pb2.RunEvent] = []
    while (batch := await _next_events(call)) is not None:
        for i, event in enumerate(batch):
            events.append(event)
            if event.WhichOneof("kind") == kind:
                if batch[i + 1 :]:
                    _unread[id(call)] = batch[i + 1 :]
                return events
    raise AssertionError(f"the stream ended without {kind}: {kinds(events)}")


async def rest(call: Any) -> list[run_pb2.RunEvent]:
    """Reads a streaming call's remaining events."""
    events: list[run_pb2.RunEvent] = []
    while (batch := await _next_events(call)) is not None:
        events.extend(batch)
    return events


async def assert_history_agrees(
    client: Client, run_id: str, live: Sequence[run_pb2.RunEvent] | None = None
) -> list[run_pb2.RunEvent]:
    """The run's history, as WatchRun replays it from the start, is whole (sequences 1..n),
    ends with one terminal event, says what GetRun says and, given the events a live client
    saw (``live``), is exactly those. Returns the history."""
    history = await client.watch_all(run_id)
    assert [e.sequence for e in history] == list(range(1, len(history) + 1)), kinds(history)
    assert [k for k in kinds(history) if k in TERMINAL_KINDS] == [kinds(history)[-1]]
    end = history[-1]
    run = await client.get_run(run_id)
    if end.HasField("run_completed"):
        assert run.status == run_pb2.RUN_STATUS_COMPLETED, run
        assert run.output == end.run_completed.output
    elif end.HasField("run_failed"):
        assert run.status == run_pb2.RUN_STATUS_FAILED, run
        assert run.error.code == end.run_failed.error.code
    else:
        assert run.status == run_pb2.RUN_STATUS_CANCELLED, run
    if live is not None:
        assert list(history) == list(live)
    return history
