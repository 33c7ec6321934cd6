"""How fast this machine is right now: a shared VM's speed varies from minute to minute (seen
here: by up to 40%), so the suite records it beside its figures."""

from __future__ import annotations

import time

LOOP = 300_000


def loop_ms() -> float:
    """CPU milliseconds a fixed piece of Python takes (the best of 5; about 8 ms on a quiet
    machine of this kind): the unit CPU-per-run figures can be read in."""
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        total = 0
        for i in range(LOOP):
            total += i % 7
        best = min(best, time.process_time() - started)
    return best * 1000
