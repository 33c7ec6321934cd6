"""``make bench``: starts the real stack as separate processes, measures, writes a report.

    python -m bench.run [--smoke] [--database-url URL]

The report (a markdown table on stdout and in bench/results/latest.md, every figure as JSON in
bench/results/latest.json, with the machine it ran on) sets each figure beside the same run done
in process, without any service. ``--smoke`` runs a few iterations only: it shows that the suite
works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psycopg

from agentrun.launcher import Service, start_agentrun, start_nats
from agentrun.nats_link import NatsNames
from bench.durable import create_agent, death_to_next_token, ratio, step_costs
from bench.latency import RunTimes, in_process, through_stack
from bench.stats import Summary
from bench.workload import bench_agent
from eventstore.agent_config import AgentConfig, ModelSettings, ScriptedSettings, ScriptedTurn
from eventstore.persistence import StoreConfig

RESULTS = Path(__file__).parent / "results"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


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


def choose_store(url: str, tmp: Path) -> str:
    if url:
        return url
    postgres = StoreConfig.from_url(DEFAULT_POSTGRES).postgres
    assert postgres is not None
    try:
        with psycopg.connect(postgres.conninfo(), connect_timeout=2):
            pass
    except psycopg.OperationalError:
        return f"sqlite:///{tmp / 'data'}"
    return f"{DEFAULT_POSTGRES}?schema=bench_{uuid.uuid4().hex[:8]}"


class Stack:
    """nats-server, executors and a gateway for the benchmarks, as separate processes."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.tmp = tmp
        self.nats = start_nats(tmp / "nats", tmp / "logs")
        self.env = {
            "AGENTRUN_DATABASE_URL": url,
            "AGENTRUN_DATA_DIR": str(tmp / "data"),
            "AGENTRUN_NATS_URL": f"nats://{self.nats.address}",
            "AGENTRUN_EXECUTOR_LISTEN": "127.0.0.1:0",
            "AGENTRUN_GATEWAY_LISTEN": "127.0.0.1:0",
            "AGENTRUN_LOG_LEVEL": "WARNING",
            "AGENTRUN_DISPATCH_ACK_WAIT": "1.5",
        }
        self.services: list[Service] = []
        self._count = 0

    def executor(self, port: int = 0) -> tuple[str, Service]:
        self._count += 1
        name = f"bench-executor-{self._count}"
        env = {
            **self.env,
            "AGENTRUN_EXECUTOR_ID": name,
            "AGENTRUN_EXECUTOR_LISTEN": f"127.0.0.1:{port}",
        }
        service = start_agentrun("executor", env, self.tmp / "logs", name)
        self.services.append(service)
        return name, service

    def gateway(self, executors: list[Service]) -> Service:
        self._count += 1
        target = ",".join(e.address for e in executors)
        service = start_agentrun(
            "gateway",
            {**self.env, "AGENTRUN_EXECUTOR_TARGET": target},
            self.tmp / "logs",
            f"bench-gateway-{self._count}",
        )
        self.services.append(service)
        return service

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.nats.stop()


async def run_suite(smoke: bool, database_url: str) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="agentrun-bench-"))
    url = choose_store(database_url, tmp)
    sequential = 20 if smoke else 1000
    concurrent = 32 if smoke else 1600
    steps = 21 if smoke else 301
    trials = 1 if smoke else 10
    stack = Stack(url, tmp)
    figures: dict[str, Summary] = {}
    rates: dict[str, float] = {}
    try:
        _, main_executor = stack.executor()
        target = stack.gateway([main_executor]).address
        for mode in ("classic", "durable"):
            agent_id = f"bench-{mode}-{uuid.uuid4().hex[:6]}"
            await create_agent(target, bench_agent(agent_id, mode))
            await through_stack(target, agent_id, max(sequential // 10, 5))  # warm up
            alone, _ = await through_stack(target, agent_id, sequential)
            loaded, wall = await through_stack(target, agent_id, concurrent, concurrency=16)
            _record(figures, f"{mode}_c1", alone)
            _record(figures, f"{mode}_c16", loaded)
            rates[f"{mode}_runs_per_second_c16"] = concurrent / wall
        await in_process(max(sequential // 10, 5))
        _record(figures, "in_process", await in_process(sequential))
        early, late = await step_costs(target, steps, 1 if smoke else 3)
        figures["durable_step_early"] = Summary.of(early)
        figures["durable_step_late"] = Summary.of(late)
        rates["durable_step_late_over_early"] = ratio(late, early)
        death = await _executor_death(stack, main_executor, trials)
        figures["durable_executor_death_to_next_token"] = Summary.of(death)
    finally:
        stack.stop()
    overhead = {
        "classic_first_token_p50_over_in_process_ms": figures["classic_c1_first_token"].p50_ms
        - figures["in_process_first_token"].p50_ms,
        "durable_first_token_p50_over_classic_ms": figures["durable_c1_first_token"].p50_ms
        - figures["classic_c1_first_token"].p50_ms,
    }
    return {
        "smoke": smoke,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "store": StoreConfig.from_url(url).describe(),
        "workload": (
            "scripted model, zero delays: a model call streaming 20 tokens, a tool call "
            "(calculator), a model call streaming 20 tokens"
        ),
        "figures": {name: asdict(summary) for name, summary in figures.items()},
        "rates": rates,
        "overhead": overhead,
        "steps": steps,
    }


def _record(figures: dict[str, Summary], name: str, times: RunTimes) -> None:
    figures[f"{name}_first_token"] = Summary.of(times.first_token)
    figures[f"{name}_whole_run"] = Summary.of(times.whole_run)


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


TARGETS = {
    "classic_first_token_p50_over_in_process_ms": "<= 2",
    "durable_first_token_p50_over_classic_ms": "<= 5",
    "classic_runs_per_second_c16": ">= 200",
    "durable_runs_per_second_c16": ">= 100",
    "durable_step_late_over_early": "<= 1.5",
}


def render(report: dict[str, Any]) -> str:
    f, rates, over = report["figures"], report["rates"], report["overhead"]

    def row(label: str, name: str) -> str:
        s = f[name]
        return f"| {label} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['count']} |"

    machine = report["machine"]
    lines = [
        f"Machine: {machine['cpus']} CPUs, {machine['platform']}, Python {machine['python']}; "
        f"store: {report['store']}; {report['time']}"
        + (" (SMOKE RUN: the numbers mean nothing)" if report["smoke"] else ""),
        f"Workload: {report['workload']}.",
        "",
        "| figure | p50 ms | p99 ms | n |",
        "|---|---|---|---|",
        row("in process (no services): first token", "in_process_first_token"),
        row("in process (no services): whole run", "in_process_whole_run"),
        row("classic, 1 client: first token", "classic_c1_first_token"),
        row("classic, 1 client: whole run", "classic_c1_whole_run"),
        row("classic, 16 clients: first token", "classic_c16_first_token"),
        row("classic, 16 clients: whole run", "classic_c16_whole_run"),
        row("durable, 1 client: first token", "durable_c1_first_token"),
        row("durable, 1 client: whole run", "durable_c1_whole_run"),
        row("durable, 16 clients: first token", "durable_c16_first_token"),
        row("durable, 16 clients: whole run", "durable_c16_whole_run"),
        row("durable step, steps 3-12", "durable_step_early"),
        row(f"durable step, last 10 of {report['steps']}", "durable_step_late"),
        row("durable: executor SIGKILL to next token", "durable_executor_death_to_next_token"),
        "",
        "| derived figure | measured | target |",
        "|---|---|---|",
    ]
    derived = {**over, **rates}
    for name, target in TARGETS.items():
        lines.append(f"| {name} | {derived[name]:.2f} | {target} |")
    death = f["durable_executor_death_to_next_token"]["p50_ms"] / 1000
    lines.append(f"| durable executor death to next token p50 (s) | {death:.2f} | < 2 |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
