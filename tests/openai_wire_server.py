"""A local HTTP/1.1 server speaking the real Chat Completions streaming wire format, for tests.

Tests script it with a queue of responses and read back every request it received::

    async with OpenAIWireServer() as server:
        server.enqueue(Completion(tokens=["Hel", "lo"]))
        ...  # point a provider at server.base_url
        assert server.requests[0].body["stream"] is True

Streams are sent as OpenAI sends them: ``text/event-stream`` over chunked transfer encoding,
one ``data: {...chat.completion.chunk...}`` event per chunk, tool calls split into an opening
delta (index, id, type, function name) and argument fragments, a closing chunk carrying the
finish reason, a usage chunk with ``choices: []`` when ``stream_options.include_usage`` is set,
then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

COMPLETIONS_PATH = "/v1/chat/completions"
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    408: "Request Timeout",
    411: "Length Required",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class WireToolCall:
    """A tool call streamed as an opening delta then one delta per argument fragment."""

    name: str
    argument_fragments: Sequence[str]
    id: str | None = None  # None: the opening delta carries no id (some servers do that)


@dataclass(frozen=True)
class Completion:
    """A well-formed streamed completion: text tokens, then tool calls, then the finish.

    With ``stall_after`` set, the server sends the role chunk and that many tokens, then sends
    nothing more until the client hangs up (see ``OpenAIWireServer.stalled``/``disconnected``).
    """

    tokens: Sequence[str] = ()
    tool_calls: Sequence[WireToolCall] = ()
    prompt_tokens: int = 11
    completion_tokens: int = 7
    finish_reason: str | None = None  # None: "tool_calls" if there are any, else "stop"
    stall_after: int | None = None


@dataclass(frozen=True)
class Truncated:
    """A stream that stops after some tokens, with no finish reason and no ``[DONE]``.

    ``abort=False`` ends the HTTP body properly (the SSE stream just stops); ``abort=True``
    closes the connection in the middle of the chunked body.
    """

    tokens: Sequence[str] = ()
    abort: bool = False


@dataclass(frozen=True)
class HttpError:
    """An HTTP error with an OpenAI-style error body (or ``raw_body`` verbatim if given)."""

    status: int
    message: str = ""
    type: str = "invalid_request_error"
    code: str | None = None
    raw_body: str | None = None


@dataclass(frozen=True)
class RawStream:
    """A 200 ``text/event-stream`` response whose body is ``body``, written verbatim."""

    body: str


Response = Completion | Truncated | HttpError | RawStream


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    raw_body: bytes

    @property
    def body(self) -> Any:
        return json.loads(self.raw_body)


@dataclass
class OpenAIWireServer:
    """Serves scripted responses on 127.0.0.1 at a free port, one per request, in order."""

    model: str = "gpt-4o-mini-2024-07-18"
    responses: deque[Response] = field(default_factory=deque)
    requests: list[RecordedRequest] = field(default_factory=list)
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _sequence: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def enqueue(self, *responses: Response) -> None:
        self.responses.extend(responses)

    async def __aenter__(self) -> OpenAIWireServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while await self._serve_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serves one request; False when the connection is to be closed."""
        request_line = await reader.readline()
        if not request_line:
            return False
        method, path, _ = request_line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:
            await self._send_json(writer, 411, {"error": {"message": "Content-Length needed"}})
            return False
        raw_body = await reader.readexactly(int(headers["content-length"]))
        self.requests.append(RecordedRequest(method, path, headers, raw_body))
        if path != COMPLETIONS_PATH:
            await self._send_json(writer, 404, _error_body(f"Unknown path {path}", "not_found"))
            return True
        if not self.responses:
            await self._send_json(writer, 500, _error_body("no scripted response left", "test"))
            return True
        response = self.responses.popleft()
        if isinstance(response, HttpError):
            body = response.raw_body
            if body is None:
                body = json.dumps(_error_body(response.message, response.type, response.code))
            await self._send(writer, response.status, "application/json", body.encode())
            return True
        await self._start_stream(writer)
        if isinstance(response, RawStream):
            await _send_chunk(writer, response.body.encode())
        elif isinstance(response, Truncated):
            for data in self._chunks(response.tokens, [], None):
                await _send_chunk(writer, _sse(data))
            if response.abort:
                return False
        else:
            options = json.loads(raw_body).get("stream_options") or {}
            include_usage = bool(options.get("include_usage"))
            if not await self._stream_completion(reader, writer, response, include_usage):
                return False
        await _send_chunk(writer, b"")  # the chunked body's terminator
        return True

    async def _stream_completion(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        response: Completion,
        include_usage: bool,
    ) -> bool:
        """Streams a completion; False if it stalled and the client hung up."""
        stall = response.stall_after
        finish: str | None = None
        if stall is None:
            finish = response.finish_reason or ("tool_calls" if response.tool_calls else "stop")
        tokens = response.tokens if stall is None else response.tokens[:stall]
        tool_calls = response.tool_calls if stall is None else ()
        for data in self._chunks(tokens, tool_calls, finish, include_usage):
            await _send_chunk(writer, _sse(data))
        if stall is not None:
            self.stalled.set()
            while await reader.read(65536):
                pass  # nothing more is sent; wait for the client to hang up
            self.disconnected.set()
            return False
        if include_usage:
            usage = {
                "prompt_tokens": response.prompt_tokens,
                "completion_tokens": response.completion_tokens,
                "total_tokens": response.prompt_tokens + response.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            }
            await _send_chunk(writer, _sse(self._chunk(None, usage=usage)))
        await _send_chunk(writer, _sse("[DONE]"))
        return True

    def _chunks(
        self,
        tokens: Sequence[str],
        tool_calls: Sequence[WireToolCall],
        finish: str | None,
        include_usage: bool = False,
    ) -> list[str]:
        """The ``data:`` payloads of a stream up to and including its finish chunk."""
        self._sequence += 1
        completion_id = f"chatcmpl-test{self._sequence:08d}"
        usage: dict[str, Any] = {"usage": None} if include_usage else {}
        payloads: list[dict[str, Any]] = [{"role": "assistant", "content": "", "refusal": None}]
        payloads += [{"content": token} for token in tokens]
        for index, call in enumerate(tool_calls):
            opening: dict[str, Any] = {"index": index, "type": "function"}
            if call.id is not None:
                opening["id"] = call.id
            opening["function"] = {"name": call.name, "arguments": ""}
            payloads.append({"tool_calls": [opening]})
            payloads += [
                {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
                for fragment in call.argument_fragments
            ]
        chunks = [
            self._chunk(completion_id, {"delta": delta, "finish_reason": None}, **usage)
            for delta in payloads
        ]
        if finish is not None:
            chunks.append(
                self._chunk(completion_id, {"delta": {}, "finish_reason": finish}, **usage)
            )
        return chunks

    def _chunk(
        self, completion_id: str | None, choice: dict[str, Any] | None = None, **extra: Any
    ) -> str:
        chunk: dict[str, Any] = {
            "id": completion_id or f"chatcmpl-test{self._sequence:08d}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": "fp_test0001",
            "choices": [] if choice is None else [{"index": 0, **choice, "logprobs": None}],
        }
        chunk.update(extra)
        return json.dumps(chunk, separators=(",", ":"))

    async def _start_stream(self, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream; charset=utf-8\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"Cache-Control: no-cache\r\n"
            b"Connection: keep-alive\r\n\r\n"
        )
        await writer.drain()

    async def _send_json(self, writer: asyncio.StreamWriter, status: int, body: Any) -> None:
        await self._send(writer, status, "application/json", json.dumps(body).encode())

    async def _send(
        self, writer: asyncio.StreamWriter, status: int, content_type: str, body: bytes
    ) -> None:
        reason = REASONS.get(status, "Error")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n".encode()
            + body
        )
        await writer.drain()


def _error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


async def _send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Writes one HTTP chunk (an empty one ends the body)."""
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()
