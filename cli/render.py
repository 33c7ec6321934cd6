"""Terminal text for runs, run events and stored events; formatting only, no I/O."""

from __future__ import annotations

import json
import re
from datetime import UTC, tzinfo

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from agentrun.v1 import agent_pb2, run_pb2

INPUT_PREVIEW_CHARS = 40
ARGUMENTS_PREVIEW_CHARS = 200
RESULT_PREVIEW_CHARS = 200
PAYLOAD_PREVIEW_CHARS = 120

_STATUS_WIDTH = len("AWAITING_TOOL_RESULT")
_AGENT_WIDTH = 16
_EVENT_TYPE_WIDTH = 22


def enum_label(descriptor: EnumDescriptor, value: int) -> str:
    """An enum value's name without its type prefix: COMPLETED for RUN_STATUS_COMPLETED."""
    entry = descriptor.values_by_number.get(value)
    if entry is None:
        return str(value)
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", descriptor.name).upper() + "_"
    return entry.name.removeprefix(prefix)


def status_label(status: run_pb2.RunStatus.ValueType) -> str:
    return enum_label(run_pb2.RunStatus.DESCRIPTOR, status)


def mode_label(mode: agent_pb2.ExecutionMode.ValueType) -> str:
    return enum_label(agent_pb2.ExecutionMode.DESCRIPTOR, mode)


def error_code_label(code: run_pb2.RunErrorCode.ValueType) -> str:
    return enum_label(run_pb2.RunErrorCode.DESCRIPTOR, code)


# What users type on the command line (lower case labels), mapped to enum values.
STATUS_CHOICES: dict[str, run_pb2.RunStatus.ValueType] = {
    status_label(value).lower(): value for value in run_pb2.RunStatus.values() if value
}
MODE_CHOICES: dict[str, agent_pb2.ExecutionMode.ValueType] = {
    mode_label(value).lower(): value for value in agent_pb2.ExecutionMode.values() if value
}


def shorten(text: str, limit: int) -> str:
    """``text`` on one line of at most ``limit`` characters; a cut is marked with '…'."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def compact_json(text: str, limit: int) -> str:
    """JSON text re-printed compactly on one line (other text as is), then shortened."""
    try:
        value = json.loads(text)
    except ValueError:
        return shorten(text, limit)
    return shorten(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")), limit)


def format_datetime(ts: Timestamp, tz: tzinfo | None = None) -> str:
    """``2025-01-02 12:00:01`` in ``tz`` (local time if None); '-' for an unset timestamp."""
    if ts.seconds == 0 and ts.nanos == 0:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")


def format_clock(ts: Timestamp, tz: tzinfo | None = None) -> str:
    """``12:00:01.123`` in ``tz`` (local time if None); '-' for an unset timestamp."""
    if ts.seconds == 0 and ts.nanos == 0:
        return "-"
    moment = ts.ToDatetime(tzinfo=UTC).astimezone(tz)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def format_usage(usage: run_pb2.Usage) -> str:
    return f"{usage.input_tokens} input + {usage.output_tokens} output tokens"


def format_run_error(error: run_pb2.RunError) -> str:
    retry = "retryable" if error.retryable else "not retryable"
    return f"{error_code_label(error.code)}: {error.message} ({retry})"


def tool_call_text(call: run_pb2.ToolCall) -> str:
    """``clock({})``: the call as the model asked for it."""
    arguments = compact_json(call.arguments_json, ARGUMENTS_PREVIEW_CHARS)
    return f"{call.name}({arguments})"


def tool_call_line(call: run_pb2.ToolCall) -> str:
    return f"→ {tool_call_text(call)}"


def approval_prompt(required: run_pb2.ToolApprovalRequired) -> str:
    """The question put to the user; no newline, the answer goes on the same line."""
    call = required.tool_call
    arguments = compact_json(call.arguments_json, ARGUMENTS_PREVIEW_CHARS)
    return f"? {call.name} wants to run with {arguments} — approve? [y/n] "


def completed_line(completed: run_pb2.RunCompleted) -> str:
    return f"[completed: {format_usage(completed.usage)}]"


def failed_line(failed: run_pb2.RunFailed) -> str:
    return f"[failed: {format_run_error(failed.error)}]"


def cancelled_line(cancelled: run_pb2.RunCancelled) -> str:
    return f"[cancelled: {cancelled.reason}]" if cancelled.reason else "[cancelled]"


class EventRenderer:
    """Turns a run's events, in order, into terminal text.

    Text deltas come back as they are (no newline) so that they print inline; every other event
    that is worth showing comes back as whole lines, starting on a fresh line. The renderer
    remembers what layout and attempts need: whether a line is open, each step's attempt, and
    the names of tool calls (approval decisions name only the call id).
    """

    def __init__(self, *, interactive: bool = False, announce_start: bool = True) -> None:
        self._interactive = interactive
        self._announce_start = announce_start
        self._open_line = False
        self._attempts: dict[int, int] = {}
        self._steps_with_text: set[int] = set()
        self._tool_names: dict[str, str] = {}
        self._text_shown = False

    def render(self, event: run_pb2.RunEvent) -> str:
        """The text to write for ``event``; empty when it shows nothing."""
        if event.WhichOneof("kind") == "text_delta":
            return self._text(event.text_delta)
        if event.WhichOneof("kind") == "tool_approval_required" and self._interactive:
            self._remember(event.tool_approval_required.tool_call)
            # The user's answer and Enter end the line.
            return self.finish() + approval_prompt(event.tool_approval_required)
        line = self._line(event)
        if line is None:
            return ""
        return self.finish() + line + "\n"

    def finish(self) -> str:
        """A newline if streamed text left a line open (before writing anything else)."""
        if not self._open_line:
            return ""
        self._open_line = False
        return "\n"

    def _text(self, delta: run_pb2.TextDelta) -> str:
        current = self._attempts.get(delta.step_index)
        if current is not None and (delta.attempt or 1) < current:
            return ""  # text of an attempt that was restarted is void
        if not delta.text:
            return ""
        self._steps_with_text.add(delta.step_index)
        self._text_shown = True
        self._open_line = not delta.text.endswith("\n")
        return delta.text

    def _remember(self, call: run_pb2.ToolCall) -> None:
        self._tool_names[call.id] = call.name

    def _line(self, event: run_pb2.RunEvent) -> str | None:
        kind = event.WhichOneof("kind")
        if kind == "run_started":
            run = event.run_started.run
            if not self._announce_start:
                return None
            mode = mode_label(run.execution_mode)
            return f"[run {run.id} started: agent {run.agent_id}, {mode}]"
        if kind == "step_started":
            return self._step_started(event.step_started)
        if kind == "tool_call_requested":
            requested = event.tool_call_requested
            self._remember(requested.tool_call)
            # A call that needs approval is shown once, with its approval question.
            return None if requested.requires_approval else tool_call_line(requested.tool_call)
        if kind == "tool_approval_required":
            call = event.tool_approval_required.tool_call
            self._remember(call)
            arguments = compact_json(call.arguments_json, ARGUMENTS_PREVIEW_CHARS)
            return f"? {call.name} wants to run with {arguments} — awaiting approval ({call.id})"
        if kind == "tool_approval_resolved":
            return self._approval_resolved(event.tool_approval_resolved)
        if kind == "client_tool_call_required":
            call = event.client_tool_call_required.tool_call
            self._remember(call)
            arguments = compact_json(call.arguments_json, ARGUMENTS_PREVIEW_CHARS)
            return f"? {call.name} is the client's to run, with {arguments} — awaiting its result"
        if kind == "tool_result":
            result = event.tool_result
            name = result.tool_name or self._tool_names.get(result.tool_call_id, "tool")
            output = compact_json(result.output, RESULT_PREVIEW_CHARS)
            return f"← {name} failed: {output}" if result.is_error else f"← {name}: {output}"
        if kind == "run_completed":
            completed = event.run_completed
            line = completed_line(completed)
            # Joining a finished run late: the answer was never streamed here, so show it.
            if not self._text_shown and completed.output:
                return completed.output.rstrip("\n") + "\n" + line
            return line
        if kind == "run_failed":
            return failed_line(event.run_failed)
        if kind == "run_cancelled":
            return cancelled_line(event.run_cancelled)
        return None

    def _step_started(self, started: run_pb2.StepStarted) -> str | None:
        attempt = started.attempt or 1
        self._attempts[started.step_index] = attempt
        if attempt <= 1:
            return None
        discarded = started.step_index in self._steps_with_text
        self._steps_with_text.discard(started.step_index)
        note = " — earlier partial text discarded" if discarded else ""
        return f"[step {started.step_index} restarted: attempt {attempt}{note}]"

    def _approval_resolved(self, resolved: run_pb2.ToolApprovalResolved) -> str:
        name = self._tool_names.get(resolved.tool_call_id, resolved.tool_call_id)
        if resolved.approved and resolved.edited_arguments_json:
            arguments = compact_json(resolved.edited_arguments_json, ARGUMENTS_PREVIEW_CHARS)
            return f"✓ {name} approved, to run with {arguments}"
        if resolved.approved:
            return f"✓ {name} approved"
        if resolved.timed_out:
            return f"✗ {name} denied: no decision in time"
        return f"✗ {name} denied: {resolved.reason}" if resolved.reason else f"✗ {name} denied"


def _summary(run_id: str, status: str, agent: str, created: str, text: str) -> str:
    status = f"{status:<{_STATUS_WIDTH}}"
    return f"{run_id:<36}  {status}  {agent:<{_AGENT_WIDTH}}  {created:<19}  {text}"


def run_list_header() -> str:
    return _summary("RUN", "STATUS", "AGENT", "CREATED", "INPUT").rstrip()


def run_summary_line(run: run_pb2.Run, tz: tzinfo | None = None) -> str:
    """One line of ``runs list``: id, status, agent, creation time and the input's start."""
    return _summary(
        run.id,
        status_label(run.status),
        run.agent_id,
        format_datetime(run.create_time, tz),
        shorten(run.input, INPUT_PREVIEW_CHARS),
    ).rstrip()


def run_details(run: run_pb2.Run, tz: tzinfo | None = None) -> str:
    """The block of ``runs show``: one labelled row per field that has something to say."""
    rows: list[tuple[str, str]] = [
        ("run", run.id),
        ("status", status_label(run.status)),
        ("agent", f"{run.agent_id} (version {run.agent_version})"),
        ("mode", mode_label(run.execution_mode)),
        ("conversation", run.conversation_id or "-"),
        ("created", format_datetime(run.create_time, tz)),
        ("updated", format_datetime(run.update_time, tz)),
    ]
    if run.version:
        rows.append(("version", str(run.version)))
    if run.forked_from_run_id:
        rows.append(("forked from", f"{run.forked_from_run_id} at version {run.forked_at_version}"))
    if run.request_id:
        rows.append(("request id", run.request_id))
    if run.HasField("usage"):
        rows.append(("usage", format_usage(run.usage)))
    if run.HasField("error"):
        rows.append(("error", format_run_error(run.error)))
    rows.extend(
        ("pending approval", f"{call.id}  {tool_call_text(call)}") for call in run.pending_approvals
    )
    rows.append(("input", run.input))
    if run.output:
        rows.append(("output", run.output))
    width = max(len(label) for label, _ in rows) + 1
    lines: list[str] = []
    for label, value in rows:
        first, *rest = value.splitlines() or [""]
        lines.append(f"{label + ':':<{width}}  {first}".rstrip())
        lines.extend((" " * (width + 2) + line).rstrip() for line in rest)
    return "\n".join(lines)


def stored_event_line(event: run_pb2.StoredRunEvent, tz: tzinfo | None = None) -> str:
    """One line of ``runs replay``: ``v3  12:00:01.123  ModelCallCompleted  {...}``."""
    version = f"v{event.version}"
    payload = compact_json(event.payload_json, PAYLOAD_PREVIEW_CHARS)
    clock = format_clock(event.time, tz)
    return f"{version:<3} {clock:<12}  {event.type:<{_EVENT_TYPE_WIDTH}}  {payload}".rstrip()
