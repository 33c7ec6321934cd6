"""Unit tests of the client command line: terminal rendering and argument parsing."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from agentrun.v1 import agent_pb2, run_pb2
from cli import render
from cli.chat import add_chat_parser, parse_approval, run_chat
from cli.client import DEFAULT_TARGET, call_metadata, rpc_error_message
from cli.render import EventRenderer
from cli.runs import add_runs_parser, list_request

RUN_ID = "3f2a9c4e-1b2d-4e5f-8a9b-0c1d2e3f4a5b"


def timestamp(text: str) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(datetime.fromisoformat(text).replace(tzinfo=UTC))
    return ts


def sample_run(**fields: Any) -> run_pb2.Run:
    run = run_pb2.Run(
        id=RUN_ID,
        agent_id="demo-durable",
        agent_version=3,
        conversation_id="conv-1",
        execution_mode=agent_pb2.EXECUTION_MODE_DURABLE,
        status=run_pb2.RUN_STATUS_COMPLETED,
        input="What time is it in Paris, and could you also send the answer to Bob?",
        create_time=timestamp("2025-01-02T12:00:01"),
        update_time=timestamp("2025-01-02T12:00:05"),
    )
    run.MergeFrom(run_pb2.Run(**fields))
    return run


def ev(**kind: Any) -> run_pb2.RunEvent:
    return run_pb2.RunEvent(run_id=RUN_ID, **kind)


def text(step: int, chunk: str, attempt: int = 1) -> run_pb2.RunEvent:
    return ev(text_delta=run_pb2.TextDelta(step_index=step, attempt=attempt, text=chunk))


def step(
    index: int, attempt: int = 1, kind: run_pb2.StepKind.ValueType = run_pb2.STEP_KIND_MODEL_CALL
) -> run_pb2.RunEvent:
    return ev(step_started=run_pb2.StepStarted(step_index=index, kind=kind, attempt=attempt))


def call(name: str, arguments: str, call_id: str = "call_1") -> run_pb2.ToolCall:
    return run_pb2.ToolCall(id=call_id, name=name, arguments_json=arguments)


def render_all(renderer: EventRenderer, events: list[run_pb2.RunEvent]) -> str:
    return "".join(renderer.render(event) for event in events)


# --- labels and small formatters -------------------------------------------------------------


def test_enum_labels_drop_their_prefix() -> None:
    assert render.status_label(run_pb2.RUN_STATUS_COMPLETED) == "COMPLETED"
    assert render.status_label(run_pb2.RUN_STATUS_AWAITING_APPROVAL) == "AWAITING_APPROVAL"
    assert render.mode_label(agent_pb2.EXECUTION_MODE_DURABLE) == "DURABLE"
    assert render.error_code_label(run_pb2.RUN_ERROR_CODE_MODEL_ERROR) == "MODEL_ERROR"
    assert render.status_label(99) == "99"  # type: ignore[arg-type]


def test_choices_map_lower_case_labels_to_values() -> None:
    assert render.STATUS_CHOICES["running"] == run_pb2.RUN_STATUS_RUNNING
    assert render.STATUS_CHOICES["awaiting_approval"] == run_pb2.RUN_STATUS_AWAITING_APPROVAL
    assert "unspecified" not in render.STATUS_CHOICES
    assert render.MODE_CHOICES == {
        "classic": agent_pb2.EXECUTION_MODE_CLASSIC,
        "durable": agent_pb2.EXECUTION_MODE_DURABLE,
    }


def test_shorten_and_compact_json() -> None:
    assert render.shorten("a\n  b", 10) == "a b"
    assert render.shorten("x" * 50, 10) == "x" * 9 + "…"
    assert render.compact_json('{\n  "a": 1,\n  "b": [1, 2]\n}', 100) == '{"a": 1, "b": [1, 2]}'
    assert render.compact_json("not json", 100) == "not json"
    assert render.compact_json("", 100) == ""


def test_times_render_in_the_given_zone_and_unset_as_dash() -> None:
    ts = timestamp("2025-01-02T12:00:01.123456")
    assert render.format_datetime(ts, UTC) == "2025-01-02 12:00:01"
    assert render.format_clock(ts, UTC) == "12:00:01.123"
    assert render.format_datetime(Timestamp(), UTC) == "-"
    assert render.format_clock(Timestamp(), UTC) == "-"


# --- events -------------------------------------------------------------------------------------


def test_text_streams_inline_and_tool_calls_start_a_new_line() -> None:
    renderer = EventRenderer(announce_start=False)
    out = render_all(
        renderer,
        [
            ev(run_started=run_pb2.RunStarted(run=sample_run())),
            step(1),
            text(1, "Let me"),
            text(1, " check."),
            ev(
                tool_call_requested=run_pb2.ToolCallRequested(
                    step_index=1, tool_call=call("clock", "{}")
                )
            ),
            ev(step_completed=run_pb2.StepCompleted(step_index=1)),
            step(2, kind=run_pb2.STEP_KIND_TOOL_CALLS),
            ev(
                tool_result=run_pb2.ToolResult(
                    step_index=2, tool_call_id="call_1", tool_name="clock", output='{"t": "12:00"}'
                )
            ),
            step(3),
            text(3, "It is noon."),
            ev(
                run_completed=run_pb2.RunCompleted(
                    output="It is noon.",
                    usage=run_pb2.Usage(input_tokens=12, output_tokens=34),
                )
            ),
        ],
    )
    assert out == (
        "Let me check.\n"
        "→ clock({})\n"
        '← clock: {"t": "12:00"}\n'
        "It is noon.\n"
        "[completed: 12 input + 34 output tokens]\n"
    )


def test_single_text_delta_has_no_newline() -> None:
    assert EventRenderer().render(text(1, "Hello")) == "Hello"


def test_run_started_is_announced_unless_disabled() -> None:
    event = ev(run_started=run_pb2.RunStarted(run=sample_run()))
    assert EventRenderer().render(event) == f"[run {RUN_ID} started: agent demo-durable, DURABLE]\n"
    assert EventRenderer(announce_start=False).render(event) == ""


def test_restarted_step_is_announced_and_stale_text_dropped() -> None:
    renderer = EventRenderer()
    out = render_all(
        renderer,
        [step(3), text(3, "partial"), step(3, attempt=2), text(3, "late", attempt=1)],
    )
    assert out == "partial\n[step 3 restarted: attempt 2 — earlier partial text discarded]\n"
    assert renderer.render(text(3, "fresh", attempt=2)) == "fresh"


def test_restart_without_shown_text_says_nothing_about_text() -> None:
    out = render_all(EventRenderer(), [step(2, kind=run_pb2.STEP_KIND_TOOL_CALLS), step(2, 2)])
    assert out == "[step 2 restarted: attempt 2]\n"


def test_approval_required_interactive_is_a_question_without_newline() -> None:
    required = run_pb2.ToolApprovalRequired(
        step_index=2, tool_call=call("send_email", '{"to": "bob@example.com"}')
    )
    renderer = EventRenderer(interactive=True)
    requested = run_pb2.ToolCallRequested(
        step_index=1, tool_call=required.tool_call, requires_approval=True
    )
    assert renderer.render(ev(tool_call_requested=requested)) == ""
    prompt = '? send_email wants to run with {"to": "bob@example.com"} — approve? [y/n] '
    assert renderer.render(ev(tool_approval_required=required)) == prompt
    assert render.approval_prompt(required) == prompt
    approved = run_pb2.ToolApprovalResolved(tool_call_id="call_1", approved=True)
    assert renderer.render(ev(tool_approval_resolved=approved)) == "✓ send_email approved\n"


def test_approval_required_when_watching_is_a_plain_line() -> None:
    required = run_pb2.ToolApprovalRequired(tool_call=call("send_email", "{}", "call_9"))
    assert EventRenderer().render(ev(tool_approval_required=required)) == (
        "? send_email wants to run with {} — awaiting approval (call_9)\n"
    )


def test_a_call_for_the_client_to_run_is_a_plain_line() -> None:
    required = run_pb2.ClientToolCallRequired(tool_call=call("pick_file", '{"kind": "pdf"}', "c"))
    assert EventRenderer().render(ev(client_tool_call_required=required)) == (
        '? pick_file is the client\'s to run, with {"kind": "pdf"} — awaiting its result\n'
    )
    status = render.status_label(run_pb2.RUN_STATUS_AWAITING_TOOL_RESULT)
    assert render.run_list_header().index("AGENT") > render.run_list_header().index("STATUS") + len(
        status
    )


@pytest.mark.parametrize(
    ("resolved", "expected"),
    [
        (run_pb2.ToolApprovalResolved(tool_call_id="c"), "✗ send_email denied"),
        (
            run_pb2.ToolApprovalResolved(tool_call_id="c", reason="not now"),
            "✗ send_email denied: not now",
        ),
        (
            run_pb2.ToolApprovalResolved(tool_call_id="c", timed_out=True),
            "✗ send_email denied: no decision in time",
        ),
        (run_pb2.ToolApprovalResolved(tool_call_id="other", approved=True), "✓ other approved"),
        (
            run_pb2.ToolApprovalResolved(
                tool_call_id="c", approved=True, edited_arguments_json='{"to": "b@example.com"}'
            ),
            '✓ send_email approved, to run with {"to": "b@example.com"}',
        ),
    ],
)
def test_approval_resolutions(resolved: run_pb2.ToolApprovalResolved, expected: str) -> None:
    renderer = EventRenderer()
    required = run_pb2.ToolApprovalRequired(tool_call=call("send_email", "{}", "c"))
    renderer.render(ev(tool_approval_required=required))
    assert renderer.render(ev(tool_approval_resolved=resolved)) == expected + "\n"


def test_failed_tool_result() -> None:
    result = run_pb2.ToolResult(tool_name="calculator", output="division by zero", is_error=True)
    assert (
        EventRenderer().render(ev(tool_result=result)) == "← calculator failed: division by zero\n"
    )


def test_terminal_events() -> None:
    failed = run_pb2.RunFailed(
        error=run_pb2.RunError(
            code=run_pb2.RUN_ERROR_CODE_MODEL_ERROR, message="provider said 500", retryable=True
        )
    )
    assert EventRenderer().render(ev(run_failed=failed)) == (
        "[failed: MODEL_ERROR: provider said 500 (retryable)]\n"
    )
    failed.error.retryable = False
    assert "(not retryable)" in EventRenderer().render(ev(run_failed=failed))
    assert EventRenderer().render(ev(run_cancelled=run_pb2.RunCancelled())) == "[cancelled]\n"
    cancelled = run_pb2.RunCancelled(reason="user")
    assert EventRenderer().render(ev(run_cancelled=cancelled)) == "[cancelled: user]\n"


def test_terminal_event_after_text_starts_a_new_line() -> None:
    renderer = EventRenderer()
    renderer.render(text(1, "half a sentence"))
    assert renderer.render(ev(run_cancelled=run_pb2.RunCancelled())) == "\n[cancelled]\n"


def test_completed_shows_the_output_when_no_text_was_streamed() -> None:
    completed = run_pb2.RunCompleted(output="The answer.", usage=run_pb2.Usage(output_tokens=2))
    assert EventRenderer().render(ev(run_completed=completed)) == (
        "The answer.\n[completed: 0 input + 2 output tokens]\n"
    )


def test_finish_closes_an_open_line_once() -> None:
    renderer = EventRenderer()
    assert renderer.finish() == ""
    renderer.render(text(1, "abc"))
    assert renderer.finish() == "\n"
    assert renderer.finish() == ""
    renderer.render(text(1, "line\n"))
    assert renderer.finish() == ""


# --- runs and stored events ---------------------------------------------------------------------


def test_run_summary_line() -> None:
    line = render.run_summary_line(sample_run(), UTC)
    assert line == (
        f"{RUN_ID}  COMPLETED             demo-durable      2025-01-02 12:00:01  "
        "What time is it in Paris, and could you…"
    )
    header = render.run_list_header()
    assert header.split() == ["RUN", "STATUS", "AGENT", "CREATED", "INPUT"]
    assert header.index("STATUS") == line.index("COMPLETED")
    assert header.index("INPUT") == line.index("What")


def test_run_details_block() -> None:
    run = sample_run(
        status=run_pb2.RUN_STATUS_FAILED,
        input="line one\nline two",
        version=7,
        forked_from_run_id="src-run",
        forked_at_version=4,
        usage=run_pb2.Usage(input_tokens=5, output_tokens=6),
        error=run_pb2.RunError(code=run_pb2.RUN_ERROR_CODE_ATTEMPTS_EXHAUSTED, message="boom"),
    )
    run.pending_approvals.append(call("send_email", '{"to": "bob"}', "call_2"))
    assert render.run_details(run, UTC).splitlines() == [
        f"run:               {RUN_ID}",
        "status:            FAILED",
        "agent:             demo-durable (version 3)",
        "mode:              DURABLE",
        "conversation:      conv-1",
        "created:           2025-01-02 12:00:01",
        "updated:           2025-01-02 12:00:05",
        "version:           7",
        "forked from:       src-run at version 4",
        "usage:             5 input + 6 output tokens",
        "error:             ATTEMPTS_EXHAUSTED: boom (not retryable)",
        'pending approval:  call_2  send_email({"to": "bob"})',
        "input:             line one",
        "                   line two",
    ]


def test_run_details_shows_output_and_hides_empty_fields() -> None:
    details = render.run_details(sample_run(output="Noon.", request_id="req-1"), UTC)
    rows = dict(line.split(":", 1) for line in details.splitlines())
    assert rows["output"].strip() == "Noon."
    assert rows["request id"].strip() == "req-1"
    assert rows.keys().isdisjoint({"version", "forked from", "error", "usage", "pending approval"})


def test_stored_event_line() -> None:
    event = run_pb2.StoredRunEvent(
        version=3,
        time=timestamp("2025-01-02T12:00:01.123"),
        type="ModelCallCompleted",
        payload_json='{\n "step_index": 1,\n "text": "hi"\n}',
    )
    assert render.stored_event_line(event, UTC) == (
        'v3  12:00:01.123  ModelCallCompleted      {"step_index": 1, "text": "hi"}'
    )
    event.version = 120
    event.payload_json = "{" + '"k": "' + "x" * 300 + '"}'
    line = render.stored_event_line(event, UTC)
    assert line.startswith("v120 12:00:01.123  ModelCallCompleted")
    assert line.endswith("…")
    assert len(line) < 200


# --- client helpers -----------------------------------------------------------------------------


def test_call_metadata_carries_the_key_as_bearer_token() -> None:
    assert call_metadata("secret") == (("authorization", "Bearer secret"),)
    assert call_metadata(None) == ()
    assert call_metadata("") == ()


def test_rpc_error_message_is_one_line() -> None:
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        "run x\nnot found",
        None,
    )
    assert rpc_error_message(error) == "error: NOT_FOUND: run x not found"
    unimplemented = grpc.aio.AioRpcError(
        grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "", None
    )
    assert rpc_error_message(unimplemented) == (
        "error: UNIMPLEMENTED: the server does not implement this call"
    )


# --- argument parsing ---------------------------------------------------------------------------


@pytest.fixture
def parser(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    monkeypatch.delenv("AGENTRUN_TARGET", raising=False)
    monkeypatch.delenv("AGENTRUN_API_KEY", raising=False)
    root = argparse.ArgumentParser(prog="agentrun")
    commands = root.add_subparsers(dest="command", required=True)
    add_chat_parser(commands)
    add_runs_parser(commands)
    return root


def test_chat_arguments(parser: argparse.ArgumentParser) -> None:
    args = parser.parse_args(["chat", "--agent", "demo-classic"])
    assert args.agent == "demo-classic"
    assert args.conversation is None
    assert args.mode is None
    assert args.target == DEFAULT_TARGET
    assert args.api_key is None
    assert args.func is run_chat

    args = parser.parse_args(
        [
            "chat",
            "--agent",
            "a",
            "--conversation",
            "c",
            "--mode",
            "durable",
            "--target",
            "gw:1",
            "--api-key",
            "k",
        ]
    )
    assert (args.conversation, args.mode, args.target, args.api_key) == (
        "c",
        "durable",
        "gw:1",
        "k",
    )


def test_chat_requires_an_agent_and_a_known_mode(parser: argparse.ArgumentParser) -> None:
    with pytest.raises(SystemExit):
        parser.parse_args(["chat"])
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "--agent", "a", "--mode", "fast"])


def test_connection_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTRUN_TARGET", "gateway:6000")
    monkeypatch.setenv("AGENTRUN_API_KEY", "env-key")
    root = argparse.ArgumentParser()
    add_runs_parser(root.add_subparsers())
    args = root.parse_args(["runs", "show", "r1"])
    assert (args.target, args.api_key) == ("gateway:6000", "env-key")


def test_runs_list_arguments(parser: argparse.ArgumentParser) -> None:
    args = parser.parse_args(
        [
            "runs",
            "list",
            "--agent",
            "demo",
            "--status",
            "running",
            "--status",
            "awaiting_approval",
            "--mode",
            "classic",
            "--limit",
            "120",
            "--json",
        ]
    )
    assert args.runs_command == "list"
    assert args.statuses == ["running", "awaiting_approval"]
    assert args.json is True
    assert callable(args.func)
    request = list_request(args)
    assert request.agent_id == "demo"
    assert request.conversation_id == ""
    assert list(request.statuses) == [
        run_pb2.RUN_STATUS_RUNNING,
        run_pb2.RUN_STATUS_AWAITING_APPROVAL,
    ]
    assert request.execution_mode == agent_pb2.EXECUTION_MODE_CLASSIC
    assert request.page_size == 120

    defaults = parser.parse_args(["runs", "list"])
    assert (defaults.limit, defaults.statuses, defaults.json) == (20, None, False)
    assert list_request(defaults).statuses == []


@pytest.mark.parametrize(
    "argv",
    [
        ["runs"],
        ["runs", "list", "--status", "done"],
        ["runs", "list", "--limit", "0"],
        ["runs", "show"],
        ["runs", "fork", "r1"],
        ["runs", "watch", "r1", "--after", "-1"],
    ],
)
def test_runs_rejects_bad_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parser.parse_args(argv)


def test_runs_show_watch_replay_fork_arguments(parser: argparse.ArgumentParser) -> None:
    show = parser.parse_args(["runs", "show", "r1", "--version", "4"])
    assert (show.runs_command, show.run_id, show.version, show.json) == ("show", "r1", 4, False)
    assert parser.parse_args(["runs", "show", "r1"]).version == 0

    watch = parser.parse_args(["runs", "watch", "r1", "--after", "10"])
    assert (watch.runs_command, watch.run_id, watch.after) == ("watch", "r1", 10)

    replay = parser.parse_args(["runs", "replay", "r1", "--from", "2", "--to", "9", "--json"])
    assert (replay.from_version, replay.to_version, replay.json) == (2, 9, True)
    assert parser.parse_args(["runs", "replay", "r1"]).to_version == 0

    fork = parser.parse_args(["runs", "fork", "r1", "--at", "5", "--api-key", "k"])
    assert (fork.runs_command, fork.run_id, fork.at_version, fork.api_key) == ("fork", "r1", 5, "k")
    funcs = {show.func, watch.func, replay.func, fork.func}
    assert len(funcs) == 4


def test_parse_approval() -> None:
    assert parse_approval(" Y ") is True
    assert parse_approval("yes") is True
    assert parse_approval("n") is False
    assert parse_approval("No") is False
    assert parse_approval("") is None
    assert parse_approval("maybe") is None
