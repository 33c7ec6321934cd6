"""``make bench``: starts the real stack as separate processes, measures, writes a report.

    python -m bench.run [--smoke] [--database-url URL]

The report (a markdown table on stdout and bench/results/latest.md, every figure as JSON in
bench/results/latest.json, with the machine it ran on) compares each figure with the same run
done in process, without any service. ``--smoke`` runs a few iterations only: it shows that the
suite works, its numbers mean nothing.
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

import grpc
import psycopg

from agentrun.launcher import start_agentrun, start_nats
from agentrun.v1 import agent_service_pb2, agent_service_pb2_grpc
from bench.first_token import bench_agent_config, in_process, through_stack
from bench.stats import Summary
from eventstore.persistence import StoreConfig
from executor.translation import agent_to_proto

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


async def run_suite(smoke: bool, database_url: str) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="agentrun-bench-"))
    url = choose_store(database_url, tmp)
    sequential = 20 if smoke else 1000
    concurrent = 32 if smoke else 2000
    nats = start_nats(tmp / "nats", tmp / "logs")
    env = {
        "AGENTRUN_DATABASE_URL": url,
        "AGENTRUN_DATA_DIR": str(tmp / "data"),
        "AGENTRUN_NATS_URL": f"nats://{nats.address}",
        "AGENTRUN_EXECUTOR_LISTEN": "127.0.0.1:0",
        "AGENTRUN_GATEWAY_LISTEN": "127.0.0.1:0",
        "AGENTRUN_LOG_LEVEL": "WARNING",
    }
    executor = start_agentrun("executor", env, tmp / "logs")
    gateway = start_agentrun(
        "gateway", {**env, "AGENTRUN_EXECUTOR_TARGET": executor.address}, tmp / "logs"
    )
    try:
        target = gateway.address
        agent_id = f"bench-{uuid.uuid4().hex[:8]}"
        async with grpc.aio.insecure_channel(target) as channel:
            agents: Any = agent_service_pb2_grpc.AgentServiceStub(channel)
            await agents.CreateAgent(
                agent_service_pb2.CreateAgentRequest(
                    agent=agent_to_proto(bench_agent_config(agent_id))
                )
            )
        await through_stack(target, agent_id, max(sequential // 10, 5))  # warm up
        await in_process(max(sequential // 10, 5))
        baseline = await in_process(sequential)
        classic, _ = await through_stack(target, agent_id, sequential)
        loaded, wall = await through_stack(target, agent_id, concurrent, concurrency=16)
    finally:
        gateway.stop()
        executor.stop()
        nats.stop()
    figures = {
        "in_process_first_token": Summary.of(baseline.first_token),
        "in_process_whole_run": Summary.of(baseline.whole_run),
        "classic_first_token_c1": Summary.of(classic.first_token),
        "classic_whole_run_c1": Summary.of(classic.whole_run),
        "classic_first_token_c16": Summary.of(loaded.first_token),
        "classic_whole_run_c16": Summary.of(loaded.whole_run),
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
        "workload": "scripted model, zero delays, one model call streaming 20 tokens",
        "figures": {name: asdict(summary) for name, summary in figures.items()},
        "classic_runs_per_second_c16": concurrent / wall,
        "classic_first_token_overhead_p50_ms": figures["classic_first_token_c1"].p50_ms
        - figures["in_process_first_token"].p50_ms,
    }


def render(report: dict[str, Any]) -> str:
    f = report["figures"]

    def row(label: str, name: str) -> str:
        s = f[name]
        return f"| {label} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['count']} |"

    lines = [
        f"Machine: {report['machine']['cpus']} CPUs, {report['machine']['platform']}, "
        f"Python {report['machine']['python']}; store: {report['store']}; {report['time']}"
        + (" (SMOKE RUN: numbers meaningless)" if report["smoke"] else ""),
        f"Workload: {report['workload']}.",
        "",
        "| figure | p50 ms | p99 ms | runs |",
        "|---|---|---|---|",
        row("in process (no services): first token", "in_process_first_token"),
        row("in process (no services): whole run", "in_process_whole_run"),
        row("classic via gateway, 1 client: first token", "classic_first_token_c1"),
        row("classic via gateway, 1 client: whole run", "classic_whole_run_c1"),
        row("classic via gateway, 16 clients: first token", "classic_first_token_c16"),
        row("classic via gateway, 16 clients: whole run", "classic_whole_run_c16"),
        "",
        f"Classic first-token overhead over in process (p50): "
        f"{report['classic_first_token_overhead_p50_ms']:.2f} ms. "
        f"Classic runs per second with 16 clients: {report['classic_runs_per_second_c16']:.0f}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
