"""Agents: their configuration history per tenant, and the use cases that manage them."""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError

from common.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from eventstore.agent_config import AgentConfig
from eventstore.persistence import StoreConfig, UnnotifiedApplication
from eventstore.store_errors import translate_store_errors

_NAMESPACE = UUID("6f3f7f0e-59f4-4a3c-9a55-0c6a3c1f0a11")
UPDATABLE_FIELDS = (
    "display_name",
    "execution_mode",
    "model",
    "instructions",
    "tools",
    "approval_timeout",
    "max_model_calls",
    "model_retry_policy",
    "tool_retry_policy",
)
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50
_SAVE_ATTEMPTS = 5


@dataclass(frozen=True)
class StoredAgent:
    """An agent at one version, with when the agent was created (version 1, or its creation
    again after a deletion) and when that version was."""

    config: AgentConfig
    create_time: datetime
    update_time: datetime


class Agent(Aggregate):
    """One agent of one tenant. Its aggregate version is the agent's version."""

    @staticmethod
    def create_id(tenant: str, agent_id: str) -> UUID:
        return uuid5(_NAMESPACE, f"agent\x00{tenant}\x00{agent_id}")

    @event("Created")
    def __init__(self, tenant: str, agent_id: str, config: dict[str, Any]) -> None:
        self.tenant = tenant
        self.agent_id = agent_id
        self.config = config
        self.deleted = False
        # When the agent was created: this event's time, or that of its creation again.
        self.created_at = self.created_on

    def update(self, config: AgentConfig) -> None:
        self._updated(config.with_version(self.version + 1).to_json())

    @event("Updated")
    def _updated(self, config: dict[str, Any]) -> None:
        self.config = config

    def recreate(self, config: AgentConfig) -> None:
        """Creates the agent again after a deletion; its version keeps rising."""
        self._recreated(config.with_version(self.version + 1).to_json())

    @event("Recreated")
    def _recreated(self, config: dict[str, Any], timestamp: datetime | None = None) -> None:
        # eventsourcing passes the event's own time to a parameter of this name.
        assert timestamp is not None
        self.config = config
        self.deleted = False
        self.created_at = timestamp

    def delete(self) -> None:
        self._deleted()

    @event("Deleted")
    def _deleted(self) -> None:
        self.deleted = True

    def current(self) -> AgentConfig:
        return AgentConfig.from_json(self.config)

    def stored(self) -> StoredAgent:
        """The current version with its times. A snapshot taken before the creation time was
        kept has none: the first creation's time stands in for it."""
        created: datetime = getattr(self, "created_at", self.created_on)
        return StoredAgent(self.current(), create_time=created, update_time=self.modified_on)


class AgentDirectory(Aggregate):
    """The ids of a tenant's agents, kept sorted, so that agents can be listed."""

    @staticmethod
    def create_id(tenant: str) -> UUID:
        return uuid5(_NAMESPACE, f"agents\x00{tenant}")

    @event("Created")
    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.agent_ids: list[str] = []

    @event("AgentAdded")
    def add(self, agent_id: str) -> None:
        if agent_id not in self.agent_ids:
            self.agent_ids.append(agent_id)
            self.agent_ids.sort()

    @event("AgentRemoved")
    def remove(self, agent_id: str) -> None:
        if agent_id in self.agent_ids:
            self.agent_ids.remove(agent_id)


class AgentCatalog(UnnotifiedApplication):
    """The use cases of agents. Every method is synchronous: call it through a thread."""

    name = "AgentCatalog"
    snapshotting_intervals = {Agent: 20, AgentDirectory: 50}

    def __init__(self, store: StoreConfig) -> None:
        store.ensure_schema()
        # Cached agents are brought up to date with one query for newer events ("fast-forward"),
        # so a run always starts with the agent's latest version, at the cost of one round trip.
        super().__init__(
            env=store.application_env(self.name) | {"AGGREGATE_CACHE_MAXSIZE": "10000"}
        )

    @translate_store_errors
    def create(self, tenant: str, config: AgentConfig) -> StoredAgent:
        config.validate()
        for _ in range(_SAVE_ATTEMPTS):
            agent = self._find(tenant, config.agent_id)
            if agent is None:
                agent = Agent(
                    tenant=tenant, agent_id=config.agent_id, config=config.with_version(1).to_json()
                )
            elif agent.deleted:
                agent.recreate(config)
            else:
                raise AlreadyExists("agent", config.agent_id)
            directory = self._directory(tenant)
            directory.add(config.agent_id)
            try:
                self.save(agent, directory)
            except IntegrityError:
                continue
            return agent.stored()
        raise Conflict("too many concurrent changes to this tenant's agents; try again")

    def get(self, tenant: str, agent_id: str, version: int = 0) -> AgentConfig:
        """The agent's configuration at ``version``, 0 for the latest."""
        return self.get_stored(tenant, agent_id, version).config

    @translate_store_errors
    def get_stored(self, tenant: str, agent_id: str, version: int = 0) -> StoredAgent:
        agent_uuid = Agent.create_id(tenant, agent_id)
        try:
            agent: Agent = self.repository.get(
                agent_uuid, version=version or None, deepcopy_from_cache=False
            )
        except AggregateNotFoundError:
            raise NotFound("agent", agent_id) from None
        if agent.deleted or (version and agent.version != version):
            raise NotFound("agent", agent_id if not version else f"{agent_id}@{version}")
        return agent.stored()

    @translate_store_errors
    def list_agents(
        self,
        tenant: str,
        page_size: int = 0,
        page_token: str = "",
        *,
        max_bytes: int = 0,
        size_of: Callable[[StoredAgent], int] | None = None,
    ) -> tuple[list[StoredAgent], str]:
        """A page of the tenant's agents, by id, and the token of the next page ("" if none).
        With ``max_bytes``, the page also ends before the agent that would take the sum of
        ``size_of`` its agents past it (a page has at least one agent)."""
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(page_token)
        agents: list[StoredAgent] = []
        total = 0
        for agent_id in (i for i in self._directory(tenant).agent_ids if i > after):
            if len(agents) == size:
                return agents, _encode_token(agents[-1].config.agent_id)
            agent = self._find(tenant, agent_id)
            if agent is None or agent.deleted:
                continue
            stored = agent.stored()
            if max_bytes and size_of is not None:
                total += size_of(stored)
                if agents and total > max_bytes:
                    return agents, _encode_token(agents[-1].config.agent_id)
            agents.append(stored)
        return agents, ""

    @translate_store_errors
    def update(
        self,
        tenant: str,
        config: AgentConfig,
        fields: Sequence[str] = (),
        expected_version: int = 0,
    ) -> StoredAgent:
        unknown = [f for f in fields if f not in UPDATABLE_FIELDS]
        if unknown:
            raise InvalidArgument(
                "update_mask",
                f"cannot update {', '.join(unknown)}; updatable: " + ", ".join(UPDATABLE_FIELDS),
            )
        for _ in range(_SAVE_ATTEMPTS):
            agent = self._find(tenant, config.agent_id)
            if agent is None or agent.deleted:
                raise NotFound("agent", config.agent_id)
            if expected_version and agent.version != expected_version:
                raise Conflict(
                    f"agent {config.agent_id!r} is at version {agent.version}, "
                    f"not {expected_version}"
                )
            merged = agent.current().to_json()
            new = config.to_json()
            for field in fields or UPDATABLE_FIELDS:
                merged[field] = new[field]
            updated = AgentConfig.from_json(merged)
            updated.validate()
            agent.update(updated)
            try:
                self.save(agent)
            except IntegrityError:
                if expected_version:
                    raise Conflict(f"agent {config.agent_id!r} changed concurrently") from None
                continue
            return agent.stored()
        raise Conflict(f"too many concurrent updates of agent {config.agent_id!r}; try again")

    @translate_store_errors
    def delete(self, tenant: str, agent_id: str) -> None:
        for _ in range(_SAVE_ATTEMPTS):
            agent = self._find(tenant, agent_id)
            if agent is None or agent.deleted:
                raise NotFound("agent", agent_id)
            agent.delete()
            directory = self._directory(tenant)
            directory.remove(agent_id)
            try:
                self.save(agent, directory)
            except IntegrityError:
                continue
            return
        raise Conflict(f"too many concurrent changes to agent {agent_id!r}; try again")

    def _find(self, tenant: str, agent_id: str) -> Agent | None:
        try:
            agent: Agent = self.repository.get(Agent.create_id(tenant, agent_id))
        except AggregateNotFoundError:
            return None
        return agent

    def _directory(self, tenant: str) -> AgentDirectory:
        try:
            directory: AgentDirectory = self.repository.get(AgentDirectory.create_id(tenant))
        except AggregateNotFoundError:
            directory = AgentDirectory(tenant=tenant)
        return directory


def _encode_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode()


def _decode_token(token: str) -> str:
    if not token:
        return ""
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token", "is not a token from a previous response") from None
