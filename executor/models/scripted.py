"""The scripted model: deterministic answers for tests, benchmarks and the demo.

An agent's ScriptedSettings either list the answers (the n-th model call of a run gives turn n,
the last turn repeating), or leave them empty for the built-in demo behaviour, decided from the
run's last user message:

- "count to N": streams the numbers 1..N as separate tokens;
- "time" or "clock": calls the clock tool, then tells the time;
- "email": calls send_email (an address in the message is the recipient), then confirms;
- "calculate EXPR": calls the calculator, then gives the result;
- "ticket": calls list_tickets if the message says "list" or "tickets", else open_ticket with
  the message as the title (the tools of the example MCP server, examples/mcp_server.py), then
  says what the tool returned;
- "recall": lists what the user said in the conversation's earlier turns;
- anything else: a reply of more than 20 tokens that quotes the input.

The same messages always give the same answer, so a replayed step is identical.

Test hook: a scripted turn whose text is CRASH_EXECUTOR_TURN kills its own process with SIGKILL
(after the agent's first-token delay) when AGENTRUN_TEST_CRASH_HOOK=1 is set in the executor's
environment, so that tests can make a step that keeps crashing its executor (a poison run).
Without that variable the turn is ordinary text.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
from collections.abc import Sequence

from eventstore.agent_config import ScriptedTurn
from eventstore.messages import ChatMessage, ToolCall
from executor.models.base import ModelReply, ModelRequest, TextSink, register_provider

_TOKEN = re.compile(r"\S+\s*|\s+")
_COUNT = re.compile(r"count to (\d+)", re.IGNORECASE)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_CALCULATE = re.compile(r"calculate\s+(.+)", re.IGNORECASE)
MAX_COUNT = 10_000
CRASH_EXECUTOR_TURN = "<test hook: crash the executor>"
CRASH_HOOK_VARIABLE = "AGENTRUN_TEST_CRASH_HOOK"


def tokens_of(text: str) -> list[str]:
    """Splits text into tokens at whitespace; whitespace stays with the token before it."""
    return _TOKEN.findall(text)


@functools.lru_cache(maxsize=4096)
def _token_count(text: str) -> int:
    """(A run's messages are counted again at each model call: once each is enough.)"""
    return len(tokens_of(text))


class ScriptedProvider:
    """A deterministic ModelProvider (see module docstring)."""

    async def complete(self, request: ModelRequest, on_text: TextSink) -> ModelReply:
        settings = request.model.scripted
        if settings.turns:
            turn = settings.turns[min(request.call_index, len(settings.turns) - 1)]
            if turn.text == CRASH_EXECUTOR_TURN and os.environ.get(CRASH_HOOK_VARIABLE) == "1":
                await asyncio.sleep(settings.first_token_delay)
                os.kill(os.getpid(), signal.SIGKILL)
            tokens, tool_calls = _scripted_turn(turn, request.call_index)
        else:
            tokens, tool_calls = _demo_answer(request.messages, request.call_index)
        for i, token in enumerate(tokens):
            delay = settings.first_token_delay if i == 0 else settings.token_delay
            if delay > 0:
                await asyncio.sleep(delay)
            on_text(token)
            if i == 0 and delay <= 0:
                # Even without delays, tokens arrive like a real model's: the first one can go
                # out while the rest are produced.
                await asyncio.sleep(0)
        if not tokens and settings.first_token_delay > 0:
            await asyncio.sleep(settings.first_token_delay)
        input_tokens = sum(_token_count(m["content"]) for m in request.messages)
        return ModelReply(
            text="".join(tokens),
            tool_calls=tool_calls,
            usage={"input_tokens": input_tokens, "output_tokens": len(tokens)},
        )

    async def aclose(self) -> None:
        return None


def _scripted_turn(turn: ScriptedTurn, call_index: int) -> tuple[list[str], list[ToolCall]]:
    calls: list[ToolCall] = [
        {"id": f"call_{call_index}_{i}", "name": c.name, "arguments_json": c.arguments_json}
        for i, c in enumerate(turn.tool_calls)
    ]
    return tokens_of(turn.text), calls


def _demo_answer(
    messages: Sequence[ChatMessage], call_index: int
) -> tuple[list[str], list[ToolCall]]:
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    text = messages[last_user]["content"]
    tool_results = [m for m in messages[last_user + 1 :] if m["role"] == "tool"]
    if tool_results:
        return tokens_of(_after_tools(messages[last_user + 1 :])), []

    def call(name: str, arguments: dict[str, str]) -> list[ToolCall]:
        return [
            {"id": f"call_{call_index}_0", "name": name, "arguments_json": json.dumps(arguments)}
        ]

    lowered = text.lower()
    count = _COUNT.search(text)
    if count:
        n = min(int(count.group(1)), MAX_COUNT)
        return [str(i) if i == 1 else f" {i}" for i in range(1, n + 1)], []
    if "email" in lowered:
        address = _EMAIL.search(text)
        to = address.group(0) if address else "someone@example.com"
        arguments = {"to": to, "subject": "A message from agentrun", "body": text}
        return tokens_of(f"I will email {to}."), call("send_email", arguments)
    if "ticket" in lowered:
        if "list" in lowered or "tickets" in lowered:
            return tokens_of("Let me list the tickets."), call("list_tickets", {})
        return tokens_of("I will open a ticket."), call("open_ticket", {"title": text})
    if "time" in lowered or "clock" in lowered:
        return tokens_of("Let me look at the clock."), call("clock", {})
    expression = _CALCULATE.search(text)
    if expression:
        return tokens_of("Let me calculate that."), call(
            "calculator", {"expression": expression.group(1).strip().rstrip("?.")}
        )
    earlier = [m["content"] for m in messages[:last_user] if m["role"] == "user"]
    if "recall" in lowered:
        said = "; ".join(f'"{e}"' for e in earlier) if earlier else "nothing yet"
        return tokens_of(f"Earlier in this conversation you said: {said}."), []
    turn = len(earlier) + 1
    reply = (
        f'You said: "{text}". This is turn {turn} of our conversation. I am the scripted demo '
        "model of agentrun, and I answer one token at a time so that you can watch the stream "
        "arrive."
    )
    return tokens_of(reply), []


def _after_tools(turn_messages: Sequence[ChatMessage]) -> str:
    """The final answer of the demo model once its tool calls have results."""
    calls = {c["id"]: c["name"] for m in turn_messages for c in m.get("tool_calls", [])}
    sentences = []
    for message in turn_messages:
        if message["role"] != "tool":
            continue
        name = calls.get(message.get("tool_call_id", ""), "tool")
        output = message["content"]
        if message.get("is_error"):
            sentences.append(f"The {name} call did not succeed: {output}")
            continue
        try:
            result = json.loads(output)
        except ValueError:
            result = {}
        if name == "clock" and isinstance(result, dict):
            sentences.append(
                f"It is {result.get('local', output)} ({result.get('timezone', 'UTC')})."
            )
        elif name == "send_email" and isinstance(result, dict):
            sentences.append(f"Done: the email to {result.get('to', '?')} was sent.")
        elif name == "calculator" and isinstance(result, dict):
            sentences.append(f"The result is {result.get('result', output)}.")
        else:
            sentences.append(f"The {name} tool returned {output}.")
    return " ".join(sentences)


register_provider("scripted", ScriptedProvider)
