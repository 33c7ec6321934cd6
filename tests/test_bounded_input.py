"""Input that is too large, too deep, undecodable or unsafe gets a clear answer and hurts
nothing: requests are refused with INVALID_ARGUMENT, a model's bad tool call is a tool error
the model sees."""

from __future__ import annotations

import json

import grpc

from agentrun.v1 import run_pb2
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
    assert len(results) == len(calls)
    for call, result in zip(calls, results, strict=True):
        header = "subject" if call["to"] == "ada@example.com" else "to"
        assert result.is_error, (call, result.output)
        assert f"argument '{header}' must be a single line without control" in result.output
    assert events[-1].run_completed.output == "done"
    run_id = events[0].run_id
    assert [m for m in read_outbox(stack.data_dir) if m["run_id"] == run_id] == []
