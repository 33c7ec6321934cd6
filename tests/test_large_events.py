"""Events larger than a NATS message, end to end in both modes: the live client, a watcher
reading the run's JetStream subject from the start, and the run list agree on every byte.

The large events come from a model (an OpenAI-compatible server, tests/openai_wire_server.py):
an answer of 1.5 MB, and tool-call arguments of 1.5 MB. An agent cannot hold them: a scripted
turn is bounded far below that (eventstore.agent_config).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from agentrun.v1 import agent_pb2, run_pb2
from tests.client import Client
from tests.openai_wire_server import Completion, OpenAIWireServer, WireToolCall

LONG_TEXT = "w " * 750_000  # an answer whose RunCompleted carries 1.5 MB of output
LONG_ARGUMENTS = json.dumps({"expression": "6*7" + " " * 1_500_000})
MODES = {"classic": agent_pb2.EXECUTION_MODE_CLASSIC, "durable": agent_pb2.EXECUTION_MODE_DURABLE}


def pieces(text: str, size: int = 50_000) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.fixture
async def model() -> AsyncIterator[OpenAIWireServer]:
    async with OpenAIWireServer() as server:
        yield server


def openai_agent(base_url: str, mode: str) -> agent_pb2.Agent:
    """An agent of the model server (which needs no API key), with the calculator."""
    return agent_pb2.Agent(
        id=f"large-{uuid.uuid4().hex[:12]}",
        execution_mode=MODES[mode],
        model=agent_pb2.ModelConfig(provider="openai", name="gpt-4o-mini", base_url=base_url),
        tools=[agent_pb2.Tool(name="calculator")],
    )


async def run_and_watch(
    channels: list[grpc.aio.Channel], agent: agent_pb2.Agent
) -> tuple[list[run_pb2.RunEvent], run_pb2.Run]:
    """Runs the agent on one gateway; checks that a watch from the start on the other gateway
    returns the very events the live client got; the live events and the run as GetRun has it."""
    client = Client(channels[0])
    created = await client.create_agent(agent)
    live = await client.run(created.id, "hi")
    run_id = live[0].run_id
    assert [e.sequence for e in live] == list(range(1, len(live) + 1))
    assert await Client(channels[1]).watch_all(run_id) == live
    return live, await client.get_run(run_id)


@pytest.mark.parametrize("mode", MODES)
async def test_an_output_larger_than_a_nats_message_reaches_watchers_whole(
    channels: list[grpc.aio.Channel], model: OpenAIWireServer, mode: str
) -> None:
    model.enqueue(Completion(tokens=pieces(LONG_TEXT)))
    live, run = await run_and_watch(channels, openai_agent(model.base_url, mode))
    assert live[-1].run_completed.output == LONG_TEXT
    assert run.status == run_pb2.RUN_STATUS_COMPLETED
    assert run.output == LONG_TEXT


@pytest.mark.parametrize("mode", MODES)
async def test_tool_call_arguments_larger_than_a_nats_message_reach_watchers_whole(
    channels: list[grpc.aio.Channel], model: OpenAIWireServer, mode: str
) -> None:
    model.enqueue(
        Completion(
            tokens=["Let me calculate."],
            tool_calls=[WireToolCall("calculator", pieces(LONG_ARGUMENTS), id="call_long")],
        ),
        Completion(tokens=["Done."]),
    )
    live, run = await run_and_watch(channels, openai_agent(model.base_url, mode))
    requested = [e.tool_call_requested for e in live if e.HasField("tool_call_requested")]
    assert [r.tool_call.arguments_json for r in requested] == [LONG_ARGUMENTS]
    result = next(e.tool_result for e in live if e.HasField("tool_result"))
    assert result.is_error  # the calculator refuses so long an expression
    assert live[-1].run_completed.output == "Done."
    assert run.status == run_pb2.RUN_STATUS_COMPLETED
    assert run.output == "Done."
