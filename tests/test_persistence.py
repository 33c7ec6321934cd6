"""eventstore.persistence: one process at a time creates the tables of a PostgreSQL store."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg

from eventstore.persistence import StoreConfig
from tests.conftest import database_url_for, drop_schema

GUARD = 30.0  # seconds; only bounds a hang


def waiting_for_an_advisory_lock(config: StoreConfig) -> bool:
    assert config.postgres is not None
    with psycopg.connect(config.postgres.conninfo(), autocommit=True) as db:
        row = db.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    return row is not None and row[0] > 0


def test_one_process_at_a_time_creates_the_tables(tmp_path: Path) -> None:
    url = database_url_for("postgres", tmp_path)
    config = StoreConfig.from_url(url)
    second_in = threading.Event()

    def second() -> None:
        with config.creating_tables():
            second_in.set()

    try:
        with config.creating_tables():
            thread = threading.Thread(target=second, daemon=True)
            thread.start()
            while not waiting_for_an_advisory_lock(config):
                assert thread.is_alive(), "the second got in while the first held the lock"
            assert not second_in.is_set()
        assert second_in.wait(GUARD)
        thread.join(GUARD)
    finally:
        drop_schema(url)


def test_sqlite_needs_no_lock(tmp_path: Path) -> None:
    config = StoreConfig.from_url(f"sqlite:///{tmp_path}")
    with config.creating_tables(), config.creating_tables():
        pass
