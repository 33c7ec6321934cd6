"""An openai-provider agent end to end: gateway -> executor -> a local server speaking the real
Chat Completions SSE wire format (tests/openai_wire_server.py), which the test scripts.

The shared stack's executor cannot see an API key set now, so this module starts its own
executor (with the key in its environment) and gateway on the session's nats-server and a fresh
SQLite store.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from cli.launcher import Service
from tests.client import Client, assert_history_agrees, kinds, text_of
from tests.conftest import database_url_for
from tests.openai_wire_server import (
    Completion,
    HttpError,
    OpenAIWireServer,
    Truncated,
    WireToolCall,
)
from tests.stack import Stack

KEY_ENV = "E2E_OPENAI_API_KEY"
UNSET_KEY_ENV = "E2E_OPENAI_API_KEY_THAT_IS_NOT_SET"
API_KEY = f"sk-e2e-{uuid.uuid4().hex}"
MODEL = "gpt-4o-mini"
INSTRUCTIONS = "You are a precise calculator assistant."
TOOL_CALL_ID = "call_e2e_6x7"


@pytest.fixture(scope="module")
def own_stack(nats_server: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("openai-e2e")
    stack = Stack(database_url=database_url_for("sqlite", tmp / "data"), nats=nats_server, tmp=tmp)
    try:
        stack.start_executor(**{KEY_ENV: API_KEY})
        stack.start_gateway()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
async def client(own_stack: Stack) -> AsyncIterator[Client]:
    async with grpc.aio.insecure_channel(own_stack.gateways[0].address) as channel:
        yield Client(channel)


@pytest.fixture
async def server() -> AsyncIterator[OpenAIWireServer]:
    async with OpenAIWireServer() as wire_server:
        yield wire_server


def openai_agent(
    base_url: str,
    api_key_env: str = KEY_ENV,
    mode: agent_pb2.ExecutionMode.ValueType = agent_pb2.EXECUTION_MODE_CLASSIC,
    attempts: int = 0,
) -> agent_pb2.Agent:
    """``attempts``: the model calls' retry policy's, with quick retries (0: the default
    policy)."""
    agent = agent_pb2.Agent(
        id=f"openai-{uuid.uuid4().hex[:12]}",
        execution_mode=mode,
        instructions=INSTRUCTIONS,
        model=agent_pb2.ModelConfig(
            provider="openai", name=MODEL, base_url=base_url, api_key_env=api_key_env
        ),
        tools=[agent_pb2.Tool(name="calculator")],
    )
    agent.model.parameters.update({"temperature": 0.25, "max_tokens": 64})
    if attempts:
        agent.model_retry_policy.maximum_attempts = attempts
        agent.model_retry_policy.initial_interval.FromMilliseconds(20)
    return agent


def attempts_of_step(events: list[run_pb2.RunEvent], step: int) -> list[int]:
    return [
        e.step_started.attempt
        for e in events
        if e.HasField("step_started") and e.step_started.step_index == step
    ]


def one(events: list[run_pb2.RunEvent], kind: str) -> Any:
    found = [getattr(e, kind) for e in events if e.WhichOneof("kind") == kind]
    assert len(found) == 1, kinds(events)
    return found[0]


async def test_a_tool_call_round_trip_over_the_wire(
    client: Client, server: OpenAIWireServer
) -> None:
    server.enqueue(
        Completion(
            tool_calls=[
                WireToolCall("calculator", ['{"expre', 'ssion": ', '"6*7"}'], id=TOOL_CALL_ID)
            ]
        ),
        Completion(tokens=["The", " answer", " is", " 42", "."]),
    )
    agent = await client.create_agent(openai_agent(server.base_url))
    events = await client.run(agent.id, "What is 6 times 7?")

    assert kinds(events)[0] == "run_started"
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    requested = one(events, "tool_call_requested").tool_call
    assert requested.id == TOOL_CALL_ID
    assert requested.name == "calculator"
    assert json.loads(requested.arguments_json) == {"expression": "6*7"}
    result = one(events, "tool_result")
    assert result.tool_call_id == TOOL_CALL_ID
    assert result.tool_name == "calculator"
    assert not result.is_error
    assert json.loads(result.output)["result"] == 42
    assert text_of(events) == "The answer is 42."
    order = kinds(events)
    assert (
        order.index("tool_call_requested")
        < order.index("tool_result")
        < order.index("text_delta")
        < order.index("run_completed")
        == len(order) - 1
    )
    completed = events[-1].run_completed
    assert completed.output == "The answer is 42."
    # Usage is what the server reported in its usage chunks, summed over both calls.
    assert completed.usage.input_tokens == 2 * 11
    assert completed.usage.output_tokens == 2 * 7

    assert len(server.requests) == 2
    for request in server.requests:
        assert request.method == "POST"
        assert request.path == "/v1/chat/completions"
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
        body = request.body
        assert body["model"] == MODEL
        assert body["stream"] is True
        assert body["temperature"] == 0.25
        assert body["max_tokens"] == 64
        assert [t["function"]["name"] for t in body["tools"]] == ["calculator"]
    first, second = (r.body["messages"] for r in server.requests)
    assert first == [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": "What is 6 times 7?"},
    ]
    assert second[:2] == first
    assistant, tool = second[2:]
    assert assistant["role"] == "assistant"
    assert [c["id"] for c in assistant["tool_calls"]] == [TOOL_CALL_ID]
    assert assistant["tool_calls"][0]["type"] == "function"
    assert assistant["tool_calls"][0]["function"]["name"] == "calculator"
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"expression": "6*7"}
    assert tool["role"] == "tool"
    assert tool["tool_call_id"] == TOOL_CALL_ID
    assert json.loads(tool["content"])["result"] == 42

    run = await client.get_run(events[0].run_id)
    assert run.status == run_pb2.RUN_STATUS_COMPLETED
    assert run.output == "The answer is 42."


async def test_the_next_run_of_a_conversation_sends_the_earlier_turns(
    client: Client, server: OpenAIWireServer
) -> None:
    server.enqueue(Completion(tokens=["Hello", " Ada."]), Completion(tokens=["You are Ada."]))
    agent = await client.create_agent(openai_agent(server.base_url))
    first = await client.run(agent.id, "I am Ada.")
    assert first[-1].run_completed.output == "Hello Ada."
    conversation_id = first[0].run_started.run.conversation_id
    second = await client.run(agent.id, "Who am I?", conversation_id=conversation_id)
    assert second[-1].run_completed.output == "You are Ada."
    assert server.requests[1].body["messages"] == [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": "I am Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "Who am I?"},
    ]


async def test_an_http_500_on_every_attempt_fails_the_run_with_a_retryable_model_error(
    client: Client, server: OpenAIWireServer
) -> None:
    error_500 = HttpError(500, "The server had an error while processing your request.")
    server.enqueue(error_500, error_500)
    agent = await client.create_agent(openai_agent(server.base_url, attempts=2))
    events = await client.run(agent.id, "What is 6 times 7?")
    assert kinds(events)[-1] == "run_failed", kinds(events)
    assert attempts_of_step(events, 1) == [1, 2]
    error = events[-1].run_failed.error
    assert error.code == run_pb2.RUN_ERROR_CODE_MODEL_ERROR
    assert error.retryable
    assert "HTTP 500" in error.message
    assert "The server had an error while processing your request." in error.message
    assert "after 2 attempts" in error.message
    assert API_KEY not in error.message
    assert len(server.requests) == 2
    run = await client.get_run(events[0].run_id)
    assert run.status == run_pb2.RUN_STATUS_FAILED
    assert run.error.code == run_pb2.RUN_ERROR_CODE_MODEL_ERROR
    assert run.error.retryable


async def test_an_http_401_fails_the_run_with_a_model_error_that_is_not_retryable(
    client: Client, server: OpenAIWireServer
) -> None:
    server.enqueue(HttpError(401, "Incorrect API key provided.", code="invalid_api_key"))
    agent = await client.create_agent(openai_agent(server.base_url))
    events = await client.run(agent.id, "hi")
    error = events[-1].run_failed.error
    assert error.code == run_pb2.RUN_ERROR_CODE_MODEL_ERROR
    assert not error.retryable
    assert "HTTP 401" in error.message
    assert "Incorrect API key provided." in error.message
    assert API_KEY not in error.message
    assert len(server.requests) == 1


async def test_an_api_key_variable_the_executor_lacks_fails_without_calling_the_server(
    client: Client, server: OpenAIWireServer
) -> None:
    agent = await client.create_agent(openai_agent(server.base_url, api_key_env=UNSET_KEY_ENV))
    events = await client.run(agent.id, "hi")
    error = events[-1].run_failed.error
    assert error.code == run_pb2.RUN_ERROR_CODE_MODEL_ERROR
    assert not error.retryable
    assert UNSET_KEY_ENV in error.message
    assert server.requests == []


@pytest.mark.parametrize(
    "mode",
    [agent_pb2.EXECUTION_MODE_CLASSIC, agent_pb2.EXECUTION_MODE_DURABLE],
    ids=["classic", "durable"],
)
async def test_a_model_call_that_fails_retryably_is_tried_again_and_the_run_completes(
    client: Client, server: OpenAIWireServer, mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    """A 503, then a stream cut off mid-answer, then the answer: the client sees three
    attempts of the step and keeps the text of the last one only."""
    server.enqueue(
        HttpError(503, "The engine is currently overloaded."),
        Truncated(tokens=["The", " ans"]),
        Completion(tokens=["The", " answer", " is", " 42", "."]),
    )
    agent = await client.create_agent(openai_agent(server.base_url, mode=mode, attempts=3))
    events = await client.run(agent.id, "What is 6 times 7?")

    assert kinds(events)[-1] == "run_completed", kinds(events)
    assert attempts_of_step(events, 1) == [1, 2, 3]
    texts = {
        attempt: "".join(
            e.text_delta.text
            for e in events
            if e.HasField("text_delta") and e.text_delta.attempt == attempt
        )
        for attempt in (1, 2, 3)
    }
    assert texts == {1: "", 2: "The ans", 3: "The answer is 42."}
    assert events[-1].run_completed.output == "The answer is 42."
    assert len(server.requests) == 3
    run_id = events[0].run_id
    run = await client.get_run(run_id)
    assert run.status == run_pb2.RUN_STATUS_COMPLETED
    assert run.output == "The answer is 42."
    await assert_history_agrees(client, run_id, events)
    if mode == agent_pb2.EXECUTION_MODE_DURABLE:
        call = client.runs.ListRunEvents(
            run_service_pb2.ListRunEventsRequest(run_id=run_id), metadata=client.metadata
        )
        stored = [event async for response in call for event in response.events]
        failures = [json.loads(e.payload_json) for e in stored if e.type == "ModelCallFailed"]
        assert [(f["attempt"], f["code"], f["retryable"]) for f in failures] == [
            (1, "http_503", True),
            (2, "stream_incomplete", True),
        ]
        assert [e.type for e in stored][-2:] == ["ModelCallCompleted", "Completed"]
