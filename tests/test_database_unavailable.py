"""PostgreSQL down: the calls that need the store (durable starts, GetRun, ListRuns, classic
starts) answer UNAVAILABLE within a few seconds, and work again once the database is back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentrun.v1 import agent_pb2, run_service_pb2
from cli.launcher import Service
from tests import postgres_server
from tests.client import Client, scripted_agent
from tests.stack import Stack

# Well under the 30 s after which a client's call ended DEADLINE_EXCEEDED before: a call that
# has not answered by then fails the test.
CALL_DEADLINE = 10.0


@pytest.fixture
def own_postgres() -> Iterator[postgres_server.Server]:
    """A PostgreSQL of this test's own, which it may stop (not the session's shared server)."""
    server = postgres_server.start()
    yield server
    server.stop()


@pytest.fixture
async def outage_stack(
    own_postgres: postgres_server.Server, nats_server: Service, tmp_path: Path
) -> AsyncIterator[Stack]:
    stack = Stack(database_url=f"{own_postgres.url}?schema=outage", nats=nats_server, tmp=tmp_path)
    try:
        stack.start_executor()
        stack.start_gateway()
        yield stack
    finally:
        if not own_postgres.running:  # the test failed during the outage
            own_postgres.resume()
        stack.stop()


async def until_it_answers(call: Callable[[], Awaitable[Any]], tries: int = 20) -> Any:
    """The call's response, asking again while it answers UNAVAILABLE (each try takes up to
    the store's connect timeout: no pause between them is needed)."""
    for _ in range(tries - 1):
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
    return await call()


@pytest.mark.timeout(180)
async def test_durable_calls_answer_unavailable_while_postgres_is_down(
    own_postgres: postgres_server.Server, outage_stack: Stack
) -> None:
    channel = grpc.aio.insecure_channel(outage_stack.gateways[0].address)
    client = Client(channel)
    durable = agent_pb2.EXECUTION_MODE_DURABLE
    agent = await client.create_agent(scripted_agent(turns=[("stored", [])], mode=durable))

    def start(
        request_id: str, mode: agent_pb2.ExecutionMode.ValueType = durable
    ) -> Awaitable[run_service_pb2.StartRunResponse]:
        request = run_service_pb2.StartRunRequest(
            agent_id=agent.id, input="hi", request_id=request_id, execution_mode=mode
        )
        return client.runs.StartRun(request, timeout=CALL_DEADLINE)  # type: ignore[no-any-return]

    before = (await start("before")).run
    own_postgres.halt()

    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "StartRun": lambda: start("during"),
        "GetRun": lambda: client.runs.GetRun(
            run_service_pb2.GetRunRequest(run_id=before.id), timeout=CALL_DEADLINE
        ),
        "ListRuns": lambda: client.runs.ListRuns(
            run_service_pb2.ListRunsRequest(), timeout=CALL_DEADLINE
        ),
        "classic StartRun": lambda: start("classic", agent_pb2.EXECUTION_MODE_CLASSIC),
    }
    # Twice: first on pooled connections that the outage broke, then on pools that must connect.
    for name, call in [*calls.items(), *calls.items()]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, (name, refused.value)
        assert "the database is unavailable" in (refused.value.details() or ""), name

    own_postgres.resume()
    during = (await until_it_answers(lambda: start("during"))).run
    assert during.id != before.id
    got = await until_it_answers(calls["GetRun"])
    assert got.run.id == before.id
    listed = await until_it_answers(calls["ListRuns"])
    assert {run.id for run in listed.runs} >= {before.id, during.id}
    await channel.close(grace=None)
