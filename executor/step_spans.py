"""The spans of a run's steps (common.tracing): model calls in OpenTelemetry's GenAI semantic
conventions, tool calls, waits for approvals and client results.

Every span names its run, its step and the step's attempt (a step taken up again after its
executor died is the next attempt, on the executor that took it up). Prompts, completions, tool
arguments and results go on spans only with AGENTRUN_TRACE_CONTENT=on.

Model and tool calls start no spans of their own: their spans are not made current
(``tracing.leaf``), which spares setting and restoring the context twice per call.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry.trace import Span, SpanKind

from common import tracing
from eventstore.agent_config import AgentConfig
from eventstore.messages import ToolCall
from eventstore.run import Run
from executor.models.base import ModelError, ModelReply, ModelRequest


def _step(run: Run, step_index: int, attempt: int) -> dict[str, Any]:
    return {
        "agentrun.run.id": run.run_id,
        "agentrun.step.index": step_index,
        "agentrun.step.attempt": attempt,
    }


def model_call(
    run: Run, config: AgentConfig, request: ModelRequest, step_index: int, attempt: int
) -> AbstractContextManager[Span]:
    """The span of one model call (a GenAI ``chat`` span)."""
    if not tracing.enabled():
        return tracing.leaf("")
    provider = config.model.provider
    model = config.model.name or provider
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider,
        "gen_ai.system": provider,  # the older name of gen_ai.provider.name
        "gen_ai.request.model": model,
        "gen_ai.conversation.id": run.conversation_id,
        **_step(run, step_index, attempt),
    }
    if tracing.content_enabled():
        attributes["gen_ai.system_instructions"] = json.dumps(
            [{"type": "text", "content": request.instructions}]
        )
        attributes["gen_ai.input.messages"] = json.dumps(list(request.messages))
    return tracing.leaf(f"chat {model}", kind=SpanKind.CLIENT, attributes=attributes)


def model_replied(span: Span, reply: ModelReply) -> None:
    if not span.is_recording():
        return
    reason = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
    span.set_attribute("gen_ai.response.finish_reasons", [reason])
    span.set_attribute("gen_ai.usage.input_tokens", reply.usage["input_tokens"])
    span.set_attribute("gen_ai.usage.output_tokens", reply.usage["output_tokens"])
    if tracing.content_enabled():
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}
        if reply.tool_calls:
            message["tool_calls"] = reply.tool_calls
        span.set_attribute("gen_ai.output.messages", json.dumps([message]))


def model_failed(span: Span, error: ModelError) -> None:
    if span.is_recording():
        span.set_attribute("error.type", error.code)
        span.set_attribute("agentrun.model.retryable", error.retryable)
        span.set_status(tracing.ERROR, error.message)


def tool_call(
    run: Run, call: ToolCall, step_index: int, attempt: int, tool_attempt: int
) -> AbstractContextManager[Span]:
    """The span of one attempt of a tool call (a GenAI ``execute_tool`` span)."""
    if not tracing.enabled():
        return tracing.leaf("")
    attributes = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": call["name"],
        "gen_ai.tool.call.id": call["id"],
        "gen_ai.tool.type": "function",
        "agentrun.tool.attempt": tool_attempt,
        **_step(run, step_index, attempt),
    }
    if tracing.content_enabled():
        attributes["gen_ai.tool.call.arguments"] = run.arguments_of(call)
    return tracing.leaf(f"execute_tool {call['name']}", attributes=attributes)


def tool_answered(span: Span, output: str, is_error: bool) -> None:
    if not span.is_recording():
        return
    span.set_attribute("agentrun.tool.is_error", is_error)
    if is_error:
        span.set_attribute("error.type", "tool_error")
    if tracing.content_enabled():
        span.set_attribute("gen_ai.tool.call.result", output)


def waiting(
    run: Run, step_index: int, calls: tuple[ToolCall, ...], what: str
) -> AbstractContextManager[Span]:
    """The span of a wait for the outside (``what``: approval, or client_result). A durable
    run suspends at once: its span ends there, and the decision resumes the run later."""
    if not tracing.enabled():
        return tracing.span("")
    attributes = {
        "agentrun.wait.kind": what,
        "gen_ai.tool.call.id": [c["id"] for c in calls],
        "gen_ai.tool.name": [c["name"] for c in calls],
        **_step(run, step_index, run.attempt_of(step_index)),
    }
    return tracing.span(f"await {what}", attributes=attributes)
