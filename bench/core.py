"""The core figures, fast: the loop to run while working on speed (about a minute).

    python -m bench.core [--mode classic|durable|both] [--runs N] [--database-url URL]
                         [--tls off|public|internal|both] [--metrics off|on]
                         [--tracing off|on]

One nats-server, one executor, one gateway, as separate processes (as ``make bench``). For each
mode: the first token at 1 client (p50/p99), then runs per second at 16 clients with the CPU
each part of the stack spent per run (as bench.scale measures it). Prints one line per figure.
``--tls``: the client reaches the gateway over TLS (public), the gateway reaches the executor
over mTLS (internal), or both; each client keeps one channel, so a handshake is not per run.
``--metrics on``: every service serves /metrics (gRPC call metrics too), scraped every second
while the figures are measured. ``--tracing on``: every service exports every span (100%
sampling) to an OTLP/gRPC receiver process on this machine (tests.otlp_collector), whose CPU is
shown as a part of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import uuid
from pathlib import Path

import httpx

from bench.durable import create_agent
from bench.latency import through_stack
from bench.machine import loop_ms
from bench.scale import CpuMeter
from bench.stack import Stack, choose_store
from bench.stats import Summary
from bench.throughput import under_load
from bench.workload import bench_agent

SCRAPE_INTERVAL = 1.0


async def measure(
    url: str, tmp: Path, modes: list[str], runs: int, tls: str, metrics: bool, tracing: bool
) -> None:
    stack = Stack(
        url,
        tmp,
        public_tls=tls in ("public", "both"),
        internal_tls=tls in ("internal", "both"),
        metrics=metrics,
        tracing=tracing,
    )
    credentials = stack.credentials
    print(
        f"TLS: {tls}; metrics: {'on' if metrics else 'off'}; tracing: {'on' if tracing else 'off'}"
    )
    scraping: asyncio.Task[None] | None = None
    try:
        _, executor = stack.executor()
        gateway = stack.gateway([executor])
        if metrics:
            scraping = asyncio.create_task(scrape_forever(stack.metrics_targets))
        target = gateway.address
        for mode in modes:
            agent_id = f"core-{mode}-{uuid.uuid4().hex[:6]}"
            await create_agent(target, bench_agent(agent_id, mode), credentials)  # type: ignore[arg-type]
            await through_stack(target, agent_id, 30, credentials=credentials)
            alone, _ = await through_stack(target, agent_id, runs, credentials=credentials)
            first = Summary.of(alone.first_token)
            print(f"{mode} c1 first token: p50 {first.p50_ms:.2f} ms, p99 {first.p99_ms:.2f} ms")
            await under_load(target, agent_id, 64, 16, credentials)
            parts = {"executor": [executor], "gateway": [gateway], "nats": [stack.nats]}
            if stack.collector is not None:
                parts["collector"] = [stack.collector]
            meter = CpuMeter(url, parts)
            meter.start()
            before = resource.getrusage(resource.RUSAGE_SELF)
            load = await under_load(target, agent_id, runs, 16, credentials)
            after = resource.getrusage(resource.RUSAGE_SELF)
            spent = meter.stop()
            spent["client"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            cpu = {part: seconds * 1000 / runs for part, seconds in spent.items()}
            shown = ", ".join(f"{part} {ms:.1f}" for part, ms in cpu.items())
            unit = loop_ms()
            print(
                f"{mode} c16: {load.runs_per_second:.1f} runs/s; CPU ms/run: {shown}, "
                f"total {sum(cpu.values()):.1f}; the machine's speed: {unit:.1f} ms for a fixed "
                f"loop, so total = {sum(cpu.values()) / unit:.3f} loops"
            )
    finally:
        if scraping is not None:
            scraping.cancel()
        stack.stop()
        if stack.collector is not None:
            received = [ln for ln in stack.collector.log().splitlines() if "received" in ln]
            print(f"the collector stand-in: {received[-1] if received else 'no count'}")


async def scrape_forever(targets: list[str]) -> None:
    """Scrapes every service's /metrics every SCRAPE_INTERVAL, as Prometheus would (more
    often than its default 15 s, so that scrapes weigh on the figures if they weigh at all)."""
    async with httpx.AsyncClient() as http:
        while True:
            for target in targets:
                (await http.get(f"http://{target}/metrics")).raise_for_status()
            await asyncio.sleep(SCRAPE_INTERVAL)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.core", description=__doc__)
    parser.add_argument("--mode", choices=("classic", "durable", "both"), default="both")
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--database-url", default=os.environ.get("AGENTRUN_BENCH_DATABASE_URL", ""))
    parser.add_argument("--tls", choices=("off", "public", "internal", "both"), default="off")
    parser.add_argument("--metrics", choices=("off", "on"), default="off")
    parser.add_argument("--tracing", choices=("off", "on"), default="off")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="agentrun-core-"))
    modes = ["classic", "durable"] if args.mode == "both" else [args.mode]
    store = choose_store(args.database_url, tmp)
    metrics, tracing = args.metrics == "on", args.tracing == "on"
    asyncio.run(measure(store, tmp, modes, args.runs, args.tls, metrics, tracing))


if __name__ == "__main__":
    main()
