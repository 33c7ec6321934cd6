"""The openai provider against a local server speaking the real Chat Completions wire format."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from eventstore.agent_config import ModelSettings
from eventstore.messages import ChatMessage
from executor.models.base import ModelError, ModelReply, ModelRequest, ToolSpec
from executor.models.openai import OpenAIProvider
from tests.openai_wire_server import (
    Completion,
    HttpError,
    OpenAIWireServer,
    RawStream,
    Truncated,
    WireToolCall,
)

GUARD = 10.0  # seconds; only bounds a hang so a broken provider fails instead of stalling CI


@pytest.fixture
async def server() -> AsyncIterator[OpenAIWireServer]:
    async with OpenAIWireServer() as wire_server:
        yield wire_server


@pytest.fixture
async def provider() -> AsyncIterator[OpenAIProvider]:
    openai = OpenAIProvider()
    yield openai
    await openai.aclose()


def make_request(
    base_url: str,
    *,
    messages: list[ChatMessage] | None = None,
    instructions: str = "",
    tools: tuple[ToolSpec, ...] = (),
    parameters: dict[str, Any] | None = None,
    api_key_env: str = "",
    call_index: int = 0,
) -> ModelRequest:
    settings = ModelSettings(
        provider="openai",
        name="gpt-4o-mini",
        parameters=parameters or {},
        base_url=base_url,
        api_key_env=api_key_env,
    )
    return ModelRequest(
        model=settings,
        instructions=instructions,
        messages=messages if messages is not None else [{"role": "user", "content": "Hi"}],
        tools=tools,
        call_index=call_index,
    )


async def call(provider: OpenAIProvider, request: ModelRequest) -> tuple[list[str], ModelReply]:
    """Runs one call that must succeed; returns the streamed text pieces and the reply."""
    pieces: list[str] = []
    reply = await provider.complete(request, pieces.append)
    return pieces, reply


async def failing_call(
    provider: OpenAIProvider, request: ModelRequest
) -> tuple[list[str], ModelError]:
    """Runs one call that must fail; returns the streamed text pieces and the error."""
    pieces: list[str] = []
    with pytest.raises(ModelError) as caught:
        await provider.complete(request, pieces.append)
    return pieces, caught.value


async def test_text_streams_tokens_in_order(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    tokens = ["Hel", "lo", ",", " wor", "ld", "!"]
    server.enqueue(Completion(tokens=tokens), Completion(tokens=["Again"]))

    pieces, reply = await call(provider, make_request(server.base_url))

    assert pieces == tokens
    assert reply.text == "Hello, world!"
    assert reply.tool_calls == []
    # The shared client serves the next call too.
    pieces, reply = await call(provider, make_request(server.base_url))
    assert (pieces, reply.text) == (["Again"], "Again")
    assert len(server.requests) == 2


async def test_tool_calls_split_across_chunks(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    server.enqueue(
        Completion(
            tokens=["Let me ", "check."],
            tool_calls=[
                WireToolCall("clock", ['{"time', 'zone": "Eur', 'ope/Paris"}'], id="call_aaa"),
                WireToolCall("calculator", ['{"expr', 'ession": ', '"2+2"}'], id="call_bbb"),
            ],
        )
    )

    pieces, reply = await call(provider, make_request(server.base_url))

    assert pieces == ["Let me ", "check."]
    assert reply.text == "Let me check."
    assert reply.tool_calls == [
        {"id": "call_aaa", "name": "clock", "arguments_json": '{"timezone": "Europe/Paris"}'},
        {"id": "call_bbb", "name": "calculator", "arguments_json": '{"expression": "2+2"}'},
    ]


async def test_tool_call_without_id_gets_a_deterministic_one(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    server.enqueue(
        Completion(tool_calls=[WireToolCall("clock", ["{}"]), WireToolCall("clock", [])])
    )

    _, reply = await call(provider, make_request(server.base_url, call_index=3))

    assert [(c["id"], c["arguments_json"]) for c in reply.tool_calls] == [
        ("call_3_0", "{}"),
        ("call_3_1", "{}"),
    ]


async def test_usage_comes_from_the_usage_chunk(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    server.enqueue(Completion(tokens=["ok"], prompt_tokens=1234, completion_tokens=56))

    _, reply = await call(provider, make_request(server.base_url))

    assert reply.usage == {"input_tokens": 1234, "output_tokens": 56}


async def test_sse_framing_variants_and_missing_usage(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    # A keep-alive comment, an event field, "data:" without a space, CRLF line endings, an
    # event split over two data lines, no usage chunk, and a [DONE] without its blank line.
    chunk = '{"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":%s}]}'
    server.enqueue(
        RawStream(
            ": OPENROUTER PROCESSING\n\n"
            f"event: message\ndata:{chunk % ('A', 'null')}\n\n"
            f"data: {chunk % ('B', 'null')}\r\n\r\n"
            'data: {"choices":[{"index":0,\ndata: "delta":{"content":"C"},"finish_reason":"stop"}]}'
            "\n\n"
            "data: [DONE]"
        )
    )

    pieces, reply = await call(provider, make_request(server.base_url))

    assert pieces == ["A", "B", "C"]
    assert reply.usage == {"input_tokens": 0, "output_tokens": 0}


async def test_request_body_and_headers(
    server: OpenAIWireServer, provider: OpenAIProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-secret")
    server.enqueue(Completion(tokens=["Done."]))
    history: list[ChatMessage] = [
        {"role": "user", "content": "What time is it, and what is 2+2?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_1", "name": "clock", "arguments_json": "{}"},
                {"id": "call_2", "name": "calculator", "arguments_json": '{"expression":"2+2"}'},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00", "is_error": False},
        {"role": "tool", "tool_call_id": "call_2", "content": "4", "is_error": False},
        {"role": "assistant", "content": "Noon, and 4."},
        {"role": "user", "content": "Thanks"},
    ]
    calculator = ToolSpec(
        name="calculator",
        description="Evaluates arithmetic.",
        parameters={"type": "object", "properties": {"expression": {"type": "string"}}},
    )
    request = make_request(
        server.base_url + "/",
        messages=history,
        instructions="You are terse.",
        tools=(calculator,),
        parameters={
            "temperature": 0.2,
            "max_tokens": 50,
            "model": "not-this-one",
            "stream": False,
            "messages": [],
            "tools": [],
        },
        api_key_env="TEST_OPENAI_KEY",
    )

    await call(provider, request)

    [received] = server.requests
    assert (received.method, received.path) == ("POST", "/v1/chat/completions")
    assert received.headers["authorization"] == "Bearer sk-test-secret"
    assert received.headers["content-type"] == "application/json"
    assert received.body == {
        "model": "gpt-4o-mini",
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
        "max_tokens": 50,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What time is it, and what is 2+2?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "clock", "arguments": "{}"},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "calculator", "arguments": '{"expression":"2+2"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
            {"role": "tool", "tool_call_id": "call_2", "content": "4"},
            {"role": "assistant", "content": "Noon, and 4."},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "calculator",
                    "description": "Evaluates arithmetic.",
                    "parameters": {
                        "type": "object",
                        "properties": {"expression": {"type": "string"}},
                    },
                },
            }
        ],
    }


async def test_no_instructions_no_tools_no_key(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    server.enqueue(Completion(tokens=["ok"]))

    await call(provider, make_request(server.base_url, parameters={"tools": [{"x": 1}]}))

    [received] = server.requests
    assert "authorization" not in received.headers
    assert received.body["messages"] == [{"role": "user", "content": "Hi"}]
    assert "tools" not in received.body


async def test_unset_api_key_variable_fails_without_calling(
    server: OpenAIWireServer, provider: OpenAIProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_OPENAI_KEY", raising=False)

    _, error = await failing_call(
        provider, make_request(server.base_url, api_key_env="TEST_OPENAI_KEY")
    )

    assert not error.retryable
    assert error.code == "missing_api_key"
    assert "TEST_OPENAI_KEY" in error.message
    assert server.requests == []


async def test_http_429_is_retryable(server: OpenAIWireServer, provider: OpenAIProvider) -> None:
    server.enqueue(
        HttpError(429, "Rate limit reached for gpt-4o-mini.", "requests", "rate_limit_exceeded")
    )

    pieces, error = await failing_call(provider, make_request(server.base_url))

    assert error.retryable
    assert "429" in error.message
    assert "Rate limit reached for gpt-4o-mini." in error.message
    assert pieces == []


async def test_http_400_is_not_retryable_and_carries_the_server_message(
    server: OpenAIWireServer, provider: OpenAIProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-secret")
    server.enqueue(HttpError(400, "Invalid value for 'temperature': must be at most 2."))

    _, error = await failing_call(
        provider, make_request(server.base_url, api_key_env="TEST_OPENAI_KEY")
    )

    assert not error.retryable
    assert "400" in error.message
    assert "Invalid value for 'temperature': must be at most 2." in error.message
    assert "sk-test-secret" not in str(error)


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(401, False), (404, False), (408, True), (409, True), (500, True), (503, True)],
)
async def test_http_status_retryability(
    server: OpenAIWireServer, provider: OpenAIProvider, status: int, retryable: bool
) -> None:
    server.enqueue(HttpError(status, f"status {status}"))

    _, error = await failing_call(provider, make_request(server.base_url))

    assert error.retryable is retryable
    assert error.code == f"http_{status}"
    assert f"status {status}" in error.message


async def test_http_error_without_json_body_is_truncated(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    server.enqueue(HttpError(502, raw_body="<html>Bad gateway</html>" + "x" * 2000))

    _, error = await failing_call(provider, make_request(server.base_url))

    assert error.retryable
    assert "502" in error.message
    assert "<html>Bad gateway</html>" in error.message
    assert "x" * 501 not in error.message


@pytest.mark.parametrize(
    ("bad", "complaint"),
    [
        ('{"choices":[{"delta":', "malformed JSON"),
        ('{"choices":{"0":{"delta":{}}}}', "malformed stream chunk"),
        ("[1, 2]", "malformed stream chunk"),
    ],
    ids=["broken-json", "wrong-shape", "not-an-object"],
)
async def test_malformed_chunk_is_a_non_retryable_error(
    server: OpenAIWireServer, provider: OpenAIProvider, bad: str, complaint: str
) -> None:
    good = '{"choices":[{"index":0,"delta":{"content":"fine"},"finish_reason":null}]}'
    server.enqueue(RawStream(f"data: {good}\n\ndata: {bad}\n\ndata: [DONE]\n\n"))

    pieces, error = await failing_call(provider, make_request(server.base_url))

    assert pieces == ["fine"]
    assert not error.retryable
    assert error.code == "malformed"
    assert complaint in error.message
    assert bad in error.message


async def test_error_event_in_the_stream(
    server: OpenAIWireServer, provider: OpenAIProvider
) -> None:
    event = '{"error":{"message":"The server had an error.","type":"server_error"}}'
    server.enqueue(RawStream(f"data: {event}\n\n"))

    _, error = await failing_call(provider, make_request(server.base_url))

    assert error.retryable
    assert error.code == "stream_error"
    assert "The server had an error." in error.message


@pytest.mark.parametrize("abort", [False, True], ids=["stream-ends", "connection-drops"])
async def test_truncated_stream_is_a_retryable_error(
    server: OpenAIWireServer, provider: OpenAIProvider, abort: bool
) -> None:
    server.enqueue(Truncated(tokens=["Once ", "upon"], abort=abort))

    pieces, error = await failing_call(provider, make_request(server.base_url))

    assert pieces == ["Once ", "upon"]
    assert error.retryable
    # A body that ends early; a connection that drops mid-body.
    assert error.code == ("transport" if abort else "stream_incomplete")


async def test_connection_refused_is_retryable(provider: OpenAIProvider) -> None:
    with socket.socket() as sock:  # a port nobody listens on once this socket closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    _, error = await failing_call(provider, make_request(f"http://127.0.0.1:{port}/v1"))

    assert error.retryable
    assert error.code == "transport"


async def test_cancelling_mid_stream_closes_the_connection(server: OpenAIWireServer) -> None:
    # A read timeout far beyond the guard: only cancellation can end the stalled call in time.
    provider = OpenAIProvider(read_timeout=3600.0)
    server.enqueue(Completion(tokens=["one ", "two ", "three"], stall_after=2))
    pieces: list[str] = []
    two_tokens = asyncio.Event()

    def on_text(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 2:
            two_tokens.set()

    try:
        task = asyncio.create_task(provider.complete(make_request(server.base_url), on_text))
        async with asyncio.timeout(GUARD):
            await two_tokens.wait()
            await server.stalled.wait()
        task.cancel()
        async with asyncio.timeout(GUARD):
            with pytest.raises(asyncio.CancelledError):
                await task
            await server.disconnected.wait()
        assert pieces == ["one ", "two "]
        # The provider still works after a cancelled call.
        server.enqueue(Completion(tokens=["after"]))
        _, reply = await call(provider, make_request(server.base_url))
        assert reply.text == "after"
    finally:
        await provider.aclose()
