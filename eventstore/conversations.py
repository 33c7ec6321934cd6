"""Conversations: the finished turns a tenant's runs have had, so that the next run sees them."""

from __future__ import annotations

import random
import time
from uuid import UUID, uuid5

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError

from common.errors import Conflict
from eventstore.messages import ChatMessage
from eventstore.persistence import StoreConfig, UnnotifiedApplication
from eventstore.store_errors import translate_store_errors

_NAMESPACE = UUID("0b9a4f7e-2f57-4d0e-8f0a-2d3b8f6c9e21")
_SAVE_ATTEMPTS = 30


class Conversation(Aggregate):
    """The turns of one conversation of one tenant, in the order they finished."""

    @staticmethod
    def create_id(tenant: str, conversation_id: str) -> UUID:
        return uuid5(_NAMESPACE, f"conversation\x00{tenant}\x00{conversation_id}")

    @event("Started")
    def __init__(self, tenant: str, conversation_id: str) -> None:
        self.tenant = tenant
        self.conversation_id = conversation_id
        self.messages: list[ChatMessage] = []
        self.run_ids: list[str] = []

    def record_turn(self, run_id: str, messages: list[ChatMessage]) -> None:
        """Appends a run's messages; a run already recorded is ignored (at-least-once callers)."""
        if run_id not in self.run_ids:
            self._turn_recorded(run_id=run_id, messages=messages)

    @event("TurnRecorded")
    def _turn_recorded(self, run_id: str, messages: list[ChatMessage]) -> None:
        self.run_ids.append(run_id)
        self.messages.extend(messages)


class ConversationLog(UnnotifiedApplication):
    """The use cases of conversations. Synchronous: call it through a thread."""

    name = "ConversationLog"
    snapshotting_intervals = {Conversation: 25}

    def __init__(self, store: StoreConfig) -> None:
        store.ensure_schema()
        # Cached conversations are fast-forwarded: reading one costs a query for its new turns.
        super().__init__(env=store.application_env(self.name) | {"AGGREGATE_CACHE_MAXSIZE": "1000"})

    @translate_store_errors
    def history(self, tenant: str, conversation_id: str) -> list[ChatMessage]:
        """The messages of the conversation's finished turns; empty for a new conversation."""
        try:
            conversation: Conversation = self.repository.get(
                Conversation.create_id(tenant, conversation_id), deepcopy_from_cache=False
            )
        except AggregateNotFoundError:
            return []
        return list(conversation.messages)

    @translate_store_errors
    def record_turn(
        self,
        tenant: str,
        conversation_id: str,
        run_id: str,
        messages: list[ChatMessage],
        *,
        probably_new: bool = False,
    ) -> None:
        """Appends a run's turn. ``probably_new``: the run saw no earlier turns, so the
        conversation is first created without reading it (if it exists after all, the save
        conflicts and it is read as usual)."""
        for attempt in range(_SAVE_ATTEMPTS):
            try:
                if probably_new and attempt == 0:
                    raise AggregateNotFoundError(conversation_id)
                conversation: Conversation = self.repository.get(
                    Conversation.create_id(tenant, conversation_id)
                )
            except AggregateNotFoundError:
                conversation = Conversation(tenant=tenant, conversation_id=conversation_id)
            conversation.record_turn(run_id, messages)
            try:
                self.save(conversation)
            except IntegrityError:
                # Another turn was recorded first: back off a little (randomly, so that writers
                # racing each other spread out), read the conversation again, retry.
                time.sleep(random.uniform(0, min(0.001 * 2**attempt, 0.05)))
                continue
            return
        raise Conflict(f"conversation {conversation_id!r} is changing too fast; try again")
