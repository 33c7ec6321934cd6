"""The agent loop: one loop for both execution modes.

It asks the run's state machine for the next step, performs it (model call, approvals, tool
call), records the result as the run's events, and emits what clients see. What differs between
the modes is behind ``RunHost``: classic keeps events in memory and waits for approvals in
memory; durable commits every step's events before the next step and suspends on approvals.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from common import metrics
from eventstore.agent_config import AgentConfig, ToolSettings
from eventstore.messages import ToolCall
from eventstore.run import Run
from eventstore.run_steps import (
    AwaitApprovals,
    AwaitResults,
    CallModel,
    FailRun,
    Finish,
    Finished,
    HandToClient,
    ListTools,
    RequestApprovals,
    RunTool,
    Step,
    next_step,
)
from executor import step_spans
from executor.client_events import MODEL_CALL, TOOL_CALLS, Announcements, emit_recorded
from executor.models import ModelProviders
from executor.models.base import ModelError, ModelRequest, ToolSpec
from executor.run_stream import RunStream
from executor.tools import Tools
from executor.tools.arguments import parse_arguments
from executor.tools.base import RetryableToolError, Tool, ToolContext, ToolError
from executor.tools.mcp import ToolUnavailable

log = logging.getLogger(__name__)

# What the model sees after a tool result that was cut (AGENTRUN_MAX_TOOL_OUTPUT_BYTES).
CUT_MARKER = "\n[agentrun: the tool's result was cut here: it is longer than {limit} bytes]"


class RunHost(Protocol):
    """What the execution mode provides to the loop."""

    def attempt(self, step_index: int) -> int:
        """The attempt number of ``step_index`` (1 unless the step was interrupted before)."""
        ...

    async def commit(self, run: Run) -> None:
        """Records the run's new events (durable: stores them; classic: drops them)."""
        ...

    async def status_changed(self, run: Run) -> None:
        """The run started or stopped waiting for the outside (approvals, a client's results)."""
        ...

    async def wait_for_decisions(self, run: Run, step: AwaitApprovals | AwaitResults) -> bool:
        """Waits for the decisions or the client's results (or their deadline). False stops the
        loop (run suspended)."""
        ...

    async def finished(self, run: Run) -> None:
        """The run has ended (its terminal event is applied): record what outlives it."""
        ...


class AgentLoop:
    """Drives one run to its end, or until its host suspends it."""

    def __init__(
        self,
        run: Run,
        stream: RunStream,
        host: RunHost,
        models: ModelProviders,
        tools: Tools,
        config: AgentConfig | None = None,
    ) -> None:
        self.run = run
        # The agent as of the run's start, parsed once (``config``: parsed by the caller).
        self.config = config or run.agent_config
        self.stream = stream
        self.host = host
        self.models = models
        self.tools = tools
        self._announce = Announcements(stream, host.attempt)
        self._seen_ids: set[str] | None = None

    async def drive(self) -> None:
        while True:
            step = next_step(self.run)
            if isinstance(step, Finished):
                return
            if not await self._perform(step):
                return

    async def _perform(self, step: Step) -> bool:
        if isinstance(step, ListTools):
            await self._list_tools()
        elif isinstance(step, CallModel):
            await self._call_model(step)
        elif isinstance(step, RequestApprovals):
            await self._request_approvals(step)
        elif isinstance(step, AwaitApprovals | AwaitResults):
            what = "approval" if isinstance(step, AwaitApprovals) else "client_result"
            with step_spans.waiting(self.run, step.step_index, step.calls, what) as span:
                going_on = await self.host.wait_for_decisions(self.run, step)
                span.set_attribute("agentrun.wait.suspended", not going_on)
                return going_on
        elif isinstance(step, HandToClient):
            await self._hand_to_client(step)
        elif isinstance(step, RunTool):
            await self._run_tool(step)
        elif isinstance(step, Finish):
            self.run.complete(step.output)
            await self.end()
        elif isinstance(step, FailRun):
            await self.fail(step.code, step.message, retryable=step.retryable)
        return True

    async def fail(self, code: str, message: str, *, retryable: bool) -> None:
        """Ends the run as failed (also used by the modes for failures outside the steps)."""
        self.run.fail(code, message, retryable)
        await self.end()

    async def cancel(self, reason: str) -> None:
        self.run.cancel(reason)
        await self.end()

    async def end(self) -> None:
        """Persists the ended run and records what outlives it, then emits its terminal event."""
        ended = list(self.run.pending_events)
        await self.host.commit(self.run)
        await self.host.finished(self.run)
        self.emit_recorded(ended)

    async def _commit(self) -> None:
        """Persists the run's new events (the host decides how), then emits what they mean for
        clients: what a client sees of a step result always follows its commit."""
        recorded = list(self.run.pending_events)
        await self.host.commit(self.run)
        self.emit_recorded(recorded)

    def emit_recorded(self, events: Sequence[Any], *, catching_up: bool = False) -> None:
        """Emits the client events of recorded run events (see executor.client_events)."""
        emit_recorded(self.run, self.stream, events, self._announce, catching_up=catching_up)

    def announced_before(self, step: int, attempt: int) -> None:
        """An earlier executor of the run announced this attempt of this step (and the steps
        before it)."""
        self._announce = Announcements(self.stream, self.host.attempt, step, attempt)

    async def _list_tools(self) -> None:
        """Pins the tools of the agent's MCP servers in the run; a server that cannot be
        listed fails the run."""
        try:
            pinned = await self.tools.mcp.pin(self.run.tenant, self.config)
        except ToolUnavailable as exc:
            await self.fail("TOOL_UNAVAILABLE", str(exc), retryable=exc.retryable)
            return
        self.run.list_tools(pinned)
        await self._commit()

    async def _call_model(self, step: CallModel) -> None:
        backoff = step.not_before - time.time()
        if backoff > 0:
            await asyncio.sleep(backoff)  # a retry, when the state machine says
        began = time.perf_counter()
        await self._model_step(step)
        metrics.STEP_MODEL_CALL.observe(time.perf_counter() - began)

    async def _model_step(self, step: CallModel) -> None:
        run, stream = self.run, self.stream
        attempt = self._announce(step.step_index, MODEL_CALL, step.attempt)
        config = self.config
        try:
            provider = self.models.get(config.model.provider)
        except Exception as exc:
            await self.fail("INVALID_AGENT", str(exc), retryable=False)
            return
        request = ModelRequest(
            model=config.model,
            instructions=config.instructions,
            messages=run.model_messages,
            tools=self._tool_specs(),
            call_index=step.call_index,
            run_id=run.run_id,
        )

        awaiting_first = step.call_index == 0 and attempt == 1  # the run's first token

        def on_text(text: str) -> None:
            nonlocal awaiting_first
            if awaiting_first:
                awaiting_first = False
                metrics.first_token(run.execution_mode, run.created_on.timestamp())
            stream.text(step.step_index, attempt, text)

        provider_name = config.model.provider
        began = time.perf_counter()
        with step_spans.model_call(run, config, request, step.step_index, attempt) as span:
            try:
                reply = await provider.complete(request, on_text)
            except ModelError as exc:
                step_spans.model_failed(span, exc)
                error: ModelError | None = exc
            else:
                step_spans.model_replied(span, reply)
                error = None
        seconds = time.perf_counter() - began
        metrics.model_call(provider_name, seconds, error.code if error else None)
        if error is not None:
            await self._model_call_failed(step, error)
            return
        usage = reply.usage
        metrics.model_usage(provider_name, usage["input_tokens"], usage["output_tokens"])
        tool_calls = _unique_ids(reply.tool_calls, self._tool_call_ids(), step.call_index)
        run.record_model_call(step.step_index, reply.text, tool_calls, reply.usage)
        if not tool_calls:
            # The final answer: the run completes in the same save (one commit less per run).
            run.complete(reply.text)
            await self.end()
            return
        await self._commit()

    async def _model_call_failed(self, step: CallModel, error: ModelError) -> None:
        """Records the failure; the state machine then decides, from the agent's retry policy,
        whether the call is tried again (drive comes back here) or the run fails, which is
        recorded in the same save."""
        self.run.record_model_failure(step.step_index, error.code, error.message, error.retryable)
        follow = next_step(self.run)
        if isinstance(follow, FailRun):
            await self.fail(follow.code, follow.message, retryable=follow.retryable)
        else:
            await self._commit()

    async def _request_approvals(self, step: RequestApprovals) -> None:
        self._announce(step.step_index, TOOL_CALLS)
        expire_at = time.time() + self.config.approval_timeout
        for call in step.calls:
            self.run.require_approval(step.step_index, call["id"], expire_at)
        await self._commit()
        await self.host.status_changed(self.run)

    async def _hand_to_client(self, step: HandToClient) -> None:
        self._announce(step.step_index, TOOL_CALLS)
        settings = self.config.tool(step.call["name"])
        timeout = settings.timeout if settings is not None else 0.0
        self.run.require_client_result(
            step.step_index, step.call["id"], step.arguments_json, time.time() + timeout
        )
        await self._commit()
        await self.host.status_changed(self.run)

    async def _run_tool(self, step: RunTool) -> None:
        backoff = step.not_before - time.time()
        if backoff > 0:
            await asyncio.sleep(backoff)  # a retry, when the state machine says
        began = time.perf_counter()
        await self._tool_step(step)
        metrics.STEP_TOOL_CALL.observe(time.perf_counter() - began)

    async def _tool_step(self, step: RunTool) -> None:
        attempt = self._announce(step.step_index, TOOL_CALLS)
        call = step.call
        if step.denial is not None:
            reason = step.denial["reason"]
            why = "the approval timed out" if step.denial["timed_out"] else "a human denied it"
            output = json.dumps({"error": f"not run: {why}", "reason": reason})
            is_error = True
        elif step.exhausted:
            output, is_error = _error(step.exhausted), True
        else:
            tool_attempt = len(self.run.tool_failures_of(call["id"])) + 1
            try:
                with step_spans.tool_call(
                    self.run, call, step.step_index, attempt, tool_attempt
                ) as span:
                    output, is_error = await self._invoke(call)
                    step_spans.tool_answered(span, output, is_error)
            except RetryableToolError as exc:
                await self._tool_call_failed(step, exc)
                return
        self.run.record_tool_outcome(step.step_index, call["id"], output, is_error)
        await self._commit()

    async def _tool_call_failed(self, step: RunTool, error: RetryableToolError) -> None:
        """Records the failed attempt; the state machine then decides, from the tool's retry
        policy, whether the call is tried again (drive comes back here) or the model gets the
        error, which is recorded in the same save."""
        call = step.call
        self.run.record_tool_failure(
            step.step_index, call["id"], error.code, str(error), error.retry_after
        )
        follow = next_step(self.run)
        if isinstance(follow, RunTool) and follow.call["id"] == call["id"] and follow.exhausted:
            self.run.record_tool_outcome(
                step.step_index, call["id"], _error(follow.exhausted), True
            )
        await self._commit()

    async def _invoke(self, call: ToolCall) -> tuple[str, bool]:
        """Runs an attempt of a tool call; a failure becomes an error result for the model,
        except one that a retry may cure (RetryableToolError, which a timeout is too)."""
        settings = self.run.tool_settings_of(call["name"])
        tool = self._resolve(call["name"], settings) if settings is not None else None
        if settings is None or tool is None:
            return _error(f"unknown tool {call['name']!r}"), True
        try:
            arguments = parse_arguments(self.run.arguments_of(call))
        except ToolError as exc:
            return _error(str(exc)), True
        context = ToolContext(
            tenant=self.run.tenant,
            run_id=self.run.run_id,
            tool_call_id=call["id"],
            data_dir=self.tools.data_dir,
        )
        invoking = _measured(tool.invoke(arguments, context), settings.name)
        try:
            output = await asyncio.wait_for(invoking, settings.timeout)
        except RetryableToolError:
            raise
        except ToolError as exc:
            return _error(str(exc)), True
        except TimeoutError:
            raise RetryableToolError(
                "timeout", f"the tool timed out after {settings.timeout:g} s"
            ) from None
        except Exception as exc:
            log.exception("tool %s failed", call["name"])
            return _error(f"the tool failed: {type(exc).__name__}"), True
        return cut_output(output, self.tools.runtime.max_output_bytes), False

    def _tool_call_ids(self) -> set[str]:
        """The ids of the run's tool calls so far (read from its messages once per loop; the
        loop adds those of each model call it records)."""
        if self._seen_ids is None:
            self._seen_ids = {c["id"] for m in self.run.messages for c in m.get("tool_calls", [])}
        return self._seen_ids

    def _resolve(self, name: str, settings: ToolSettings) -> Tool | None:
        pinned = self.run.pinned_tool(name)
        if pinned is not None:
            return self.tools.resolve_pinned(settings, pinned)
        return self.tools.resolve(settings)

    def _tool_specs(self) -> list[ToolSpec]:
        specs = []
        for settings in self.config.tools:
            if settings.kind == "mcp":
                continue  # (its tools are pinned in the run: below)
            tool = self.tools.resolve(settings)
            if tool is not None:
                specs.append(
                    ToolSpec(
                        name=settings.name,
                        description=settings.description or tool.description,
                        parameters=tool.parameters,
                    )
                )
        for pinned in self.run.pinned_tools or ():
            specs.append(
                ToolSpec(
                    name=pinned["name"],
                    description=pinned["description"],
                    parameters=pinned["parameters"],
                )
            )
        return specs


async def _measured(invoking: Awaitable[str], tool: str) -> str:
    """A tool call's attempt, timed and counted (``tool``: its name in the agent, a bounded
    label: a name the model makes up never gets this far)."""
    began = time.perf_counter()
    try:
        output = await invoking
    except BaseException:  # a timeout cancels the attempt: it failed too
        metrics.tool_call(tool, time.perf_counter() - began, failed=True)
        raise
    metrics.tool_call(tool, time.perf_counter() - began, failed=False)
    return output


def _error(message: str) -> str:
    return json.dumps({"error": message})


def cut_output(output: str, limit: int) -> str:
    """A result of at most ``limit`` bytes of UTF-8, and a marker the model sees if it was cut
    (a tool that reads from elsewhere cuts its result itself, before it holds all of it)."""
    if len(output) * 4 <= limit:  # (short enough in any encoding: no need to encode it)
        return output
    encoded = output.encode()
    if len(encoded) <= limit:
        return output
    kept = encoded[:limit].decode("utf-8", errors="ignore")
    return kept + CUT_MARKER.format(limit=limit)


def _unique_ids(calls: list[ToolCall], seen: set[str], call_index: int) -> list[ToolCall]:
    """Tool call ids must be unique within the run (approvals name calls by id): ``seen`` holds
    the run's, and gets these."""
    unique: list[ToolCall] = []
    for i, call in enumerate(calls):
        call_id = call["id"] or f"call_{call_index}_{i}"
        if call_id in seen:
            call_id = f"{call_id}_{call_index}_{i}"
        seen.add(call_id)
        unique.append(
            {"id": call_id, "name": call["name"], "arguments_json": call["arguments_json"]}
        )
    return unique
