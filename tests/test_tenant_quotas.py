"""Per-tenant quotas (AGENTRUN_TENANT_MAX_CONCURRENT_RUNS, AGENTRUN_TENANT_RUNS_PER_MINUTE),
enforced in the store: two gateways over two executors admit no more than the quota between
them, and a refused start says RESOURCE_EXHAUSTED with when to try again (RetryInfo)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from common.rpc import STATUS_DETAILS_KEY, metadata_pairs
from tests.client import Client, kinds, rest, scripted_agent, until
from tests.stack import Stack

API_KEYS = "acme:acme-key,other:other-key"
EMAIL_ARGS = '{"to": "a@example.com", "subject": "hi", "body": "hello"}'
# Runs that wait for an approval until they are cancelled.
WAITING = [("I will send the email.", [("send_email", EMAIL_ARGS)])]


async def clients_of(stack: Stack, api_key: str) -> AsyncIterator[list[Client]]:
    channels = [grpc.aio.insecure_channel(g.address) for g in stack.gateways]
    try:
        yield [Client(channel, api_key) for channel in channels]
    finally:
        for channel in channels:
            await channel.close(grace=None)


def start_stack(stack: Stack, **quotas: str) -> None:
    for _ in range(2):
        stack.start_executor(**quotas)
    for _ in range(2):
        stack.start_gateway(AGENTRUN_API_KEYS=API_KEYS)


async def start(client: Client, agent_id: str, request_id: str) -> run_pb2.Run:
    response = await client.runs.StartRun(
        run_service_pb2.StartRunRequest(agent_id=agent_id, input="hi", request_id=request_id),
        metadata=client.metadata,
    )
    run: run_pb2.Run = response.run
    return run


def refusal(error: grpc.aio.AioRpcError) -> tuple[str, float]:
    """The ErrorInfo reason and the RetryInfo delay (seconds) of a RESOURCE_EXHAUSTED."""
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    details = [v for k, v in metadata_pairs(error) if k == STATUS_DETAILS_KEY]
    assert details, "the status has no details"
    status = status_pb2.Status.FromString(details[0])
    reason, delay = "", -1.0
    for detail in status.details:
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(retry):
            delay = retry.retry_delay.ToNanoseconds() / 1e9
    assert delay >= 0, "the status has no RetryInfo"
    return reason, delay


async def outcomes(starts: list[Any]) -> tuple[list[run_pb2.Run], list[grpc.aio.AioRpcError]]:
    results = await asyncio.gather(*starts, return_exceptions=True)
    admitted = [r for r in results if isinstance(r, run_pb2.Run)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(admitted) + len(refused) == len(results), results
    return admitted, refused


async def cancel(client: Client, run_id: str) -> None:
    """Cancels a run once it waits for its approval, and reads its stream to its end (which
    goes out after the run list records it)."""
    watch = client.watch(run_id)
    await until(watch, "tool_approval_required")
    await client.runs.CancelRun(
        run_service_pb2.CancelRunRequest(run_id=run_id), metadata=client.metadata
    )
    await rest(watch)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "mode",
    [agent_pb2.EXECUTION_MODE_CLASSIC, agent_pb2.EXECUTION_MODE_DURABLE],
)
async def test_concurrent_runs_are_limited_per_tenant_across_gateways(
    empty_stack: Stack, mode: agent_pb2.ExecutionMode.ValueType
) -> None:
    start_stack(empty_stack, AGENTRUN_TENANT_MAX_CONCURRENT_RUNS="2")
    async for clients in clients_of(empty_stack, "acme-key"):
        agent = await clients[0].create_agent(scripted_agent(turns=WAITING, mode=mode))
        # Six starts at once, three through each gateway: the two executors admit two.
        admitted, refused = await outcomes(
            [start(clients[i % 2], agent.id, f"run-{i}") for i in range(6)]
        )
        assert (len(admitted), len(refused)) == (2, 4)
        for error in refused:
            reason, delay = refusal(error)
            assert reason == "TENANT_CONCURRENT_RUNS"
            assert delay > 0
            assert "the limit is 2" in (error.details() or "")

        # A repeated start is the same run, not a new one.
        first = admitted[0]
        assert (await start(clients[1], agent.id, first.request_id)).id == first.id
        # Another tenant has quotas of its own.
        async for others in clients_of(empty_stack, "other-key"):
            other_agent = await others[0].create_agent(scripted_agent(turns=WAITING))
            other = await start(others[1], other_agent.id, "other-run")
            await cancel(others[1], other.id)

        # A run that ends frees its slot.
        await cancel(clients[0], first.id)
        assert (await clients[1].get_run(first.id)).status == run_pb2.RUN_STATUS_CANCELLED
        late = await start(clients[1], agent.id, "late")
        for run in (admitted[1], late):
            await cancel(clients[0], run.id)


@pytest.mark.timeout(180)
async def test_runs_per_minute_are_limited_per_tenant_across_gateways(
    empty_stack: Stack,
) -> None:
    start_stack(empty_stack, AGENTRUN_TENANT_RUNS_PER_MINUTE="3")
    async for clients in clients_of(empty_stack, "acme-key"):
        agent = await clients[0].create_agent(scripted_agent(turns=[("quick", [])]))
        admitted, refused = await outcomes(
            [start(clients[i % 2], agent.id, f"run-{i}") for i in range(5)]
        )
        assert (len(admitted), len(refused)) == (3, 2)
        for error in refused:
            reason, delay = refusal(error)
            assert reason == "TENANT_RUNS_PER_MINUTE"
            assert 0 < delay <= 60
        # Ended runs still count within the minute.
        for run in admitted:
            await clients[0].watch_all(run.id)
            assert (await clients[0].get_run(run.id)).status == run_pb2.RUN_STATUS_COMPLETED
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await start(clients[1], agent.id, "again")
        assert refusal(again.value)[0] == "TENANT_RUNS_PER_MINUTE"
        # A streamed start is refused the same way, with the same details.
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            await clients[0].run(agent.id, "hi")
        assert refusal(streamed.value)[0] == "TENANT_RUNS_PER_MINUTE"


async def fork(client: Client, run_id: str, at_version: int, request_id: str) -> run_pb2.Run:
    response = await client.runs.ForkRun(
        run_service_pb2.ForkRunRequest(run_id=run_id, at_version=at_version, request_id=request_id),
        metadata=client.metadata,
    )
    run: run_pb2.Run = response.run
    return run


@pytest.mark.timeout(180)
async def test_a_fork_is_a_new_run_under_the_quotas(empty_stack: Stack) -> None:
    start_stack(empty_stack, AGENTRUN_TENANT_MAX_CONCURRENT_RUNS="1")
    async for clients in clients_of(empty_stack, "acme-key"):
        agent = await clients[0].create_agent(
            scripted_agent(turns=WAITING, mode=agent_pb2.EXECUTION_MODE_DURABLE)
        )
        source = await start(clients[0], agent.id, "source")
        watch = clients[0].watch(source.id)
        await until(watch, "tool_approval_required")
        watch.cancel()
        waiting = (await clients[0].get_run(source.id)).version

        # The source holds the one slot: a fork of it would be a second run at once.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await fork(clients[1], source.id, waiting, "fork")
        reason, delay = refusal(refused.value)
        assert (reason, delay > 0) == ("TENANT_CONCURRENT_RUNS", True)

        # Once the source ends, the fork (the refused request, asked again) takes the slot.
        await cancel(clients[0], source.id)
        forked = await fork(clients[1], source.id, waiting, "fork")
        assert forked.forked_from_run_id == source.id
        assert (await clients[0].get_run(forked.id)).status == run_pb2.RUN_STATUS_AWAITING_APPROVAL
        # A repeated fork is the same run, not a new one; a start waits for the fork to end.
        assert (await fork(clients[0], source.id, waiting, "fork")).id == forked.id
        with pytest.raises(grpc.aio.AioRpcError) as after_fork:
            await start(clients[0], agent.id, "after-fork")
        assert refusal(after_fork.value)[0] == "TENANT_CONCURRENT_RUNS"

        await clients[0].runs.CancelRun(
            run_service_pb2.CancelRunRequest(run_id=forked.id), metadata=clients[0].metadata
        )
        assert kinds(await clients[0].watch_all(forked.id))[-1] == "run_cancelled"
