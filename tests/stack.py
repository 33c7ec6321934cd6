"""A real agentrun stack for tests: executor and gateway processes against one store and NATS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
from nats.js.api import DeliverPolicy

from agentrun.v1 import run_pb2
from cli.launcher import Service, start_agentrun
from common.event_streams import Reassembly, is_terminal, published
from common.nats_link import NatsLink, NatsNames
from common.settings import Settings
from tests import histories


@dataclass
class Stack:
    database_url: str
    nats: Service
    tmp: Path
    executors: list[Service] = field(default_factory=list)
    gateways: list[Service] = field(default_factory=list)
    # Stacks of one test session share a nats-server: each keeps to a namespace of its own.
    namespace: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:12]}")
    # Runs created from then on have not had their histories checked (see verify_histories).
    verified_until: float = field(default_factory=time.time)
    _count: int = 0

    @property
    def data_dir(self) -> Path:
        return self.tmp / "data"

    def env(self, **overrides: str) -> dict[str, str]:
        return {
            "AGENTRUN_DATABASE_URL": self.database_url,
            "AGENTRUN_DATA_DIR": str(self.data_dir),
            "AGENTRUN_NATS_URL": f"nats://{self.nats.address}",
            "AGENTRUN_NATS_NAMESPACE": self.namespace,
            "AGENTRUN_EXECUTOR_LISTEN": "127.0.0.1:0",
            "AGENTRUN_GATEWAY_LISTEN": "127.0.0.1:0",
            "AGENTRUN_LIVENESS_INTERVAL": "0.5",
            "AGENTRUN_RECONCILE_INTERVAL": "1",
            "AGENTRUN_LOG_LEVEL": "INFO",
            # JetStream reserves a stream's max bytes of the server's storage, and the stacks of
            # a session share one nats-server: each namespace's streams reserve little.
            "AGENTRUN_EVENT_STREAM_MAX_BYTES": str(64 * 1024**2),
            "AGENTRUN_DEADLETTER_MAX_BYTES": str(1024**2),
            **overrides,
        }

    def _name(self, kind: str) -> str:
        self._count += 1
        return f"{kind}-{self._count}"

    def start_executor(self, **env: str) -> Service:
        service = start_agentrun(
            "executor", self.env(**env), self.tmp / "logs", self._name("executor")
        )
        self.executors.append(service)
        return service

    def start_gateway(self, executor_target: str | None = None, **env: str) -> Service:
        target = executor_target or ",".join(e.address for e in self.executors)
        service = start_agentrun(
            "gateway",
            self.env(AGENTRUN_EXECUTOR_TARGET=target, **env),
            self.tmp / "logs",
            self._name("gateway"),
        )
        self.gateways.append(service)
        return service

    async def verify_histories(self) -> None:
        """Every run that ended since the last check has a published history that agrees with
        the run list (tests.histories)."""
        since, self.verified_until = self.verified_until, time.time()
        await histories.verify(self, since - 1.0)

    def stop(self) -> None:
        """Stops the services, once the histories of the runs they ended are checked."""
        try:
            _in_a_thread(self.verify_histories())
        finally:
            for service in [*self.gateways, *self.executors]:
                service.stop()


def _in_a_thread(work: Coroutine[Any, Any, None]) -> None:
    """Runs ``work`` to its end on an event loop of its own (the caller may be on one)."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(work)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def start_stack(
    database_url: str, nats: Service, tmp: Path, *, executors: int = 1, gateways: int = 1
) -> Stack:
    stack = Stack(database_url=database_url, nats=nats, tmp=tmp)
    try:
        for _ in range(executors):
            stack.start_executor()
        for _ in range(gateways):
            stack.start_gateway()
    except BaseException:
        stack.stop()
        raise
    return stack


# A probe that cannot reach the stack's nats-server fails the test instead of hanging it.
PROBE_CONNECT_TIMEOUT = 30.0


@contextlib.asynccontextmanager
async def nats_of(stack: Stack) -> AsyncIterator[NatsLink]:
    """A NATS connection in the stack's namespace, for looking at what the services left there."""
    link = NatsLink(
        [f"nats://{stack.nats.address}"],
        name="test-probe",
        event_retention=Settings().event_retention,
        names=NatsNames(stack.namespace),
        manage_streams=False,  # the services' streams, as they configured them
    )
    await link.start()
    try:
        async with asyncio.timeout(PROBE_CONNECT_TIMEOUT):
            await link.wait_connected()
        yield link
    finally:
        await link.close()


async def holder_of(stack: Stack, run_id: str) -> str | None:
    """The id of the executor that answers for the run on NATS (None: nobody does)."""
    async with nats_of(stack) as link:
        subject = link.names.control_subject(run_id)
        try:
            reply = await link.nc.request(subject, b'{"op": "ping"}', timeout=5.0)
        except nats.errors.NoRespondersError:
            return None
        executor: str = json.loads(reply.data)["executor"]
        return executor


async def published_events(
    stack: Stack, run_id: str, *, wait_for_end: float = 0.0
) -> list[run_pb2.RunEvent]:
    """Every event on the run's JetStream subject, as stored (parts put back together).
    ``wait_for_end``: if the stream has not ended, wait up to that many seconds for its end
    (an executor publishes a run's end a moment after recording it)."""
    async with nats_of(stack) as link:
        names = link.names
        last = (await published(link, run_id)).stream_sequence
        if not last:
            return []
        sub = await link.js.subscribe(
            names.events_subject(run_id),
            stream=names.events_stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        reassembly = Reassembly()
        events: list[run_pb2.RunEvent] = []
        try:
            async with asyncio.timeout(10.0 + wait_for_end):
                while True:
                    msg = await sub.next_msg(timeout=10.0 + wait_for_end)
                    events.extend(reassembly.add(msg.data, msg.headers))
                    ended = bool(events) and is_terminal(events[-1])
                    if msg.metadata.sequence.stream >= last and (ended or not wait_for_end):
                        return events
        except (TimeoutError, nats.errors.TimeoutError):
            return events
        finally:
            await sub.unsubscribe()
