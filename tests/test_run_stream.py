"""The run event stream: sequences, coalescing, consumers."""

from __future__ import annotations

import asyncio
import math

import pytest

from agentrun.v1 import run_pb2
from eventstore.messages import ToolCall, Usage
from executor.run_stream import MAX_DELTA_CHARS, Marks, RunStream

USAGE: Usage = {"input_tokens": 1, "output_tokens": 2}


def kinds(events: list[run_pb2.RunEvent]) -> list[str]:
    return [e.WhichOneof("kind") or "" for e in events]


async def test_events_get_gap_free_sequences_when_taken_and_text_coalesces() -> None:
    taken: list[list[run_pb2.RunEvent]] = []
    stream = RunStream("r", on_taken=lambda batch, version: taken.append(batch))
    assert stream.attach()
    stream.run_started(run_pb2.Run(id="r"))
    stream.step_started(1, run_pb2.STEP_KIND_MODEL_CALL, 1)
    for token in ["a", "b", "c"]:
        stream.text(1, 1, token)
    first = await stream.next_batch()
    assert kinds(first) == ["run_started", "step_started", "text_delta"]
    assert first[2].text_delta.text == "abc"
    stream.text(1, 1, "d")
    stream.text(1, 2, "e")  # a new attempt never merges with the old one
    stream.text(1, 2, "")
    second = await stream.next_batch()
    assert [(e.text_delta.attempt, e.text_delta.text) for e in second] == [(1, "d"), (2, "e")]
    stream.run_completed("done", USAGE)
    stream.text(1, 2, "ignored after the end")
    third = await stream.next_batch()
    assert kinds(third) == ["run_completed"]
    assert await stream.next_batch() == []
    events = first + second + third
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(e.run_id == "r" and e.time.seconds > 0 for e in events)
    assert taken == [first, second, third]
    assert stream.ended
    assert stream.last_sequence == 6
    await stream.close()


async def test_a_delta_is_bounded() -> None:
    stream = RunStream("r")
    assert stream.attach()
    stream.text(1, 1, "x" * MAX_DELTA_CHARS)
    stream.text(1, 1, "y")
    batch = await stream.next_batch()
    assert [len(e.text_delta.text) for e in batch] == [MAX_DELTA_CHARS, 1]
    await stream.close()


async def test_a_resumed_stream_continues_the_sequence() -> None:
    stream = RunStream("r", first_sequence=41)
    assert stream.attach()
    stream.step_started(3, run_pb2.STEP_KIND_MODEL_CALL, 2)
    assert [e.sequence for e in await stream.next_batch()] == [41]
    await stream.close()


async def test_without_a_consumer_the_drain_takes_events_and_one_consumer_at_a_time() -> None:
    taken: list[run_pb2.RunEvent] = []
    done = asyncio.Event()

    def on_taken(batch: list[run_pb2.RunEvent], marks: Marks) -> None:
        taken.extend(batch)
        if any(e.HasField("run_cancelled") for e in batch):
            done.set()

    stream = RunStream("r", on_taken=on_taken)
    assert stream.attach()
    assert not stream.attach()
    stream.step_started(1, run_pb2.STEP_KIND_MODEL_CALL, 1)
    assert kinds(await stream.next_batch()) == ["step_started"]
    stream.detach()
    stream.text(1, 1, "hello")
    stream.run_cancelled("stop")
    await done.wait()
    await stream.wait_ended()
    assert kinds(taken) == ["step_started", "text_delta", "run_cancelled"]
    assert [e.sequence for e in taken] == [1, 2, 3]
    await stream.close()


async def test_an_interrupted_consumer_gets_the_error_and_the_run_is_unaffected() -> None:
    stream = RunStream("r")
    assert stream.attach()
    waiting = asyncio.create_task(stream.next_batch())
    stream.interrupt(ValueError("bad approval"))
    with pytest.raises(ValueError, match="bad approval"):
        await waiting
    stream.text(1, 1, "still streaming")
    assert (await stream.next_batch())[0].text_delta.text == "still streaming"
    await stream.close()


@pytest.mark.parametrize(
    ("expire_at", "expected"),
    [
        (1_700_000_000.5, "2023-11-14T22:13:20.500Z"),
        (1_700_000_000 + 315_576_000_000, "9999-12-31T23:59:59.999999999Z"),
        (float(2**62), "9999-12-31T23:59:59.999999999Z"),
        (math.inf, "9999-12-31T23:59:59.999999999Z"),
        (math.nan, "9999-12-31T23:59:59.999999999Z"),
        (-1e12, "0001-01-01T00:00:00Z"),
    ],
)
async def test_an_approval_deadline_out_of_a_timestamps_range_is_clamped(
    expire_at: float, expected: str
) -> None:
    stream = RunStream("r")
    assert stream.attach()
    call: ToolCall = {"id": "c1", "name": "send_email", "arguments_json": "{}"}
    stream.approval_required(2, call, expire_at)
    [event] = await stream.next_batch()
    assert event.tool_approval_required.expire_time.ToJsonString() == expected
    await stream.close()
