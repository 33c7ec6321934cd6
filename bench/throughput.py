"""Throughput: many clients, each streaming one run after another, all at once.

Runs per second is runs completed / wall time; tokens per second is the text-delta tokens the
clients received (counted as they arrive, in the client) / wall time. With the benchmark
workload every run streams 40 tokens (two model calls of 20).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from bench.latency import RunTimes, through_stack


@dataclass
class Load:
    times: RunTimes
    wall: float
    runs: int

    @property
    def runs_per_second(self) -> float:
        return self.runs / self.wall

    @property
    def tokens_per_second(self) -> float:
        return self.times.tokens / self.wall


async def under_load(
    target: str,
    agent_id: str,
    runs: int,
    concurrency: int,
    credentials: grpc.ChannelCredentials | None = None,
) -> Load:
    """``runs`` runs of ``agent_id`` by ``concurrency`` clients at once."""
    times, wall = await through_stack(
        target, agent_id, runs, concurrency=concurrency, credentials=credentials
    )
    return Load(times, wall, runs)
