"""What clients see of recorded run events: emit_recorded on a real RunStream, and which steps
Announcements announces (again) when an executor takes a run up from an earlier one."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from agentrun.v1 import run_pb2
from eventstore.agent_config import AgentConfig, ModelSettings, ToolSettings
from eventstore.messages import ToolCall, Usage
from eventstore.run import Run
from executor.client_events import MODEL_CALL, TOOL_CALLS, Announcements, emit_recorded
from executor.run_stream import MAX_DELTA_CHARS, Marks, RunStream

USAGE: Usage = {"input_tokens": 10, "output_tokens": 4}
EXPIRE_AT = 1_700_000_000.5


def new_run() -> Run:
    agent = AgentConfig(
        agent_id="helper",
        model=ModelSettings(provider="scripted"),
        execution_mode="durable",
        tools=(ToolSettings("clock"), ToolSettings("send_email", requires_approval=True)),
    )
    return Run(
        run_id=str(uuid.uuid4()),
        tenant="acme",
        request_id="req",
        agent=agent.to_json(),
        input="hello",
        conversation_id="conv",
        history=[],
        execution_mode="durable",
    )


def call(call_id: str, name: str) -> ToolCall:
    return {"id": call_id, "name": name, "arguments_json": f'{{"id": "{call_id}"}}'}


def proto_call(call_id: str, name: str) -> run_pb2.ToolCall:
    return run_pb2.ToolCall(id=call_id, name=name, arguments_json=f'{{"id": "{call_id}"}}')


def usage(input_tokens: int = 10, output_tokens: int = 4) -> run_pb2.Usage:
    return run_pb2.Usage(input_tokens=input_tokens, output_tokens=output_tokens)


def started(step: int, kind: run_pb2.StepKind.ValueType, attempt: int = 1) -> run_pb2.RunEvent:
    return run_pb2.RunEvent(
        step_started=run_pb2.StepStarted(step_index=step, kind=kind, attempt=attempt)
    )


def requested(step: int, call_id: str, name: str, approval: bool) -> run_pb2.RunEvent:
    return run_pb2.RunEvent(
        tool_call_requested=run_pb2.ToolCallRequested(
            step_index=step, tool_call=proto_call(call_id, name), requires_approval=approval
        )
    )


def completed(
    step: int, kind: run_pb2.StepKind.ValueType, with_usage: run_pb2.Usage | None = None
) -> run_pb2.RunEvent:
    event = run_pb2.RunEvent(step_completed=run_pb2.StepCompleted(step_index=step, kind=kind))
    if with_usage is not None:
        event.step_completed.usage.CopyFrom(with_usage)
    return event


def result(step: int, call_id: str, name: str, output: str, error: bool) -> run_pb2.RunEvent:
    return run_pb2.RunEvent(
        tool_result=run_pb2.ToolResult(
            step_index=step, tool_call_id=call_id, tool_name=name, output=output, is_error=error
        )
    )


def text(step: int, attempt: int, content: str) -> run_pb2.RunEvent:
    return run_pb2.RunEvent(
        text_delta=run_pb2.TextDelta(step_index=step, attempt=attempt, text=content)
    )


def content(events: list[run_pb2.RunEvent]) -> list[run_pb2.RunEvent]:
    """The events without what the stream stamps on them (run id, sequence, time)."""
    stripped = []
    for event in events:
        copy = run_pb2.RunEvent()
        copy.CopyFrom(event)
        copy.ClearField("run_id")
        copy.ClearField("sequence")
        copy.ClearField("time")
        stripped.append(copy)
    return stripped


class Recorder:
    """Applies changes to a run and keeps the events each one recorded."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.events: list[Any] = list(run.collect_events())

    def __call__(self, change: Callable[[Run], object]) -> list[Any]:
        change(self.run)
        recorded = list(self.run.collect_events())
        self.events.extend(recorded)
        return recorded


async def emitted(
    run: Run,
    events: list[Any],
    *,
    step: int = 0,
    attempt: int = 0,
    catching_up: bool = False,
) -> tuple[list[run_pb2.RunEvent], Marks]:
    """The client events ``events`` add to a new stream attached by its consumer (with the
    earlier executor's ``step``/``attempt`` announced), and the stream's marks."""
    stream = RunStream(run.run_id, first_sequence=7)
    assert stream.attach()
    announce = Announcements(stream, run.attempt_of, step, attempt)
    emit_recorded(run, stream, events, announce, catching_up=catching_up)
    batch = stream.take_now()
    await stream.close()
    assert [e.sequence for e in batch] == list(range(7, 7 + len(batch)))
    assert all(e.run_id == run.run_id for e in batch)
    return batch, stream.marks


async def test_a_whole_history_maps_to_the_client_events_of_its_steps() -> None:
    run = new_run()
    record = Recorder(run)
    calls = [call("c1", "clock"), call("c2", "send_email")]
    record(lambda r: r.record_model_call(1, "let me check", calls, USAGE))
    record(lambda r: r.require_approval(2, "c2", EXPIRE_AT))
    record(lambda r: r.decide("c2", True, "fine", False))
    record(lambda r: r.record_tool_outcome(2, "c1", "12:00", False))
    record(lambda r: r.record_tool_outcome(2, "c2", "sent", False))
    record(lambda r: r.record_model_call(3, "done", [], {"input_tokens": 1, "output_tokens": 2}))
    record(lambda r: r.complete("done"))
    assert record.events[-1].originator_version == 8

    batch, marks = await emitted(run, record.events)

    approval = run_pb2.ToolApprovalRequired(step_index=2, tool_call=proto_call("c2", "send_email"))
    approval.expire_time.seconds = 1_700_000_000
    approval.expire_time.nanos = 500_000_000
    assert content(batch) == [
        # Requested has no client event of its own (RunStarted comes from the executor).
        started(1, MODEL_CALL),
        requested(1, "c1", "clock", approval=False),
        requested(1, "c2", "send_email", approval=True),
        completed(1, MODEL_CALL, usage()),
        started(2, TOOL_CALLS),
        run_pb2.RunEvent(tool_approval_required=approval),
        run_pb2.RunEvent(
            tool_approval_resolved=run_pb2.ToolApprovalResolved(
                tool_call_id="c2", approved=True, reason="fine", timed_out=False
            )
        ),
        result(2, "c1", "clock", "12:00", error=False),
        result(2, "c2", "send_email", "sent", error=False),
        completed(2, TOOL_CALLS),
        started(3, MODEL_CALL),
        completed(3, MODEL_CALL, usage(1, 2)),
        run_pb2.RunEvent(
            run_completed=run_pb2.RunCompleted(output="done", usage=usage(11, 6)),
        ),
    ]
    assert not batch[9].step_completed.HasField("usage")
    assert marks == Marks(version=8, step=3, attempt=1)


async def test_events_emitted_as_they_are_recorded_match_the_whole_history() -> None:
    """The live loop emits each commit's events with the run at that version; the client sees
    the same events as when the whole history is emitted at once."""
    run = new_run()
    record = Recorder(run)
    stream = RunStream(run.run_id)
    assert stream.attach()
    announce = Announcements(stream, run.attempt_of)
    changes: list[Callable[[Run], object]] = [
        lambda r: r.record_model_call(1, "", [call("c1", "clock"), call("c2", "clock")], USAGE),
        lambda r: r.record_tool_outcome(2, "c1", "12:00", False),
        lambda r: r.record_tool_outcome(2, "c2", "error: no clock", True),
        lambda r: r.record_model_call(3, "it is noon", [], USAGE),
    ]
    live: list[run_pb2.RunEvent] = []
    for change in changes:
        emit_recorded(run, stream, record(change), announce)
        live.extend(stream.take_now())
    await stream.close()
    assert content(live) == [
        started(1, MODEL_CALL),
        requested(1, "c1", "clock", approval=False),
        requested(1, "c2", "clock", approval=False),
        completed(1, MODEL_CALL, usage()),
        started(2, TOOL_CALLS),
        result(2, "c1", "clock", "12:00", error=False),
        result(2, "c2", "clock", "error: no clock", error=True),
        completed(2, TOOL_CALLS),
        started(3, MODEL_CALL),
        completed(3, MODEL_CALL, usage()),
    ]
    assert [e.sequence for e in live] == list(range(1, 11))
    assert stream.marks == Marks(version=5, step=3, attempt=1)
    whole, _ = await emitted(run, record.events)
    assert content(whole) == content(live)


async def test_a_step_completes_only_with_the_outcome_of_its_last_call() -> None:
    run = new_run()
    record = Recorder(run)
    calls = [call("c1", "clock"), call("c2", "clock"), call("c3", "clock")]
    record(lambda r: r.record_model_call(1, "", calls, USAGE))
    first_two = record(lambda r: r.record_tool_outcome(2, "c1", "a", False))
    first_two += record(lambda r: r.record_tool_outcome(2, "c2", "b", False))
    batch, marks = await emitted(run, first_two, step=1, attempt=1)
    assert content(batch) == [
        started(2, TOOL_CALLS),
        result(2, "c1", "clock", "a", error=False),
        result(2, "c2", "clock", "b", error=False),
    ]
    assert marks == Marks(version=4, step=2, attempt=1)
    last = record(lambda r: r.record_tool_outcome(2, "c3", "c", False))
    batch, marks = await emitted(run, last, step=2, attempt=1)
    assert content(batch) == [result(2, "c3", "clock", "c", error=False), completed(2, TOOL_CALLS)]
    assert marks == Marks(version=5, step=0, attempt=0)


async def test_a_denied_approval_resolves_and_its_call_gets_an_error_result() -> None:
    run = new_run()
    record = Recorder(run)
    record(lambda r: r.record_model_call(1, "", [call("c1", "send_email")], USAGE))
    recorded = record(lambda r: r.require_approval(2, "c1", EXPIRE_AT))
    recorded += record(lambda r: r.decide("c1", False, "approval timed out", True))
    recorded += record(lambda r: r.record_tool_outcome(2, "c1", "denied", True))
    batch, marks = await emitted(run, recorded, step=1, attempt=1)
    assert [e.WhichOneof("kind") for e in batch] == [
        "step_started",
        "tool_approval_required",
        "tool_approval_resolved",
        "tool_result",
        "step_completed",
    ]
    assert batch[0].step_started == run_pb2.StepStarted(step_index=2, kind=TOOL_CALLS, attempt=1)
    required = batch[1].tool_approval_required
    assert required.step_index == 2
    assert required.tool_call == proto_call("c1", "send_email")
    assert required.expire_time.ToNanoseconds() == 1_700_000_000_500_000_000
    assert batch[2].tool_approval_resolved == run_pb2.ToolApprovalResolved(
        tool_call_id="c1", approved=False, reason="approval timed out", timed_out=True
    )
    assert batch[3].tool_result.is_error
    assert marks == Marks(version=5, step=2, attempt=1)


async def test_two_approvals_in_one_step_announce_the_step_once() -> None:
    run = new_run()
    record = Recorder(run)
    calls = [call("c1", "send_email"), call("c2", "send_email")]
    record(lambda r: r.record_model_call(1, "", calls, USAGE))
    recorded = record(lambda r: r.require_approval(2, "c1", EXPIRE_AT))
    recorded += record(lambda r: r.require_approval(2, "c2", EXPIRE_AT + 1))
    batch, _ = await emitted(run, recorded, step=1, attempt=1)
    assert [e.WhichOneof("kind") for e in batch] == [
        "step_started",
        "tool_approval_required",
        "tool_approval_required",
    ]
    assert [e.tool_approval_required.tool_call.id for e in batch[1:]] == ["c1", "c2"]
    assert batch[2].tool_approval_required.expire_time.seconds == 1_700_000_001


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("MODEL_ERROR", run_pb2.RUN_ERROR_CODE_MODEL_ERROR),
        ("MAX_MODEL_CALLS", run_pb2.RUN_ERROR_CODE_MAX_MODEL_CALLS),
        ("EXECUTOR_LOST", run_pb2.RUN_ERROR_CODE_EXECUTOR_LOST),
        ("ATTEMPTS_EXHAUSTED", run_pb2.RUN_ERROR_CODE_ATTEMPTS_EXHAUSTED),
        ("INVALID_AGENT", run_pb2.RUN_ERROR_CODE_INVALID_AGENT),
        ("DISPATCH_FAILED", run_pb2.RUN_ERROR_CODE_DISPATCH_FAILED),
        ("SOMETHING_NEW", run_pb2.RUN_ERROR_CODE_INTERNAL),
    ],
)
async def test_a_failure_maps_its_code(code: str, expected: run_pb2.RunErrorCode.ValueType) -> None:
    run = new_run()
    record = Recorder(run)
    recorded = record(lambda r: r.fail(code, "it broke", code == "MODEL_ERROR"))
    batch, marks = await emitted(run, recorded)
    assert content(batch) == [
        run_pb2.RunEvent(
            run_failed=run_pb2.RunFailed(
                error=run_pb2.RunError(
                    code=expected, message="it broke", retryable=code == "MODEL_ERROR"
                )
            )
        )
    ]
    assert marks == Marks(version=2)


async def test_a_cancellation_is_the_terminal_event_and_nothing_follows_it() -> None:
    run = new_run()
    record = Recorder(run)
    record(lambda r: r.record_model_call(1, "", [call("c1", "send_email")], USAGE))
    recorded = record(lambda r: r.require_approval(2, "c1", EXPIRE_AT))
    recorded += record(lambda r: r.cancel("user gave up"))
    stream = RunStream(run.run_id)
    assert stream.attach()
    emit_recorded(run, stream, recorded, Announcements(stream, run.attempt_of, 1, 1))
    # Whatever comes after the terminal event is not shown.
    emit_recorded(run, stream, record.events[1:2], Announcements(stream, run.attempt_of))
    batch = stream.take_now()
    assert [e.WhichOneof("kind") for e in batch] == [
        "step_started",
        "tool_approval_required",
        "run_cancelled",
    ]
    assert batch[-1].run_cancelled.reason == "user gave up"
    assert stream.ended
    assert stream.take_now() == []
    await stream.close()


async def test_catching_up_resends_a_model_calls_whole_text_as_a_new_attempt() -> None:
    """The earlier executor announced step 1 (attempt 1) and may have published part of its
    text before dying: the text goes again, whole, as attempt 2, before the tool calls."""
    run = new_run()
    record = Recorder(run)
    recorded = record(
        lambda r: r.record_model_call(1, "the whole answer", [call("c1", "clock")], USAGE)
    )
    batch, marks = await emitted(run, recorded, step=1, attempt=1, catching_up=True)
    assert content(batch) == [
        started(1, MODEL_CALL, attempt=2),
        text(1, 2, "the whole answer"),
        requested(1, "c1", "clock", approval=False),
        completed(1, MODEL_CALL, usage()),
    ]
    assert marks == Marks(version=2, step=1, attempt=2)

    # Nothing was announced yet: attempt 1 is announced, then the text goes as attempt 2.
    batch, marks = await emitted(run, recorded, catching_up=True)
    assert content(batch) == [
        started(1, MODEL_CALL, attempt=1),
        started(1, MODEL_CALL, attempt=2),
        text(1, 2, "the whole answer"),
        requested(1, "c1", "clock", approval=False),
        completed(1, MODEL_CALL, usage()),
    ]
    assert marks == Marks(version=2, step=1, attempt=2)

    # Without catching up, the text is not sent again (it streamed live).
    batch, _ = await emitted(run, recorded, step=1, attempt=1)
    assert content(batch) == [
        requested(1, "c1", "clock", approval=False),
        completed(1, MODEL_CALL, usage()),
    ]


async def test_catching_up_a_long_text_sends_bounded_deltas() -> None:
    run = new_run()
    record = Recorder(run)
    long_text = "word " * MAX_DELTA_CHARS  # five times the bound
    recorded = record(lambda r: r.record_model_call(1, long_text, [], USAGE))
    batch, _ = await emitted(run, recorded, step=1, attempt=1, catching_up=True)
    deltas = [e.text_delta for e in batch if e.HasField("text_delta")]
    assert "".join(d.text for d in deltas) == long_text
    assert all(d.attempt == 2 for d in deltas)
    assert max(len(d.text) for d in deltas) <= MAX_DELTA_CHARS


async def test_catching_up_after_a_resumed_step_uses_the_steps_attempts() -> None:
    """Step 1 was attempt 2 (its first executor died mid-call); the second executor recorded
    its model call and died before publishing; a third took the run up (Resumed step 2)."""
    run = new_run()
    record = Recorder(run)
    record(lambda r: r.resume("executor-b"))  # Resumed step 1: attempt 2
    recorded = record(lambda r: r.record_model_call(1, "answer", [call("c1", "clock")], USAGE))
    recorded += record(lambda r: r.resume("executor-c"))  # Resumed step 2: attempt 2
    assert (run.attempt_of(1), run.attempt_of(2)) == (2, 2)
    batch, marks = await emitted(run, recorded, step=1, attempt=2, catching_up=True)
    assert content(batch) == [
        started(1, MODEL_CALL, attempt=3),
        text(1, 3, "answer"),
        requested(1, "c1", "clock", approval=False),
        completed(1, MODEL_CALL, usage()),
    ]
    assert marks == Marks(version=4, step=1, attempt=3)
    outcome = record(lambda r: r.record_tool_outcome(2, "c1", "12:00", False))
    batch, marks = await emitted(run, outcome, step=1, attempt=3)
    assert content(batch) == [
        started(2, TOOL_CALLS, attempt=2),
        result(2, "c1", "clock", "12:00", error=False),
        completed(2, TOOL_CALLS),
    ]
    assert marks == Marks(version=5, step=2, attempt=2)


async def test_catching_up_a_model_call_without_text_sends_no_new_attempt() -> None:
    run = new_run()
    record = Recorder(run)
    recorded = record(lambda r: r.record_model_call(1, "", [call("c1", "send_email")], USAGE))
    batch, marks = await emitted(run, recorded, step=1, attempt=1, catching_up=True)
    assert content(batch) == [
        requested(1, "c1", "send_email", approval=True),
        completed(1, MODEL_CALL, usage()),
    ]
    assert marks == Marks(version=2, step=0, attempt=0)


async def test_announcements_skip_what_an_earlier_executor_announced() -> None:
    stream = RunStream("r")
    assert stream.attach()
    attempts = {2: 5, 3: 1}
    announce = Announcements(stream, lambda step: attempts.get(step, 1), step=3, attempt=1)

    assert announce(1, MODEL_CALL) == 1  # before the earlier executor's step: never again
    assert announce(2, TOOL_CALLS) == 5  # ... whatever its attempt
    assert announce(3, MODEL_CALL) == 1  # its step, at the attempt it announced
    assert stream.take_now() == []
    assert stream.marks == Marks()

    attempts[3] = 2
    assert announce(3, MODEL_CALL) == 2  # a higher attempt of its step is announced
    assert announce(3, MODEL_CALL) == 2  # once
    assert announce(4, TOOL_CALLS) == 1
    assert announce(4, TOOL_CALLS) == 1
    attempts[4] = 2
    assert announce(4, TOOL_CALLS) == 2
    attempts[2] = 6
    assert announce(2, TOOL_CALLS) == 6
    assert content(stream.take_now()) == [
        started(3, MODEL_CALL, attempt=2),
        started(4, TOOL_CALLS, attempt=1),
        started(4, TOOL_CALLS, attempt=2),
    ]
    assert stream.marks == Marks(version=0, step=4, attempt=2)
    await stream.close()


async def test_fresh_announcements_announce_every_step_once_per_attempt() -> None:
    stream = RunStream("r")
    assert stream.attach()
    attempts = {1: 1}
    announce = Announcements(stream, lambda step: attempts.get(step, 1))
    assert announce(1, MODEL_CALL) == 1
    assert announce(1, MODEL_CALL) == 1
    attempts[1] = 2
    assert announce(1, MODEL_CALL) == 2
    assert announce(2, TOOL_CALLS) == 1
    assert content(stream.take_now()) == [
        started(1, MODEL_CALL, attempt=1),
        started(1, MODEL_CALL, attempt=2),
        started(2, TOOL_CALLS, attempt=1),
    ]
    assert stream.marks == Marks(step=2, attempt=1)
    await stream.close()


async def test_events_clients_do_not_see_only_move_the_version_mark() -> None:
    run = new_run()
    record = Recorder(run)
    recorded = record(lambda r: r.resume("executor-b"))
    recorded += record(lambda r: r.release("executor-b"))
    batch, marks = await emitted(run, [*record.events[:1], *recorded])
    assert batch == []
    assert marks == Marks(version=3)


async def test_a_retried_model_call_is_announced_as_the_steps_next_attempt() -> None:
    """A failed attempt is recorded (ModelCallFailed), which clients do not see; the retry's
    StepStarted(attempt 2) tells them to drop the failed attempt's text. A host that counts
    take-overs only (classic's is always 1) is given the run's count."""
    run = new_run()
    record = Recorder(run)
    stream = RunStream(run.run_id)
    assert stream.attach()
    announce = Announcements(stream, lambda step: 1)
    assert announce(1, MODEL_CALL, run.attempt_of(1)) == 1
    stream.text(1, 1, "Once upon")
    failed = record(lambda r: r.record_model_failure(1, "stream_incomplete", "cut", True))
    emit_recorded(run, stream, failed, announce)
    assert announce(1, MODEL_CALL, run.attempt_of(1)) == 2
    stream.text(1, 2, "Once upon a time.")
    emit_recorded(
        run, stream, record(lambda r: r.record_model_call(1, "Once", [], USAGE)), announce
    )
    assert content(stream.take_now()) == [
        started(1, MODEL_CALL, attempt=1),
        text(1, 1, "Once upon"),
        started(1, MODEL_CALL, attempt=2),
        text(1, 2, "Once upon a time."),
        completed(1, MODEL_CALL, usage()),
    ]
    assert stream.marks == Marks(version=3, step=1, attempt=2)
    await stream.close()
