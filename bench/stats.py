"""Summaries of measured latencies."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    count: int
    p50_ms: float
    p99_ms: float
    mean_ms: float

    @staticmethod
    def of(seconds: list[float]) -> Summary:
        ordered = sorted(seconds)
        if not ordered:
            return Summary(0, 0.0, 0.0, 0.0)

        def pick(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

        return Summary(len(ordered), pick(0.5), pick(0.99), statistics.fmean(ordered) * 1000)

    def cells(self) -> str:
        return f"{self.p50_ms:.2f} | {self.p99_ms:.2f}"
