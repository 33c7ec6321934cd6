"""Shared fixtures: the store on every backend, a real nats-server, a real stack of processes.

PostgreSQL suites use the server of AGENTRUN_TEST_POSTGRES_URL (CI sets it) or, without it, a
throwaway server started the first time a test needs one (tests/postgres_server.py); every store
and stack gets its own schema. They are skipped only when the variable says ``skip``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from cli.launcher import Service, start_nats
from eventstore.persistence import StoreConfig
from executor.extensions import load_extensions
from tests.console_stack import console_stack, grpc_client  # noqa: F401 (fixtures)
from tests.postgres_server import Throwaway
from tests.stack import Stack, start_stack

# As an executor does at startup: the agents the tests validate name the shipped providers and
# tools.
load_extensions()

BACKENDS = ["sqlite", "postgres"]
THROWAWAY_POSTGRES = Throwaway()


def postgres_url(schema: str) -> str:
    server = os.environ.get("AGENTRUN_TEST_POSTGRES_URL", "")
    if server == "skip":
        pytest.skip("PostgreSQL suite: AGENTRUN_TEST_POSTGRES_URL=skip")
    server = server or THROWAWAY_POSTGRES.url()
    separator = "&" if "?" in server else "?"
    return f"{server}{separator}schema={schema}"


def database_url_for(backend: str, tmp: Path) -> str:
    if backend == "postgres":
        return postgres_url(f"t_{uuid.uuid4().hex[:12]}")
    return f"sqlite:///{tmp}"


@pytest.fixture(scope="session", autouse=True)
def _stop_throwaway_postgres() -> Iterator[None]:
    """Set up before, so torn down after, every other fixture of the session."""
    yield
    THROWAWAY_POSTGRES.stop()


def drop_schema(url: str) -> None:
    config = StoreConfig.from_url(url)
    if config.postgres is None or not config.postgres.schema:
        return
    with psycopg.connect(config.postgres.conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{config.postgres.schema}" CASCADE')


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreConfig]:
    """A fresh, empty store on each backend."""
    url = database_url_for(request.param, tmp_path)
    yield StoreConfig.from_url(url)
    drop_schema(url)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("nats")
    server = start_nats(tmp / "store", tmp / "logs")
    yield server
    server.stop()


@pytest.fixture(scope="session", params=BACKENDS)
def stack(
    request: pytest.FixtureRequest,
    nats_server: Service,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """One executor and two gateways (real processes) on each backend, shared by a session."""
    tmp = tmp_path_factory.mktemp(f"stack-{request.param}")
    url = database_url_for(request.param, tmp / "data")
    running = start_stack(url, nats_server, tmp, executors=1, gateways=2)
    yield running
    running.stop()
    drop_schema(url)


@pytest.fixture(params=BACKENDS)
def empty_stack(
    request: pytest.FixtureRequest, nats_server: Service, tmp_path: Path
) -> Iterator[Stack]:
    """A stack with no process started yet, on each backend: for tests that start, stop and
    kill executors and gateways themselves."""
    url = database_url_for(request.param, tmp_path / "data")
    running = Stack(database_url=url, nats=nats_server, tmp=tmp_path)
    try:
        yield running
    finally:
        running.stop()
        drop_schema(url)


@pytest.fixture
async def channels(stack: Stack) -> AsyncIterator[list[grpc.aio.Channel]]:
    """One client channel to each gateway of the stack."""
    opened = [grpc.aio.insecure_channel(g.address) for g in stack.gateways]
    yield opened
    for channel in opened:
        await channel.close(grace=None)


@pytest.fixture(autouse=True)
async def _histories_agree(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """After each test on the shared stack: the runs it ended have histories that agree with
    the run list (other stacks check theirs when they stop)."""
    yield
    if "stack" in request.fixturenames:
        shared: Stack = request.getfixturevalue("stack")
        await shared.verify_histories()
