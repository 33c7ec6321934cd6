"""An executor call that ends the moment it arrives (its executor is stopping or crashing) gives
the client a clear UNAVAILABLE on every carried method, never INTERNAL "Internal error from
Core": the gateway's write of the call's first message races the call's end, and a write that
loses the race fails inside gRPC, which then ends the call with that INTERNAL.

The executor here is a stand-in, a real gRPC server on loopback that ends every ExecuteRun at
once: a real executor ends a call only after reading the gateway's first message, or by dying,
neither of which can be timed to land on the write.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentrun.internal.v1 import executor_service_pb2_grpc
from agentrun.v1 import run_service_pb2
from cli.launcher import Service
from tests.client import Client
from tests.stack import Stack

TRIES = 40  # of each method; before the fix about one call in ten ended INTERNAL
RUN_ID = str(uuid.uuid4())


class EndsAtOnce(executor_service_pb2_grpc.ExecutorServiceServicer):
    async def ExecuteRun(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the executor is stopping")
        yield  # an async generator, like the method it stands for


@pytest.fixture
async def gateway(nats_server: Service, tmp_path: Path) -> AsyncIterator[Client]:
    server = grpc.aio.server()
    executor_service_pb2_grpc.add_ExecutorServiceServicer_to_server(EndsAtOnce(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stack = Stack(database_url=f"sqlite:///{tmp_path / 'data'}", nats=nats_server, tmp=tmp_path)
    try:
        stack.start_gateway(f"127.0.0.1:{port}")
        async with grpc.aio.insecure_channel(stack.gateways[0].address) as channel:
            yield Client(channel)
    finally:
        stack.stop()
        await server.stop(None)


def converse(client: Client, first: run_service_pb2.ConverseRequest) -> Any:
    async def requests() -> AsyncIterator[run_service_pb2.ConverseRequest]:
        yield first
        await asyncio.Event().wait()  # the client stays

    return client.runs.Converse(requests())


@pytest.mark.timeout(120)
async def test_every_carried_call_ends_unavailable_and_says_what_to_do(gateway: Client) -> None:
    calls: dict[str, Callable[[], Any]] = {
        "Converse start": lambda: converse(
            gateway,
            run_service_pb2.ConverseRequest(
                start=run_service_pb2.StreamRunRequest(agent_id="agent", input="hi")
            ),
        ),
        "Converse attach": lambda: converse(
            gateway,
            run_service_pb2.ConverseRequest(
                attach=run_service_pb2.ConverseAttach(run_id=RUN_ID, after_sequence=1)
            ),
        ),
        "StreamRun": lambda: gateway.stream("agent", "hi"),
        "WatchRun": lambda: gateway.watch(RUN_ID, 1),
    }
    answers: Counter[tuple[str, str, str]] = Counter()
    for _ in range(TRIES):
        for name, open_call in calls.items():
            call = open_call()
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(call.read(), 30)
            call.cancel()
            error = ended.value
            answers[name, error.code().name, error.details() or ""] += 1
    unclear = {
        answer: count
        for answer, count in answers.items()
        if answer[1] != "UNAVAILABLE"
        or not any(hint in answer[2] for hint in ("same request_id", "WatchRun"))
    }
    assert not unclear, unclear
