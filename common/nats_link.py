"""The NATS connection of a gateway or executor, and the names of what lives in NATS.

NATS is not needed for classic runs to stream, so a process must start and work without it:
``NatsLink`` connects in the background, keeps trying until it succeeds, and lets nats-py
reconnect after that. Per-run control subscriptions registered while disconnected are made once
the connection exists.

Names below are for the default namespace ``agentrun`` (see NatsNames).

- Run event streams: JetStream stream ``AGENTRUN_RUN_EVENTS``, one subject per run,
  ``agentrun.events.<run_id>``. A message carries consecutive events (PublishedRunEvents) and the
  ``Nats-Msg-Id`` ``<run_id>:<first sequence>[:<publisher>]`` so that a retried publish is
  deduplicated. Its headers say which of the run's stored versions and which step (and attempt)
  the stream reflects once it has the message (``Agentrun-Version``, ``Agentrun-Step``). An
  event too large for one message goes out as n consecutive parts, each a slice of the
  message's payload (``Agentrun-Part: i/n``, the message's id followed by ``:i/n``): see
  common.event_streams, which reads and writes them.
- Dispatch: JetStream work-queue stream ``AGENTRUN_DISPATCH`` (subject ``agentrun.dispatch``),
  one message per durable run that needs an executor, shared by all executors.
- Dead letters: JetStream stream ``AGENTRUN_DEADLETTER`` (subject ``agentrun.deadletter``), one
  JSON record per durable run given up on (a step that kept crashing its executor), for operators.

The run-events and dead-letter streams are bounded (``StreamLimits``): at their limits JetStream
discards their oldest messages, so that new runs always publish; a message larger than the
events stream's per-message limit cannot be stored, and publishers split events to fit it.
- Control: core NATS request/reply on ``agentrun.control.<run_id>``, answered by the executor
  holding the run (approvals and cancellation from any gateway, and liveness probes: "no
  responders" means no process holds the run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from common.errors import Unavailable, register_unavailable

# A request that timed out or a connection that is down (a NATS node died and the cluster is
# electing, say): the caller may try again, so the answer is UNAVAILABLE, not INTERNAL.
register_unavailable(
    "nats",
    nats.errors.TimeoutError,
    nats.errors.NoServersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    named="NATS",
)

log = logging.getLogger(__name__)

TENANT_HEADER = "Agentrun-Tenant"
VERSION_HEADER = "Agentrun-Version"  # the run's stored version a message's events reflect
STEP_HEADER = "Agentrun-Step"  # the highest step a run's stream has announced
PART_HEADER = "Agentrun-Part"  # "i/n": the message is part i of n of one message's payload
# On parts 1..n-1: the sequence of the last event before the parts (the stream's whole history
# ends there until part n is stored).
LAST_SEQUENCE_HEADER = "Agentrun-Last-Sequence"
FIRST_PART_HEADER = "Agentrun-First-Part"  # on parts 2..n: part 1's sequence in the stream
DEDUPLICATION_WINDOW = 120.0
# Seconds a connection must have been up before "nobody answers for the run" is believed. Every
# process reconnects after a NATS outage within about a second (``reconnect_time_wait`` and its
# jitter), and a reconnected client has its subscriptions back before it is connected; until a
# holder has had that time, its silence says nothing about whether it is alive.
SETTLE_AFTER_CONNECT = 5.0


NAMESPACE_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class NatsNames:
    """Where a deployment keeps its things in NATS. The namespace (``agentrun`` by default)
    keeps deployments that share a NATS apart: each has its own streams and subjects."""

    namespace: str = "agentrun"

    def __post_init__(self) -> None:
        if not NAMESPACE_PATTERN.fullmatch(self.namespace):
            raise ValueError("a NATS namespace is 1-32 characters of a-z, 0-9 and _")

    @property
    def _stream_prefix(self) -> str:
        return self.namespace.upper()

    @property
    def events_stream(self) -> str:
        return f"{self._stream_prefix}_RUN_EVENTS"

    @property
    def agent_changes_subject(self) -> str:
        return f"{self.namespace}.agents.changed"

    def events_subject(self, run_id: str) -> str:
        return f"{self.namespace}.events.{run_id}"

    def control_subject(self, run_id: str) -> str:
        return f"{self.namespace}.control.{run_id}"

    @property
    def dispatch_stream(self) -> str:
        return f"{self._stream_prefix}_DISPATCH"

    @property
    def dispatch_subject(self) -> str:
        return f"{self.namespace}.dispatch"

    dispatch_consumer = "executors"

    @property
    def deadletter_stream(self) -> str:
        return f"{self._stream_prefix}_DEADLETTER"

    @property
    def deadletter_subject(self) -> str:
        return f"{self.namespace}.deadletter"


@dataclass(frozen=True)
class StreamLimits:
    """Bounds of the streams that grow (the dispatch work queue holds only runs waiting for an
    executor). Sizes in bytes, ages in seconds; 0 means no limit. JetStream reserves a stream's
    ``max_bytes`` of the server's storage when the stream is created (or updated)."""

    events_max_bytes: int = 1024**3
    events_max_message_bytes: int = 1024 * 1024
    deadletter_max_age: float = 30 * 24 * 3600.0
    deadletter_max_bytes: int = 64 * 1024**2

    def __post_init__(self) -> None:
        if 0 < self.events_max_message_bytes < MIN_MESSAGE_BYTES:
            raise ValueError(
                f"the events stream's message limit must be at least {MIN_MESSAGE_BYTES} bytes"
            )
        for name in ("events_max_bytes", "deadletter_max_bytes", "deadletter_max_age"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} is a size or an age (0: no limit)")


# No limits: what a process that only looks at the streams (a test probe) asks for.
UNLIMITED = StreamLimits(0, 0, 0.0, 0)
# The smallest per-message limit of the events stream: room for headers and a useful slice.
MIN_MESSAGE_BYTES = 64 * 1024


def _limit(value: float) -> int:
    """A limit as JetStream takes it: -1 for none."""
    return int(value) if value > 0 else -1


def _window(window: float, max_age: float) -> float:
    """A deduplication window JetStream takes: no longer than the stream's max age."""
    return min(window, max_age) if max_age > 0 else window


def message_id(run_id: str, first_sequence: int) -> str:
    return f"{run_id}:{first_sequence}"


MessageHandler = Callable[[Msg], Awaitable[None]]


class NatsLink:
    """A NATS connection that may not exist yet (see module docstring)."""

    def __init__(
        self,
        urls: list[str],
        *,
        name: str,
        event_retention: float,
        names: NatsNames | None = None,
        replicas: int = 1,
        settle_after: float = SETTLE_AFTER_CONNECT,
        manage_streams: bool = True,
        tls: ssl.SSLContext | None = None,
        limits: StreamLimits = UNLIMITED,
    ) -> None:
        self.names = names or NatsNames()
        # An executor creates the streams and keeps them to its settings; a link that only
        # looks (a probe, a tool) must not reconfigure them.
        self._manage_streams = manage_streams
        self._tls = tls  # None: nats-py's default context for servers that want TLS
        self.limits = limits
        self._settle_after = settle_after
        # Copies of each stream in a JetStream cluster (3 survives the loss of one server; 1 on a
        # single server).
        self._replicas = replicas
        if self._replicas < 1:
            raise ValueError("a JetStream stream has at least one replica")
        self._urls = urls
        self._name = name
        self._event_retention = event_retention
        self._closing = False
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._connected = asyncio.Event()
        self._connected_at = 0.0  # monotonic time of the last (re)connection
        self._task: asyncio.Task[None] | None = None
        self._handlers: dict[str, MessageHandler] = {}
        self._subscriptions: dict[str, Subscription] = {}
        self._restore: asyncio.Task[None] | None = None
        self._reconnected_callbacks: list[Callable[[], None]] = []

    async def start(self, wait: float = 2.0) -> None:
        """Starts connecting; waits up to ``wait`` seconds for the first connection."""
        self._task = asyncio.create_task(self._connect_forever(), name="nats-connect")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), wait)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        self._connected.clear()

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def max_payload(self) -> int:
        """The largest message (headers included) that the connected server and the events
        stream take (NATS's default when the server is unknown)."""
        server = 1024 * 1024
        if self._nc is not None and self._nc.is_connected:
            server = int(self._nc.max_payload)
        stream = self.limits.events_max_message_bytes
        return min(server, stream) if stream > 0 else server

    @property
    def nc(self) -> Client:
        if self._nc is None or not self._nc.is_connected:
            raise Unavailable("nats", "NATS is unavailable: run event streams cannot be read now")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None or not self.is_connected:
            raise Unavailable("nats", "NATS is unavailable: run event streams cannot be read now")
        return self._js

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def subscribe_control(
        self, run_id: str, handler: MessageHandler, *, flush: bool = False
    ) -> None:
        """Answers control requests for ``run_id`` with ``handler`` (now, or once connected)."""
        await self.subscribe(self.names.control_subject(run_id), handler, flush=flush)

    async def unsubscribe_control(self, run_id: str) -> None:
        await self.unsubscribe(self.names.control_subject(run_id))

    async def subscribe(
        self, subject: str, handler: MessageHandler, *, flush: bool = False
    ) -> None:
        """Handles the subject's messages with ``handler`` (now, or once connected); a second
        call for the subject replaces the handler, with no moment unsubscribed. ``flush``:
        returns once the server has the subscription (one round trip)."""
        self._handlers[subject] = handler
        if self._nc is not None and subject not in self._subscriptions:
            await self._subscribe(subject)
            if flush:
                await self.flush()

    async def flush(self, wait: int = 10) -> None:
        """Returns once the server has processed everything sent on this connection before (one
        round trip): a subscription made, a subscription removed, a message published.

        nats-py's own ``flush`` is not that: it writes its PING to the socket at once, ahead of
        the commands still in its pending buffer (SUB, UNSUB, PUB wait there until its flusher
        task runs), so its PONG can come back before the server has seen them. Here the pending
        buffer is written out first, then the PING follows it."""
        nc = self.nc
        try:
            await asyncio.wait_for(nc._flush_pending(force_flush=True), wait)
        except TimeoutError:
            raise nats.errors.FlushTimeoutError from None
        await nc.flush(wait)

    def on_reconnected(self, callback: Callable[[], None]) -> None:
        """Calls ``callback`` after each reconnection (messages may have been missed)."""
        self._reconnected_callbacks.append(callback)

    async def unsubscribe(self, subject: str) -> None:
        self._handlers.pop(subject, None)
        sub = self._subscriptions.pop(subject, None)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    @property
    def settled(self) -> bool:
        """Whether this connection has been up long enough for every live process to have
        reconnected too (see SETTLE_AFTER_CONNECT)."""
        return self.is_connected and time.monotonic() - self._connected_at >= self._settle_after

    async def holder_answers(self, run_id: str, wait: float = 2.0) -> bool | None:
        """Whether a process answers the run's control subject, i.e. holds the run: True or
        False; None when it cannot be told (NATS unavailable, no answer in time, or a silence
        heard too soon after a (re)connection to mean anything)."""
        try:
            await self.nc.request(
                self.names.control_subject(run_id), b'{"op": "ping"}', timeout=wait
            )
        except nats.errors.NoRespondersError:
            return False if self.settled else None
        except (TimeoutError, nats.errors.Error, Unavailable):
            return None
        return True

    async def _subscribe(self, subject: str) -> None:
        assert self._nc is not None

        async def dispatch(msg: Msg) -> None:
            handler = self._handlers.get(subject)
            if handler is not None:
                await handler(msg)

        self._subscriptions[subject] = await self._nc.subscribe(subject, cb=dispatch)

    async def _connect_forever(self) -> None:
        delay = 0.2
        while True:
            try:
                nc = await nats.connect(
                    servers=self._urls,
                    name=self._name,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    ping_interval=5,
                    max_outstanding_pings=3,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    tls=self._tls,
                )
                break
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                log.warning("NATS at %s not reachable (%s); retrying", self._urls, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._nc = nc
        self._connected_at = time.monotonic()
        self._js = nc.jetstream(timeout=5)
        while self._manage_streams:
            try:
                await self.ensure_streams()
                break
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("cannot set up JetStream streams (%s); retrying", exc)
                await asyncio.sleep(1.0)
        for subject in list(self._handlers):
            if subject not in self._subscriptions:
                await self._subscribe(subject)
        log.info("connected to NATS at %s", nc.connected_url.netloc if nc.connected_url else "?")
        self._connected.set()

    async def ensure_streams(self) -> None:
        """Creates the streams, or updates them to the configured settings (idempotent)."""
        assert self._js is not None
        for config in (
            StreamConfig(
                name=self.names.events_stream,
                subjects=[self.names.events_subject(">")],
                storage=StorageType.FILE,
                max_age=self._event_retention,
                # JetStream refuses a deduplication window longer than the retention.
                duplicate_window=min(DEDUPLICATION_WINDOW, self._event_retention),
                num_replicas=self._replicas,
                max_bytes=_limit(self.limits.events_max_bytes),
                max_msg_size=_limit(self.limits.events_max_message_bytes),
                discard=DiscardPolicy.OLD,
            ),
            StreamConfig(
                name=self.names.dispatch_stream,
                subjects=[self.names.dispatch_subject],
                storage=StorageType.FILE,
                retention=RetentionPolicy.WORK_QUEUE,
                duplicate_window=DEDUPLICATION_WINDOW,
                num_replicas=self._replicas,
            ),
            StreamConfig(
                name=self.names.deadletter_stream,
                subjects=[self.names.deadletter_subject],
                storage=StorageType.FILE,
                max_age=max(0.0, self.limits.deadletter_max_age),
                duplicate_window=_window(DEDUPLICATION_WINDOW, self.limits.deadletter_max_age),
                num_replicas=self._replicas,
                max_bytes=_limit(self.limits.deadletter_max_bytes),
                discard=DiscardPolicy.OLD,
            ),
        ):
            try:
                await self._js.add_stream(config)
            except nats.js.errors.BadRequestError:
                await self._js.update_stream(config)

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS error: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:  # a drain on close disconnects too: nothing to warn about
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        self._connected_at = time.monotonic()
        log.info("reconnected to NATS")
        for callback in self._reconnected_callbacks:
            callback()
        # A NATS that lost its state gets its streams back (outside the client's callback).
        if self._manage_streams:
            self._restore = asyncio.create_task(self._ensure_streams_quietly())

    async def _ensure_streams_quietly(self) -> None:
        try:
            await self.ensure_streams()
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("cannot set up JetStream streams after reconnecting: %s", exc)
