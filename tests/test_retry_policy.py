"""RetryPolicy: which failures it retries, how long it waits, its bounds and its JSON form."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from common.errors import InvalidArgument
from eventstore.retry_policy import (
    DEFAULT_MODEL_RETRY_POLICY,
    DEFAULT_TOOL_RETRY_POLICY,
    MAX_ATTEMPTS_LIMIT,
    MAX_RETRY_INTERVAL,
    RetryPolicy,
)

POLICY = RetryPolicy(
    maximum_attempts=4,
    initial_interval=0.5,
    backoff_coefficient=3.0,
    maximum_interval=2.0,
    non_retryable_error_codes=("http_400",),
)


def test_the_waits_grow_by_the_coefficient_up_to_the_maximum() -> None:
    assert [POLICY.interval(n) for n in (1, 2, 3, 4)] == [0.5, 1.5, 2.0, 2.0]
    assert [DEFAULT_MODEL_RETRY_POLICY.interval(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    flat = RetryPolicy(initial_interval=5.0, backoff_coefficient=1.0, maximum_interval=5.0)
    assert flat.interval(MAX_ATTEMPTS_LIMIT) == 5.0
    steep = RetryPolicy(maximum_attempts=100, backoff_coefficient=10.0, maximum_interval=600.0)
    assert steep.interval(99) == 600.0


def test_only_retryable_failures_with_attempts_left_are_retried() -> None:
    assert POLICY.retries("http_500", retryable=True, failed_attempts=1)
    assert POLICY.retries("http_500", retryable=True, failed_attempts=3)
    assert not POLICY.retries("http_500", retryable=True, failed_attempts=4)
    assert not POLICY.retries("http_401", retryable=False, failed_attempts=1)
    # The agent may refuse to retry what the provider would.
    assert not POLICY.retries("http_400", retryable=True, failed_attempts=1)
    assert not DEFAULT_TOOL_RETRY_POLICY.retries("transport", retryable=True, failed_attempts=1)


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (RetryPolicy(maximum_attempts=0), "maximum_attempts"),
        (RetryPolicy(maximum_attempts=MAX_ATTEMPTS_LIMIT + 1), "maximum_attempts"),
        (RetryPolicy(initial_interval=0), "initial_interval"),
        (RetryPolicy(initial_interval=-1), "initial_interval"),
        (RetryPolicy(initial_interval=math.nan), "initial_interval"),
        (RetryPolicy(maximum_interval=MAX_RETRY_INTERVAL + 1), "maximum_interval"),
        (RetryPolicy(maximum_interval=math.inf), "maximum_interval"),
        (RetryPolicy(initial_interval=10.0, maximum_interval=5.0), "maximum_interval"),
        (RetryPolicy(backoff_coefficient=0.5), "backoff_coefficient"),
        (RetryPolicy(backoff_coefficient=11.0), "backoff_coefficient"),
        (RetryPolicy(non_retryable_error_codes=("",)), "non_retryable_error_codes"),
        (RetryPolicy(non_retryable_error_codes=("x" * 101,)), "non_retryable_error_codes"),
        (RetryPolicy(non_retryable_error_codes=("x",) * 51), "non_retryable_error_codes"),
    ],
    ids=repr,
)
def test_validate_names_the_field_out_of_bounds(policy: RetryPolicy, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        policy.validate("agent.model_retry_policy")
    assert caught.value.field == f"agent.model_retry_policy.{field}"


def test_validate_accepts_the_bounds() -> None:
    RetryPolicy(1, MAX_RETRY_INTERVAL, 1.0, MAX_RETRY_INTERVAL).validate("p")
    RetryPolicy(MAX_ATTEMPTS_LIMIT, 0.001, 10.0, 0.001, ("x" * 100,) * 50).validate("p")
    DEFAULT_MODEL_RETRY_POLICY.validate("p")
    DEFAULT_TOOL_RETRY_POLICY.validate("p")


def test_the_json_form_round_trips_and_fills_what_is_missing_from_a_default() -> None:
    data = json.loads(json.dumps(POLICY.to_json()))
    assert RetryPolicy.from_json(data, DEFAULT_MODEL_RETRY_POLICY) == POLICY
    assert RetryPolicy.from_json({}, DEFAULT_TOOL_RETRY_POLICY) == DEFAULT_TOOL_RETRY_POLICY
    partial = RetryPolicy.from_json({"maximum_attempts": 7}, DEFAULT_MODEL_RETRY_POLICY)
    assert partial == replace(DEFAULT_MODEL_RETRY_POLICY, maximum_attempts=7)
