"""executor.translation: domain values to and from protos."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from google.protobuf import duration_pb2

from agentrun.v1 import agent_pb2
from common.errors import InvalidArgument
from eventstore.retry_policy import (
    DEFAULT_MODEL_RETRY_POLICY,
    DEFAULT_TOOL_RETRY_POLICY,
    RetryPolicy,
)
from eventstore.run_store import StoredEvent
from executor.translation import agent_from_proto, agent_to_proto, history_batches


def stored(version: int, text: str) -> StoredEvent:
    return StoredEvent(version, datetime(2026, 1, 1, tzinfo=UTC), "Noted", {"text": text})


def test_history_batches_keep_every_event_in_order_and_close_at_the_size() -> None:
    events = [stored(v, "x" * 100) for v in range(1, 11)]
    batches = list(history_batches(events, max_bytes=400))
    assert [len(b.events) for b in batches] == [3, 3, 3, 1]
    versions = [e.version for b in batches for e in b.events]
    assert versions == list(range(1, 11))
    first = batches[0].events[0]
    assert first.type == "Noted"
    assert first.payload_json == '{"text": "' + "x" * 100 + '"}'
    assert first.time.ToDatetime(tzinfo=UTC) == datetime(2026, 1, 1, tzinfo=UTC)


def test_a_batch_closes_with_the_event_that_fills_it() -> None:
    events = [stored(1, "small"), stored(2, "y" * 5000), stored(3, "small")]
    assert [len(b.events) for b in history_batches(events, max_bytes=1000)] == [2, 1]


def test_no_events_make_no_batches() -> None:
    assert list(history_batches([], max_bytes=1000)) == []


def test_durations_of_any_size_reach_validation_which_names_their_field() -> None:
    huge = duration_pb2.Duration(seconds=2**62)
    agent = agent_pb2.Agent(
        id="helper",
        model=agent_pb2.ModelConfig(provider="scripted"),
        approval_timeout=huge,
        tools=[agent_pb2.Tool(name="clock", timeout=huge)],
    )
    agent.model.scripted.first_token_delay.CopyFrom(huge)
    agent.model.scripted.token_delay.CopyFrom(huge)
    config = agent_from_proto(agent)  # raised OverflowError (then INTERNAL) before
    assert config.approval_timeout == config.tools[0].timeout == float(2**62)
    assert config.model.scripted.first_token_delay == config.model.scripted.token_delay == 2**62
    with pytest.raises(InvalidArgument) as caught:
        config.validate()
    assert caught.value.field == "agent.model.scripted.first_token_delay"


def test_durations_keep_their_nanoseconds() -> None:
    agent = agent_pb2.Agent(approval_timeout=duration_pb2.Duration(seconds=90, nanos=500_000_000))
    agent.model.scripted.token_delay.FromMilliseconds(10)
    config = agent_from_proto(agent)
    assert config.approval_timeout == 90.5
    assert config.model.scripted.token_delay == 0.01


def test_retry_policies_round_trip_and_unset_ones_are_the_defaults() -> None:
    unset = agent_from_proto(agent_pb2.Agent(id="a", model=agent_pb2.ModelConfig(provider="x")))
    assert unset.model_retry_policy == DEFAULT_MODEL_RETRY_POLICY
    assert unset.tool_retry_policy == DEFAULT_TOOL_RETRY_POLICY
    config = replace(
        unset,
        model_retry_policy=RetryPolicy(5, 0.25, 1.5, 4.5, ("http_429",)),
        tool_retry_policy=RetryPolicy(2, 10.0, 1.0, 10.0),
    )
    assert agent_from_proto(agent_to_proto(config)) == config


def test_a_policy_takes_a_default_for_each_field_it_leaves_unset() -> None:
    agent = agent_pb2.Agent(id="a", model=agent_pb2.ModelConfig(provider="scripted"))
    agent.model_retry_policy.non_retryable_error_codes.append("http_429")
    agent.tool_retry_policy.initial_interval.FromSeconds(45)
    config = agent_from_proto(agent)
    assert config.model_retry_policy == replace(
        DEFAULT_MODEL_RETRY_POLICY, non_retryable_error_codes=("http_429",)
    )
    # The longest wait is at least the first one.
    assert config.tool_retry_policy == RetryPolicy(1, 45.0, 2.0, 45.0)
    config.validate()
