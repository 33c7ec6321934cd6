"""Chat messages as the model sees them, in JSON-native form so that they store as they are."""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict


class ToolCall(TypedDict):
    """A tool call the model asked for. ``id`` is unique within the run."""

    id: str
    name: str
    arguments_json: str


class Usage(TypedDict):
    input_tokens: int
    output_tokens: int


class ChatMessage(TypedDict):
    """One message of a conversation, in the shape of the Chat Completions API."""

    role: Literal["user", "assistant", "tool"]
    content: str
    tool_calls: NotRequired[list[ToolCall]]
    tool_call_id: NotRequired[str]
    is_error: NotRequired[bool]


def user_message(text: str) -> ChatMessage:
    return {"role": "user", "content": text}


def assistant_message(text: str, tool_calls: list[ToolCall]) -> ChatMessage:
    message: ChatMessage = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def tool_message(tool_call_id: str, output: str, is_error: bool) -> ChatMessage:
    return {"role": "tool", "content": output, "tool_call_id": tool_call_id, "is_error": is_error}


def no_usage() -> Usage:
    return {"input_tokens": 0, "output_tokens": 0}


def add_usage(a: Usage, b: Usage) -> Usage:
    return {
        "input_tokens": a["input_tokens"] + b["input_tokens"],
        "output_tokens": a["output_tokens"] + b["output_tokens"],
    }
