"""Gauges of the whole cluster, computed when they are scraped (so every executor tells the same
numbers): durable runs suspended awaiting a decision (the run list), and the dispatch queue's
pending and redelivered messages (its JetStream consumer).

A scrape runs in the endpoint's thread: the run list is read there (it is synchronous), the
consumer is asked on the executor's event loop, which the scrape waits for without blocking.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from eventstore.run_list import RunList
from executor.durable.dispatch import WorkQueue

log = logging.getLogger(__name__)

ASK_TIMEOUT = 5.0

SUSPENDED = "agentrun_durable_runs_awaiting_decision"
PENDING = "agentrun_dispatch_pending"
REDELIVERED = "agentrun_dispatch_redelivered"
GAUGES = {
    SUSPENDED: "Durable runs suspended until a decision on a tool call (the whole cluster).",
    PENDING: "Durable runs queued for an executor and not yet delivered to one.",
    REDELIVERED: "Dispatch messages delivered more than once and not yet acknowledged.",
}


class ClusterGauges(Collector):
    def __init__(
        self, run_list: RunList, queue: WorkQueue, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._run_list = run_list
        self._queue = queue
        self._loop = loop

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The gauges without their values: what the registry asks when the collector is
        registered, on the event loop, which collect would block."""
        yield from (GaugeMetricFamily(name, text) for name, text in GAUGES.items())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            suspended = self._run_list.suspended_durable_runs()
        except Exception as exc:  # a scrape without the gauge beats a failed scrape
            log.warning("metrics: cannot count suspended runs: %s", exc)
        else:
            yield _gauge(SUSPENDED, suspended)
        try:
            asked = asyncio.run_coroutine_threadsafe(self._queue.backlog(), self._loop)
            pending, redelivered = asked.result(ASK_TIMEOUT)
        except Exception as exc:
            log.warning("metrics: cannot read the dispatch queue: %s", exc)
            return
        yield _gauge(PENDING, pending)
        yield _gauge(REDELIVERED, redelivered)


def _gauge(name: str, value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, GAUGES[name], value=value)
