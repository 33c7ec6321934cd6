"""A run's client-visible event stream: sequencing and coalescing, in one place.

The agent loop adds events; a consumer takes them in batches. Events get their per-run sequence
when they are taken, not when they are added, so text added while the consumer was busy with
its previous batch merges into one delta ("flush when the previous write completes"). Every
taken batch also goes to ``on_taken`` (the JetStream publisher), so live and resuming clients
see the very same events with the very same sequences.

The consumer is the live gRPC stream while a client is attached; otherwise a drain task paced
by the publisher takes the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from agentrun.v1 import run_pb2
from eventstore.messages import ToolCall, Usage

MAX_DELTA_CHARS = 16_384
# What a protobuf Timestamp can hold: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
FIRST_TIME_NANOS = -62_135_596_800 * 10**9
LAST_TIME_NANOS = 253_402_300_799 * 10**9 + 999_999_999


@dataclass(frozen=True)
class Marks:
    """How far a stream has got in its run's history, published with each batch so that an
    executor taking the run up later knows what the stream already shows."""

    version: int = 0  # the run's recorded events up to this version have their client events
    step: int = 0  # the highest step announced (StepStarted)
    attempt: int = 0  # the highest attempt of that step announced

    def merge(self, other: Marks) -> Marks:
        step, attempt = max((self.step, self.attempt), (other.step, other.attempt))
        return Marks(max(self.version, other.version), step, attempt)


Taken = Callable[[list[run_pb2.RunEvent], Marks], None]
"""Receives each taken batch and the stream's marks as of that batch."""
Pacer = Callable[[], Awaitable[None]]


@dataclass
class _PendingText:
    step_index: int
    attempt: int
    parts: list[str] = field(default_factory=list)
    size: int = 0


class RunStream:
    """The event stream of one run (see module docstring)."""

    def __init__(
        self,
        run_id: str,
        *,
        first_sequence: int = 1,
        on_taken: Taken | None = None,
        pace: Pacer | None = None,
        drain: bool = True,
    ) -> None:
        self.run_id = run_id
        self._next_sequence = first_sequence
        self._outbox: list[run_pb2.RunEvent | _PendingText] = []
        self._ready = asyncio.Event()
        self._terminal_added = False
        self._terminal_taken = False
        self._ended = asyncio.Event()
        self._emptied = asyncio.Event()
        self._interruption: BaseException | None = None
        self._marks = Marks()
        self._on_taken = on_taken
        self._pace = pace
        self._attached = False
        self._drain_task: asyncio.Task[None] | None = None
        self._drains = drain
        self._start_drain()

    @property
    def last_sequence(self) -> int:
        return self._next_sequence - 1

    def mark_version(self, version: int) -> None:
        """The client events of the run's recorded events up to ``version`` have been added."""
        self._marks = self._marks.merge(Marks(version=version))

    @property
    def marks(self) -> Marks:
        return self._marks

    @property
    def ended(self) -> bool:
        """True once the terminal event has been taken."""
        return self._terminal_taken

    # -- adding ------------------------------------------------------------------------------

    def text(self, step_index: int, attempt: int, text: str) -> None:
        if not text or self._terminal_added:
            return
        while len(text) > MAX_DELTA_CHARS:  # a long text goes out as several bounded deltas
            self._outbox.append(
                _PendingText(step_index, attempt, [text[:MAX_DELTA_CHARS]], MAX_DELTA_CHARS)
            )
            text = text[MAX_DELTA_CHARS:]
        last = self._outbox[-1] if self._outbox else None
        if (
            isinstance(last, _PendingText)
            and last.step_index == step_index
            and last.attempt == attempt
            and last.size + len(text) <= MAX_DELTA_CHARS
        ):
            last.parts.append(text)
            last.size += len(text)
        else:
            self._outbox.append(_PendingText(step_index, attempt, [text], len(text)))
        self._ready.set()

    def run_started(self, run: run_pb2.Run) -> None:
        self._add(run_pb2.RunEvent(run_started=run_pb2.RunStarted(run=run)))

    def step_started(self, step_index: int, kind: run_pb2.StepKind.ValueType, attempt: int) -> None:
        self._marks = self._marks.merge(Marks(step=step_index, attempt=attempt))
        self._add(
            run_pb2.RunEvent(
                step_started=run_pb2.StepStarted(
                    step_index=step_index,
                    kind=kind,
                    attempt=attempt,
                )
            )
        )

    def tool_call_requested(
        self,
        step_index: int,
        call: ToolCall,
        requires_approval: bool,
        client_executes: bool = False,
    ) -> None:
        self._add(
            run_pb2.RunEvent(
                tool_call_requested=run_pb2.ToolCallRequested(
                    step_index=step_index,
                    tool_call=tool_call_proto(call),
                    requires_approval=requires_approval,
                    client_executes=client_executes,
                )
            )
        )

    def client_tool_call_required(self, step_index: int, call: ToolCall, expire_at: float) -> None:
        required = run_pb2.ClientToolCallRequired(
            step_index=step_index, tool_call=tool_call_proto(call)
        )
        set_time(required.expire_time, expire_at)
        self._add(run_pb2.RunEvent(client_tool_call_required=required))

    def approval_required(self, step_index: int, call: ToolCall, expire_at: float) -> None:
        required = run_pb2.ToolApprovalRequired(
            step_index=step_index, tool_call=tool_call_proto(call)
        )
        set_time(required.expire_time, expire_at)
        self._add(run_pb2.RunEvent(tool_approval_required=required))

    def approval_resolved(
        self,
        tool_call_id: str,
        approved: bool,
        reason: str,
        timed_out: bool,
        edited_arguments_json: str = "",
    ) -> None:
        self._add(
            run_pb2.RunEvent(
                tool_approval_resolved=run_pb2.ToolApprovalResolved(
                    tool_call_id=tool_call_id,
                    approved=approved,
                    reason=reason,
                    timed_out=timed_out,
                    edited_arguments_json=edited_arguments_json,
                )
            )
        )

    def tool_result(self, step_index: int, call: ToolCall, output: str, is_error: bool) -> None:
        self._add(
            run_pb2.RunEvent(
                tool_result=run_pb2.ToolResult(
                    step_index=step_index,
                    tool_call_id=call["id"],
                    tool_name=call["name"],
                    output=output,
                    is_error=is_error,
                )
            )
        )

    def step_completed(
        self, step_index: int, kind: run_pb2.StepKind.ValueType, usage: Usage | None = None
    ) -> None:
        completed = run_pb2.StepCompleted(step_index=step_index, kind=kind)
        if usage is not None:
            completed.usage.CopyFrom(usage_proto(usage))
        self._add(run_pb2.RunEvent(step_completed=completed))

    def run_completed(self, output: str, usage: Usage) -> None:
        self._add_terminal(
            run_pb2.RunEvent(
                run_completed=run_pb2.RunCompleted(output=output, usage=usage_proto(usage))
            )
        )

    def run_failed(
        self, code: run_pb2.RunErrorCode.ValueType, message: str, retryable: bool
    ) -> None:
        error = run_pb2.RunError(code=code, message=message, retryable=retryable)
        self._add_terminal(run_pb2.RunEvent(run_failed=run_pb2.RunFailed(error=error)))

    def run_cancelled(self, reason: str) -> None:
        self._add_terminal(run_pb2.RunEvent(run_cancelled=run_pb2.RunCancelled(reason=reason)))

    def end(self, event: run_pb2.RunEvent) -> None:
        """Ends the stream with a terminal event made elsewhere (a run's recorded end)."""
        self._add_terminal(event)

    def _add(self, event: run_pb2.RunEvent) -> None:
        if self._terminal_added:
            return
        self._outbox.append(event)
        self._ready.set()

    def _add_terminal(self, event: run_pb2.RunEvent) -> None:
        if self._terminal_added:
            return
        self._add(event)
        self._terminal_added = True

    # -- taking ------------------------------------------------------------------------------

    async def next_batch(self) -> list[run_pb2.RunEvent]:
        """The next events, sequenced; empty once the terminal event has been taken."""
        while not self._outbox:
            if self._interruption is not None:
                error, self._interruption = self._interruption, None
                raise error
            if self._terminal_taken:
                return []
            self._ready.clear()
            await self._ready.wait()
        return self._take()

    def interrupt(self, error: BaseException) -> None:
        """Makes the attached consumer's next ``next_batch`` raise ``error`` (for example a
        steering message on its RPC was refused), without affecting the run."""
        self._interruption = error
        self._ready.set()

    def take_now(self) -> list[run_pb2.RunEvent]:
        """Takes whatever is pending at once (to flush a stream that will get no more)."""
        return self._take() if self._outbox else []

    def _take(self) -> list[run_pb2.RunEvent]:
        batch: list[run_pb2.RunEvent] = []
        now = time.time_ns()
        taken_at = Timestamp(seconds=now // 1_000_000_000, nanos=now % 1_000_000_000)
        for item in self._outbox:
            if isinstance(item, _PendingText):
                event = run_pb2.RunEvent(
                    text_delta=run_pb2.TextDelta(
                        step_index=item.step_index, attempt=item.attempt, text="".join(item.parts)
                    )
                )
            else:
                event = item
            event.run_id = self.run_id
            event.sequence = self._next_sequence
            event.time.CopyFrom(taken_at)
            self._next_sequence += 1
            batch.append(event)
        self._outbox.clear()
        self._emptied.set()
        if self._terminal_added:
            self._terminal_taken = True
            self._ended.set()
        if self._on_taken is not None:
            self._on_taken(batch, self._marks)
        return batch

    async def drained(self) -> None:
        """Returns once everything added so far has been taken (by the consumer attached, or
        by the drain task)."""
        while self._outbox:
            self._emptied.clear()
            await self._emptied.wait()

    async def wait_ended(self) -> None:
        """Returns once the terminal event has been taken by a consumer."""
        await self._ended.wait()

    # -- consumers -----------------------------------------------------------------------------

    def attach(self) -> bool:
        """Makes the caller the consumer. False if another consumer is attached."""
        if self._attached:
            return False
        self._attached = True
        if self._drain_task is not None:
            self._drain_task.cancel()
            self._drain_task = None
        return True

    def detach(self) -> None:
        self._attached = False
        self._start_drain()

    def _start_drain(self) -> None:
        if self._drains and self._drain_task is None and not self._terminal_taken:
            self._drain_task = asyncio.create_task(self._drain(), name=f"drain-{self.run_id}")

    async def _drain(self) -> None:
        while not self._terminal_taken:
            while not self._outbox:
                self._ready.clear()
                await self._ready.wait()
            if self._pace is not None:
                await self._pace()
            self._take()

    async def close(self) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_task
            self._drain_task = None


def set_time(stamp: Timestamp, seconds: float) -> None:
    """Sets ``stamp`` to ``seconds`` since the epoch, clamped to what a Timestamp can hold: a
    time too far away (an approval deadline of an agent stored before durations were bounded)
    reads as the last representable one, instead of failing the event that carries it. NaN, a
    deadline that never comes, reads as the last one too."""
    if math.isfinite(seconds):
        nanos = int(seconds * 1e9)
    else:
        nanos = FIRST_TIME_NANOS if seconds == -math.inf else LAST_TIME_NANOS
    stamp.FromNanoseconds(min(max(nanos, FIRST_TIME_NANOS), LAST_TIME_NANOS))


def tool_call_proto(call: ToolCall) -> run_pb2.ToolCall:
    return run_pb2.ToolCall(id=call["id"], name=call["name"], arguments_json=call["arguments_json"])


def usage_proto(usage: Usage) -> run_pb2.Usage:
    return run_pb2.Usage(input_tokens=usage["input_tokens"], output_tokens=usage["output_tokens"])
