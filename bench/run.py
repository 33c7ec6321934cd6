"""``make bench``: starts the real stack as separate processes, measures, writes a report.

    python -m bench.run [--smoke] [--database-url URL]

The report (a markdown table on stdout and in bench/results/latest.md, every figure as JSON in
bench/results/latest.json, with the machine it ran on) sets each figure beside the same run done
in process, without any service. ``--smoke`` runs the same measurements with a few iterations
only: it shows that the suite works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.durable import create_agent, death_to_next_token, ratio, step_costs
from bench.latency import RunTimes, in_process, through_stack
from bench.machine import loop_ms
from bench.pace import DESCRIPTION as PACED_WORKLOAD
from bench.pace import paced
from bench.replay import replay
from bench.report import render
from bench.rounds import busiest, described, in_rounds, quickest
from bench.scale import CLIENTS as SCALE_CLIENTS
from bench.scale import scale_out
from bench.stack import DEFAULT_POSTGRES, Stack, choose_store
from bench.stats import Summary
from bench.suspended import suspended_runs
from bench.workload import bench_agent
from cli.launcher import Service
from common.nats_link import NatsNames
from eventstore.agent_config import AgentConfig, ModelSettings, ScriptedSettings, ScriptedTurn
from eventstore.persistence import StoreConfig

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a few iterations, to check it works")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("AGENTRUN_BENCH_DATABASE_URL", ""),
        help=f"the store (default: {DEFAULT_POSTGRES} if reachable, else SQLite)",
    )
    args = parser.parse_args()
    report = asyncio.run(run_suite(args.smoke, args.database_url))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2))
    table = render(report)
    (RESULTS / "latest.md").write_text(table)
    print(table)


@dataclass(frozen=True)
class Counts:
    """How much of each measurement: the full suite and the smoke run differ only here."""

    sequential: int  # runs one after another, one client
    c16: int  # runs by 16 clients at once
    c64: int  # runs by 64 clients at once
    paced: int  # runs at a real model's pace, per mode
    steps: int  # steps of the long durable run
    step_runs: int
    history_events: int  # events of the run read back
    replay_tries: int
    suspended: int  # durable runs held awaiting approval
    suspended_warm_up: int
    death_trials: int
    scale_runs: int  # durable runs by 16 clients with each of 1, 2 and 3 executors
    scale_warm_up: int
    rounds: int  # the sequential, c16 and c64 runs are measured in this many rounds


FULL = Counts(1000, 800, 960, 5, 301, 5, 1000, 20, 2000, 100, 10, 800, 64, 4)
SMOKE = Counts(20, 32, 128, 1, 21, 1, 100, 3, 20, 5, 1, 16, 16, 2)


async def run_suite(smoke: bool, database_url: str) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="agentrun-bench-"))
    url = choose_store(database_url, tmp)
    n = SMOKE if smoke else FULL
    phase = Phases()
    stack = Stack(url, tmp)
    figures: dict[str, Summary] = {}
    rates: dict[str, float] = {}
    rounds: dict[str, Any] = {}
    try:
        _, main_executor = stack.executor()
        target = stack.gateway([main_executor]).address
        phase.done("stack started")
        for mode in ("classic", "durable"):
            agent_id = f"bench-{mode}-{uuid.uuid4().hex[:6]}"
            await create_agent(target, bench_agent(agent_id, mode))
            await through_stack(target, agent_id, max(n.sequential // 10, 5))  # warm up
            alone = await in_rounds(
                functools.partial(through_stack, target, agent_id, n.sequential // n.rounds),
                n.rounds,
            )
            _record(figures, f"{mode}_c1", quickest(alone).times)
            rounds[f"{mode}_c1"] = described(alone)
            phase.done(f"{mode}, 1 client")
            for clients, runs in ((16, n.c16), (64, n.c64)):
                loads = await in_rounds(
                    functools.partial(
                        through_stack, target, agent_id, runs // n.rounds, concurrency=clients
                    ),
                    n.rounds,
                )
                load = busiest(loads)
                _record(figures, f"{mode}_c{clients}", load.times)
                rates[f"{mode}_runs_per_second_c{clients}"] = load.runs_per_second
                rates[f"{mode}_tokens_per_second_c{clients}"] = load.tokens_per_second
                rounds[f"{mode}_c{clients}"] = described(loads)
                phase.done(f"{mode}, {clients} clients")
        await in_process(max(n.sequential // 10, 5))
        _record(figures, "in_process", await in_process(n.sequential))
        phase.done("in process")
        for name, times in (await paced(target, n.paced)).items():
            _record(figures, name, times)
        phase.done("paced")
        early, late = await step_costs(target, n.steps, n.step_runs)
        figures["durable_step_early"] = Summary.of(early)
        figures["durable_step_late"] = Summary.of(late)
        rates["durable_step_late_over_early"] = ratio(late, early)
        phase.done("step costs")
        history = await replay(target, url, n.history_events, n.replay_tries)
        figures["replay_list_run_events"] = Summary.of(history.list_run_events)
        figures["replay_load"] = Summary.of(history.load)
        figures["replay_from_events"] = Summary.of(history.from_events)
        phase.done("replay")
        held = await suspended_runs(target, main_executor, n.suspended, n.suspended_warm_up)
        phase.done("suspended runs")
        death = await _executor_death(stack, main_executor, n.death_trials)
        figures["durable_executor_death_to_next_token"] = Summary.of(death)
        phase.done("executor death")
    finally:
        stack.stop()
    phase.done("stack stopped")
    scale = await scale_out(url, tmp, n.scale_runs, n.scale_warm_up)
    phase.done("scale out (1, 2, 3 executors)")
    return {
        "smoke": smoke,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loop_ms_by_phase": phase.loop_ms,
        },
        "store": StoreConfig.from_url(url).describe(),
        "workload": (
            "scripted model, zero delays: a model call streaming 20 tokens, a tool call "
            "(calculator), a model call streaming 20 tokens"
        ),
        "paced_workload": PACED_WORKLOAD,
        "counts": asdict(n),
        "figures": {name: asdict(summary) for name, summary in figures.items()},
        "rates": rates,
        "rounds": rounds,
        "overhead": _overhead(figures),
        "phase_seconds": phase.seconds,
        "steps": n.steps,
        "replay_events": history.events,
        "scale": {
            "clients": SCALE_CLIENTS,
            "points": [asdict(point) for point in scale],
        },
        "suspended": {
            "runs": held.runs,
            "rss_before_bytes": held.rss_before,
            "rss_after_bytes": held.rss_after,
            "bytes_per_run": held.bytes_per_run,
            "seconds_to_suspend_all": held.start_seconds,
        },
    }


class Phases:
    """How long each part of the suite took (on stderr as it goes, and in the report)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.loop_ms: dict[str, float] = {}  # the machine's speed as each part ended
        self._last = self._start = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self.loop_ms[name] = loop_ms()
        self._last = time.perf_counter()
        print(f"bench: {name}: {now - self._start:.1f} s", file=sys.stderr, flush=True)


def _record(figures: dict[str, Summary], name: str, times: RunTimes) -> None:
    figures[f"{name}_first_token"] = Summary.of(times.first_token)
    figures[f"{name}_whole_run"] = Summary.of(times.whole_run)


def _overhead(figures: dict[str, Summary]) -> dict[str, float]:
    """Differences of percentiles: a figure over its reference, in ms."""

    def over(name: str, reference: str, pct: str = "p50") -> float:
        field = f"{pct}_ms"
        return float(getattr(figures[name], field) - getattr(figures[reference], field))

    result = {}
    for pct in ("p50", "p99"):
        result[f"classic_first_token_{pct}_over_in_process_ms"] = over(
            "classic_c1_first_token", "in_process_first_token", pct
        )
        result[f"durable_first_token_{pct}_over_classic_ms"] = over(
            "durable_c1_first_token", "classic_c1_first_token", pct
        )
    for mode in ("classic", "durable"):
        for part in ("first_token", "whole_run"):
            result[f"paced_{mode}_{part}_p50_over_in_process_ms"] = over(
                f"paced_{mode}_c1_{part}", f"paced_in_process_{part}"
            )
    return result


async def _executor_death(stack: Stack, main_executor: Service, trials: int) -> list[float]:
    """The main executor goes; two others share the work; the holder of a streaming durable run
    is killed, trial after trial, and a fresh executor takes the place of each killed one."""
    main_executor.stop()
    standing: dict[str, Service] = dict([stack.executor(), stack.executor()])
    gateway = stack.gateway(list(standing.values()))
    agent_id = f"slow-{uuid.uuid4().hex[:6]}"
    slow = AgentConfig(
        agent_id=agent_id,
        version=1,
        execution_mode="durable",
        model=ModelSettings(
            provider="scripted",
            scripted=ScriptedSettings(
                token_delay=0.01, turns=(ScriptedTurn(" ".join(["word"] * 400)),)
            ),
        ),
    )
    await create_agent(gateway.address, slow)
    return await death_to_next_token(
        gateway.address,
        f"nats://{stack.nats.address}",
        NatsNames(),
        standing,
        stack.executor,
        agent_id,
        trials,
    )


if __name__ == "__main__":
    main()
