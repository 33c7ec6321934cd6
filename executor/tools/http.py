"""HTTP tools: one endpoint of the agent's own as a tool.

A call POSTs its arguments as the JSON body, with the header Idempotency-Key
``<run id>:<tool call id>`` (the same for every attempt, so the endpoint can deduplicate a call
made again after a crash) and the headers whose values the agent names as environment variables
of the executor. The response body is the result. A connection error, a timeout, HTTP 429 or
5xx is an attempt a retry may cure (RetryableToolError, with the response's Retry-After); any
other status is a tool error for the model at once. At most the executor's largest tool output
(and one byte, to know it is more) is read: a huge response never sits in memory.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from eventstore.agent_config import HttpToolSettings, ToolSettings
from executor.tools.base import (
    RetryableToolError,
    ToolContext,
    ToolError,
    ToolRuntime,
    headers_from_env,
    register_kind,
    retry_after_seconds,
)

# An error body is only quoted to the model, never returned whole.
MAX_ERROR_BODY = 2048


class HttpTool:
    """The tool of one agent's HTTP tool settings."""

    def __init__(self, settings: ToolSettings, runtime: ToolRuntime) -> None:
        assert settings.http is not None  # (validated with the agent)
        self._settings: HttpToolSettings = settings.http
        self._name = settings.name
        self._timeout = settings.timeout
        self._runtime = runtime

    @property
    def name(self) -> str:
        return self._name

    @property
    def description(self) -> str:
        return self._settings.description

    @property
    def parameters(self) -> dict[str, Any]:
        return self._settings.parameters or {"type": "object"}

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> str:
        url = self._settings.url
        self._runtime.check_allowed(url)
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": context.idempotency_key,
            **headers_from_env(self._settings.headers_from_env),
        }
        # The loop cuts a result to the limit and marks it cut: a few bytes more than the limit
        # tell it there was more, even once a character cut in half is dropped.
        limit = self._runtime.max_output_bytes + 4
        body = json.dumps(arguments).encode()
        try:
            async with self._runtime.http.stream(
                "POST", url, content=body, headers=headers, timeout=self._timeout
            ) as response:
                read = await _read_at_most(response, limit)
        except httpx.TimeoutException:
            raise RetryableToolError(
                "timeout", f"the tool's endpoint did not answer within {self._timeout:g} s"
            ) from None
        except httpx.TransportError as exc:
            raise RetryableToolError(
                "transport", f"the tool's endpoint could not be reached: {type(exc).__name__}"
            ) from None
        status = response.status_code
        text = read.decode("utf-8", errors="replace")
        if status == 429 or status >= 500:
            raise RetryableToolError(
                f"http_{status}",
                f"the tool's endpoint answered HTTP {status}: {text[:MAX_ERROR_BODY]}",
                retry_after_seconds(response.headers.get("Retry-After")),
            )
        if not 200 <= status < 300:
            raise ToolError(f"the tool's endpoint answered HTTP {status}: {text[:MAX_ERROR_BODY]}")
        return text


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    """The first ``limit`` bytes of the body (the rest is never read: the connection is closed
    instead)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


register_kind("http", HttpTool)
