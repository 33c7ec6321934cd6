"""The gateway's public TLS: a client with the test CA, mTLS, and certificates replaced while
the gateway runs. Real gateway and executor processes; certificates from common.certs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.launcher import Service
from common.certs import Authority, write_dev_certificates
from common.tls import channel_credentials
from tests.client import Client, assert_history_agrees, scripted_agent
from tests.stack import Stack

GUARD = 60.0


@pytest.fixture
def tls_stack(nats_server: Service, tmp_path: Path) -> Iterator[Stack]:
    """One executor (plaintext on loopback); the tests start their gateways."""
    stack = Stack(database_url=f"sqlite:///{tmp_path / 'data'}", nats=nats_server, tmp=tmp_path)
    try:
        stack.start_executor()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    folder = tmp_path / "certs"
    write_dev_certificates(folder)
    return folder / "public"


def tls_env(public: Path, *, client_ca: bool = False) -> dict[str, str]:
    env = {
        "AGENTRUN_TLS_CERT": str(public / "server.pem"),
        "AGENTRUN_TLS_KEY": str(public / "server-key.pem"),
    }
    if client_ca:
        env["AGENTRUN_TLS_CLIENT_CA"] = str(public / "ca.pem")
    return env


async def run_over(channel: grpc.aio.Channel) -> None:
    client = Client(channel)
    agent = await client.create_agent(scripted_agent(turns=[("over TLS", [])]))
    events = await client.run(agent.id, "hi")
    assert events[-1].run_completed.output == "over TLS"
    await assert_history_agrees(client, events[0].run_id, events)


async def check(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The status of a health check over ``channel`` (OK when it answers SERVING)."""
    try:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=GUARD
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    return grpc.StatusCode.OK


def agentrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        text=True,
        timeout=GUARD,
        env=env,
    )


async def test_a_client_with_the_test_ca_runs_over_tls(tls_stack: Stack, certs: Path) -> None:
    gateway = tls_stack.start_gateway(**tls_env(certs))
    async with grpc.aio.secure_channel(
        gateway.address, channel_credentials(certs / "ca.pem")
    ) as channel:
        await run_over(channel)
    async with grpc.aio.insecure_channel(gateway.address) as plaintext:
        assert await check(plaintext) == grpc.StatusCode.UNAVAILABLE

    done = agentrun("health", "--target", gateway.address, "--ca", str(certs / "ca.pem"))
    assert done.returncode == 0, done.stderr
    done = agentrun("health", "--target", gateway.address, "--timeout", "2")
    assert done.returncode == 1, done.stdout
    done = agentrun(
        "runs", "list", "--target", gateway.address, "--tls", "--ca", str(certs / "ca.pem")
    )
    assert done.returncode == 0, done.stderr


async def test_with_a_client_ca_a_client_needs_a_certificate(tls_stack: Stack, certs: Path) -> None:
    gateway = tls_stack.start_gateway(**tls_env(certs, client_ca=True))
    ca = certs / "ca.pem"
    async with grpc.aio.secure_channel(gateway.address, channel_credentials(ca)) as anonymous:
        assert await check(anonymous) == grpc.StatusCode.UNAVAILABLE
    other = Authority.new("another CA").issue("impostor", server=False)
    other.write(certs.parent, "impostor")
    async with grpc.aio.secure_channel(
        gateway.address,
        channel_credentials(ca, certs.parent / "impostor.pem", certs.parent / "impostor-key.pem"),
    ) as impostor:
        assert await check(impostor) == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.secure_channel(
        gateway.address, channel_credentials(ca, certs / "client.pem", certs / "client-key.pem")
    ) as known:
        await run_over(known)

    base = ["--target", gateway.address, "--ca", str(ca)]
    done = agentrun("health", *base, "--timeout", "2")
    assert done.returncode == 1, done.stdout
    client = ["--cert", str(certs / "client.pem"), "--key", str(certs / "client-key.pem")]
    done = agentrun("health", *base, *client)
    assert done.returncode == 0, done.stderr
    done = agentrun("runs", "list", *base, *client, "--json")
    assert done.returncode == 0, done.stderr


async def test_a_replaced_certificate_is_served_without_a_restart(
    tls_stack: Stack, certs: Path
) -> None:
    gateway = tls_stack.start_gateway(**tls_env(certs))
    successor = Authority.new("the next CA")
    (certs.parent / "next-ca.pem").write_bytes(successor.cert_pem)
    old_ca, new_ca = certs / "ca.pem", certs.parent / "next-ca.pem"

    async def status_trusting(ca: Path) -> grpc.StatusCode:
        async with grpc.aio.secure_channel(gateway.address, channel_credentials(ca)) as channel:
            return await check(channel)

    assert await status_trusting(old_ca) == grpc.StatusCode.OK
    assert await status_trusting(new_ca) == grpc.StatusCode.UNAVAILABLE

    # Replaced the way certificate managers do: new files moved over the old ones.
    issued = successor.issue("agentrun gateway", ["localhost", "127.0.0.1"], client=False)
    issued.write(certs.parent, "next")
    os.replace(certs.parent / "next-key.pem", certs / "server-key.pem")
    os.replace(certs.parent / "next.pem", certs / "server.pem")

    assert await status_trusting(new_ca) == grpc.StatusCode.OK
    assert await status_trusting(old_ca) == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.secure_channel(gateway.address, channel_credentials(new_ca)) as channel:
        await run_over(channel)
    assert gateway.process.poll() is None
    assert "TLS certificate reloaded" in gateway.log()


def test_a_gateway_with_half_a_tls_configuration_does_not_start(
    tls_stack: Stack, certs: Path
) -> None:
    with pytest.raises(RuntimeError, match="AGENTRUN_TLS_CERT and AGENTRUN_TLS_KEY go together"):
        tls_stack.start_gateway(AGENTRUN_TLS_CERT=str(certs / "server.pem"))
    with pytest.raises(RuntimeError, match="the key does not belong to the certificate"):
        tls_stack.start_gateway(
            AGENTRUN_TLS_CERT=str(certs / "server.pem"),
            AGENTRUN_TLS_KEY=str(certs / "client-key.pem"),
        )
