"""The scripted model: tokenising, scripted turns, and the demo behaviours."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from eventstore.agent_config import ModelSettings, ScriptedSettings, ScriptedToolCall, ScriptedTurn
from eventstore.messages import (
    ChatMessage,
    ToolCall,
    assistant_message,
    tool_message,
    user_message,
)
from executor.models.base import ModelReply, ModelRequest
from executor.models.scripted import MAX_COUNT, ScriptedProvider, tokens_of


async def complete(
    messages: Sequence[ChatMessage],
    turns: tuple[ScriptedTurn, ...] = (),
    call_index: int = 0,
) -> tuple[ModelReply, list[str]]:
    """One model call without delays; returns the reply and the tokens streamed."""
    model = ModelSettings(
        provider="scripted",
        scripted=ScriptedSettings(first_token_delay=0, token_delay=0, turns=turns),
    )
    request = ModelRequest(model=model, instructions="", messages=messages, call_index=call_index)
    streamed: list[str] = []
    reply = await ScriptedProvider().complete(request, streamed.append)
    assert reply.text == "".join(streamed)
    assert reply.usage["output_tokens"] == len(streamed)
    return reply, streamed


def arguments(call: ToolCall) -> object:
    return json.loads(call["arguments_json"])


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", []),
        ("hello", ["hello"]),
        ("Hello world", ["Hello ", "world"]),
        ("a  b\n\tc ", ["a  ", "b\n\t", "c "]),
        ("  leading", ["  ", "leading"]),
        ("It's 10:00, okay?", ["It's ", "10:00, ", "okay?"]),
    ],
)
def test_tokens_of_keeps_whitespace_with_the_token_before_it(text: str, tokens: list[str]) -> None:
    assert tokens_of(text) == tokens
    assert "".join(tokens_of(text)) == text


async def test_scripted_turns_follow_the_call_index_and_the_last_repeats() -> None:
    turns = (
        ScriptedTurn("First answer."),
        ScriptedTurn(
            "Calling tools.",
            tool_calls=(
                ScriptedToolCall("clock", "{}"),
                ScriptedToolCall("calculator", '{"expression": "6*7"}'),
            ),
        ),
        ScriptedTurn("The end."),
    )
    messages = [user_message("anything at all")]

    first, first_tokens = await complete(messages, turns, call_index=0)
    second, _ = await complete(messages, turns, call_index=1)
    third, _ = await complete(messages, turns, call_index=2)
    later, _ = await complete(messages, turns, call_index=9)

    assert (first.text, first_tokens, first.tool_calls) == (
        "First answer.",
        ["First ", "answer."],
        [],
    )
    assert second.text == "Calling tools."
    assert second.tool_calls == [
        {"id": "call_1_0", "name": "clock", "arguments_json": "{}"},
        {"id": "call_1_1", "name": "calculator", "arguments_json": '{"expression": "6*7"}'},
    ]
    assert (third.text, third.tool_calls) == ("The end.", [])
    assert (later.text, later.tool_calls) == ("The end.", [])


async def test_a_repeating_scripted_turn_numbers_its_tool_calls_by_call_index() -> None:
    turns = (ScriptedTurn("", tool_calls=(ScriptedToolCall("clock", "{}"),)),)

    reply, streamed = await complete([user_message("hi")], turns, call_index=4)

    assert (reply.text, streamed) == ("", [])
    assert [c["id"] for c in reply.tool_calls] == ["call_4_0"]


async def test_demo_counts() -> None:
    reply, streamed = await complete([user_message("Please count to 5")])

    assert streamed == ["1", " 2", " 3", " 4", " 5"]
    assert reply.text == "1 2 3 4 5"
    assert reply.tool_calls == []


async def test_demo_count_is_capped() -> None:
    _, streamed = await complete([user_message("count to 99999")])

    assert len(streamed) == MAX_COUNT
    assert streamed[-1] == f" {MAX_COUNT}"


async def test_demo_asks_the_clock_for_the_time() -> None:
    reply, _ = await complete([user_message("What time is it?")], call_index=2)

    assert reply.text == "Let me look at the clock."
    assert reply.tool_calls == [{"id": "call_2_0", "name": "clock", "arguments_json": "{}"}]


async def test_demo_sends_email_to_the_address_in_the_message() -> None:
    text = "Please email bob@example.com about lunch"

    reply, _ = await complete([user_message(text)])

    assert reply.text == "I will email bob@example.com."
    assert [(c["id"], c["name"]) for c in reply.tool_calls] == [("call_0_0", "send_email")]
    assert arguments(reply.tool_calls[0]) == {
        "to": "bob@example.com",
        "subject": "A message from agentrun",
        "body": text,
    }


async def test_demo_email_without_an_address_goes_to_a_placeholder() -> None:
    reply, _ = await complete([user_message("send an email please")])

    assert arguments(reply.tool_calls[0]) == {
        "to": "someone@example.com",
        "subject": "A message from agentrun",
        "body": "send an email please",
    }


@pytest.mark.parametrize(
    ("text", "expression"), [("calculate 2+3", "2+3"), ("Calculate (4 * 5) - 1?", "(4 * 5) - 1")]
)
async def test_demo_calculates_with_the_calculator(text: str, expression: str) -> None:
    reply, _ = await complete([user_message(text)])

    assert reply.text == "Let me calculate that."
    assert [(c["id"], c["name"]) for c in reply.tool_calls] == [("call_0_0", "calculator")]
    assert arguments(reply.tool_calls[0]) == {"expression": expression}


async def test_demo_recalls_what_the_user_said_earlier() -> None:
    messages = [
        user_message("my name is Ada"),
        assistant_message("Hello Ada.", []),
        user_message("I like tea"),
        assistant_message("Noted.", []),
        user_message("recall"),
    ]

    reply, _ = await complete(messages)

    assert reply.text == 'Earlier in this conversation you said: "my name is Ada"; "I like tea".'
    assert reply.tool_calls == []


async def test_demo_recall_in_a_new_conversation() -> None:
    reply, _ = await complete([user_message("recall")])

    assert reply.text == "Earlier in this conversation you said: nothing yet."


async def test_demo_default_reply_quotes_the_input_and_names_the_turn() -> None:
    first, streamed = await complete([user_message("hello there")])
    third, _ = await complete(
        [
            user_message("one"),
            assistant_message("1", []),
            user_message("two"),
            assistant_message("2", []),
            user_message("three"),
        ]
    )

    assert len(streamed) >= 20
    assert first.text.startswith('You said: "hello there". This is turn 1 of our conversation.')
    assert "This is turn 3 of our conversation." in third.text
    assert first.tool_calls == third.tool_calls == []


async def test_demo_answers_from_the_clock_result() -> None:
    call: ToolCall = {"id": "call_0_0", "name": "clock", "arguments_json": "{}"}
    result = {
        "utc": "2026-01-01T09:00:00+00:00",
        "timezone": "Europe/Paris",
        "local": "2026-01-01T10:00:00+01:00",
    }
    messages = [
        user_message("what time is it"),
        assistant_message("Let me look at the clock.", [call]),
        tool_message("call_0_0", json.dumps(result), is_error=False),
    ]

    reply, _ = await complete(messages, call_index=1)

    assert reply.text == "It is 2026-01-01T10:00:00+01:00 (Europe/Paris)."
    assert reply.tool_calls == []


async def test_demo_answers_from_several_tool_results_and_an_error() -> None:
    calls: list[ToolCall] = [
        {"id": "call_0_0", "name": "send_email", "arguments_json": "{}"},
        {"id": "call_0_1", "name": "calculator", "arguments_json": "{}"},
        {"id": "call_0_2", "name": "clock", "arguments_json": "{}"},
    ]
    sent = {"status": "sent", "to": "bob@example.com", "message_id": "<x@outbox.agentrun>"}
    messages = [
        user_message("email bob@example.com and calculate 2+3"),
        assistant_message("", calls),
        tool_message("call_0_0", json.dumps(sent), is_error=False),
        tool_message("call_0_1", json.dumps({"expression": "2+3", "result": 5}), is_error=False),
        tool_message("call_0_2", "clock: unknown time zone 'Mars/Base'", is_error=True),
    ]

    reply, _ = await complete(messages, call_index=1)

    assert reply.text == (
        "Done: the email to bob@example.com was sent. The result is 5. "
        "The clock call did not succeed: clock: unknown time zone 'Mars/Base'"
    )
    assert reply.tool_calls == []


async def test_demo_describes_a_result_it_has_no_sentence_for() -> None:
    call: ToolCall = {"id": "call_0_0", "name": "calculator", "arguments_json": "{}"}
    messages = [
        user_message("calculate 1+1"),
        assistant_message("", [call]),
        tool_message("call_0_0", "[2]", is_error=False),
        tool_message("call_0_9", '"orphan"', is_error=False),  # answers no call it knows
    ]

    reply, _ = await complete(messages, call_index=1)

    assert reply.text == 'The calculator tool returned [2]. The tool tool returned "orphan".'


async def test_demo_tool_results_of_earlier_turns_do_not_count() -> None:
    messages = [
        user_message("what time is it"),
        assistant_message("", [{"id": "call_0_0", "name": "clock", "arguments_json": "{}"}]),
        tool_message("call_0_0", '{"local": "10:00", "timezone": "UTC"}', is_error=False),
        assistant_message("It is 10:00 (UTC).", []),
        user_message("and what time is it now?"),
    ]

    reply, _ = await complete(messages)

    assert [c["name"] for c in reply.tool_calls] == ["clock"]


async def test_usage_counts_the_tokens_of_every_message() -> None:
    messages = [
        user_message("one two three"),
        assistant_message("four five", []),
        user_message("count to 3"),
    ]

    reply, _ = await complete(messages)

    assert reply.usage == {"input_tokens": 8, "output_tokens": 3}


async def test_the_same_request_gives_the_same_answer() -> None:
    messages = [user_message("tell me something")]

    assert await complete(messages) == await complete(messages)
