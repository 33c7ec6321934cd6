"""TLS to the backends, configured through their URLs: NATS (tls://, AGENTRUN_NATS_TLS_*) and
PostgreSQL (libpq's ssl* parameters in AGENTRUN_DATABASE_URL).

NATS: a real nats-server that requires TLS and client certificates, and a real executor and
gateway that run a durable run through it. PostgreSQL: the test server (TLS off) refuses a
connection that requires TLS on every connection path the store uses, which shows that the URL's
parameters reach libpq.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from eventsourcing.utils import Environment

from agentrun.v1 import agent_pb2
from cli.launcher import NATS_READY, Service, _start, free_port, nats_server_path, start_agentrun
from common.certs import write_dev_certificates
from eventstore.persistence import StoreConfig
from eventstore.postgres_recorders import PostgresFactory
from tests.client import Client, assert_history_agrees, scripted_agent
from tests.conftest import postgres_url

DURABLE = agent_pb2.EXECUTION_MODE_DURABLE


@pytest.fixture
def public_certs(tmp_path: Path) -> Path:
    write_dev_certificates(tmp_path / "certs")
    return tmp_path / "certs" / "public"


@pytest.fixture
def tls_nats(tmp_path: Path, public_certs: Path) -> Iterator[Service]:
    """A nats-server that speaks only TLS and requires client certificates of the public CA."""
    port = free_port()
    argv = [
        nats_server_path(),
        *("-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "nats")),
        *("--tlsverify", "--tlscert", str(public_certs / "server.pem")),
        *("--tlskey", str(public_certs / "server-key.pem")),
        *("--tlscacert", str(public_certs / "ca.pem")),
    ]
    server = _start("nats-tls", argv, os.environ, tmp_path / "logs", NATS_READY, port)
    yield server
    server.stop()


async def test_executors_reach_nats_over_tls(
    tls_nats: Service, public_certs: Path, tmp_path: Path
) -> None:
    env = {
        "AGENTRUN_DATABASE_URL": f"sqlite:///{tmp_path / 'data'}",
        "AGENTRUN_DATA_DIR": str(tmp_path / "data"),
        "AGENTRUN_NATS_URL": f"tls://{tls_nats.address}",
        "AGENTRUN_NATS_TLS_CA": str(public_certs / "ca.pem"),
        "AGENTRUN_NATS_TLS_CERT": str(public_certs / "client.pem"),
        "AGENTRUN_NATS_TLS_KEY": str(public_certs / "client-key.pem"),
        "AGENTRUN_EXECUTOR_LISTEN": "127.0.0.1:0",
        "AGENTRUN_GATEWAY_LISTEN": "127.0.0.1:0",
    }
    started: list[Service] = []
    try:
        executor = start_agentrun("executor", env, tmp_path / "logs")
        started.append(executor)
        gateway = start_agentrun(
            "gateway", {**env, "AGENTRUN_EXECUTOR_TARGET": executor.address}, tmp_path / "logs"
        )
        started.append(gateway)
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            client = Client(channel)
            # Durable: dispatched through JetStream, and streamed from it.
            agent = await client.create_agent(
                scripted_agent(turns=[("through TLS", [])], mode=DURABLE)
            )
            events = await client.run(agent.id, "hi")
            assert events[-1].run_completed.output == "through TLS"
            await assert_history_agrees(client, events[0].run_id, events)
        assert "not reachable" not in executor.log()
    finally:
        for service in reversed(started):
            service.stop()


def connection_paths(url: str) -> dict[str, dict[str, str]]:
    """The libpq parameters of each way the store connects: its own connections (schema, the
    run list, pruning) and eventsourcing's pools."""
    store = StoreConfig.from_url(url)
    assert store.postgres is not None
    factory = PostgresFactory(Environment("Runs", store.application_env("Runs")))
    kwargs = factory.datastore.pool.kwargs
    assert isinstance(kwargs, dict)
    return {
        "conninfo": {
            k: str(v)
            for k, v in psycopg.conninfo.conninfo_to_dict(store.postgres.conninfo()).items()
        },
        "eventsourcing pool": {k: str(v) for k, v in kwargs.items() if k != "row_factory"},
    }


def test_the_urls_tls_parameters_reach_every_connection(tmp_path: Path) -> None:
    url = (
        "postgresql://u:p@db.example:5432/agentrun?schema=s&sslmode=verify-full"
        f"&sslrootcert={tmp_path}/ca.pem&sslcert={tmp_path}/c.pem&sslkey={tmp_path}/k.pem"
    )
    for path, params in connection_paths(url).items():
        assert params["sslmode"] == "verify-full", path
        assert params["sslrootcert"] == f"{tmp_path}/ca.pem", path
        assert params["sslcert"] == f"{tmp_path}/c.pem", path
        assert params["sslkey"] == f"{tmp_path}/k.pem", path
        assert params["host"] == "db.example", path
    with pytest.raises(Exception, match="sslmode must be one of"):
        StoreConfig.from_url("postgresql://u@h/db?sslmode=always")


def test_a_database_url_that_requires_tls_is_obeyed() -> None:
    """The test server has TLS off: requiring it must fail on every path, and disabling it
    must work, which only happens if libpq gets the parameter."""
    base = postgres_url("public")
    for path, params in connection_paths(f"{base}&sslmode=require").items():
        with pytest.raises(psycopg.OperationalError, match="SSL") as caught:
            connect(params)
        assert caught.value is not None, path
    for params in connection_paths(f"{base}&sslmode=disable").values():
        connect(params)


def connect(params: dict[str, str]) -> None:
    psycopg.connect(psycopg.conninfo.make_conninfo(**params), connect_timeout=5).close()
