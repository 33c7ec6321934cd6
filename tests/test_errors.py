"""The one table from failures to statuses: a dependency's failure anywhere is its
UNAVAILABLE, named, whatever raised it."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import psycopg

import common.nats_link  # noqa: F401  (registers NATS's failures)
import eventstore.store_errors  # noqa: F401  (registers the database's failures)
from common.errors import NotFound, Unavailable, as_agentrun_error


def test_a_nats_request_that_timed_out_is_nats_unavailable() -> None:
    error = as_agentrun_error(nats.errors.TimeoutError())
    assert isinstance(error, Unavailable)
    assert error.dependency == "nats"
    assert error.message.startswith("NATS is unavailable: ")


def test_a_jetstream_without_a_leader_is_nats_unavailable() -> None:
    error = as_agentrun_error(nats.js.errors.ServiceUnavailableError())
    assert isinstance(error, Unavailable)
    assert error.dependency == "nats"


def test_a_lost_database_connection_is_the_database_unavailable() -> None:
    error = as_agentrun_error(psycopg.OperationalError("connection refused"))
    assert isinstance(error, Unavailable)
    assert error.message == "the database is unavailable: connection refused"


def test_a_domain_error_is_itself_and_a_bug_is_none() -> None:
    missing = NotFound("run", "r1")
    assert as_agentrun_error(missing) is missing
    assert as_agentrun_error(KeyError("x")) is None
