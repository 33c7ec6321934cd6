"""Measurements in rounds.

This kind of machine (a shared VM) runs at anything between full speed and half of it from one
minute to the next (bench.machine measures it), so each latency and throughput measurement of
the stack is taken in several rounds, the machine's speed noted after each. The report's figures
are the best round's (what the stack does when the machine runs at its speed), and the median
and worst rounds stand beside them; every round is in the JSON.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench.latency import RunTimes
from bench.machine import loop_ms
from bench.stats import Summary
from bench.throughput import Load


@dataclass
class Round(Load):
    loop_ms: float = 0.0  # the machine's speed right after the round

    @property
    def first_token_p50_ms(self) -> float:
        return Summary.of(self.times.first_token).p50_ms


async def in_rounds(
    measure: Callable[[], Awaitable[tuple[RunTimes, float]]], rounds: int
) -> list[Round]:
    """``rounds`` rounds of ``measure`` (which returns run times and the wall time)."""
    done = []
    for _ in range(rounds):
        times, wall = await measure()
        done.append(Round(times, wall, len(times.whole_run), loop_ms()))
    return done


def quickest(rounds: list[Round]) -> Round:
    """The round with the lowest median first token."""
    return min(rounds, key=lambda r: r.first_token_p50_ms)


def busiest(rounds: list[Round]) -> Round:
    """The round with the most runs per second."""
    return max(rounds, key=lambda r: r.runs_per_second)


def described(rounds: list[Round]) -> dict[str, Any]:
    """Every round's key numbers, and their median (for the report and the JSON)."""
    each = [
        {
            "runs": r.runs,
            "first_token_p50_ms": r.first_token_p50_ms,
            "first_token_p99_ms": Summary.of(r.times.first_token).p99_ms,
            "runs_per_second": r.runs_per_second,
            "loop_ms": r.loop_ms,
        }
        for r in rounds
    ]
    return {
        "rounds": each,
        "median_first_token_p50_ms": statistics.median(r["first_token_p50_ms"] for r in each),
        "median_runs_per_second": statistics.median(r["runs_per_second"] for r in each),
    }
