"""ConversationLog on every backend: turns append once each, in order, per tenant."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from eventstore.conversations import Conversation, ConversationLog
from eventstore.messages import (
    ChatMessage,
    ToolCall,
    assistant_message,
    tool_message,
    user_message,
)
from eventstore.persistence import StoreConfig
from eventstore.run_list import RunList

TENANT = "acme"
OTHER = "globex"


def turn(n: int) -> list[ChatMessage]:
    return [user_message(f"question {n}"), assistant_message(f"answer {n}", [])]


@pytest.fixture
def log(store: StoreConfig) -> Iterator[ConversationLog]:
    # RunList creates the PostgreSQL schema, as it does first in executor/context.py.
    RunList(store).close()
    app = ConversationLog(store)
    yield app
    app.close()


def test_a_new_conversation_has_no_history(log: ConversationLog) -> None:
    assert log.history(TENANT, "conv-1") == []


def test_record_turn_appends_the_messages(log: ConversationLog) -> None:
    call: ToolCall = {"id": "call_0_0", "name": "clock", "arguments_json": "{}"}
    first = [
        user_message("what time is it"),
        assistant_message("Let me look.", [call]),
        tool_message("call_0_0", '{"local": "10:00"}', is_error=False),
        assistant_message("It is 10:00.", []),
    ]
    second = [user_message("thanks"), assistant_message("You're welcome.", [])]

    log.record_turn(TENANT, "conv-1", "run-1", first)
    assert log.history(TENANT, "conv-1") == first

    log.record_turn(TENANT, "conv-1", "run-2", second)
    assert log.history(TENANT, "conv-1") == first + second


def test_recording_the_same_run_twice_is_ignored(log: ConversationLog) -> None:
    log.record_turn(TENANT, "conv-1", "run-1", turn(1))
    log.record_turn(TENANT, "conv-1", "run-2", turn(2))

    log.record_turn(TENANT, "conv-1", "run-1", turn(1))
    log.record_turn(TENANT, "conv-1", "run-1", [user_message("a different retry")])

    assert log.history(TENANT, "conv-1") == turn(1) + turn(2)


def test_conversations_and_tenants_are_isolated(log: ConversationLog) -> None:
    log.record_turn(TENANT, "conv-1", "run-1", turn(1))
    log.record_turn(TENANT, "conv-2", "run-2", turn(2))
    log.record_turn(OTHER, "conv-1", "run-3", turn(3))
    # The same run id in another tenant's conversation is a different run.
    log.record_turn(OTHER, "conv-2", "run-1", turn(4))

    assert log.history(TENANT, "conv-1") == turn(1)
    assert log.history(TENANT, "conv-2") == turn(2)
    assert log.history(OTHER, "conv-1") == turn(3)
    assert log.history(OTHER, "conv-2") == turn(4)
    assert log.history(OTHER, "conv-3") == []


def test_many_turns_read_back_in_order_across_snapshots(
    log: ConversationLog, store: StoreConfig
) -> None:
    count = 60  # snapshots every 25 events: the conversation starts, then 60 turns
    for n in range(count):
        log.record_turn(TENANT, "long", f"run-{n}", turn(n))
    expected = [m for n in range(count) for m in turn(n)]

    assert log.snapshots is not None
    snapshots = log.snapshots.get(Conversation.create_id(TENANT, "long"))
    assert [s.originator_version for s in snapshots] == [25, 50]
    assert log.history(TENANT, "long") == expected

    # Runs recorded before a snapshot are still known after it, and a fresh reader agrees.
    log.record_turn(TENANT, "long", "run-3", [user_message("duplicate")])
    reopened = ConversationLog(store)
    try:
        assert reopened.history(TENANT, "long") == expected
    finally:
        reopened.close()


def record_concurrently(log: ConversationLog, writers: int, turns_each: int) -> list[str]:
    """Records ``turns_each`` turns from each of ``writers`` threads started together; returns
    the contents of the conversation's messages (each turn is one message: its run id)."""
    start = threading.Barrier(writers)

    def write(writer: int) -> None:
        start.wait()
        for n in range(turns_each):
            run_id = f"run-{writer}-{n}"
            log.record_turn(TENANT, "busy", run_id, [user_message(run_id)])

    with ThreadPoolExecutor(max_workers=writers) as pool:
        for future in [pool.submit(write, w) for w in range(writers)]:
            future.result()
    return [m["content"] for m in log.history(TENANT, "busy")]


def test_concurrent_first_turns_from_threads_all_land(log: ConversationLog) -> None:
    # Eight writers race to start the conversation; every lost race is another writer's
    # success, so each writer retries at most seven times, within the retry budget.
    contents = record_concurrently(log, writers=8, turns_each=1)

    assert sorted(contents) == [f"run-{w}-0" for w in range(8)]


def test_sustained_concurrent_writers_all_land(log: ConversationLog) -> None:
    writers, turns_each = 4, 50

    contents = record_concurrently(log, writers, turns_each)

    assert sorted(contents) == sorted(
        f"run-{w}-{n}" for w in range(writers) for n in range(turns_each)
    )
    for writer in range(writers):  # each writer's turns keep their order
        mine = [c for c in contents if c.startswith(f"run-{writer}-")]
        assert mine == [f"run-{writer}-{n}" for n in range(turns_each)]
