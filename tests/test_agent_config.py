"""AgentConfig: its JSON form round-trips, its defaults, and what validate() refuses."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest

from common.errors import InvalidArgument
from eventstore.agent_config import (
    DEFAULT_APPROVAL_TIMEOUT,
    DEFAULT_MAX_MODEL_CALLS,
    DEFAULT_TOOL_TIMEOUT,
    MAX_APPROVAL_TIMEOUT,
    MAX_MODEL_CALLS_LIMIT,
    MAX_SCRIPTED_DELAY,
    MAX_TOOL_TIMEOUT,
    AgentConfig,
    ModelSettings,
    ScriptedSettings,
    ScriptedToolCall,
    ScriptedTurn,
    ToolSettings,
)
from eventstore.retry_policy import (
    DEFAULT_MODEL_RETRY_POLICY,
    DEFAULT_TOOL_RETRY_POLICY,
    RetryPolicy,
)

SCRIPTED = ModelSettings(provider="scripted")


def minimal(**changes: Any) -> AgentConfig:
    """A valid configuration with only the required fields, changed by ``changes``."""
    return replace(AgentConfig(agent_id="helper", model=SCRIPTED), **changes)


def full_config() -> AgentConfig:
    return AgentConfig(
        agent_id="support-bot-2",
        version=7,
        display_name="Support bot",
        execution_mode="durable",
        instructions="Be brief.\nUse tools when useful.",
        approval_timeout=90.5,
        max_model_calls=3,
        model_retry_policy=RetryPolicy(5, 0.25, 1.5, 4.0, ("http_429", "transport")),
        tool_retry_policy=RetryPolicy(2, 10.0, 1.0, 10.0),
        model=ModelSettings(
            provider="scripted",
            name="scripted-v1",
            parameters={"temperature": 0.2, "stop": ["\n\n"], "nested": {"k": True}},
            base_url="http://127.0.0.1:9999/v1",
            api_key_env="SUPPORT_KEY",
            scripted=ScriptedSettings(
                first_token_delay=0.25,
                token_delay=0.01,
                turns=(
                    ScriptedTurn(
                        text="Checking.",
                        tool_calls=(
                            ScriptedToolCall("clock", '{"timezone": "Europe/Paris"}'),
                            ScriptedToolCall("calculator", '{"expression": "6*7"}'),
                        ),
                    ),
                    ScriptedTurn(text="Done: 42."),
                ),
            ),
        ),
        tools=(
            ToolSettings(name="clock", description="what time it is"),
            ToolSettings(name="send_email", requires_approval=True, timeout=5.0),
            ToolSettings(name="calculator", timeout=0.5),
        ),
    )


def test_full_config_round_trips_through_json() -> None:
    config = full_config()
    data = config.to_json()

    assert AgentConfig.from_json(data) == config
    # The JSON form is JSON-native: it survives serialisation to text and back.
    assert AgentConfig.from_json(json.loads(json.dumps(data))) == config


def test_json_form_names_every_field() -> None:
    data = full_config().to_json()

    assert data["agent_id"] == "support-bot-2"
    assert data["version"] == 7
    assert data["execution_mode"] == "durable"
    assert data["model"]["scripted"]["turns"] == [
        {
            "text": "Checking.",
            "tool_calls": [
                {"name": "clock", "arguments_json": '{"timezone": "Europe/Paris"}'},
                {"name": "calculator", "arguments_json": '{"expression": "6*7"}'},
            ],
        },
        {"text": "Done: 42.", "tool_calls": []},
    ]
    assert data["model_retry_policy"] == {
        "maximum_attempts": 5,
        "initial_interval": 0.25,
        "backoff_coefficient": 1.5,
        "maximum_interval": 4.0,
        "non_retryable_error_codes": ["http_429", "transport"],
    }
    assert data["tools"][1] == {
        "name": "send_email",
        "description": "",
        "requires_approval": True,
        "timeout": 5.0,
    }


def test_defaults_of_a_new_config() -> None:
    config = AgentConfig(agent_id="helper", model=SCRIPTED)

    assert config.version == 0
    assert config.display_name == ""
    assert config.execution_mode == "classic"
    assert config.instructions == ""
    assert config.tools == ()
    assert config.approval_timeout == DEFAULT_APPROVAL_TIMEOUT == 24 * 3600.0
    assert config.max_model_calls == DEFAULT_MAX_MODEL_CALLS == 16
    assert config.model.scripted == ScriptedSettings(0.0, 0.0, ())
    assert ToolSettings(name="clock").timeout == DEFAULT_TOOL_TIMEOUT == 30.0
    # A model call is tried 3 times (waiting 1 s, then 2 s); a tool call once.
    assert config.model_retry_policy == DEFAULT_MODEL_RETRY_POLICY == RetryPolicy(3, 1.0, 2.0, 30.0)
    assert config.tool_retry_policy == DEFAULT_TOOL_RETRY_POLICY == RetryPolicy(1, 1.0, 2.0, 30.0)
    config.validate()


def test_from_json_fills_missing_fields_with_defaults() -> None:
    config = AgentConfig.from_json(
        {
            "agent_id": "helper",
            "model": {"provider": "scripted", "scripted": {"turns": [{"text": "hi"}]}},
            "tools": [{"name": "clock"}],
        }
    )

    assert config == AgentConfig(
        agent_id="helper",
        model=ModelSettings(
            provider="scripted", scripted=ScriptedSettings(turns=(ScriptedTurn(text="hi"),))
        ),
        tools=(ToolSettings(name="clock"),),
    )


def test_tool_looks_up_by_name_and_with_version_changes_only_the_version() -> None:
    config = full_config()

    assert config.tool("send_email") == ToolSettings(
        name="send_email", requires_approval=True, timeout=5.0
    )
    assert config.tool("nope") is None
    assert config.with_version(8) == replace(config, version=8)
    assert config.version == 7


@pytest.mark.parametrize(
    "agent_id", ["a", "helper", "support-bot-2", "a" + "b" * 62, "x-"], ids=repr
)
def test_valid_agent_ids(agent_id: str) -> None:
    minimal(agent_id=agent_id).validate()


@pytest.mark.parametrize(
    ("config", "field"),
    [
        pytest.param(minimal(agent_id=""), "agent.id", id="empty-id"),
        pytest.param(minimal(agent_id="Helper"), "agent.id", id="uppercase-id"),
        pytest.param(minimal(agent_id="1helper"), "agent.id", id="id-starts-with-digit"),
        pytest.param(minimal(agent_id="-helper"), "agent.id", id="id-starts-with-dash"),
        pytest.param(minimal(agent_id="my_agent"), "agent.id", id="id-with-underscore"),
        pytest.param(minimal(agent_id="a" * 64), "agent.id", id="id-too-long"),
        pytest.param(
            minimal(model=ModelSettings(provider="anthropic")),
            "agent.model.provider",
            id="unknown-provider",
        ),
        pytest.param(
            minimal(model=ModelSettings(provider="openai")),
            "agent.model.name",
            id="openai-without-name",
        ),
        pytest.param(
            minimal(
                model=ModelSettings(
                    provider="scripted", scripted=ScriptedSettings(first_token_delay=-1)
                )
            ),
            "agent.model.scripted.first_token_delay",
            id="negative-first-token-delay",
        ),
        pytest.param(
            minimal(
                model=ModelSettings(provider="scripted", scripted=ScriptedSettings(token_delay=-1))
            ),
            "agent.model.scripted.token_delay",
            id="negative-token-delay",
        ),
        pytest.param(minimal(tools=(ToolSettings("shell"),)), "agent.tools", id="unknown-tool"),
        pytest.param(
            minimal(tools=(ToolSettings("clock"), ToolSettings("clock", timeout=2))),
            "agent.tools[1].name",
            id="duplicate-tool",
        ),
        pytest.param(
            minimal(tools=(ToolSettings("clock", timeout=0),)),
            "agent.tools.timeout",
            id="zero-tool-timeout",
        ),
        pytest.param(
            minimal(tools=(ToolSettings("clock", timeout=-3),)),
            "agent.tools.timeout",
            id="negative-tool-timeout",
        ),
        pytest.param(
            minimal(approval_timeout=0), "agent.approval_timeout", id="zero-approval-timeout"
        ),
        pytest.param(
            minimal(approval_timeout=-1),
            "agent.approval_timeout",
            id="negative-approval-timeout",
        ),
        pytest.param(minimal(max_model_calls=0), "agent.max_model_calls", id="zero-model-calls"),
        pytest.param(
            minimal(max_model_calls=MAX_MODEL_CALLS_LIMIT + 1),
            "agent.max_model_calls",
            id="too-many-model-calls",
        ),
        pytest.param(
            minimal(instructions="x" * 100_001), "agent.instructions", id="instructions-too-long"
        ),
        pytest.param(
            minimal(model_retry_policy=RetryPolicy(maximum_attempts=0)),
            "agent.model_retry_policy.maximum_attempts",
            id="no-model-call-attempts",
        ),
        pytest.param(
            minimal(tool_retry_policy=RetryPolicy(initial_interval=0)),
            "agent.tool_retry_policy.initial_interval",
            id="zero-tool-retry-interval",
        ),
    ],
)
def test_validate_names_the_wrong_field(config: AgentConfig, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        config.validate()
    assert caught.value.field == field


def test_validate_accepts_the_bounds() -> None:
    minimal(max_model_calls=1).validate()
    minimal(max_model_calls=MAX_MODEL_CALLS_LIMIT).validate()
    minimal(instructions="x" * 100_000).validate()
    minimal(model=ModelSettings(provider="openai", name="gpt-4o-mini")).validate()
    minimal(tools=(ToolSettings("clock", timeout=0.001),), approval_timeout=0.001).validate()
    full_config().validate()


def scripted_delays(first_token_delay: float = 0.0, token_delay: float = 0.0) -> ModelSettings:
    return ModelSettings(
        provider="scripted",
        scripted=ScriptedSettings(first_token_delay=first_token_delay, token_delay=token_delay),
    )


@pytest.mark.parametrize(
    ("config", "field", "bound"),
    [
        pytest.param(
            minimal(approval_timeout=315_576_000_000),
            "agent.approval_timeout",
            "30 days",
            id="approval-timeout-of-the-largest-duration",
        ),
        pytest.param(
            minimal(approval_timeout=float(2**62)),
            "agent.approval_timeout",
            "30 days",
            id="approval-timeout-of-2**62-seconds",
        ),
        pytest.param(
            minimal(approval_timeout=MAX_APPROVAL_TIMEOUT + 0.001),
            "agent.approval_timeout",
            "30 days",
            id="approval-timeout-just-over",
        ),
        pytest.param(
            minimal(tools=(ToolSettings("clock", timeout=MAX_TOOL_TIMEOUT + 1),)),
            "agent.tools.timeout",
            "1 hour",
            id="tool-timeout",
        ),
        pytest.param(
            minimal(model=scripted_delays(first_token_delay=MAX_SCRIPTED_DELAY + 1)),
            "agent.model.scripted.first_token_delay",
            "60 seconds",
            id="first-token-delay",
        ),
        pytest.param(
            minimal(model=scripted_delays(token_delay=1e300)),
            "agent.model.scripted.token_delay",
            "60 seconds",
            id="token-delay",
        ),
    ],
)
def test_validate_bounds_every_duration(config: AgentConfig, field: str, bound: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        config.validate()
    assert caught.value.field == field
    assert caught.value.description == f"must be at most {bound}"


def test_validate_accepts_durations_at_their_bounds() -> None:
    minimal(
        approval_timeout=MAX_APPROVAL_TIMEOUT,
        tools=(ToolSettings("clock", timeout=MAX_TOOL_TIMEOUT),),
        model=scripted_delays(MAX_SCRIPTED_DELAY, MAX_SCRIPTED_DELAY),
    ).validate()
    assert (MAX_APPROVAL_TIMEOUT, MAX_TOOL_TIMEOUT, MAX_SCRIPTED_DELAY) == (30 * 86400, 3600, 60)


def test_validate_refuses_an_agent_id_with_a_trailing_newline() -> None:
    with pytest.raises(InvalidArgument) as caught:
        minimal(agent_id="helper\n").validate()
    assert caught.value.field == "agent.id"


@pytest.mark.parametrize(
    ("config", "field"),
    [
        pytest.param(
            minimal(tools=(ToolSettings("clock", timeout=math.nan),)),
            "agent.tools.timeout",
            id="nan-tool-timeout",
        ),
        pytest.param(
            minimal(approval_timeout=math.nan), "agent.approval_timeout", id="nan-approval"
        ),
        pytest.param(
            minimal(approval_timeout=math.inf), "agent.approval_timeout", id="infinite-approval"
        ),
        pytest.param(
            minimal(model=scripted_delays(token_delay=math.nan)),
            "agent.model.scripted.token_delay",
            id="nan-token-delay",
        ),
    ],
)
def test_validate_refuses_durations_that_are_not_finite(config: AgentConfig, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        config.validate()
    assert caught.value.field == field
