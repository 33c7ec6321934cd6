"""The run list on every backend: claiming, updating and listing rows a page at a time."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from common.errors import InvalidArgument, NotFound
from eventstore.messages import ToolCall
from eventstore.persistence import StoreConfig
from eventstore.run_list import MAX_PAGE_SIZE, RunFilter, RunList, RunRecord

TENANT = "acme"
OTHER = "globex"


def run(run_id: str, **fields: Any) -> RunRecord:
    return replace(RunRecord(run_id=run_id, tenant=TENANT, agent_id="helper"), **fields)


@pytest.fixture
def run_list(store: StoreConfig) -> Iterator[RunList]:
    opened = RunList(store)
    yield opened
    opened.close()


def all_pages(run_list: RunList, run_filter: RunFilter, page_size: int) -> list[list[str]]:
    pages: list[list[str]] = []
    token = ""
    while True:
        records, token = run_list.list_runs(TENANT, run_filter, page_size, token)
        pages.append([r.run_id for r in records])
        if not token:
            return pages


def test_claim_inserts_the_row(run_list: RunList) -> None:
    record = run(
        "run-1",
        request_id="req-1",
        agent_version=3,
        conversation_id="conv-1",
        input="hello",
        executor_id="executor-a",
        created_at=1000.5,
    )

    assert run_list.claim(record) is None

    stored = run_list.get(TENANT, "run-1")
    assert stored == record
    assert stored.created_at == 1000.5
    assert stored.updated_at > 0


def test_claim_sets_created_at_when_missing(run_list: RunList) -> None:
    run_list.claim(run("run-1"))

    stored = run_list.get(TENANT, "run-1")
    assert stored.created_at > 0
    assert stored.created_at == stored.updated_at


def test_second_claim_returns_the_existing_row_unchanged(run_list: RunList) -> None:
    first = run("run-1", input="first", created_at=1000.0)
    run_list.claim(first)
    stored = run_list.get(TENANT, "run-1")

    existing = run_list.claim(run("run-1", input="second", status="failed", created_at=2000.0))

    assert existing == stored
    assert (existing.input, existing.status, existing.created_at) == ("first", "running", 1000.0)
    assert run_list.get(TENANT, "run-1") == stored


def test_update_changes_the_given_fields_including_json_fields(run_list: RunList) -> None:
    run_list.claim(run("run-1", input="hi", created_at=1000.0))
    approvals: list[ToolCall] = [
        {"id": "call_0_0", "name": "send_email", "arguments_json": '{"to": "a@example.com"}'},
        {"id": "call_0_1", "name": "clock", "arguments_json": "{}"},
    ]

    run_list.update(
        "run-1",
        status="awaiting_approval",
        pending_approvals=approvals,
        decisions={"call_0_0": True, "call_0_1": False},
        output="partial",
        input_tokens=12,
        output_tokens=34,
        version=5,
    )

    stored = run_list.get(TENANT, "run-1")
    assert stored.pending_approvals == approvals
    assert stored.decisions == {"call_0_0": True, "call_0_1": False}
    assert (stored.status, stored.output, stored.version) == ("awaiting_approval", "partial", 5)
    assert (stored.input_tokens, stored.output_tokens) == (12, 34)
    assert (stored.input, stored.created_at) == ("hi", 1000.0)


def test_update_of_error_fields(run_list: RunList) -> None:
    run_list.claim(run("run-1"))

    run_list.update(
        "run-1",
        status="failed",
        error_code="MODEL_ERROR",
        error_message="the model failed",
        error_retryable=True,
        pending_approvals=[],
    )

    stored = run_list.get(TENANT, "run-1")
    assert stored.error_retryable is True
    assert (stored.status, stored.error_code, stored.error_message) == (
        "failed",
        "MODEL_ERROR",
        "the model failed",
    )
    assert stored.pending_approvals == []


@pytest.mark.parametrize("name", ["tenant", "created_at", "colour"])
def test_update_of_a_fixed_or_unknown_field_is_refused(run_list: RunList, name: str) -> None:
    run_list.claim(run("run-1", created_at=1000.0))
    before = run_list.get(TENANT, "run-1")

    with pytest.raises(ValueError, match=name):
        run_list.update("run-1", **{name: "x"})

    assert run_list.get(TENANT, "run-1") == before


def test_update_active_changes_a_row_only_until_it_records_an_end(run_list: RunList) -> None:
    """The row arbitrates how a classic run ended: the first end recorded stays."""
    run_list.claim(run("run-1"))
    assert run_list.update_active("run-1", status="awaiting_approval")
    assert run_list.update_active("run-1", status="failed", error_code="EXECUTOR_LOST")
    assert not run_list.update_active("run-1", status="completed", output="too late")
    assert not run_list.update_active("run-1", status="running")
    stored = run_list.get(TENANT, "run-1")
    assert (stored.status, stored.error_code, stored.output) == ("failed", "EXECUTOR_LOST", "")
    assert not run_list.update_active("no-such-run", status="completed")


def test_get_with_the_wrong_tenant_or_id_is_not_found(run_list: RunList) -> None:
    run_list.claim(run("run-1"))

    with pytest.raises(NotFound) as caught:
        run_list.get(OTHER, "run-1")
    assert (caught.value.kind, caught.value.resource_id) == ("run", "run-1")
    with pytest.raises(NotFound):
        run_list.get(TENANT, "run-2")


def test_rows_survive_reopening_the_index(run_list: RunList, store: StoreConfig) -> None:
    run_list.claim(run("run-1", input="kept", created_at=1000.0))

    reopened = RunList(store)
    try:
        assert reopened.get(TENANT, "run-1") == run_list.get(TENANT, "run-1")
    finally:
        reopened.close()


def test_list_is_newest_first_with_ties_by_run_id(run_list: RunList) -> None:
    for run_id, created_at in [("b", 100.0), ("d", 300.0), ("a", 200.0), ("c", 200.0)]:
        run_list.claim(run(run_id, created_at=created_at))
    run_list.claim(replace(run("z", created_at=400.0), tenant=OTHER))

    records, token = run_list.list_runs(TENANT, RunFilter())

    assert [r.run_id for r in records] == ["d", "c", "a", "b"]
    assert token == ""


def test_list_filters_combine_with_and(run_list: RunList) -> None:
    rows = [
        run("r1", agent_id="a1", conversation_id="c1", status="running"),
        run("r2", agent_id="a1", conversation_id="c1", status="completed"),
        run("r3", agent_id="a1", conversation_id="c2", status="running", execution_mode="durable"),
        run("r4", agent_id="a2", conversation_id="c1", status="failed"),
        run("r5", agent_id="a2", conversation_id="c2", status="running", execution_mode="durable"),
        run("r6", agent_id="a1", conversation_id="c1", status="cancelled"),
    ]
    for n, row in enumerate(rows):
        run_list.claim(replace(row, created_at=1000.0 + n))
    run_list.claim(
        replace(run("x1", agent_id="a1", conversation_id="c1"), tenant=OTHER, created_at=2000.0)
    )

    def listed(run_filter: RunFilter) -> list[str]:
        return [r.run_id for r in run_list.list_runs(TENANT, run_filter)[0]]

    assert listed(RunFilter()) == ["r6", "r5", "r4", "r3", "r2", "r1"]
    assert listed(RunFilter(agent_id="a1")) == ["r6", "r3", "r2", "r1"]
    assert listed(RunFilter(conversation_id="c2")) == ["r5", "r3"]
    assert listed(RunFilter(statuses=("running",))) == ["r5", "r3", "r1"]
    assert listed(RunFilter(execution_mode="durable")) == ["r5", "r3"]
    assert listed(RunFilter(agent_id="a1", conversation_id="c1")) == ["r6", "r2", "r1"]
    assert listed(RunFilter(agent_id="a1", statuses=("completed", "cancelled"))) == ["r6", "r2"]
    assert listed(RunFilter(agent_id="a2", execution_mode="durable", statuses=("running",))) == [
        "r5"
    ]
    assert listed(RunFilter(agent_id="a2", conversation_id="c1", statuses=("running",))) == []


def test_paging_until_exhaustion_has_no_duplicates_and_no_gaps(run_list: RunList) -> None:
    # 23 runs, several sharing a creation time, so pages split inside a tie.
    expected: list[tuple[float, str]] = []
    for n in range(23):
        created_at = 1000.0 + n // 3
        run_list.claim(run(f"run-{n:02d}", created_at=created_at))
        expected.append((created_at, f"run-{n:02d}"))
    newest_first = [run_id for _, run_id in sorted(expected, reverse=True)]

    pages = all_pages(run_list, RunFilter(), page_size=5)

    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]
    assert [run_id for page in pages for run_id in page] == newest_first


def test_paging_with_a_filter(run_list: RunList) -> None:
    for n in range(10):
        status = "completed" if n % 2 else "running"
        run_list.claim(run(f"run-{n}", status=status, created_at=1000.0 + n))

    pages = all_pages(run_list, RunFilter(statuses=("completed",)), page_size=2)

    assert pages == [["run-9", "run-7"], ["run-5", "run-3"], ["run-1"]]


def test_an_exactly_full_last_page_has_no_next_token(run_list: RunList) -> None:
    for n in range(4):
        run_list.claim(run(f"run-{n}", created_at=1000.0 + n))

    assert all_pages(run_list, RunFilter(), page_size=2) == [["run-3", "run-2"], ["run-1", "run-0"]]


def test_default_and_maximum_page_sizes(run_list: RunList) -> None:
    for n in range(MAX_PAGE_SIZE + 1):
        run_list.claim(run(f"run-{n:04d}", created_at=1000.0 + n))

    default_page, default_token = run_list.list_runs(TENANT, RunFilter())
    assert len(default_page) == 50
    assert default_token

    capped, token = run_list.list_runs(TENANT, RunFilter(), page_size=10_000)
    assert len(capped) == MAX_PAGE_SIZE
    rest, last_token = run_list.list_runs(TENANT, RunFilter(), 10_000, token)
    assert [r.run_id for r in rest] == ["run-0000"]
    assert last_token == ""


def test_a_token_used_with_other_filters_is_invalid(run_list: RunList) -> None:
    for n in range(3):
        run_list.claim(run(f"run-{n}", agent_id="a1", created_at=1000.0 + n))
    _, token = run_list.list_runs(TENANT, RunFilter(agent_id="a1"), page_size=1)
    assert token

    for other in (RunFilter(), RunFilter(agent_id="a2"), RunFilter(agent_id="a1", statuses=["x"])):
        with pytest.raises(InvalidArgument) as caught:
            run_list.list_runs(TENANT, other, page_size=1, page_token=token)
        assert caught.value.field == "page_token"


def test_a_token_does_not_depend_on_the_order_of_statuses(run_list: RunList) -> None:
    for n, status in enumerate(["running", "failed", "running", "completed"]):
        run_list.claim(run(f"run-{n}", status=status, created_at=1000.0 + n))
    _, token = run_list.list_runs(TENANT, RunFilter(statuses=("running", "failed")), page_size=1)

    records, _ = run_list.list_runs(
        TENANT, RunFilter(statuses=("failed", "running")), page_size=5, page_token=token
    )

    assert [r.run_id for r in records] == ["run-1", "run-0"]


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "%%%%",
        b64(b"\xff\xfe"),
        b64(b"not json"),
        b64(json.dumps([1, 2, 3]).encode()),
        b64(json.dumps({"c": 1.0, "r": "run-1"}).encode()),
        b64(json.dumps({"c": "soon", "r": "run-1", "f": "{}"}).encode()),
    ],
    ids=[
        "not-base64",
        "only-non-base64-chars",
        "not-utf8",
        "not-json",
        "json-list",
        "missing-filter",
        "bad-created-at",
    ],
)
def test_a_garbage_token_is_invalid(run_list: RunList, token: str) -> None:
    run_list.claim(run("run-1"))

    with pytest.raises(InvalidArgument) as caught:
        run_list.list_runs(TENANT, RunFilter(), page_token=token)
    assert caught.value.field == "page_token"


def test_a_negative_page_size_is_invalid(run_list: RunList) -> None:
    with pytest.raises(InvalidArgument) as caught:
        run_list.list_runs(TENANT, RunFilter(), page_size=-1)
    assert caught.value.field == "page_size"


def test_active_classic_runs(run_list: RunList) -> None:
    run_list.claim(run("running", status="running"))
    run_list.claim(run("waiting", status="awaiting_approval"))
    run_list.claim(run("done", status="completed"))
    run_list.claim(run("failed", status="failed"))
    run_list.claim(run("cancelled", status="cancelled"))
    run_list.claim(run("durable", status="running", execution_mode="durable"))
    run_list.claim(replace(run("elsewhere", status="running"), tenant=OTHER))
    run_list.claim(run("finished-later", status="running"))
    run_list.update("finished-later", status="completed")

    active = run_list.active_classic_runs()

    assert sorted(r.run_id for r in active) == ["elsewhere", "running", "waiting"]


def test_remove_deletes_the_row(run_list: RunList) -> None:
    run_list.claim(run("run-1", input="first", created_at=1000.0))
    run_list.claim(run("run-2", created_at=1001.0))

    run_list.remove("run-1")
    run_list.remove("never-existed")

    with pytest.raises(NotFound):
        run_list.get(TENANT, "run-1")
    assert [r.run_id for r in run_list.list_runs(TENANT, RunFilter())[0]] == ["run-2"]
    # A removed run id can be claimed afresh.
    assert run_list.claim(run("run-1", input="again", created_at=1002.0)) is None
    assert run_list.get(TENANT, "run-1").input == "again"


def test_a_run_list_of_an_earlier_version_gets_the_column_it_lacks(store: StoreConfig) -> None:
    earlier = RunList(store)
    earlier.claim(run("run-old"))
    with earlier._db.cursor() as cur:  # as the table was before client_results
        cur.execute("ALTER TABLE agentrun_runs DROP COLUMN client_results")
    earlier.close()
    for _ in range(2):  # (opened again: the column is there, nothing to add)
        reopened = RunList(store)
        assert reopened.get(TENANT, "run-old").client_results == {}
        reopened.claim(run("run-new", client_results={"c1": "digest"}))
        assert reopened.get(TENANT, "run-new").client_results == {"c1": "digest"}
        reopened.remove("run-new")
        reopened.close()


def test_durable_runs_due_and_suspended_durable_runs(run_list: RunList) -> None:
    run_list.claim(run("stalled", execution_mode="durable"))
    run_list.claim(run("fresh", execution_mode="durable"))
    run_list.claim(run("late", execution_mode="durable", status="awaiting_approval"))
    run_list.update("late", approval_deadline=50.0)
    run_list.claim(run("not-yet", execution_mode="durable", status="awaiting_tool_result"))
    run_list.update("not-yet", approval_deadline=10_000.0)
    run_list.claim(run("no-deadline", execution_mode="durable", status="awaiting_approval"))
    run_list.claim(run("ended", execution_mode="durable", status="completed"))
    run_list.update("ended", approval_deadline=50.0)
    run_list.claim(run("classic", status="running"))
    with run_list._db.cursor() as cur:  # stalled: unchanged for a long time
        cur.execute(
            "UPDATE agentrun_runs SET updated_at = 100 WHERE run_id IN ('stalled', 'ended')"
        )

    due = run_list.durable_runs_due(stalled_before=1000.0, deadline_before=1000.0)

    assert sorted(r.run_id for r in due) == ["late", "stalled"]
    assert run_list.suspended_durable_runs() == 2


def test_a_run_list_of_an_earlier_version_gets_its_indexes_of_active_runs(
    store: StoreConfig,
) -> None:
    earlier = RunList(store)
    earlier.claim(run("run-old"))
    with earlier._db.cursor() as cur:  # the indexes of every row it had before
        cur.execute("DROP INDEX agentrun_runs_active_only")
        cur.execute("DROP INDEX agentrun_runs_active_by_tenant")
        cur.execute("CREATE INDEX agentrun_runs_active ON agentrun_runs (execution_mode, status)")
        cur.execute("CREATE INDEX agentrun_runs_by_tenant_status ON agentrun_runs (tenant, status)")
    earlier.close()
    for _ in range(2):  # (opened again: nothing left to change)
        reopened = RunList(store)
        with reopened._db.cursor() as cur:
            if store.postgres is None:
                cur.execute(
                    "SELECT name FROM sqlite_master "
                    "WHERE type = 'index' AND tbl_name = 'agentrun_runs' AND sql IS NOT NULL"
                )
            else:
                cur.execute(
                    "SELECT indexname FROM pg_indexes WHERE tablename = 'agentrun_runs' "
                    "AND schemaname = current_schema() AND indexname <> 'agentrun_runs_pkey'"
                )
            indexes = sorted(str(row[0]) for row in cur.fetchall())
        assert indexes == [
            "agentrun_runs_active_by_tenant",
            "agentrun_runs_active_only",
            "agentrun_runs_by_tenant",
        ]
        assert [r.run_id for r in reopened.active_classic_runs()] == ["run-old"]
        reopened.close()
