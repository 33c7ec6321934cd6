"""Only the gateways of this deployment reach an executor: a shared token or mTLS.

Real executor and gateway processes; a stranger is a gRPC client on the executor's port that
names a tenant, as a gateway does, but lacks the token or the internal certificate.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentrun.v1 import run_service_pb2
from cli.launcher import Service
from common.certs import Authority, write_dev_certificates
from common.internal_access import TOKEN_METADATA
from common.rpc import TENANT_METADATA
from common.tls import channel_credentials
from tests.client import Client, assert_history_agrees, scripted_agent
from tests.stack import Stack

TOKEN = "s3cret-token-of-this-deployment"
LIST_RUNS = "/agentrun.v1.RunService/ListRuns"
EXECUTE_RUN = "/agentrun.internal.v1.ExecutorService/ExecuteRun"


@pytest.fixture
def sqlite_stack(nats_server: Service, tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(database_url=f"sqlite:///{tmp_path / 'data'}", nats=nats_server, tmp=tmp_path)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    write_dev_certificates(folder)
    return folder


def internal_tls_env(certs: Path, role: str) -> dict[str, str]:
    internal = certs / "internal"
    return {
        "AGENTRUN_INTERNAL_TLS_CA": str(internal / "ca.pem"),
        "AGENTRUN_INTERNAL_TLS_CERT": str(internal / f"{role}.pem"),
        "AGENTRUN_INTERNAL_TLS_KEY": str(internal / f"{role}-key.pem"),
    }


async def a_run_through(gateway: Service) -> str:
    """A whole run through ``gateway``; its id."""
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        client = Client(channel)
        agent = await client.create_agent(scripted_agent(turns=[("hello from inside", [])]))
        events = await client.run(agent.id, "hi")
        assert events[-1].run_completed.output == "hello from inside"
        await assert_history_agrees(client, events[0].run_id, events)
        return events[0].run_id


async def list_runs(channel: grpc.aio.Channel, *metadata: tuple[str, str]) -> list[str]:
    call = channel.unary_unary(
        LIST_RUNS,
        request_serializer=run_service_pb2.ListRunsRequest.SerializeToString,
        response_deserializer=run_service_pb2.ListRunsResponse.FromString,
    )
    response = await call(
        run_service_pb2.ListRunsRequest(), metadata=((TENANT_METADATA, "local"), *metadata)
    )
    return [run.id for run in response.runs]


async def refused(awaitable: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable  # type: ignore[misc]
    return caught.value


async def serving(channel: grpc.aio.Channel) -> bool:
    answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


async def test_with_a_token_strangers_are_refused_and_gateways_work(sqlite_stack: Stack) -> None:
    executor = sqlite_stack.start_executor(AGENTRUN_INTERNAL_TOKEN=TOKEN)
    gateway = sqlite_stack.start_gateway(AGENTRUN_INTERNAL_TOKEN=TOKEN)
    run_id = await a_run_through(gateway)

    async with grpc.aio.insecure_channel(executor.address) as stranger:
        for metadata in [(), ((TOKEN_METADATA, "wrong"),), ((TOKEN_METADATA, TOKEN[:-1]),)]:
            error = await refused(list_runs(stranger, *metadata))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
            assert TOKEN_METADATA in (error.details() or "")
        execute = stranger.stream_stream(EXECUTE_RUN, None, None)
        call = execute(iter(()), metadata=((TENANT_METADATA, "local"),))
        error = await refused(call.read())
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        # Health checks need no token; the token opens the rest.
        assert await serving(stranger)
        assert run_id in await list_runs(stranger, (TOKEN_METADATA, TOKEN))

    # A gateway without the token gets the executor's refusal, not runs.
    keyless = sqlite_stack.start_gateway()
    async with grpc.aio.insecure_channel(keyless.address) as channel:
        error = await refused(Client(channel).get_run(run_id))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error


async def test_with_mtls_strangers_are_refused_and_gateways_work(
    sqlite_stack: Stack, certs: Path, tmp_path: Path
) -> None:
    executor = sqlite_stack.start_executor(**internal_tls_env(certs, "executor"))
    gateway = sqlite_stack.start_gateway(**internal_tls_env(certs, "gateway"))
    run_id = await a_run_through(gateway)

    internal = certs / "internal"
    # A certificate of another CA: the public one that clients of a gateway may hold.
    public = certs / "public"
    other = Authority.new("someone else's CA").issue("stranger")
    (tmp_path / "stranger.pem").write_bytes(other.cert_pem)
    (tmp_path / "stranger-key.pem").write_bytes(other.key_pem)
    strangers = {
        "plaintext": grpc.aio.insecure_channel(executor.address),
        "TLS, no client certificate": grpc.aio.secure_channel(
            executor.address, channel_credentials(internal / "ca.pem")
        ),
        "a client certificate of the public CA": grpc.aio.secure_channel(
            executor.address,
            channel_credentials(
                internal / "ca.pem", public / "client.pem", public / "client-key.pem"
            ),
        ),
        "a client certificate of an unknown CA": grpc.aio.secure_channel(
            executor.address,
            channel_credentials(
                internal / "ca.pem", tmp_path / "stranger.pem", tmp_path / "stranger-key.pem"
            ),
        ),
    }
    try:
        for what, channel in strangers.items():
            error = await refused(list_runs(channel))
            assert error.code() == grpc.StatusCode.UNAVAILABLE, (what, error)
    finally:
        for channel in strangers.values():
            await channel.close(grace=None)

    # The internal certificate (here the gateway's) opens the executor.
    async with grpc.aio.secure_channel(
        executor.address,
        channel_credentials(
            internal / "ca.pem", internal / "gateway.pem", internal / "gateway-key.pem"
        ),
    ) as insider:
        assert run_id in await list_runs(insider)
        assert await serving(insider)

    # A gateway without the internal certificate reaches no executor.
    plain = sqlite_stack.start_gateway()
    async with grpc.aio.insecure_channel(plain.address) as channel:
        error = await refused(Client(channel).get_run(run_id))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error


def test_an_executor_open_to_the_network_does_not_start(sqlite_stack: Stack) -> None:
    with pytest.raises(RuntimeError) as caught:
        sqlite_stack.start_executor(AGENTRUN_EXECUTOR_LISTEN="0.0.0.0:0")
    message = str(caught.value)
    assert "without authenticating its callers" in message, message
    assert "AGENTRUN_INTERNAL_TOKEN" in message
    # With a token it may listen anywhere.
    executor = sqlite_stack.start_executor(
        AGENTRUN_EXECUTOR_LISTEN="0.0.0.0:0", AGENTRUN_INTERNAL_TOKEN=TOKEN
    )
    assert executor.process.poll() is None


async def test_an_executor_rereads_its_internal_certificate(
    sqlite_stack: Stack, tmp_path: Path
) -> None:
    """Its certificate and key replaced while it runs (by one of another CA): new connections
    get the new one, without a restart."""
    internal_ca, successor = Authority.new("internal"), Authority.new("successor")
    folder = tmp_path / "rotating"
    folder.mkdir()
    (folder / "ca.pem").write_bytes(internal_ca.cert_pem)
    (folder / "next-ca.pem").write_bytes(successor.cert_pem)
    internal_ca.issue("executor", ["127.0.0.1"]).write(folder, "executor")
    internal_ca.issue("gateway", ["127.0.0.1"]).write(folder, "gateway")
    executor = sqlite_stack.start_executor(
        AGENTRUN_INTERNAL_TLS_CA=str(folder / "ca.pem"),
        AGENTRUN_INTERNAL_TLS_CERT=str(folder / "executor.pem"),
        AGENTRUN_INTERNAL_TLS_KEY=str(folder / "executor-key.pem"),
    )

    async def status_trusting(ca: str) -> grpc.StatusCode:
        credentials = channel_credentials(
            folder / ca, folder / "gateway.pem", folder / "gateway-key.pem"
        )
        async with grpc.aio.secure_channel(executor.address, credentials) as channel:
            try:
                await list_runs(channel)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

    assert await status_trusting("ca.pem") == grpc.StatusCode.OK
    assert await status_trusting("next-ca.pem") == grpc.StatusCode.UNAVAILABLE
    successor.issue("executor", ["127.0.0.1"]).write(folder, "next")
    os.replace(folder / "next-key.pem", folder / "executor-key.pem")
    os.replace(folder / "next.pem", folder / "executor.pem")
    assert await status_trusting("next-ca.pem") == grpc.StatusCode.OK
    assert await status_trusting("ca.pem") == grpc.StatusCode.UNAVAILABLE
