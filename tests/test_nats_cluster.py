"""A three-node NATS JetStream cluster (three nats-server processes on loopback ports): the
executor is given all three URLs and keeps its streams in three replicas
(AGENTRUN_NATS_REPLICAS=3). The NATS node the executor is connected to is killed with SIGKILL
while durable and classic runs stream: every run completes with its exact output, every
client's stream is gap-free, and no recorded tool call runs again.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentrun.v1 import agent_pb2, run_pb2
from cli.launcher import NATS_READY, Service, _start, free_port, nats_server_path
from tests.client import Client, kinds, scripted_agent, text_of
from tests.conftest import database_url_for, drop_schema
from tests.stack import Stack
from tests.test_durable_crashes import CRASH_ENV, TOOLS, TURNS, check_run, stored_history
from tests.test_scale_out import GUARD, POOLS, RETRY_PAUSE, Progress, Reader

DURABLE_RUNS = 12
CLASSIC_RUNS = 4
CLASSIC_TEXT = " ".join(f"word{i}" for i in range(60))


def start_cluster(tmp: Path) -> list[Service]:
    """Three JetStream servers routed to each other, each waiting until the cluster has elected
    its metadata leader (before that, no stream can be placed)."""
    ports = [(free_port(), free_port()) for _ in range(3)]
    routes = ",".join(f"nats://127.0.0.1:{cluster}" for _, cluster in ports)
    members: list[Service] = []
    try:
        for i, (client, cluster) in enumerate(ports):
            name = f"nats-{i + 1}"
            argv = [
                nats_server_path(),
                *("-a", "127.0.0.1", "-p", str(client), "-js", "-sd", str(tmp / name)),
                *("--server_name", name, "--cluster_name", "agentrun"),
                *("--cluster", f"nats://127.0.0.1:{cluster}", "--routes", routes),
            ]
            members.append(_start(name, argv, os.environ, tmp / "logs", NATS_READY, client))
        for member in members:
            # "Self is new JetStream cluster metadata leader" / "... new metadata leader: x"
            member.wait_for_output("metadata leader", timeout=GUARD)
    except BaseException:
        for member in members:
            member.kill()
        raise
    return members


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[Service]]:
    members = start_cluster(tmp_path / "nats")
    yield members
    for member in members:
        member.stop()


@pytest.mark.timeout(240)
async def test_runs_complete_when_the_executors_nats_node_dies(
    nats_cluster: list[Service], tmp_path: Path
) -> None:
    url = database_url_for("postgres", tmp_path / "data") + POOLS
    urls = ",".join(f"nats://{member.address}" for member in nats_cluster)
    env = {"AGENTRUN_NATS_URL": urls, "AGENTRUN_NATS_REPLICAS": "3", **CRASH_ENV}
    stack = Stack(database_url=url, nats=nats_cluster[0], tmp=tmp_path)
    try:
        executor = stack.start_executor(**env)
        gateway = stack.start_gateway(executor.address)
        # The executor says which server it is on once its streams exist (in three replicas).
        await asyncio.to_thread(executor.wait_for_output, "connected to NATS at", timeout=GUARD)
        found = re.search(r"connected to NATS at [\w.-]+:(\d+)", executor.log())
        assert found, executor.log()[-2000:]
        victim = next(m for m in nats_cluster if m.port == int(found.group(1)))

        async with grpc.aio.insecure_channel(gateway.address) as channel:
            client = Client(channel)
            durable = await client.create_agent(
                scripted_agent(
                    turns=TURNS,
                    tools=TOOLS,
                    mode=agent_pb2.EXECUTION_MODE_DURABLE,
                    token_delay_ms=40,
                )
            )
            classic = await client.create_agent(
                scripted_agent(turns=[(CLASSIC_TEXT, [])], token_delay_ms=40)
            )
            calm = await client.run(durable.id, "work")
            per_run = len(calm)

            progress = Progress()
            readers = [
                Reader([client, client], 0, durable.id, progress) for _ in range(DURABLE_RUNS)
            ]
            classic_runs = [
                asyncio.create_task(client.run(classic.id, "talk")) for _ in range(CLASSIC_RUNS)
            ]
            # Mid-run: a fifth of the durable runs' events are through.
            assert await progress.reach(DURABLE_RUNS * per_run // 5, DURABLE_RUNS)
            mark = executor.lines_seen
            victim.kill()
            # The histories are read at the stack's end through a node that is still up.
            stack.nats = next(m for m in nats_cluster if m is not victim)
            await asyncio.to_thread(
                executor.wait_for_output, "disconnected from NATS", after=mark, timeout=GUARD
            )

            finished = [await reader.result() for reader in readers]
            for events in finished:
                check_run(events, stack.data_dir, await stored_history(client, events[0].run_id))
            for task in classic_runs:
                events = await asyncio.wait_for(task, GUARD)
                assert [e.sequence for e in events] == list(range(1, len(events) + 1))
                assert events[-1].HasField("run_completed"), kinds(events)
                assert text_of(events) == CLASSIC_TEXT
                # A classic run's stream is kept for reconnecting clients (in the store).
                watched = await watch_as_a_client_would(client, events[0].run_id)
                assert watched == events
            assert all(r.events[-1].run_completed.output == "All done." for r in readers)
            # Durable runs started after the loss work too.
            after = await asyncio.wait_for(client.run(durable.id, "again"), GUARD)
            assert after[-1].HasField("run_completed"), kinds(after)
            assert after[-1].run_completed.output == "All done."
    finally:
        stack.stop()
        drop_schema(url)


async def watch_as_a_client_would(client: Client, run_id: str) -> list[run_pb2.RunEvent]:
    """WatchRun, asked again (after a pause, as a client should) while it answers UNAVAILABLE:
    a JetStream request can time out while the cluster replaces the dead node."""
    for attempt in range(1, 6):
        try:
            return await client.watch_all(run_id)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 5:
                raise
            await asyncio.sleep(RETRY_PAUSE * attempt)
    raise AssertionError("unreachable")
