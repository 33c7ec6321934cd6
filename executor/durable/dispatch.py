"""The dispatch work queue of durable runs, shared by all executors (NATS JetStream).

A message says "run R needs an executor". One durable pull consumer, ``executors``, serves
every executor: a message goes to one of them at a time; the taker keeps it alive while it
works (``in_progress``) and acknowledges it when it stops (completion, failure, suspension).
An executor that dies stops keeping its messages alive, and JetStream delivers them again after
``ack_wait``: another executor (or the same one, restarted) resumes the run.

Messages are deduplicated by run and version (``Nats-Msg-Id``), so dispatching the same state
twice within the deduplication window queues it once.

An executor that drains (SIGTERM) stops fetching and gives its messages back with ``nak``: they
are delivered again at once rather than after ``ack_wait``. A message whose taking up failed is
given back with a delay that grows with each delivery (``retry_later``). A run given up on (see
eventstore.run_steps.exhausted_attempts and executor.durable) gets a record in the dead-letter
stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from common.background import Background
from common.errors import Unavailable
from common.nats_link import NatsLink

log = logging.getLogger(__name__)

RECOVERY_HEADER = "Agentrun-Recovery"
TRACE_HEADERS = ("traceparent", "tracestate")
FETCH_WAIT = 10.0
MAX_RETRY_DELAY = 60.0


@dataclass(frozen=True)
class Dispatch:
    """A taken dispatch message."""

    run_id: str
    tenant: str
    recovery: bool  # sent by a reconciler: the run's previous executor is gone
    deliveries: int  # how often JetStream has delivered this message (1: first time)
    msg: Msg
    trace_context: dict[str, str]  # the headers of the W3C trace context, if any


class WorkQueue:
    """Publishing to and taking from the dispatch queue (see module docstring)."""

    def __init__(self, link: NatsLink, ack_wait: float) -> None:
        self._link = link
        self.ack_wait = ack_wait

    @property
    def subject(self) -> str:
        return self._link.names.dispatch_subject

    async def dispatch(
        self,
        run_id: str,
        tenant: str,
        version: int,
        *,
        recovery: bool = False,
        trace_context: Mapping[str, str] | None = None,
    ) -> None:
        """Queues the run (at ``version``) for an executor. Raises Unavailable without NATS.
        ``trace_context``: the run's trace, for its taker to continue (as message headers)."""
        headers = {"Nats-Msg-Id": f"dispatch:{run_id}:{version}{':recovery' if recovery else ''}"}
        if recovery:
            headers[RECOVERY_HEADER] = "1"
        headers.update(trace_context or {})
        payload = json.dumps({"run_id": run_id, "tenant": tenant}).encode()
        await self._link.js.publish(self._link.names.dispatch_subject, payload, headers=headers)

    async def dead_letter(self, run_id: str, tenant: str, record: dict[str, object]) -> None:
        """Records, for operators, a run that was given up on (once per run within the
        deduplication window: taking the run up again repeats the same record)."""
        body = {"run_id": run_id, "tenant": tenant, "dead_lettered_at": time.time(), **record}
        await self._link.js.publish(
            self._link.names.deadletter_subject,
            json.dumps(body).encode(),
            headers={"Nats-Msg-Id": f"deadletter:{run_id}"},
        )

    async def backlog(self) -> tuple[int, int]:
        """The queue's messages not yet delivered, and those delivered more than once (the
        executors' shared consumer: the same numbers whichever executor asks)."""
        names = self._link.names
        info = await self._link.js.consumer_info(names.dispatch_stream, names.dispatch_consumer)
        return info.num_pending or 0, info.num_redelivered or 0

    async def retry_later(self, dispatch: Dispatch) -> None:
        """Gives a message whose taking up failed back for another delivery, after a delay of
        ``ack_wait`` doubled with each delivery so far, at most MAX_RETRY_DELAY."""
        delay = min(self.ack_wait * 2 ** min(dispatch.deliveries - 1, 16), MAX_RETRY_DELAY)
        with contextlib.suppress(nats.errors.Error):
            await dispatch.msg.nak(delay=delay)

    async def take_forever(
        self, handle: Callable[[Dispatch], Awaitable[None]], slots: asyncio.Semaphore
    ) -> None:
        """Takes messages while this executor has free slots; each runs ``handle`` in a task.
        Cancelling it stops the taking: the pull subscription goes, so that the server hands
        nothing more to this executor."""
        tasks = Background()
        while True:
            await self._link.wait_connected()
            try:
                subscription = await self._subscribe()
            except (TimeoutError, Unavailable, nats.errors.Error) as exc:
                log.warning("cannot subscribe to the dispatch queue (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            try:
                await self._take_from(subscription, handle, slots, tasks)
            finally:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    async def _take_from(
        self,
        subscription: nats.js.JetStreamContext.PullSubscription,
        handle: Callable[[Dispatch], Awaitable[None]],
        slots: asyncio.Semaphore,
        tasks: Background,
    ) -> None:
        """Takes messages until the subscription fails (then returns: subscribe again)."""
        while True:
            await slots.acquire()
            try:
                msgs = await subscription.fetch(1, timeout=FETCH_WAIT)
            except (TimeoutError, nats.errors.TimeoutError):
                slots.release()
                continue
            except (Unavailable, nats.errors.Error) as exc:
                slots.release()
                log.warning("dispatch queue: %s; subscribing again", exc)
                await asyncio.sleep(0.5)
                return
            except BaseException:
                slots.release()
                raise
            dispatch = _parse(msgs[0])
            if dispatch is None:
                slots.release()
                with contextlib.suppress(nats.errors.Error):
                    await msgs[0].term()
                continue
            tasks.start(_run_then_release(handle, dispatch, slots))

    async def _subscribe(self) -> nats.js.JetStreamContext.PullSubscription:
        names = self._link.names
        config = ConsumerConfig(
            durable_name=names.dispatch_consumer,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=-1,
            filter_subject=names.dispatch_subject,
        )
        js = self._link.js
        with contextlib.suppress(nats.js.errors.BadRequestError):
            await js.add_consumer(names.dispatch_stream, config)
        return await js.pull_subscribe_bind(
            durable=names.dispatch_consumer, stream=names.dispatch_stream
        )


async def keep_alive(msg: Msg, ack_wait: float) -> None:
    """Tells JetStream, while the run is worked on, that its message is still being processed."""
    while True:
        await asyncio.sleep(ack_wait / 4)
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
            await msg.in_progress()


async def _run_then_release(
    handle: Callable[[Dispatch], Awaitable[None]], dispatch: Dispatch, slots: asyncio.Semaphore
) -> None:
    try:
        await handle(dispatch)
    except Exception:  # ``handle`` deals with its failures: this is a bug in that
        log.exception("run %s: dispatch failed", dispatch.run_id)
    finally:
        slots.release()


def _parse(msg: Msg) -> Dispatch | None:
    try:
        body = json.loads(msg.data)
        headers = msg.headers or {}
        return Dispatch(
            run_id=str(body["run_id"]),
            tenant=str(body["tenant"]),
            recovery=bool(headers.get(RECOVERY_HEADER)),
            deliveries=msg.metadata.num_delivered or 1,
            msg=msg,
            trace_context={k: v for k, v in headers.items() if k in TRACE_HEADERS},
        )
    except (ValueError, KeyError, TypeError):
        log.error("dropping a malformed dispatch message: %r", msg.data[:200])
        return None
