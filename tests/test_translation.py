"""executor.translation: domain values to and from protos."""

from __future__ import annotations

from datetime import UTC, datetime

from eventstore.run_store import StoredEvent
from executor.translation import history_batches


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
