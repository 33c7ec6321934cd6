"""Input that is too large, too deep, undecodable or unsafe gets a clear answer and hurts
nothing: requests are refused with INVALID_ARGUMENT, a model's bad tool call is a tool error
the model sees."""

from __future__ import annotations

import json

import grpc
import pytest

from agentrun.v1 import agent_pb2, run_pb2
from executor.tools.send_email import read_outbox
from tests.client import Client, scripted_agent
from tests.stack import Stack

# Characters that would break a header into lines or hide one: a few of each kind.
HEADER_BREAKERS = ["\u2028", "\u2029", "\x85", "\x00", "\x0b", "\x0c", "\x1b", "\x7f", "\x9b"]


def tool_results(events: list[run_pb2.RunEvent]) -> list[run_pb2.ToolResult]:
    return [e.tool_result for e in events if e.HasField("tool_result")]


async def test_send_email_refuses_control_and_line_separator_characters_in_headers(
    channels: list[grpc.aio.Channel], stack: Stack
) -> None:
    calls = []
    for char in HEADER_BREAKERS:
        calls.append({"to": "ada@example.com", "subject": f"Hi{char}Bcc: eve@x.com", "body": "b"})
        calls.append({"to": f"ada@example.com{char}", "subject": "Hi", "body": "b"})
    turns = [("", [("send_email", json.dumps(c)) for c in calls]), ("done", [])]
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=turns, tools=(("send_email", False),)))
    events = await client.run(agent.id, "email")
    results = tool_results(events)
    assert len(results) == len(calls), events[-1]
    for call, result in zip(calls, results, strict=True):
        header = "subject" if call["to"] == "ada@example.com" else "to"
        assert result.is_error, (call, result.output)
        assert f"argument '{header}' must be a single line without control" in result.output
    assert events[-1].run_completed.output == "done"
    run_id = events[0].run_id
    assert [m for m in read_outbox(stack.data_dir) if m["run_id"] == run_id] == []


MODES = {"classic": agent_pb2.EXECUTION_MODE_CLASSIC, "durable": agent_pb2.EXECUTION_MODE_DURABLE}
# Arguments as a model may send them: nested far past any parser's recursion limit, nested
# past agentrun's bound but within the parser's, and not JSON at all.
BAD_ARGUMENTS = [
    ('{"expression": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested more than 64 levels deep"),
    ('{"expression": ' + "[" * 100 + "]" * 100 + "}", "nested more than 64 levels deep"),
    ('{"expression": "6*7"', "malformed arguments (not JSON)"),
]


@pytest.mark.parametrize("mode", MODES)
async def test_malformed_or_too_deep_tool_arguments_are_a_tool_error_the_model_sees(
    channels: list[grpc.aio.Channel], mode: str
) -> None:
    calls = [("calculator", arguments) for arguments, _ in BAD_ARGUMENTS]
    # The object and 63 arrays in it: 64 levels.
    calls.append(("calculator", '{"expression": ' + "[" * 63 + "]" * 63 + "}"))
    turns = [("", calls), ("done", [])]
    client = Client(channels[0])
    agent = await client.create_agent(
        scripted_agent(turns=turns, tools=(("calculator", False),), mode=MODES[mode])
    )
    events = await client.run(agent.id, "calculate")
    results = tool_results(events)
    assert len(results) == len(calls), events[-1]
    for (_, message), result in zip(BAD_ARGUMENTS, results, strict=False):
        assert result.is_error
        assert message in result.output
    # 64 levels reach the tool, which refuses a list for an expression.
    assert results[-1].is_error
    assert "malformed" not in results[-1].output
    assert events[-1].run_completed.output == "done"
    # At once: no step was tried again (a durable run once burned its attempts on this).
    assert {e.step_started.attempt for e in events if e.HasField("step_started")} == {1}
