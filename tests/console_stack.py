"""A real stack behind a real console process, for the console's HTTP and browser tests: one
executor, a gateway that requires API keys, and ``agentrun console`` in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from agentrun.v1 import run_pb2
from cli.launcher import Service, free_port, start_console
from tests.client import Client, kinds
from tests.stack import Stack

API_KEY = "console-test-key"
API_KEYS = f"console:{API_KEY}"
GUARD = 60.0  # seconds; only bounds a hang


@dataclass
class ConsoleStack:
    stack: Stack
    console: Service
    # The gateway's one executor listens here: a test that kills it starts another on the port.
    executor_port: int
    # Where the gateway serves its metrics (the tests count its WatchRun calls).
    gateway_metrics: str

    @property
    def url(self) -> str:
        return f"http://{self.console.address}"

    @property
    def gateway(self) -> str:
        return self.stack.gateways[0].address


@pytest.fixture(scope="session")
def console_stack(
    nats_server: Service, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConsoleStack]:
    """Shared by the console's tests (HTTP and browser), on PostgreSQL."""
    from tests.conftest import database_url_for, drop_schema

    tmp = tmp_path_factory.mktemp("console")
    url = database_url_for("postgres", tmp / "data")
    stack = Stack(database_url=url, nats=nats_server, tmp=tmp)
    console = None
    try:
        executor_port = free_port()
        stack.start_executor(AGENTRUN_EXECUTOR_LISTEN=f"127.0.0.1:{executor_port}")
        metrics = f"127.0.0.1:{free_port()}"
        gateway = stack.start_gateway(
            f"127.0.0.1:{executor_port}",
            AGENTRUN_API_KEYS=API_KEYS,
            AGENTRUN_METRICS_LISTEN=metrics,
        )
        console = start_console(gateway.address, tmp / "logs")
        yield ConsoleStack(stack, console, executor_port, metrics)
    finally:
        if console is not None:
            console.stop()
        stack.stop()
        drop_schema(url)


@pytest.fixture
async def grpc_client(console_stack: ConsoleStack) -> AsyncIterator[Client]:
    """A gRPC client of the console's gateway, with the key the console signs in with."""
    async with grpc.aio.insecure_channel(console_stack.gateway) as channel:
        yield Client(channel, API_KEY)


def csrf_of(page: str) -> str:
    found = re.search(r'<meta name="csrf-token" content="([^"]+)"', page)
    assert found, page[:500]
    return found.group(1)


@contextlib.asynccontextmanager
async def signed_in(base_url: str, api_key: str = API_KEY) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client with a signed-in console session."""
    async with httpx.AsyncClient(base_url=base_url, timeout=GUARD) as http:
        login = await http.get("/login")
        response = await http.post(
            "/login", data={"api_key": api_key, "csrf_token": csrf_of(login.text), "next": "/runs"}
        )
        assert response.status_code == 303, response.text
        yield http


async def wait_for_event(client: Client, run_id: str, kind: str) -> list[run_pb2.RunEvent]:
    """The run's events from the start up to the first of ``kind`` (WatchRun)."""
    events: list[run_pb2.RunEvent] = []
    call = client.watch(run_id)
    try:
        async with asyncio.timeout(GUARD):
            async for response in call:
                for event in response.events:
                    events.append(event)
                    if event.WhichOneof("kind") == kind:
                        return events
    finally:
        call.cancel()  # ends now, not when collected: the tests count the gateway's WatchRuns
    raise AssertionError(f"no {kind}: {kinds(events)}")
