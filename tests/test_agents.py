"""AgentCatalog on every backend: versions, paging, field-mask updates, deletion, tenancy."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from common.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from eventstore.agent_config import (
    AgentConfig,
    ModelSettings,
    ScriptedSettings,
    ScriptedTurn,
    ToolSettings,
)
from eventstore.agents import MAX_PAGE_SIZE, Agent, AgentCatalog
from eventstore.persistence import StoreConfig
from eventstore.retry_policy import DEFAULT_TOOL_RETRY_POLICY, RetryPolicy
from eventstore.run_list import RunList

TENANT = "acme"
OTHER = "globex"


def agent(agent_id: str, **changes: Any) -> AgentConfig:
    return replace(
        AgentConfig(agent_id=agent_id, model=ModelSettings(provider="scripted")), **changes
    )


@pytest.fixture
def catalog(store: StoreConfig) -> Iterator[AgentCatalog]:
    # RunList creates the PostgreSQL schema, as it does first in executor/context.py.
    RunList(store).close()
    app = AgentCatalog(store)
    yield app
    app.close()


def test_create_starts_at_version_one_and_get_reads_it_back(catalog: AgentCatalog) -> None:
    config = agent(
        "helper",
        display_name="Helper",
        instructions="Be kind.",
        execution_mode="durable",
        tools=(ToolSettings("clock"), ToolSettings("send_email", requires_approval=True)),
        max_model_calls=4,
    )

    created = catalog.create(TENANT, config).config

    assert created == config.with_version(1)
    assert catalog.get(TENANT, "helper") == created
    assert catalog.get(TENANT, "helper", version=1) == created


def test_create_ignores_the_version_given_by_the_caller(catalog: AgentCatalog) -> None:
    assert catalog.create(TENANT, agent("helper", version=42)).config.version == 1


def test_create_twice_is_already_exists_and_keeps_the_first(catalog: AgentCatalog) -> None:
    catalog.create(TENANT, agent("helper", display_name="first"))

    with pytest.raises(AlreadyExists) as caught:
        catalog.create(TENANT, agent("helper", display_name="second"))

    assert caught.value.resource_id == "helper"
    current = catalog.get(TENANT, "helper")
    assert (current.display_name, current.version) == ("first", 1)


def test_get_unknown_agent_is_not_found(catalog: AgentCatalog) -> None:
    with pytest.raises(NotFound) as caught:
        catalog.get(TENANT, "nobody")
    assert (caught.value.kind, caught.value.resource_id) == ("agent", "nobody")


def test_get_a_given_version(catalog: AgentCatalog) -> None:
    catalog.create(TENANT, agent("helper", display_name="v1"))
    catalog.update(TENANT, agent("helper", display_name="v2"), ["display_name"])
    catalog.update(TENANT, agent("helper", display_name="v3"), ["display_name"])

    assert catalog.get(TENANT, "helper").display_name == "v3"
    for version in (1, 2, 3):
        got = catalog.get(TENANT, "helper", version=version)
        assert (got.version, got.display_name) == (version, f"v{version}")
    with pytest.raises(NotFound):
        catalog.get(TENANT, "helper", version=4)


def test_get_old_versions_past_the_snapshot_interval(catalog: AgentCatalog) -> None:
    catalog.create(TENANT, agent("helper", display_name="v1"))
    for version in range(2, 46):  # snapshots every 20 versions: at 20 and 40
        catalog.update(TENANT, agent("helper", display_name=f"v{version}"), ["display_name"])

    assert catalog.snapshots is not None
    snapshots = catalog.snapshots.get(Agent.create_id(TENANT, "helper"))
    assert [s.originator_version for s in snapshots] == [20, 40]
    latest = catalog.get(TENANT, "helper")
    assert (latest.version, latest.display_name) == (45, "v45")
    for version in (1, 19, 20, 21, 40, 44):
        assert catalog.get(TENANT, "helper", version=version).display_name == f"v{version}"
    # Snapshots keep the creation time.
    first = catalog.get_stored(TENANT, "helper", version=1)
    assert catalog.get_stored(TENANT, "helper").create_time == first.create_time
    assert catalog.get_stored(TENANT, "helper", version=41).create_time == first.create_time


def test_an_agent_keeps_its_create_time_and_each_version_has_its_update_time(
    catalog: AgentCatalog,
) -> None:
    created = catalog.create(TENANT, agent("helper", display_name="v1"))
    updated = catalog.update(TENANT, agent("helper", display_name="v2"), ["display_name"])

    assert created.create_time == created.update_time
    assert updated.create_time == created.create_time
    assert updated.update_time > created.update_time
    assert catalog.get_stored(TENANT, "helper") == updated
    assert catalog.get_stored(TENANT, "helper", version=1) == created
    assert catalog.list_agents(TENANT)[0] == [updated]


def test_an_agent_created_again_after_a_deletion_has_a_new_create_time(
    catalog: AgentCatalog,
) -> None:
    first = catalog.create(TENANT, agent("helper"))
    catalog.delete(TENANT, "helper")

    again = catalog.create(TENANT, agent("helper"))
    updated = catalog.update(TENANT, agent("helper", display_name="x"), ["display_name"])

    assert again.create_time == again.update_time
    assert again.create_time > first.create_time
    assert updated.create_time == again.create_time
    assert catalog.get_stored(TENANT, "helper", version=1) == first


def test_list_pages_through_agents_in_id_order(catalog: AgentCatalog) -> None:
    ids = ["delta", "alpha", "golf", "charlie", "echo", "bravo", "foxtrot"]
    for agent_id in ids:
        catalog.create(TENANT, agent(agent_id))

    pages: list[list[str]] = []
    token = ""
    while True:
        configs, token = catalog.list_agents(TENANT, page_size=3, page_token=token)
        pages.append([c.config.agent_id for c in configs])
        if not token:
            break

    assert pages == [["alpha", "bravo", "charlie"], ["delta", "echo", "foxtrot"], ["golf"]]


def test_list_of_a_tenant_without_agents_is_empty(catalog: AgentCatalog) -> None:
    assert catalog.list_agents(TENANT) == ([], "")


def test_list_exactly_one_full_page_has_no_next_token(catalog: AgentCatalog) -> None:
    for agent_id in ("a", "b", "c"):
        catalog.create(TENANT, agent(agent_id))

    configs, token = catalog.list_agents(TENANT, page_size=3)

    assert [c.config.agent_id for c in configs] == ["a", "b", "c"]
    assert token == ""


def test_list_default_and_maximum_page_sizes(catalog: AgentCatalog) -> None:
    for i in range(MAX_PAGE_SIZE + 1):
        catalog.create(TENANT, agent(f"agent-{i:04d}"))

    default_page, default_token = catalog.list_agents(TENANT)
    assert len(default_page) == 50
    assert default_token

    capped, token = catalog.list_agents(TENANT, page_size=10_000)
    assert len(capped) == MAX_PAGE_SIZE
    rest, last_token = catalog.list_agents(TENANT, page_size=10_000, page_token=token)
    assert [c.config.agent_id for c in rest] == [f"agent-{MAX_PAGE_SIZE:04d}"]
    assert last_token == ""


def test_list_pages_end_before_max_bytes_with_at_least_one_agent(catalog: AgentCatalog) -> None:
    sizes = {"alpha": 5, "bravo": 4, "charlie": 12, "delta": 1, "echo": 3}
    for agent_id in sizes:
        catalog.create(TENANT, agent(agent_id))

    pages: list[list[str]] = []
    token = ""
    while True:
        configs, token = catalog.list_agents(
            TENANT, page_token=token, max_bytes=10, size_of=lambda s: sizes[s.config.agent_id]
        )
        pages.append([c.config.agent_id for c in configs])
        if not token:
            break

    # charlie alone is past the bound: it gets a page of its own.
    assert pages == [["alpha", "bravo"], ["charlie"], ["delta", "echo"]]


def test_list_negative_page_size_is_invalid(catalog: AgentCatalog) -> None:
    with pytest.raises(InvalidArgument) as caught:
        catalog.list_agents(TENANT, page_size=-1)
    assert caught.value.field == "page_size"


@pytest.mark.parametrize(
    "token",
    ["garbage", base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode()],
    ids=["not-base64", "not-utf8"],
)
def test_list_bad_page_token_is_invalid(catalog: AgentCatalog, token: str) -> None:
    catalog.create(TENANT, agent("helper"))

    with pytest.raises(InvalidArgument) as caught:
        catalog.list_agents(TENANT, page_token=token)
    assert caught.value.field == "page_token"


def test_list_token_of_only_non_base64_characters_is_invalid(catalog: AgentCatalog) -> None:
    catalog.create(TENANT, agent("helper"))

    with pytest.raises(InvalidArgument):
        catalog.list_agents(TENANT, page_token="%%%%")


def test_update_changes_only_the_masked_fields(catalog: AgentCatalog) -> None:
    catalog.create(
        TENANT,
        agent("helper", display_name="Old", instructions="old instructions", max_model_calls=5),
    )
    wanted = agent(
        "helper",
        display_name="New",
        instructions="new instructions",
        max_model_calls=9,
        tools=(ToolSettings("calculator"),),
    )

    updated = catalog.update(TENANT, wanted, ["display_name", "max_model_calls"]).config

    assert updated.version == 2
    assert (updated.display_name, updated.max_model_calls) == ("New", 9)
    assert (updated.instructions, updated.tools) == ("old instructions", ())
    assert catalog.get(TENANT, "helper") == updated


def test_update_without_mask_replaces_every_updatable_field(catalog: AgentCatalog) -> None:
    catalog.create(TENANT, agent("helper", display_name="Old", instructions="old"))
    model = ModelSettings(
        provider="scripted", scripted=ScriptedSettings(turns=(ScriptedTurn("hi"),))
    )
    wanted = AgentConfig(
        agent_id="helper",
        model=model,
        display_name="New",
        execution_mode="durable",
        tools=(ToolSettings("clock", timeout=3.0),),
        approval_timeout=60.0,
        max_model_calls=2,
        model_retry_policy=RetryPolicy(maximum_attempts=1),
        tool_retry_policy=RetryPolicy(maximum_attempts=2, initial_interval=0.5),
    )

    updated = catalog.update(TENANT, wanted).config

    assert updated == wanted.with_version(2)


def test_a_retry_policy_is_updated_on_its_own(catalog: AgentCatalog) -> None:
    catalog.create(TENANT, agent("helper", max_model_calls=5))
    policy = RetryPolicy(maximum_attempts=6, non_retryable_error_codes=("http_400",))
    wanted = agent("helper", model_retry_policy=policy, max_model_calls=9)

    updated = catalog.update(TENANT, wanted, ["model_retry_policy"]).config

    assert updated.model_retry_policy == policy
    assert updated.max_model_calls == 5
    assert updated.tool_retry_policy == DEFAULT_TOOL_RETRY_POLICY


def test_every_update_raises_the_version_by_one(catalog: AgentCatalog) -> None:
    catalog.create(TENANT, agent("helper"))

    versions = [
        catalog.update(
            TENANT, agent("helper", instructions=str(i)), ["instructions"]
        ).config.version
        for i in range(4)
    ]

    assert versions == [2, 3, 4, 5]


@pytest.mark.parametrize("mask", [["agent_id"], ["version"], ["display_name", "colour"]], ids=str)
def test_update_with_a_field_that_cannot_change_is_refused(
    catalog: AgentCatalog, mask: list[str]
) -> None:
    catalog.create(TENANT, agent("helper", display_name="Old"))

    with pytest.raises(InvalidArgument) as caught:
        catalog.update(TENANT, agent("helper", display_name="New", version=9), mask)

    assert caught.value.field == "update_mask"
    current = catalog.get(TENANT, "helper")
    assert (current.display_name, current.version) == ("Old", 1)


def test_update_with_expected_version(catalog: AgentCatalog) -> None:
    catalog.create(TENANT, agent("helper"))
    catalog.update(TENANT, agent("helper", display_name="second"), ["display_name"])

    with pytest.raises(Conflict):
        catalog.update(
            TENANT, agent("helper", display_name="stale"), ["display_name"], expected_version=1
        )
    assert catalog.get(TENANT, "helper").display_name == "second"

    updated = catalog.update(
        TENANT, agent("helper", display_name="third"), ["display_name"], expected_version=2
    ).config
    assert (updated.version, updated.display_name) == (3, "third")


def test_update_that_makes_the_config_invalid_is_refused(catalog: AgentCatalog) -> None:
    catalog.create(TENANT, agent("helper"))

    with pytest.raises(InvalidArgument) as caught:
        catalog.update(TENANT, agent("helper", max_model_calls=0), ["max_model_calls"])

    assert caught.value.field == "agent.max_model_calls"
    assert catalog.get(TENANT, "helper").version == 1


def test_update_of_an_unknown_agent_is_not_found(catalog: AgentCatalog) -> None:
    with pytest.raises(NotFound):
        catalog.update(TENANT, agent("nobody", display_name="x"), ["display_name"])


def test_delete_hides_the_agent(catalog: AgentCatalog) -> None:
    catalog.create(TENANT, agent("keep"))
    catalog.create(TENANT, agent("gone"))

    catalog.delete(TENANT, "gone")

    with pytest.raises(NotFound):
        catalog.get(TENANT, "gone")
    assert [c.config.agent_id for c in catalog.list_agents(TENANT)[0]] == ["keep"]
    with pytest.raises(NotFound):
        catalog.delete(TENANT, "gone")
    with pytest.raises(NotFound):
        catalog.update(TENANT, agent("gone", display_name="x"), ["display_name"])


def test_delete_of_an_unknown_agent_is_not_found(catalog: AgentCatalog) -> None:
    with pytest.raises(NotFound):
        catalog.delete(TENANT, "nobody")


def test_create_after_delete_keeps_the_version_rising(catalog: AgentCatalog) -> None:
    catalog.create(TENANT, agent("helper", display_name="first"))  # version 1
    catalog.update(TENANT, agent("helper", display_name="edited"), ["display_name"])  # 2
    catalog.delete(TENANT, "helper")  # 3

    again = catalog.create(TENANT, agent("helper", display_name="again")).config

    assert (again.version, again.display_name) == (4, "again")
    assert catalog.get(TENANT, "helper") == again
    assert [c.config.agent_id for c in catalog.list_agents(TENANT)[0]] == ["helper"]
    assert catalog.update(TENANT, agent("helper"), ["display_name"]).config.version == 5


@pytest.mark.parametrize(
    ("config", "field"),
    [
        pytest.param(agent("Helper"), "agent.id", id="uppercase-id"),
        pytest.param(agent("9lives"), "agent.id", id="id-starts-with-digit"),
        pytest.param(agent("has space"), "agent.id", id="id-with-space"),
        pytest.param(agent("a" * 64), "agent.id", id="id-too-long"),
        pytest.param(
            agent("helper", model=ModelSettings(provider="gemini")),
            "agent.model.provider",
            id="unknown-provider",
        ),
        pytest.param(
            agent("helper", tools=(ToolSettings("rm"),)), "agent.tools", id="unknown-tool"
        ),
        pytest.param(
            agent("helper", tools=(ToolSettings("clock"), ToolSettings("clock"))),
            "agent.tools[1].name",
            id="duplicate-tool",
        ),
        pytest.param(
            agent("helper", tools=(ToolSettings("clock", timeout=0),)),
            "agent.tools.timeout",
            id="zero-tool-timeout",
        ),
        pytest.param(
            agent("helper", approval_timeout=-5), "agent.approval_timeout", id="negative-approval"
        ),
        pytest.param(
            agent("helper", max_model_calls=0), "agent.max_model_calls", id="zero-model-calls"
        ),
        pytest.param(
            agent("helper", max_model_calls=1001), "agent.max_model_calls", id="1001-model-calls"
        ),
    ],
)
def test_create_refuses_an_invalid_config(
    catalog: AgentCatalog, config: AgentConfig, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        catalog.create(TENANT, config)

    assert caught.value.field == field
    assert catalog.list_agents(TENANT) == ([], "")


def test_create_accepts_the_model_call_bounds(catalog: AgentCatalog) -> None:
    assert catalog.create(TENANT, agent("one", max_model_calls=1)).config.max_model_calls == 1
    many = catalog.create(TENANT, agent("many", max_model_calls=1000))
    assert many.config.max_model_calls == 1000


def test_tenants_have_independent_agents_with_the_same_id(catalog: AgentCatalog) -> None:
    catalog.create(TENANT, agent("helper", display_name="acme's"))
    catalog.create(OTHER, agent("helper", display_name="globex's"))

    catalog.update(TENANT, agent("helper", display_name="acme's v2"), ["display_name"])
    catalog.delete(OTHER, "helper")

    mine = catalog.get(TENANT, "helper")
    assert (mine.version, mine.display_name) == (2, "acme's v2")
    with pytest.raises(NotFound):
        catalog.get(OTHER, "helper")
    assert [c.config.display_name for c in catalog.list_agents(TENANT)[0]] == ["acme's v2"]
    assert catalog.list_agents(OTHER) == ([], "")


def test_a_tenant_cannot_reach_another_tenants_agent(catalog: AgentCatalog) -> None:
    catalog.create(TENANT, agent("private", display_name="secret"))

    with pytest.raises(NotFound):
        catalog.get(OTHER, "private")
    with pytest.raises(NotFound):
        catalog.get(OTHER, "private", version=1)
    with pytest.raises(NotFound):
        catalog.update(OTHER, agent("private", display_name="hijacked"), ["display_name"])
    with pytest.raises(NotFound):
        catalog.delete(OTHER, "private")
    assert catalog.list_agents(OTHER) == ([], "")

    untouched = catalog.get(TENANT, "private")
    assert (untouched.version, untouched.display_name) == (1, "secret")
