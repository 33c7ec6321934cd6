"""Retention: JetStream keeps run event streams for AGENTRUN_EVENT_RETENTION (a changed setting
is applied to the existing stream), and finished runs older than AGENTRUN_RUN_RETENTION are
pruned from the store (events, snapshots, run-list rows) on every backend, while younger and
unfinished runs stay; pruning is idempotent and safe from several stores at once.

Time is controlled by passing ``now`` to the prune: nothing here sleeps or waits for a clock.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from uuid import UUID

import grpc
import pytest

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from cli.launcher import Service
from common.errors import NotFound
from common.nats_link import NatsLink, NatsNames
from common.settings import Settings
from eventstore.messages import Usage
from eventstore.persistence import StoreConfig
from eventstore.pruning import (
    POSTGRES_EVENTS,
    POSTGRES_SNAPSHOTS,
    SQLITE_EVENTS,
    SQLITE_SNAPSHOTS,
    PruneResult,
    RunPruner,
)
from eventstore.run_list import RunFilter, RunList, RunRecord
from eventstore.run_store import SNAPSHOT_INTERVAL, RunStore
from executor.retention import RetentionJob
from executor.run_list_projection import NAME as RUN_LIST
from executor.translation import record_of
from tests.client import Client, scripted_agent, until
from tests.conftest import BACKENDS, database_url_for, drop_schema
from tests.stack import Stack
from tests.test_run_store import call, new_run

TENANT = "acme"
DAY = 24 * 3600.0
RETENTION = 30 * DAY
USAGE: Usage = {"input_tokens": 1, "output_tokens": 1}


# -- settings ------------------------------------------------------------------------------------


def test_the_retention_settings_and_their_defaults() -> None:
    defaults = Settings.from_env({})
    assert defaults.event_retention == 7 * DAY
    assert defaults.run_retention == 30 * DAY
    assert defaults.retention_interval == 300.0
    changed = Settings.from_env(
        {
            "AGENTRUN_EVENT_RETENTION": "3600",
            "AGENTRUN_RUN_RETENTION": "86400",
            "AGENTRUN_RETENTION_INTERVAL": "60",
        }
    )
    assert (changed.event_retention, changed.run_retention, changed.retention_interval) == (
        3600.0,
        86400.0,
        60.0,
    )
    assert Settings.from_env({"AGENTRUN_RUN_RETENTION": "0"}).run_retention == 0.0


# -- JetStream -----------------------------------------------------------------------------------


async def test_event_retention_is_the_streams_max_age_and_a_change_is_applied(
    nats_server: Service,
) -> None:
    names = NatsNames(f"t{uuid.uuid4().hex[:12]}")
    urls = [f"nats://{nats_server.address}"]

    async def open_link(retention: float) -> NatsLink:
        link = NatsLink(urls, name="retention-test", event_retention=retention, names=names)
        await link.start(wait=30)
        assert link.is_connected
        return link

    first = await open_link(3600)
    try:
        info = await first.js.stream_info(names.events_stream)
        assert info.config.max_age == 3600
        await first.js.publish(names.events_subject("r1"), b"kept")
    finally:
        await first.close()
    # The next process starts with another setting: the existing stream takes it, and keeps
    # its messages.
    second = await open_link(2 * DAY)
    try:
        info = await second.js.stream_info(names.events_stream)
        assert info.config.max_age == 2 * DAY
        assert info.state.messages == 1
        assert (
            await second.js.get_last_msg(names.events_stream, names.events_subject("r1"))
        ).data == b"kept"
        await second.js.delete_stream(names.events_stream)
        await second.js.delete_stream(names.dispatch_stream)
    finally:
        await second.close()


# -- the store -----------------------------------------------------------------------------------


@dataclass
class Stores:
    config: StoreConfig
    runs: RunStore
    run_list: RunList

    def project(self) -> None:
        """What the run-list projection of an executor does: every recorded change, applied."""
        while True:
            position = self.run_list.projection_position(RUN_LIST)
            notifications = self.runs.recorder.select_notifications(start=position + 1, limit=500)
            if not notifications:
                return
            run_ids = list(dict.fromkeys(str(n.originator_id) for n in notifications))
            records = [record_of(self.runs.load(r, to_change=False)) for r in run_ids]
            self.run_list.apply_projection(RUN_LIST, position, notifications[-1].id, records)

    def retention(self, batch_size: int = 100) -> RunPruner:
        return RunPruner(self.config, self.runs, projection=RUN_LIST, batch_size=batch_size)

    def events(self, run_id: str) -> int:
        return len(list(self.runs.events.get(UUID(run_id))))

    def snapshots(self, run_id: str) -> int:
        assert self.runs.snapshots is not None
        return len(list(self.runs.snapshots.get(UUID(run_id))))

    def is_gone(self, run_id: str) -> bool:
        """No row, no events, no snapshots (a cached copy in another store's memory may stay:
        readers find runs through their rows)."""
        try:
            self.run_list.get(TENANT, run_id)
        except NotFound:
            return self.events(run_id) == 0 and self.snapshots(run_id) == 0
        return False


@pytest.fixture
def stores(store: StoreConfig) -> Iterator[Stores]:
    runs, run_list = RunStore(store), RunList(store)
    yield Stores(store, runs, run_list)
    runs.close()
    run_list.close()


def durable_run(stores: Stores, end: str, steps: int = 1) -> str:
    """A stored durable run of ``steps`` tool steps, then ended: completed, failed, cancelled,
    or left running or suspended (awaiting an approval)."""
    run = new_run()
    stores.runs.create(run)
    for step in range(1, steps + 1):
        run.record_model_call(step, "checking", [call(f"c{step}", "clock")], USAGE)
        run.record_tool_outcome(step, f"c{step}", "noon", False)
        stores.runs.commit(run)
    if end == "suspended":
        run.record_model_call(steps + 1, "sending", [call("mail", "send_email")], USAGE)
        run.require_approval(steps + 1, "mail", 0.0)
    elif end == "completed":
        run.complete("done")
    elif end == "failed":
        run.fail("MODEL_ERROR", "the model failed", False)
    elif end == "cancelled":
        run.cancel("no longer needed")
    if end != "running":
        stores.runs.commit(run)
    return run.run_id


def classic_run(stores: Stores, status: str) -> str:
    run_id = str(uuid.uuid4())
    stores.run_list.claim(RunRecord(run_id=run_id, tenant=TENANT, agent_id="helper"))
    if status != "running":
        stores.run_list.update(run_id, status=status)
    return run_id


def test_the_tables_pruned_are_the_run_stores(stores: Stores) -> None:
    recorder = stores.runs.recorder
    assert stores.runs.snapshots is not None
    snapshots = stores.runs.snapshots.recorder
    if stores.config.is_postgres:
        expected = (POSTGRES_EVENTS, POSTGRES_SNAPSHOTS)
    else:
        expected = (SQLITE_EVENTS, SQLITE_SNAPSHOTS)
    names = (recorder.events_table_name, snapshots.events_table_name)  # type: ignore[attr-defined]
    assert names == expected


def test_finished_runs_older_than_the_retention_are_pruned_the_rest_kept(stores: Stores) -> None:
    old = [
        durable_run(stores, "completed", steps=SNAPSHOT_INTERVAL // 2 + 1),  # has a snapshot
        durable_run(stores, "failed"),
        durable_run(stores, "cancelled"),
        classic_run(stores, "completed"),
        classic_run(stores, "failed"),
        classic_run(stores, "cancelled"),
    ]
    between = time.time()
    young = [durable_run(stores, "completed"), classic_run(stores, "completed")]
    # Unfinished runs, written last (on SQLite the store's newest event is never pruned).
    unfinished = [
        classic_run(stores, "running"),
        classic_run(stores, "awaiting_approval"),
        durable_run(stores, "running"),
        durable_run(stores, "suspended"),
    ]
    stores.project()
    assert stores.snapshots(old[0]) == 1
    kept_events = {r: stores.events(r) for r in young + unfinished}
    old_events = sum(stores.events(r) for r in old)

    result = stores.retention().prune(RETENTION, now=between + RETENTION)

    assert result == PruneResult(runs=6, events=old_events, snapshots=1, deferred=0)
    assert all(stores.is_gone(r) for r in old)
    for run_id in old[:3]:  # the pruning store's cache forgot them
        with pytest.raises(NotFound):
            stores.runs.load(run_id)
    assert {r: stores.events(r) for r in young + unfinished} == kept_events
    listed, _ = stores.run_list.list_runs(TENANT, RunFilter())
    assert {r.run_id for r in listed} == set(young + unfinished)

    # Much later: every finished run goes; unfinished ones stay, whatever their age.
    later = stores.retention().prune(RETENTION, now=between + 100 * RETENTION)
    assert later.runs == 2
    assert all(stores.is_gone(r) for r in young)
    listed, _ = stores.run_list.list_runs(TENANT, RunFilter())
    assert {r.run_id: r.status for r in listed} == {
        unfinished[0]: "running",
        unfinished[1]: "awaiting_approval",
        unfinished[2]: "running",
        unfinished[3]: "awaiting_approval",
    }
    assert all(stores.events(r) == kept_events[r] for r in unfinished[2:])
    assert stores.runs.load(unfinished[3]).awaiting_decision()


def test_retention_zero_keeps_everything(stores: Stores) -> None:
    finished = [durable_run(stores, "completed"), classic_run(stores, "completed")]
    durable_run(stores, "running")
    stores.project()
    events = stores.events(finished[0])
    far = time.time() + 1000 * RETENTION
    assert stores.retention().prune(0, now=far) == PruneResult()
    job = RetentionJob(stores.config, stores.runs, retention=0, interval=1.0)
    assert not job.enabled
    assert asyncio.run(job.once(now=far)) == PruneResult()
    assert [stores.run_list.get(TENANT, r).status for r in finished] == ["completed", "completed"]
    assert stores.events(finished[0]) == events == 4


def test_a_run_is_pruned_only_once_the_run_list_has_applied_all_its_events(
    stores: Stores,
) -> None:
    run_id = durable_run(stores, "completed")
    durable_run(stores, "running")  # the store's newest event is not the finished run's
    # The projection has read the run (finished) for its first notification only: its row says
    # completed, but the projection has the run's later notifications still to apply.
    first = stores.runs.recorder.select_notifications(start=1, limit=1)[0]
    record = record_of(stores.runs.load(run_id, to_change=False))
    stores.run_list.apply_projection(RUN_LIST, 0, first.id, [record])
    now = time.time() + 2 * RETENTION

    assert stores.retention().prune(RETENTION, now=now) == PruneResult(deferred=1)
    assert stores.run_list.get(TENANT, run_id).status == "completed"
    stores.project()
    assert stores.retention().prune(RETENTION, now=now).runs == 1
    assert stores.is_gone(run_id)


def test_on_sqlite_the_run_holding_the_newest_event_waits_for_a_newer_one(
    stores: Stores,
) -> None:
    run_id = durable_run(stores, "completed")
    stores.project()
    now = time.time() + 2 * RETENTION
    first = stores.retention().prune(RETENTION, now=now)
    if stores.config.is_postgres:  # notification ids come from a sequence: never reused
        assert first.runs == 1
        return
    # SQLite would give the next event the deleted newest event's rowid, which the run list
    # projection has passed: the run is left for later...
    assert first == PruneResult(deferred=1)
    assert stores.run_list.get(TENANT, run_id).status == "completed"
    # ...until something newer is written. The newer event is then seen by the projection.
    newer = durable_run(stores, "running")
    stores.project()
    assert stores.retention().prune(RETENTION, now=now).runs == 1
    assert stores.is_gone(run_id)
    another = durable_run(stores, "running")
    stores.project()
    assert {r.run_id for r in stores.run_list.list_runs(TENANT, RunFilter())[0]} == {newer, another}


def test_pruning_twice_and_from_two_stores_at_once_is_safe(stores: Stores) -> None:
    finished = [durable_run(stores, "completed") for _ in range(12)]
    finished += [classic_run(stores, "failed") for _ in range(12)]
    unfinished = [durable_run(stores, "suspended"), classic_run(stores, "running")]
    stores.project()
    events = sum(stores.events(r) for r in finished)
    suspended_events = stores.events(unfinished[0])
    now = time.time() + 2 * RETENTION
    # Two executors' stores, small batches, at the same moment.
    other_runs = RunStore(stores.config)
    try:
        pruners = [
            stores.retention(batch_size=3),
            RunPruner(stores.config, other_runs, projection=RUN_LIST, batch_size=3),
        ]
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda p: p.prune(RETENTION, now=now), pruners))
    finally:
        other_runs.close()
    # Each row and each event was deleted once, by one of them.
    assert sum((r for r in results), PruneResult()) == PruneResult(runs=24, events=events)
    assert all(stores.is_gone(r) for r in finished)
    # Again: nothing left to do, nothing else touched.
    assert stores.retention().prune(RETENTION, now=now) == PruneResult()
    assert [stores.run_list.get(TENANT, r).status for r in unfinished] == [
        "awaiting_approval",
        "running",
    ]
    assert stores.events(unfinished[0]) == suspended_events


async def test_the_executor_job_prunes_in_batches(stores: Stores) -> None:
    finished = [classic_run(stores, "completed") for _ in range(7)]
    between = time.time()
    young = classic_run(stores, "completed")
    job = RetentionJob(stores.config, stores.runs, retention=RETENTION, interval=3600, batch_size=2)
    assert job.enabled
    result = await job.once(now=between + RETENTION)
    assert result == PruneResult(runs=7)
    assert all(stores.is_gone(r) for r in finished)
    assert stores.run_list.get(TENANT, young).status == "completed"
    job.start()  # the first prune comes within an interval: stopping before it is clean
    job.stop()
    await job.wait_stopped()


# -- through the API -----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def retention_stack(
    request: pytest.FixtureRequest,
    nats_server: Service,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A stack of its own: pruning with a moved clock removes every old finished run in it.
    Its executor's own job is off (0), so that the test's prune is the only one."""
    tmp = tmp_path_factory.mktemp(f"retention-{request.param}")
    url = database_url_for(request.param, tmp / "data")
    running = Stack(database_url=url, nats=nats_server, tmp=tmp)
    try:
        running.start_executor(AGENTRUN_RUN_RETENTION="0")
        running.start_gateway()
        yield running
    finally:
        running.stop()
        drop_schema(url)


@pytest.fixture
async def client(retention_stack: Stack) -> AsyncIterator[Client]:
    channel = grpc.aio.insecure_channel(retention_stack.gateways[0].address)
    yield Client(channel)
    await channel.close(grace=None)


async def list_run_ids(client: Client, agent_id: str) -> set[str]:
    response = await client.runs.ListRuns(run_service_pb2.ListRunsRequest(agent_id=agent_id))
    return {r.id for r in response.runs}


async def test_pruned_runs_are_not_found_through_the_api(
    client: Client, retention_stack: Stack
) -> None:
    durable = agent_pb2.EXECUTION_MODE_DURABLE
    email = json.dumps({"to": "ada@example.com", "subject": "Hi", "body": "Hello"})
    turns = [("Sending.", [("send_email", email)]), ("Sent.", [])]
    durable_agent = await client.create_agent(scripted_agent(turns=[("Done.", [])], mode=durable))
    classic_agent = await client.create_agent(scripted_agent(turns=[("Done.", [])]))
    waiting_agent = await client.create_agent(scripted_agent(turns=turns, mode=durable))
    durable_id = (await client.run(durable_agent.id, "hi"))[0].run_id
    classic_id = (await client.run(classic_agent.id, "hi"))[0].run_id
    between = time.time()
    waiting = client.stream(waiting_agent.id, "email Ada")
    waiting_id = (await until(waiting, "tool_approval_required"))[0].run_id
    try:
        # ListRuns brings the run list up to date with everything recorded (as a prune needs).
        assert await list_run_ids(client, durable_agent.id) == {durable_id}
        assert await list_run_ids(client, waiting_agent.id) == {waiting_id}
        config = StoreConfig.from_url(retention_stack.database_url, retention_stack.data_dir)
        result = await asyncio.to_thread(
            RunPruner(config).prune, RETENTION, between + 100 * RETENTION
        )
        assert result.runs == 2

        for run_id in (durable_id, classic_id):
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await client.get_run(run_id)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        events = client.runs.ListRunEvents(run_service_pb2.ListRunEventsRequest(run_id=durable_id))
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            [e async for e in events]
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert await list_run_ids(client, durable_agent.id) == set()
        assert await list_run_ids(client, classic_agent.id) == set()
        # The suspended run is still there and can go on.
        assert (await client.get_run(waiting_id)).status == run_pb2.RUN_STATUS_AWAITING_APPROVAL
        assert await list_run_ids(client, waiting_agent.id) == {waiting_id}
    finally:
        waiting.cancel()
