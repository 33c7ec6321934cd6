"""The run's state machine, without any server: every history of events gives one next step.

Histories are built by applying the Run aggregate's own events, then replayed from their stored
form (the events alone) to show that the decision depends on nothing else.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from typing import Any

from eventsourcing.application import Application

from eventstore.agent_config import AgentConfig, HttpToolSettings, ModelSettings, ToolSettings
from eventstore.messages import ToolCall, Usage
from eventstore.retry_policy import DEFAULT_MODEL_RETRY_POLICY, RetryPolicy
from eventstore.run import Decision, Run
from eventstore.run_steps import (
    AwaitApprovals,
    CallModel,
    FailRun,
    Finish,
    Finished,
    RequestApprovals,
    RunTool,
    exhausted_attempts,
    next_step,
)

USAGE: Usage = {"input_tokens": 1, "output_tokens": 1}


def new_run(max_model_calls: int = 4, retry: RetryPolicy = DEFAULT_MODEL_RETRY_POLICY) -> Run:
    agent = AgentConfig(
        agent_id="a",
        version=3,
        model=ModelSettings(provider="scripted"),
        tools=(ToolSettings("clock"), ToolSettings("send_email", requires_approval=True)),
        max_model_calls=max_model_calls,
        model_retry_policy=retry,
    )
    return Run(
        run_id=str(uuid.uuid4()),
        tenant="t",
        request_id="",
        agent=agent.to_json(),
        input="hello",
        conversation_id="c",
        history=[],
        execution_mode="durable",
    )


def call(call_id: str, name: str) -> ToolCall:
    return {"id": call_id, "name": name, "arguments_json": "{}"}


_stores: dict[Any, Application[Any]] = {}


def replayed(run: Run) -> Run:
    """The run rebuilt from its stored events alone (each run's events go to a store of its own,
    saved as they are made, as durable mode does)."""
    if run.id not in _stores:
        _stores[run.id] = Application(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    store = _stores[run.id]
    store.save(run)
    rebuilt: Run = store.repository.get(run.id)
    return rebuilt


def status_of(run: Run) -> str:
    return run.status


def test_a_new_run_calls_the_model() -> None:
    assert next_step(new_run()) == CallModel(step_index=1, call_index=0)


def test_an_answer_without_tool_calls_finishes_the_run() -> None:
    run = new_run()
    run.record_model_call(1, "hi there", [], USAGE)
    assert next_step(run) == Finish("hi there")
    run.complete("hi there")
    assert next_step(run) == Finished()
    assert next_step(replayed(run)) == Finished()


def test_tool_calls_run_in_the_models_order_then_the_model_is_called_again() -> None:
    run = new_run()
    run.record_model_call(1, "", [call("c1", "clock"), call("c2", "clock")], USAGE)
    assert next_step(run) == RunTool(step_index=2, call=call("c1", "clock"), denial=None)
    run.record_tool_outcome(2, "c1", "{}", False)
    assert run.steps_completed == 1
    assert next_step(replayed(run)) == RunTool(step_index=2, call=call("c2", "clock"), denial=None)
    run.record_tool_outcome(2, "c2", "{}", False)
    assert run.steps_completed == 2
    assert next_step(run) == CallModel(step_index=3, call_index=1)
    assert [m["role"] for m in run.messages] == ["user", "assistant", "tool", "tool"]


def test_approvals_are_requested_for_every_call_that_needs_one_before_any_tool_runs() -> None:
    run = new_run()
    calls = [call("c1", "clock"), call("c2", "send_email"), call("c3", "send_email")]
    run.record_model_call(1, "", calls, USAGE)
    assert next_step(run) == RequestApprovals(step_index=2, calls=(calls[1], calls[2]))
    run.require_approval(2, "c2", 100.0)
    run.require_approval(2, "c3", 50.0)
    assert status_of(run) == "awaiting_approval"
    expected = AwaitApprovals(step_index=2, calls=(calls[1], calls[2]), expire_at=50.0)
    assert next_step(run) == expected
    assert next_step(replayed(run)) == expected
    run.decide("c3", False, "no", False)
    assert next_step(run) == AwaitApprovals(step_index=2, calls=(calls[1],), expire_at=100.0)
    run.decide("c2", True, "", False)
    assert status_of(run) == "running"
    assert next_step(run) == RunTool(step_index=2, call=calls[0], denial=None)
    run.record_tool_outcome(2, "c1", "{}", False)
    assert next_step(run) == RunTool(step_index=2, call=calls[1], denial=None)
    run.record_tool_outcome(2, "c2", "{}", False)
    denial: Decision = {"approved": False, "reason": "no", "timed_out": False}
    assert next_step(replayed(run)) == RunTool(step_index=2, call=calls[2], denial=denial)


def test_the_run_fails_when_it_needs_more_model_calls_than_allowed() -> None:
    run = new_run(max_model_calls=1)
    run.record_model_call(1, "", [call("c1", "clock")], USAGE)
    run.record_tool_outcome(2, "c1", "{}", False)
    step = next_step(run)
    assert isinstance(step, FailRun)
    assert step.code == "MAX_MODEL_CALLS"


def test_ended_runs_have_nothing_left_to_do() -> None:
    ends: list[Callable[[Run], object]] = [
        lambda r: r.fail("MODEL_ERROR", "x", True),
        lambda r: r.cancel("stop"),
    ]
    for end in ends:
        run = new_run()
        run.record_model_call(1, "", [call("c1", "send_email")], USAGE)
        run.require_approval(2, "c1", 1.0)
        end(run)
        assert next_step(run) == Finished()
        assert next_step(replayed(run)) == Finished()


def test_every_prefix_of_a_history_decides_the_same_before_and_after_replay() -> None:
    """Applies a long history one event at a time; at each point the live aggregate and the one
    rebuilt from the stored events decide the same next step."""
    run = new_run(max_model_calls=10)
    actions: list[Callable[[Run], object]] = [
        lambda r: r.record_model_call(
            1, "a", [call("c1", "clock"), call("c2", "send_email")], USAGE
        ),
        lambda r: r.require_approval(2, "c2", 9.0),
        lambda r: r.decide("c2", True, "", False),
        lambda r: r.record_tool_outcome(2, "c1", "{}", False),
        lambda r: r.record_tool_outcome(2, "c2", "{}", True),
        lambda r: r.record_model_call(3, "b", [call("c3", "send_email")], USAGE),
        lambda r: r.require_approval(4, "c3", 9.0),
        lambda r: r.decide("c3", False, "timeout", True),
        lambda r: r.record_tool_outcome(4, "c3", "denied", True),
        lambda r: r.record_model_call(5, "done", [], USAGE),
        lambda r: r.complete("done"),
    ]
    seen = []
    nothing: Callable[[Run], object] = lambda r: None  # noqa: E731
    for action in itertools.chain([nothing], actions):
        action(run)
        step = next_step(run)
        assert next_step(replayed(run)) == step
        seen.append(type(step).__name__)
    assert seen == [
        "CallModel",
        "RequestApprovals",
        "AwaitApprovals",
        "RunTool",
        "RunTool",
        "CallModel",
        "RequestApprovals",
        "AwaitApprovals",
        "RunTool",
        "CallModel",
        "Finish",
        "Finished",
    ]


RETRY = RetryPolicy(maximum_attempts=3, initial_interval=2.0, backoff_coefficient=3.0)


def test_a_failed_model_call_is_tried_again_after_the_policys_backoff() -> None:
    run = new_run(retry=RETRY)
    run.record_model_failure(1, "http_503", "overloaded", True)
    (first,) = run.failures_of(1)
    assert (first["code"], run.attempt_of(1)) == ("http_503", 2)
    expected = CallModel(step_index=1, call_index=0, attempt=2, not_before=first["failed_at"] + 2.0)
    assert next_step(run) == expected
    assert next_step(replayed(run)) == expected
    run.record_model_failure(1, "transport", "connection reset", True)
    second = run.failures_of(1)[-1]
    assert (second["code"], run.attempt_of(1)) == ("transport", 3)
    assert next_step(replayed(run)) == CallModel(
        step_index=1, call_index=0, attempt=3, not_before=second["failed_at"] + 6.0
    )


def test_the_run_fails_when_the_policy_allows_no_more_attempts() -> None:
    run = new_run(retry=RETRY)
    for _ in range(3):
        run.record_model_failure(1, "http_503", "overloaded", True)
    step = next_step(replayed(run))
    assert step == FailRun(
        "MODEL_ERROR",
        "overloaded (after 3 attempts: the agent's retry policy allows no more)",
        retryable=True,
    )
    once = new_run(retry=RetryPolicy(maximum_attempts=1))
    once.record_model_failure(1, "http_503", "overloaded", True)
    assert next_step(once) == FailRun(
        "MODEL_ERROR",
        "overloaded (after 1 attempt: the agent's retry policy allows no more)",
        retryable=True,
    )


def test_a_failure_that_a_retry_cannot_cure_fails_the_run_at_once() -> None:
    run = new_run(retry=RETRY)
    run.record_model_failure(1, "http_401", "bad key", False)
    assert next_step(replayed(run)) == FailRun("MODEL_ERROR", "bad key", retryable=False)
    listed = new_run(retry=RetryPolicy(non_retryable_error_codes=("http_429",)))
    listed.record_model_failure(1, "http_429", "rate limited", True)
    assert next_step(listed) == FailRun("MODEL_ERROR", "rate limited", retryable=True)


def test_a_completed_model_call_leaves_its_failures_behind() -> None:
    run = new_run(retry=RETRY)
    run.record_model_failure(1, "http_503", "overloaded", True)
    run.record_model_call(1, "", [call("c1", "clock")], USAGE)
    run.record_tool_outcome(2, "c1", "{}", False)
    assert run.failures_of(1) == []
    assert run.attempt_of(1) == 2
    assert next_step(replayed(run)) == CallModel(step_index=3, call_index=1, attempt=1)


def test_failed_model_calls_are_not_counted_as_attempts_that_crashed_their_executor() -> None:
    run = new_run(retry=RetryPolicy(maximum_attempts=5))
    run.record_model_failure(1, "http_503", "overloaded", True)
    run.record_model_failure(1, "http_503", "overloaded", True)
    # The executor of the third attempt died; another one takes the run up.
    assert exhausted_attempts(run, max_attempts=2) is None
    run.resume("executor-b")
    assert run.attempt_of(1) == 4
    # It died too, during the fourth.
    crashed = exhausted_attempts(replayed(run), max_attempts=2)
    assert crashed is not None
    assert "attempted 2 times" in crashed.message


def tool_run(agent_policy: RetryPolicy, tool_policy: RetryPolicy | None = None) -> Run:
    """A run whose model called the HTTP tool "weather" (call "w1") at step 1."""
    agent = AgentConfig(
        agent_id="a",
        model=ModelSettings(provider="scripted"),
        tools=(
            ToolSettings(
                "weather",
                kind="http",
                http=HttpToolSettings(url="http://127.0.0.1/w", description="w"),
                retry_policy=tool_policy,
            ),
        ),
        tool_retry_policy=agent_policy,
    )
    run = Run(
        run_id=str(uuid.uuid4()),
        tenant="t",
        request_id="",
        agent=agent.to_json(),
        input="hello",
        conversation_id="c",
        history=[],
        execution_mode="durable",
    )
    run.record_model_call(1, "", [call("w1", "weather")], USAGE)
    return run


def test_a_failed_tool_call_is_tried_again_after_its_own_policys_backoff() -> None:
    run = tool_run(RetryPolicy(maximum_attempts=1), RETRY)
    w1 = call("w1", "weather")
    assert next_step(run) == RunTool(step_index=2, call=w1, denial=None)
    run.record_tool_failure(2, "w1", "http_503", "HTTP 503", 0.0)
    (first,) = run.tool_failures_of("w1")
    assert run.attempt_of(2) == 2
    expected = RunTool(2, w1, None, not_before=first["failed_at"] + 2.0)
    assert next_step(run) == expected
    assert next_step(replayed(run)) == expected
    # Retry-After lengthens the wait (the policy's is 6 s now), never beyond the longest (30 s).
    run.record_tool_failure(2, "w1", "http_429", "HTTP 429", 9.0)
    second = run.tool_failures_of("w1")[-1]
    assert next_step(replayed(run)).not_before == second["failed_at"] + 9.0  # type: ignore[union-attr]
    capped = tool_run(RetryPolicy(maximum_attempts=1), RETRY)
    capped.record_tool_failure(2, "w1", "http_429", "HTTP 429", 3600.0)
    assert next_step(capped).not_before == capped.tool_failures[-1]["failed_at"] + 30.0  # type: ignore[union-attr]
    run.record_tool_failure(2, "w1", "http_429", "HTTP 429", 3600.0)
    assert next_step(replayed(run)) == RunTool(
        2,
        w1,
        None,
        exhausted="HTTP 429 (after 3 attempts: the tool's retry policy allows no more)",
    )


def test_a_tool_without_a_policy_of_its_own_takes_the_agents() -> None:
    run = tool_run(RetryPolicy(maximum_attempts=2, initial_interval=0.5, maximum_interval=0.5))
    run.record_tool_failure(2, "w1", "timeout", "slow", 30.0)
    last = run.tool_failures_of("w1")[-1]
    assert next_step(replayed(run)).not_before == last["failed_at"] + 0.5  # type: ignore[union-attr]
    run.record_tool_failure(2, "w1", "timeout", "slow", 0.0)
    assert next_step(replayed(run)).exhausted.startswith("slow (after 2 attempts")  # type: ignore[union-attr]
    listed = tool_run(RetryPolicy(maximum_attempts=5, non_retryable_error_codes=("http_503",)))
    listed.record_tool_failure(2, "w1", "http_503", "HTTP 503", 0.0)
    assert next_step(listed).exhausted == "HTTP 503"  # type: ignore[union-attr]


def test_failed_tool_calls_are_not_counted_as_attempts_that_crashed_their_executor() -> None:
    run = tool_run(RetryPolicy(maximum_attempts=5))
    run.record_tool_failure(2, "w1", "transport", "refused", 0.0)
    run.record_tool_failure(2, "w1", "transport", "refused", 0.0)
    # The executor of the third attempt died; another one takes the run up.
    assert exhausted_attempts(run, max_attempts=2) is None
    run.resume("executor-b")
    assert run.attempt_of(2) == 4
    # It died too, during the fourth.
    crashed = exhausted_attempts(replayed(run), max_attempts=2)
    assert crashed is not None
    assert "attempted 2 times" in crashed.message
