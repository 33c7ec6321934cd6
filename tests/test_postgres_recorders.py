"""eventstore.postgres_recorders: one statement per save, notification ids committed in order."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from eventstore.conversations import ConversationLog
from eventstore.persistence import StoreConfig
from eventstore.postgres_recorders import ComposedOnceAggregateRecorder, OrderedInsertRecorder
from eventstore.run_store import RunStore
from tests.conftest import database_url_for, drop_schema
from tests.test_run_store import new_run

GUARD = 30.0  # seconds; only bounds a hang


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[StoreConfig]:
    url = database_url_for("postgres", tmp_path)
    yield StoreConfig.from_url(url)
    drop_schema(url)


def connect(config: StoreConfig) -> psycopg.Connection[tuple[object, ...]]:
    assert config.postgres is not None
    conn = psycopg.connect(config.postgres.conninfo(), autocommit=True)
    conn.execute(f'SET search_path = "{config.postgres.schema}"')
    return conn


def waiting_for_the_run_store(config: StoreConfig) -> str:
    """Who waits for a lock on the run store's table: a session's application_name (an
    executor's id: see executor.server), "" if none waits."""
    with connect(config) as db:
        row = db.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'relation' AND NOT l.granted"
            " AND l.relation = 'runstore_events'::regclass"
        ).fetchone()
    return "" if row is None else str(row[0]) or "(unnamed)"


def test_the_stores_use_them(postgres: StoreConfig) -> None:
    runs, conversations = RunStore(postgres), ConversationLog(postgres)
    try:
        assert isinstance(runs.recorder, OrderedInsertRecorder)
        assert isinstance(conversations.recorder, ComposedOnceAggregateRecorder)
    finally:
        runs.close()
        conversations.close()


def test_a_save_waits_for_a_writer_that_drew_an_earlier_notification_id(
    postgres: StoreConfig,
) -> None:
    """The skip a follower must never make: a writer draws notification id n and has not
    committed; a later save must not commit id n+1 before it (a follower reading past n+1
    would never come back for n). Without the table lock the save would not wait here."""
    runs = RunStore(postgres)
    saved = threading.Event()
    run = new_run()

    def save() -> None:
        runs.create(run)
        saved.set()

    try:
        with connect(postgres) as writer, writer.transaction():
            writer.execute(
                "INSERT INTO runstore_events (originator_id, originator_version, topic, state)"
                " VALUES (%s, 1, 'earlier', '')",
                (uuid.uuid4(),),
            )
            thread = threading.Thread(target=save, daemon=True)
            thread.start()
            while not waiting_for_the_run_store(postgres):
                assert thread.is_alive(), "the save did not wait for the earlier writer"
            assert not saved.is_set()
        assert saved.wait(GUARD)
        thread.join(GUARD)
        notifications = runs.recorder.select_notifications(start=None, limit=10)
        assert notifications[0].topic == "earlier"
        assert notifications[1].originator_id == uuid.UUID(run.run_id)
    finally:
        runs.close()


def test_saves_return_their_notification_ids_in_order(postgres: StoreConfig) -> None:
    runs = RunStore(postgres)
    try:
        first, second = new_run(), new_run()
        runs.create(first)
        runs.create(second)
        notifications = runs.recorder.select_notifications(start=None, limit=10)
        assert [n.originator_id for n in notifications] == [
            uuid.UUID(first.run_id),
            uuid.UUID(second.run_id),
        ]
        assert notifications[0].id < notifications[1].id
    finally:
        runs.close()
