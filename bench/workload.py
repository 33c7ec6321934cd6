"""The benchmark workload: a run = a model call streaming 20 tokens -> a tool call -> a model
call streaming 20 tokens -> complete, on the scripted model with zero delays (overhead only)."""

from __future__ import annotations

from eventstore.agent_config import (
    AgentConfig,
    ExecutionMode,
    ModelSettings,
    ScriptedSettings,
    ScriptedToolCall,
    ScriptedTurn,
    ToolSettings,
)

TOKENS = 20
FIRST = " ".join(f"first{i}" for i in range(TOKENS))
SECOND = " ".join(f"second{i}" for i in range(TOKENS))


def bench_agent(agent_id: str, mode: ExecutionMode = "classic", **scripted: float) -> AgentConfig:
    """The workload's agent; ``scripted`` may set first_token_delay and token_delay (seconds)."""
    return AgentConfig(
        agent_id=agent_id,
        version=1,
        execution_mode=mode,
        model=ModelSettings(
            provider="scripted",
            scripted=ScriptedSettings(
                turns=(
                    ScriptedTurn(FIRST, (ScriptedToolCall("calculator", '{"expression": "6*7"}'),)),
                    ScriptedTurn(SECOND),
                ),
                **scripted,
            ),
        ),
        tools=(ToolSettings("calculator"),),
    )


STEP = ScriptedTurn("step", (ScriptedToolCall("calculator", '{"expression": "1+1"}'),))


def long_agent(agent_id: str, model_calls: int) -> AgentConfig:
    """A durable agent whose run has ``2 * model_calls - 1`` steps (each call but the last
    asks for a tool): for the cost of a step late in a long run."""
    return AgentConfig(
        agent_id=agent_id,
        version=1,
        execution_mode="durable",
        max_model_calls=model_calls,
        model=ModelSettings(
            provider="scripted",
            scripted=ScriptedSettings(turns=(*[STEP] * (model_calls - 1), ScriptedTurn("done"))),
        ),
        tools=(ToolSettings("calculator"),),
    )
