"""The Run aggregate's own rules: decisions, pending calls, what the model sees."""

from __future__ import annotations

import copy
import uuid

import pytest
from eventsourcing.utils import get_topic

from common.errors import FailedPrecondition
from eventstore.agent_config import AgentConfig, ModelSettings, ToolSettings
from eventstore.messages import ChatMessage, ToolCall, Usage
from eventstore.run import Run

USAGE: Usage = {"input_tokens": 1, "output_tokens": 1}
EMAIL: ToolCall = {"id": "c1", "name": "send_email", "arguments_json": "{}"}
CLOCK: ToolCall = {"id": "c2", "name": "clock", "arguments_json": "{}"}


def new_run(history: list[ChatMessage] | None = None) -> Run:
    agent = AgentConfig(
        agent_id="a",
        model=ModelSettings(provider="scripted"),
        tools=(ToolSettings("clock"), ToolSettings("send_email", requires_approval=True)),
    )
    return Run(
        run_id=str(uuid.uuid4()),
        tenant="t",
        request_id="r",
        agent=agent.to_json(),
        input="now",
        conversation_id="c",
        history=history or [],
        execution_mode="classic",
    )


def test_the_model_sees_the_conversation_then_this_run() -> None:
    earlier: list[ChatMessage] = [
        {"role": "user", "content": "before"},
        {"role": "assistant", "content": "answer"},
    ]
    run = new_run(earlier)
    assert run.model_messages == [*earlier, {"role": "user", "content": "now"}]
    assert run.messages == [{"role": "user", "content": "now"}]


def test_pending_calls_and_approval_requirements() -> None:
    run = new_run()
    assert run.pending_tool_calls() == []
    run.record_model_call(1, "", [EMAIL, CLOCK], USAGE)
    assert run.pending_tool_calls() == [EMAIL, CLOCK]
    assert run.requires_approval(EMAIL)
    assert not run.requires_approval(CLOCK)
    run.record_tool_outcome(2, "c2", "{}", False)
    assert run.pending_tool_calls() == [EMAIL]


def test_decisions_are_checked_against_what_is_pending_and_recorded() -> None:
    run = new_run()
    run.record_model_call(1, "", [EMAIL, CLOCK], USAGE)
    with pytest.raises(FailedPrecondition, match="not awaiting approval"):
        run.check_decision("c1", True)  # not required yet
    run.require_approval(2, "c1", 10.0)
    with pytest.raises(FailedPrecondition, match="not awaiting approval"):
        run.check_decision("c2", True)  # the clock needs no approval
    with pytest.raises(FailedPrecondition, match="not awaiting approval"):
        run.check_decision("send_email", True)  # by id, never by tool name
    assert run.check_decision("c1", True) is True
    run.decide("c1", True, "", False)
    assert run.check_decision("c1", True) is False  # a repeat changes nothing
    with pytest.raises(FailedPrecondition, match="already approved"):
        run.check_decision("c1", False)


def test_a_timed_out_decision_says_so_and_an_ended_run_takes_no_new_decision() -> None:
    run = new_run()
    run.record_model_call(1, "", [EMAIL], USAGE)
    run.require_approval(2, "c1", 10.0)
    run.decide("c1", False, "late", True)
    with pytest.raises(FailedPrecondition, match="denied by the approval timeout"):
        run.check_decision("c1", True)
    other = new_run()
    other.record_model_call(1, "", [EMAIL], USAGE)
    other.require_approval(2, "c1", 10.0)
    other.cancel("stop")
    with pytest.raises(FailedPrecondition, match="already ended"):
        other.check_decision("c1", True)


def test_the_event_classes_keep_the_topics_runs_are_stored_under() -> None:
    names = [
        "Requested",
        "ModelCallCompleted",
        "ToolApprovalRequired",
        "ToolApprovalDecided",
        "ToolCallCompleted",
        "Resumed",
        "Released",
        "Completed",
        "Failed",
        "Cancelled",
    ]
    for name in names:
        assert get_topic(getattr(Run, name)) == f"eventstore.run:Run.{name}"


def test_ends_and_step_results_are_known_by_their_classes() -> None:
    run = new_run()
    run.record_model_call(1, "", [EMAIL], USAGE)
    run.require_approval(2, "c1", 10.0)
    run.decide("c1", True, "", False)
    run.record_tool_outcome(2, "c1", "sent", False)
    run.resume("executor-a")
    run.release("executor-a")
    run.fail("MODEL_ERROR", "broke", True)
    events = run.collect_events()
    assert [type(e).__name__ for e in events if isinstance(e, Run.StepResult)] == [
        "ModelCallCompleted",
        "ToolApprovalRequired",
        "ToolApprovalDecided",
        "ToolCallCompleted",
    ]
    assert [type(e).__name__ for e in events if isinstance(e, Run.Ended)] == ["Failed"]
    assert all(issubclass(c, Run.Ended) for c in (Run.Completed, Run.Failed, Run.Cancelled))


def test_the_pinned_agent_is_read_as_a_typed_value_parsed_once() -> None:
    run = new_run()
    config = run.agent_config
    assert config == AgentConfig.from_json(run.agent)
    assert run.agent_config is config
    assert config.tool("send_email") == ToolSettings("send_email", requires_approval=True)
    assert run.requires_approval(EMAIL)
    assert not run.requires_approval(CLOCK)
    assert not run.requires_approval({"id": "c3", "name": "unknown", "arguments_json": "{}"})
    # Kept out of the state that the library snapshots, compares and copies: a copy (equal
    # to the run) parses its own.
    assert "_agent_config" not in vars(run)
    copied = copy.deepcopy(run)
    assert copied == run
    assert copied.agent_config == config
    assert copied.agent_config is not config
