"""The openai provider: any OpenAI-compatible Chat Completions endpoint, streamed over SSE.

Works against OpenAI, vLLM, Ollama and the llama.cpp server. The API key is read from the
environment variable the agent's settings name; it only ever goes into the request header.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import httpx

from common.errors import InvalidArgument
from eventstore.agent_config import ModelSettings
from eventstore.messages import ChatMessage, ToolCall, Usage
from executor.models.base import (
    ModelError,
    ModelReply,
    ModelRequest,
    TextSink,
    register_provider,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RESERVED_BODY_KEYS = frozenset({"model", "messages", "stream", "stream_options", "tools"})
ERROR_BODY_LIMIT = 500


def check_settings(settings: ModelSettings) -> None:
    """What an agent of this provider must set."""
    if not settings.name:
        raise InvalidArgument("agent.model.name", "is required for the openai provider")


def is_retryable_status(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


def to_wire_message(message: ChatMessage) -> dict[str, Any]:
    """One stored chat message in the Chat Completions request format."""
    role = message["role"]
    if role == "tool":
        return {
            "role": "tool",
            "tool_call_id": message.get("tool_call_id", ""),
            "content": message["content"],
        }
    if role == "assistant" and message.get("tool_calls"):
        return {
            "role": "assistant",
            "content": message["content"] or None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments_json"]},
                }
                for call in message.get("tool_calls", [])
            ],
        }
    return {"role": role, "content": message["content"]}


def request_body(request: ModelRequest) -> dict[str, Any]:
    """The JSON body of the call. Settings parameters never override what the call is."""
    settings = request.model
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    messages.extend(to_wire_message(m) for m in request.messages)
    body = {k: v for k, v in settings.parameters.items() if k not in RESERVED_BODY_KEYS}
    body.update(
        model=settings.name,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.parameters,
                },
            }
            for tool in request.tools
        ]
    return body


def http_error(status: int, body: bytes) -> ModelError:
    """A ModelError for an HTTP error response, with the server's own message."""
    text = body.decode("utf-8", errors="replace")
    detail = text[:ERROR_BODY_LIMIT]
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, too deep
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        detail = error["message"][:ERROR_BODY_LIMIT]
    elif isinstance(error, str):
        detail = error[:ERROR_BODY_LIMIT]
    return ModelError(
        f"openai: HTTP {status}: {detail}",
        code=f"http_{status}",
        retryable=is_retryable_status(status),
    )


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


class _Stream:
    """Folds the chunks of one streamed completion into a reply."""

    def __init__(self, on_text: TextSink) -> None:
        self.on_text = on_text
        self.text: list[str] = []
        self.calls: dict[int, _PartialCall] = {}
        self.usage: Usage = {"input_tokens": 0, "output_tokens": 0}
        self.finished = False
        self.finish_reason = ""

    def feed(self, data: str) -> None:
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise ModelError(
                f"openai: malformed JSON in stream chunk ({exc}): {data[:200]!r}", code="malformed"
            ) from None
        try:
            content = self._apply(chunk)
        except (AttributeError, LookupError, TypeError, ValueError):
            raise ModelError(
                f"openai: malformed stream chunk: {data[:200]!r}", code="malformed"
            ) from None
        if content:
            self.text.append(content)
            self.on_text(content)

    def _apply(self, chunk: Any) -> str:
        """Takes in one chunk's usage, finish reason and tool calls; returns its text."""
        error = chunk.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            retryable = error.get("type") == "server_error" or (
                isinstance(code, int) and is_retryable_status(code)
            )
            raise ModelError(
                f"openai: error in stream: {error.get('message')}",
                code="stream_error",
                retryable=retryable,
            )
        if usage := chunk.get("usage"):
            self.usage = {
                "input_tokens": int(usage.get("prompt_tokens") or 0),
                "output_tokens": int(usage.get("completion_tokens") or 0),
            }
        if not chunk.get("choices"):
            return ""
        choice = chunk["choices"][0]
        if reason := choice.get("finish_reason"):
            self.finished, self.finish_reason = True, str(reason)
        delta = choice.get("delta") or {}
        for position, call in enumerate(delta.get("tool_calls") or []):
            partial = self.calls.setdefault(int(call.get("index", position)), _PartialCall())
            function = call.get("function") or {}
            partial.id = partial.id or call.get("id") or ""
            partial.name = partial.name or function.get("name") or ""
            partial.arguments += function.get("arguments") or ""
        content = delta.get("content")
        return content if isinstance(content, str) else ""

    def reply(self, call_index: int) -> ModelReply:
        tool_calls: list[ToolCall] = [
            {
                "id": call.id or f"call_{call_index}_{index}",
                "name": call.name,
                "arguments_json": call.arguments or "{}",
            }
            for index, call in sorted(self.calls.items())
        ]
        return ModelReply(
            text="".join(self.text),
            tool_calls=tool_calls,
            usage=self.usage,
            finish_reason=self.finish_reason,
        )


class OpenAIProvider:
    """Streams Chat Completions calls over one shared HTTP client, created on first use."""

    def __init__(self, *, connect_timeout: float = 10.0, read_timeout: float = 120.0) -> None:
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def complete(self, request: ModelRequest, on_text: TextSink) -> ModelReply:
        settings = request.model
        url = (settings.base_url or DEFAULT_BASE_URL).rstrip("/") + "/chat/completions"
        headers = {"Accept": "text/event-stream"}
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env)
            if not key:
                raise ModelError(
                    f"openai: environment variable {settings.api_key_env} (the API key) is not set",
                    code="missing_api_key",
                )
            headers["Authorization"] = f"Bearer {key}"
        stream = _Stream(on_text)
        # httpx errors are not chained (``from None``): they hold the request, key and all.
        try:
            async with self._http().stream(
                "POST", url, json=request_body(request), headers=headers
            ) as response:
                if response.status_code >= 400:
                    raise http_error(response.status_code, await response.aread())
                done = await _read_events(response, stream)
        except httpx.UnsupportedProtocol as exc:
            raise ModelError(
                f"openai: bad base_url {settings.base_url!r}: {exc}", code="bad_base_url"
            ) from None
        except httpx.TransportError as exc:
            raise ModelError(
                f"openai: {type(exc).__name__} talking to {url}: {exc}",
                code="transport",
                retryable=True,
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ModelError(
                f"openai: {type(exc).__name__} talking to {url}: {exc}", code="http"
            ) from None
        if not done and not stream.finished:
            raise ModelError(
                "openai: the stream ended before the completion did",
                code="stream_incomplete",
                retryable=True,
            )
        return stream.reply(request.call_index)


async def _read_events(response: httpx.Response, stream: _Stream) -> bool:
    """Feeds each SSE event's data to ``stream``; True once ``[DONE]`` arrives."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line:
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value.removeprefix(" "))
            continue
        if not data:
            continue
        event, data = "\n".join(data), []
        if event.strip() == "[DONE]":
            return True
        stream.feed(event)
    # An event cut off by the end of the stream is dropped, bar a [DONE] lacking its blank line.
    return "\n".join(data).strip() == "[DONE]"


register_provider("openai", OpenAIProvider, check_settings)
