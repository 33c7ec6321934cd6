"""RunStore on every backend: creating, committing (the fence between two executors), loading
(by tenant, at a version), reading histories, forking, and snapshots."""

from __future__ import annotations

import copy
import dataclasses
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any
from uuid import UUID

import pytest

from common.errors import AlreadyExists, Conflict, FailedPrecondition, NotFound, OutOfRange
from eventstore.agent_config import AgentConfig, ModelSettings, ToolSettings
from eventstore.messages import ChatMessage, ToolCall, Usage
from eventstore.persistence import StoreConfig
from eventstore.retry_policy import DEFAULT_MODEL_RETRY_POLICY, DEFAULT_TOOL_RETRY_POLICY
from eventstore.run import PinnedTool, Run
from eventstore.run_store import SNAPSHOT_INTERVAL, RunStore, StoredEvent

TENANT = "acme"
OTHER = "globex"
USAGE: Usage = {"input_tokens": 3, "output_tokens": 5}
EARLIER: list[ChatMessage] = [
    {"role": "user", "content": "earlier question"},
    {"role": "assistant", "content": "earlier answer"},
]


@pytest.fixture
def runs(store: StoreConfig) -> Iterator[RunStore]:
    opened = RunStore(store)
    yield opened
    opened.close()


def new_run(tenant: str = TENANT, run_id: str = "") -> Run:
    agent = AgentConfig(
        agent_id="helper",
        version=2,
        execution_mode="durable",
        model=ModelSettings(provider="scripted"),
        tools=(ToolSettings("clock"), ToolSettings("send_email", requires_approval=True)),
        max_model_calls=200,
    )
    return Run(
        run_id=run_id or str(uuid.uuid4()),
        tenant=tenant,
        request_id=f"req-{uuid.uuid4().hex[:8]}",
        agent=agent.to_json(),
        input="hello",
        conversation_id="conv-1",
        history=EARLIER,
        execution_mode="durable",
    )


def call(call_id: str, name: str) -> ToolCall:
    return {"id": call_id, "name": name, "arguments_json": json.dumps({"n": call_id})}


def state(run: Run) -> dict[str, Any]:
    """What a run is now, for comparisons: a copy of its attributes, without the events not
    yet saved."""
    return copy.deepcopy({k: v for k, v in vars(run).items() if k != "_pending_events"})


def types_of(events: list[StoredEvent]) -> list[str]:
    return [e.type for e in events]


def awaiting_run(runs: RunStore) -> Run:
    """A stored run whose model asked for a tool and a tool that needs approval; an executor
    took it up (Resumed) before the approval was required. Versions 1 to 4."""
    run = new_run()
    runs.create(run)
    run.record_model_call(1, "checking", [call("c1", "clock"), call("c2", "send_email")], USAGE)
    runs.commit(run)
    run.resume("executor-b")
    runs.commit(run)
    run.require_approval(2, "c2", 1_000_000.5)
    runs.commit(run)
    assert run.version == 4
    return run


def cached(runs: RunStore, run_id: str) -> bool:
    cache = runs.repository.cache
    assert cache is not None
    try:
        cache.get(UUID(run_id))
    except KeyError:
        return False
    return True


def test_a_run_that_waits_for_a_person_or_has_ended_is_not_kept_in_memory(
    runs: RunStore,
) -> None:
    running = new_run()
    runs.create(running)
    runs.load(running.run_id)
    assert cached(runs, running.run_id)
    waiting = awaiting_run(runs)
    runs.load(waiting.run_id)
    assert not cached(runs, waiting.run_id)
    decided = runs.load(waiting.run_id)
    decided.decide("c2", True, "fine", False)
    runs.commit(decided)
    assert runs.load(waiting.run_id).awaiting_decision() == []
    assert cached(runs, waiting.run_id)
    running.cancel("enough")
    runs.commit(running)
    assert runs.load(running.run_id, to_change=False).status == "cancelled"
    assert not cached(runs, running.run_id)


def test_a_created_run_loads_with_the_same_state(runs: RunStore) -> None:
    run = new_run()
    runs.create(run)
    loaded = runs.load(run.run_id)
    assert state(loaded) == state(run)
    assert loaded.version == 1
    assert loaded.status == "running"
    assert loaded.messages == [{"role": "user", "content": "hello"}]
    assert loaded.model_messages == [*EARLIER, {"role": "user", "content": "hello"}]
    assert loaded.agent_config == run.agent_config


def test_a_run_id_is_created_once(runs: RunStore) -> None:
    run = new_run()
    runs.create(run)
    with pytest.raises(AlreadyExists) as error:
        runs.create(new_run(tenant=OTHER, run_id=run.run_id))
    assert error.value.metadata() == {"kind": "run", "id": run.run_id}
    assert runs.load(run.run_id).tenant == TENANT
    assert types_of(runs.history(run.run_id)) == ["Requested"]


def test_unknown_runs_are_not_found(runs: RunStore) -> None:
    with pytest.raises(NotFound):
        runs.load(str(uuid.uuid4()))
    with pytest.raises(NotFound):
        runs.load_for(TENANT, str(uuid.uuid4()))


def test_of_two_executors_appending_at_the_same_version_the_second_conflicts(
    runs: RunStore,
) -> None:
    run = new_run()
    runs.create(run)
    first, second = runs.load(run.run_id), runs.load(run.run_id)
    first.record_model_call(1, "first executor", [], USAGE)
    second.record_model_call(1, "second executor", [call("c1", "clock")], USAGE)
    runs.commit(first)
    with pytest.raises(Conflict):
        runs.commit(second)
    history = runs.history(run.run_id)
    assert types_of(history) == ["Requested", "ModelCallCompleted"]
    assert history[1].payload["text"] == "first executor"
    stored = runs.load(run.run_id)
    assert state(stored) == state(first)
    assert stored.messages[-1] == {"role": "assistant", "content": "first executor"}


def test_an_executor_that_took_the_run_up_fences_the_stale_one(runs: RunStore) -> None:
    run = new_run()
    runs.create(run)
    stale = runs.load(run.run_id)
    taker = runs.load(run.run_id)
    taker.resume("executor-b")
    runs.commit(taker)
    stale.record_model_call(1, "too late", [], USAGE)
    with pytest.raises(Conflict):
        runs.commit(stale)
    stored = runs.load(run.run_id)
    assert stored.holder == "executor-b"
    assert stored.attempt_of(1) == 2
    assert stored.model_calls == 0
    assert types_of(runs.history(run.run_id)) == ["Requested", "Resumed"]


def test_another_tenants_run_looks_absent(runs: RunStore) -> None:
    run = new_run()
    runs.create(run)
    assert state(runs.load_for(TENANT, run.run_id)) == state(run)
    with pytest.raises(NotFound) as error:
        runs.load_for(OTHER, run.run_id)
    assert error.value.metadata() == {"kind": "run", "id": run.run_id}
    with pytest.raises(NotFound):
        runs.load_for(OTHER, run.run_id, version=1)


def test_a_run_loads_as_it_was_at_each_version(runs: RunStore) -> None:
    run = new_run()
    runs.create(run)
    states = {1: state(run)}
    run.record_model_call(1, "checking", [call("c1", "clock")], USAGE)
    runs.commit(run)
    states[2] = state(run)
    run.record_tool_outcome(2, "c1", "12:00", False)
    runs.commit(run)
    states[3] = state(run)
    run.record_model_call(3, "it is noon", [], USAGE)
    run.complete("it is noon")
    runs.commit(run)  # one save, two events
    states[5] = state(run)
    for version in (1, 2, 3, 5):
        assert state(runs.load(run.run_id, version=version)) == states[version]
        assert state(runs.load_for(TENANT, run.run_id, version=version)) == states[version]
    at_four = runs.load(run.run_id, version=4)
    assert at_four.version == 4
    assert at_four.status == "running"
    assert at_four.model_calls == 2
    assert runs.load(run.run_id, version=2).pending_tool_calls() == [call("c1", "clock")]
    assert runs.load(run.run_id).status == "completed"
    with pytest.raises(OutOfRange, match="no version 6"):
        runs.load(run.run_id, version=6)
    with pytest.raises(OutOfRange):
        runs.load_for(TENANT, run.run_id, version=100)


def test_history_gives_versions_types_and_payloads_within_bounds(runs: RunStore) -> None:
    run = new_run()
    runs.create(run)
    run.record_model_call(1, "checking", [call("c1", "send_email")], USAGE)
    runs.commit(run)
    run.require_approval(2, "c1", 1_000_000.25)
    runs.commit(run)
    run.decide("c1", False, "not now", False)
    runs.commit(run)
    run.record_tool_outcome(2, "c1", "denied: not now", True)
    runs.commit(run)
    run.fail("MODEL_ERROR", "the model is down", True)
    runs.commit(run)

    history = runs.history(run.run_id)
    assert [(e.version, e.type) for e in history] == [
        (1, "Requested"),
        (2, "ModelCallCompleted"),
        (3, "ToolApprovalRequired"),
        (4, "ToolApprovalDecided"),
        (5, "ToolCallCompleted"),
        (6, "Failed"),
    ]
    assert all(isinstance(e.time, datetime) and e.time.tzinfo is not None for e in history)
    assert [e.time for e in history] == sorted(e.time for e in history)
    payloads = [json.loads(e.payload_json) for e in history]
    assert payloads[0] == {
        "run_id": run.run_id,
        "tenant": TENANT,
        "request_id": run.request_id,
        "agent": run.agent,
        "input": "hello",
        "conversation_id": "conv-1",
        "history": EARLIER,
        "execution_mode": "durable",
        "forked_from_run_id": "",
        "forked_at_version": 0,
        "trace_context": {},
    }
    assert payloads[1:] == [
        {
            "step_index": 1,
            "text": "checking",
            "tool_calls": [call("c1", "send_email")],
            "usage": {"input_tokens": 3, "output_tokens": 5},
        },
        {"step_index": 2, "tool_call_id": "c1", "expire_at": 1_000_000.25},
        {
            "tool_call_id": "c1",
            "approved": False,
            "reason": "not now",
            "timed_out": False,
            "arguments_json": "",
        },
        {"step_index": 2, "tool_call_id": "c1", "output": "denied: not now", "is_error": True},
        {"code": "MODEL_ERROR", "message": "the model is down", "retryable": True},
    ]
    assert [e.payload for e in history] == payloads

    assert [e.version for e in runs.history(run.run_id, 0, 0)] == [1, 2, 3, 4, 5, 6]
    assert [e.version for e in runs.history(run.run_id, 1)] == [1, 2, 3, 4, 5, 6]
    assert [e.version for e in runs.history(run.run_id, 2, 4)] == [2, 3, 4]
    assert [e.version for e in runs.history(run.run_id, 3, 3)] == [3]
    assert [e.version for e in runs.history(run.run_id, 5)] == [5, 6]
    assert [e.version for e in runs.history(run.run_id, 0, 2)] == [1, 2]
    assert [e.version for e in runs.history(run.run_id, 4, 99)] == [4, 5, 6]
    assert runs.history(run.run_id, 7) == []
    assert runs.history(str(uuid.uuid4())) == []
    assert runs.history(run.run_id, 2, 4) == history[1:4]


def test_recorded_after_gives_the_domain_events_after_a_version(runs: RunStore) -> None:
    run = new_run()
    runs.create(run)
    run.record_model_call(1, "checking", [call("c1", "clock")], USAGE)
    run.record_tool_outcome(2, "c1", "12:00", False)
    runs.commit(run)
    run.record_model_call(3, "noon", [], USAGE)
    run.complete("noon")
    runs.commit(run)

    after = runs.recorded_after(run.run_id, 2)
    assert [(type(e).__name__, e.originator_version) for e in after] == [
        ("ToolCallCompleted", 3),
        ("ModelCallCompleted", 4),
        ("Completed", 5),
    ]
    assert after[0].originator_id == UUID(run.run_id)
    assert (after[0].tool_call_id, after[0].output, after[0].is_error) == ("c1", "12:00", False)
    assert after[2].output == "noon"
    everything = runs.recorded_after(run.run_id, 0)
    assert [e.originator_version for e in everything] == [1, 2, 3, 4, 5]
    assert type(everything[0]).__name__ == "Requested"
    assert runs.recorded_after(run.run_id, 5) == []


def test_a_fork_awaiting_an_approval_has_the_recorded_steps_without_the_bookkeeping(
    runs: RunStore,
) -> None:
    source = awaiting_run(runs)
    fork_id = str(uuid.uuid4())
    fork = runs.fork(TENANT, source.run_id, 4, fork_id, "fork-request")

    assert fork.run_id == fork_id != source.run_id
    assert fork.request_id == "fork-request"
    assert fork.forked_from_run_id == source.run_id
    assert fork.forked_at_version == 4
    assert fork.tenant == TENANT
    assert fork.execution_mode == "durable"
    assert fork.status == "awaiting_approval"
    assert fork.awaiting_decision() == [call("c2", "send_email")]
    assert fork.approval_deadline == 1_000_000.5
    assert fork.pending_tool_calls() == [call("c1", "clock"), call("c2", "send_email")]
    assert fork.messages == source.messages
    assert fork.model_messages == source.model_messages
    assert fork.usage == source.usage
    assert fork.holder == ""
    assert fork.attempts == {}  # executor bookkeeping is not copied
    assert (fork.agent, fork.input, fork.conversation_id) == (
        source.agent,
        source.input,
        source.conversation_id,
    )

    stored = runs.load(fork_id)
    assert state(stored) == state(fork)
    source_steps = [e for e in runs.history(source.run_id) if e.type != "Resumed"]
    fork_steps = runs.history(fork_id)
    assert types_of(fork_steps) == [
        "Requested",
        "ModelCallCompleted",
        "ToolApprovalRequired",
    ]
    assert types_of(fork_steps) == types_of(source_steps)
    assert [e.payload for e in fork_steps[1:]] == [e.payload for e in source_steps[1:]]
    requested = fork_steps[0].payload
    assert requested["forked_from_run_id"] == source.run_id
    assert requested["forked_at_version"] == 4
    assert requested["run_id"] == fork_id
    assert requested["request_id"] == "fork-request"
    # The source is untouched.
    assert state(runs.load(source.run_id)) == state(source)


def test_a_fork_at_an_earlier_version_goes_on_from_there(runs: RunStore) -> None:
    source = awaiting_run(runs)
    source.decide("c2", True, "", False)
    source.record_tool_outcome(2, "c1", "12:00", False)
    runs.commit(source)
    fork = runs.fork(TENANT, source.run_id, 2, str(uuid.uuid4()), "r2")
    assert fork.forked_at_version == 2
    assert fork.status == "running"
    assert fork.approvals_required == {}
    assert fork.outcomes == {}
    assert fork.pending_tool_calls() == [call("c1", "clock"), call("c2", "send_email")]
    assert types_of(runs.history(fork.run_id)) == ["Requested", "ModelCallCompleted"]


def test_a_fork_at_version_zero_forks_the_latest_version(runs: RunStore) -> None:
    source = awaiting_run(runs)
    fork = runs.fork(TENANT, source.run_id, 0, str(uuid.uuid4()), "latest")
    assert fork.forked_at_version == source.version == 4
    assert fork.status == "awaiting_approval"


def test_a_fork_must_be_at_a_version_before_the_source_ended(runs: RunStore) -> None:
    source = awaiting_run(runs)
    source.cancel("no longer needed")
    runs.commit(source)  # version 5
    with pytest.raises(FailedPrecondition, match="has ended by version 5"):
        runs.fork(TENANT, source.run_id, 5, str(uuid.uuid4()), "r")
    with pytest.raises(FailedPrecondition):
        runs.fork(TENANT, source.run_id, 0, str(uuid.uuid4()), "r")
    fork = runs.fork(TENANT, source.run_id, 4, str(uuid.uuid4()), "r")
    assert fork.status == "awaiting_approval"


def test_a_fork_out_of_range_or_of_another_tenants_run_is_refused(runs: RunStore) -> None:
    source = awaiting_run(runs)
    for version in (5, 100, -1):
        fork_id = str(uuid.uuid4())
        with pytest.raises(OutOfRange, match="versions 1 to 4"):
            runs.fork(TENANT, source.run_id, version, fork_id, "r")
        with pytest.raises(NotFound):
            runs.load(fork_id)
    with pytest.raises(NotFound):
        runs.fork(OTHER, source.run_id, 2, str(uuid.uuid4()), "r")
    with pytest.raises(NotFound):
        runs.fork(TENANT, str(uuid.uuid4()), 1, str(uuid.uuid4()), "r")
    taken = str(uuid.uuid4())
    runs.fork(TENANT, source.run_id, 2, taken, "r")
    with pytest.raises(AlreadyExists):
        runs.fork(TENANT, source.run_id, 3, taken, "r")


def test_a_long_run_loads_from_snapshots_as_it_is_in_memory(runs: RunStore) -> None:
    run = new_run()
    runs.create(run)
    states: dict[int, dict[str, Any]] = {}

    def remember() -> None:
        states[run.version] = state(run)

    remember()
    step = 0
    for n in range(60):  # each turn: a model call, then its tool's outcome (two commits)
        step += 1
        name = "send_email" if n % 7 == 0 else "clock"
        run.record_model_call(step, f"turn {n}", [call(f"c{n}", name)], USAGE)
        remember()
        runs.commit(run)
        step += 1
        if name == "send_email":
            run.require_approval(step, f"c{n}", 1000.0 + n)
            remember()
            approved = n % 2 == 0
            run.decide(f"c{n}", approved, f"reason {n}", not approved and n % 3 == 0)
            remember()
        run.record_tool_outcome(step, f"c{n}", f"output {n}", n % 5 == 0)
        remember()
        runs.commit(run)
    run.record_model_call(step + 1, "all done", [], USAGE)
    remember()
    run.complete("all done")
    remember()
    runs.commit(run)
    assert run.version > 2 * SNAPSHOT_INTERVAL
    assert sorted(states) == list(range(1, run.version + 1))

    assert runs.snapshots is not None
    snapshots = [s.originator_version for s in runs.snapshots.get(UUID(run.run_id))]
    assert snapshots == list(range(SNAPSHOT_INTERVAL, run.version + 1, SNAPSHOT_INTERVAL))

    loaded = runs.load(run.run_id)
    assert state(loaded) == state(run)
    assert loaded == run
    assert loaded.model_calls == 61
    assert loaded.usage == {"input_tokens": 3 * 61, "output_tokens": 5 * 61}
    assert len(loaded.outcomes) == 60
    assert loaded.status == "completed"
    for version, expected in states.items():
        assert state(runs.load(run.run_id, version=version)) == expected, version
    assert len(runs.history(run.run_id)) == run.version


def test_a_run_whose_agent_was_read_snapshots_and_loads_from_its_snapshot(
    store: StoreConfig, runs: RunStore
) -> None:
    run = awaiting_run(runs)
    run = runs.load(run.run_id, to_change=False)
    config = run.agent_config
    runs.take_snapshot(UUID(run.run_id))
    assert runs.snapshots is not None
    (snapshot,) = runs.snapshots.get(UUID(run.run_id))
    assert isinstance(snapshot, Run.Snapshot)
    assert "_agent_config" not in snapshot.state
    fresh = RunStore(store)  # nothing cached: it reads the snapshot
    try:
        loaded = fresh.load(run.run_id)
        assert state(loaded) == state(run)
        assert loaded.agent_config == config
        assert loaded.requires_approval(call("c2", "send_email"))
    finally:
        fresh.close()


def as_stored_by_version_1(runs: RunStore, event: Any, change: Callable[[Any], None]) -> Any:
    """``event`` (a run event or snapshot) stored as versions before retry policies stored it:
    without a class version, and changed by ``change``."""
    stored = runs.mapper.to_stored_event(event)
    data = runs.mapper.transcoder.decode(stored.state)
    change(data)
    return dataclasses.replace(stored, state=runs.mapper.transcoder.encode(data))


def without_policies(agent: dict[str, Any]) -> None:
    del agent["model_retry_policy"], agent["tool_retry_policy"]


def test_a_run_requested_by_an_earlier_version_gets_the_default_retry_policies(
    runs: RunStore,
) -> None:
    run = new_run()
    (requested,) = run.collect_events()

    def to_version_1(data: dict[str, Any]) -> None:
        assert data.pop("class_version") == 3
        without_policies(data["agent"])
        del data["trace_context"]  # (nor before traces)

    runs.recorder.insert_events([as_stored_by_version_1(runs, requested, to_version_1)])

    loaded = runs.load(run.run_id)
    assert loaded.agent_config.model_retry_policy == DEFAULT_MODEL_RETRY_POLICY
    assert loaded.agent_config.tool_retry_policy == DEFAULT_TOOL_RETRY_POLICY
    assert loaded.agent == run.agent  # the policies are in the pinned agent, as now
    assert state(loaded) == state(run)


def test_a_snapshot_taken_by_an_earlier_version_is_upcast(
    store: StoreConfig, runs: RunStore
) -> None:
    run = awaiting_run(runs)
    snapshot = Run.Snapshot.take(runs.load(run.run_id))

    def to_version_1(data: dict[str, Any]) -> None:
        assert data["state"].pop("class_version") == Run.class_version
        without_policies(data["state"]["agent"])
        del data["state"]["releases"]  # (versions before drains had none)
        del data["state"]["model_failures"]  # (nor before retries)
        del data["state"]["tool_failures"]  # (nor before tool retries)
        del data["state"]["client_calls"], data["state"]["edited_arguments"]  # (nor before
        # client tools and approvals that edit)
        del data["state"]["pinned_tools"]  # (nor before MCP servers)
        del data["state"]["trace_context"]  # (nor before traces)

    assert runs.snapshots is not None
    runs.snapshots.recorder.insert_events([as_stored_by_version_1(runs, snapshot, to_version_1)])
    fresh = RunStore(store)  # nothing cached: it reads the snapshot
    try:
        loaded = fresh.load(run.run_id)
        assert state(loaded) == state(run)
        assert loaded.agent_config.model_retry_policy == DEFAULT_MODEL_RETRY_POLICY
        assert loaded.releases_of(2) == 0
        assert loaded.pinned_tools is None
        assert loaded.trace_context == {}
    finally:
        fresh.close()


def test_a_decision_recorded_before_approvals_could_edit_loads_without_an_edit(
    runs: RunStore,
) -> None:
    run = awaiting_run(runs)
    run.decide("c2", True, "fine", False)
    (decided,) = run.collect_events()

    def to_version_1(data: dict[str, Any]) -> None:
        assert data.pop("class_version") == 2
        assert data.pop("arguments_json") == ""

    runs.recorder.insert_events([as_stored_by_version_1(runs, decided, to_version_1)])
    runs.forget(run.run_id)
    loaded = runs.load(run.run_id)
    assert loaded.decisions["c2"]["approved"]
    assert loaded.arguments_of(loaded.tool_call("c2")) == loaded.tool_call("c2")["arguments_json"]
    (stored,) = [e for e in runs.history(run.run_id) if e.type == "ToolApprovalDecided"]
    assert stored.payload["arguments_json"] == ""


def test_a_fork_offers_the_tools_pinned_in_its_source(runs: RunStore) -> None:
    source = new_run()
    runs.create(source)
    pinned: PinnedTool = {
        "name": "kb_lookup",
        "server": 0,
        "server_name": "lookup",
        "description": "Looks a word up.",
        "parameters": {"type": "object"},
    }
    source.list_tools([pinned])
    runs.commit(source)
    fork = runs.fork(TENANT, source.run_id, 2, str(uuid.uuid4()), "again")
    assert types_of(runs.history(fork.run_id)) == ["Requested", "ToolsListed"]
    assert runs.load(fork.run_id).pinned_tools == [pinned]


def test_a_fork_starts_a_failed_model_call_afresh(runs: RunStore) -> None:
    source = new_run()
    runs.create(source)
    source.record_model_failure(1, "http_503", "overloaded", True)
    runs.commit(source)
    assert types_of(runs.history(source.run_id)) == ["Requested", "ModelCallFailed"]
    fork = runs.fork(TENANT, source.run_id, 2, str(uuid.uuid4()), "again")
    assert types_of(runs.history(fork.run_id)) == ["Requested"]
    assert (fork.failures_of(1), fork.attempt_of(1)) == ([], 1)
    assert (source.failures_of(1)[0]["code"], source.attempt_of(1)) == ("http_503", 2)
