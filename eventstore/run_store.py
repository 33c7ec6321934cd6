"""Durable runs: their stored histories and the use cases on them. Synchronous: use a thread.

A durable run's events are committed step by step (a step's events in one save); the store's
optimistic concurrency is the fence between two executors: whoever saves a version second gets
Conflict and must stop.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application, LRUCache
from eventsourcing.persistence import IntegrityError

from common.errors import AlreadyExists, Conflict, FailedPrecondition, NotFound, OutOfRange
from eventstore.persistence import StoreConfig
from eventstore.run import Run
from eventstore.store_errors import translate_store_errors

SNAPSHOT_INTERVAL = 50
# Runs read again soon (GetRun, the run list, decisions) are fast-forwarded from the cache: one
# query for their newer events instead of reading from the last snapshot.
AGGREGATE_CACHE_MAXSIZE = 1000

# What an event holds besides its fields: its place in its aggregate's history and its time.
_ENVELOPE = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})


@dataclass(frozen=True)
class StoredEvent:
    """One event of a run's history, for people: its version, time, type and fields."""

    version: int
    time: datetime
    type: str
    payload: dict[str, Any]

    @property
    def payload_json(self) -> str:
        return json.dumps(self.payload, default=str, sort_keys=True)


class RunStore(Application[UUID]):
    """The stored histories of durable runs."""

    name = "RunStore"
    snapshotting_intervals = {Run: SNAPSHOT_INTERVAL}

    def __init__(self, store: StoreConfig) -> None:
        store.ensure_schema()
        super().__init__(
            env=store.application_env(self.name)
            | {"AGGREGATE_CACHE_MAXSIZE": str(AGGREGATE_CACHE_MAXSIZE)}
        )

    @translate_store_errors
    def create(self, run: Run) -> None:
        """Stores a new run. AlreadyExists if the run id is taken."""
        try:
            self.save(run)
        except IntegrityError:
            raise AlreadyExists("run", run.run_id) from None

    @translate_store_errors
    def commit(self, run: Run) -> None:
        """Stores the run's new events in one save. Conflict if another executor got there
        first (the caller no longer holds the run and must stop)."""
        try:
            self.save(run)
        except IntegrityError:
            raise Conflict(f"run {run.run_id} was changed by another executor") from None
        if run.is_finished or run.waits:
            self.forget(run.run_id)

    def forget(self, run_id: str) -> None:
        """Drops the run from the aggregate cache: one that waits for a person or has ended
        (a suspended run must cost the executor no memory, and whoever needs it next, minutes
        or days later, reads it back once), or one that was pruned."""
        cache = self.repository.cache
        if isinstance(cache, LRUCache):
            with contextlib.suppress(KeyError):
                cache.get(UUID(run_id), evict=True)

    @translate_store_errors
    def load(self, run_id: str, version: int | None = None, *, to_change: bool = True) -> Run:
        """The run (as of ``version``). ``to_change=False``: the caller only reads it, so the
        cached run itself is returned, not a copy; it must not be changed."""
        try:
            run: Run = self.repository.get(
                UUID(run_id), version=version, deepcopy_from_cache=to_change
            )
        except AggregateNotFoundError:
            raise NotFound("run", run_id) from None
        if version is not None and run.version != version:
            raise OutOfRange(f"run {run_id} has no version {version} (it is at {run.version})")
        if version is None and (run.is_finished or run.waits):
            self.forget(run_id)
        return run

    def load_for(
        self, tenant: str, run_id: str, version: int | None = None, *, to_change: bool = True
    ) -> Run:
        """The run, if it belongs to ``tenant`` (other tenants' runs look absent)."""
        run = self.load(run_id, version, to_change=to_change)
        if run.tenant != tenant:
            raise NotFound("run", run_id)
        return run

    @translate_store_errors
    def recorded_after(self, run_id: str, version: int) -> list[Any]:
        """The run's recorded events after ``version`` (the domain events themselves)."""
        return list(self.events.get(UUID(run_id), gt=version))

    @translate_store_errors
    def history(self, run_id: str, from_version: int = 0, to_version: int = 0) -> list[StoredEvent]:
        events = self.events.get(
            UUID(run_id),
            gt=from_version - 1 if from_version > 1 else None,
            lte=to_version or None,
        )
        return [_stored(event) for event in events]

    @translate_store_errors
    def fork(
        self,
        tenant: str,
        source_id: str,
        at_version: int,
        new_run_id: str,
        request_id: str,
        trace_context: dict[str, str] | None = None,
    ) -> Run:
        """A new run whose history is the source's up to ``at_version``; it goes on from there.

        Recorded step results are applied again (tool calls that completed are not run again);
        executor bookkeeping is not copied. A version at or after the source's end is refused:
        the fork would have nothing left to do. ``trace_context``: the fork's trace (its own, not
        its source's).
        """
        source = self.load_for(tenant, source_id)
        version = at_version or source.version
        if not 1 <= version <= source.version:
            raise OutOfRange(f"run {source_id} has versions 1 to {source.version}")
        events = list(self.events.get(UUID(source_id), lte=version))
        if any(isinstance(e, Run.Ended) for e in events):
            raise FailedPrecondition(
                f"run {source_id} has ended by version {version}; fork it at an earlier version"
            )
        fork = Run(
            run_id=new_run_id,
            tenant=tenant,
            request_id=request_id,
            agent=source.agent,
            input=source.input,
            conversation_id=source.conversation_id,
            history=source.history,
            execution_mode="durable",
            forked_from_run_id=source_id,
            forked_at_version=version,
            trace_context=trace_context or {},
        )
        for event in events:
            if isinstance(event, Run.StepResult):
                # The same event again, as the fork's next one (the library's own way of
                # recording an event: it is applied to the fork and pending until saved).
                fork.trigger_event(type(event), **_fields_of(event))
        self.create(fork)
        return fork


def _fields_of(event: object) -> dict[str, Any]:
    return {k: v for k, v in vars(event).items() if k not in _ENVELOPE}


def _stored(event: Any) -> StoredEvent:
    return StoredEvent(
        version=event.originator_version,
        time=event.timestamp,
        type=type(event).__name__,
        payload=_fields_of(event),
    )
