"""Scale out: durable runs per second with 1, 2 and 3 executors, and the CPU each part of the stack
spends per run.

One nats-server; each point adds an executor and starts a gateway whose target lists them all
(against the suite's store); after a warm-up, 16 clients stream the benchmark workload
(bench.workload) one run after another. The CPU of a part is the user + system time its processes
spent during the measured runs (``utime + stime`` of /proc/<pid>/stat, before and after), divided
by the runs: executors (all of them together), the gateway, the nats-server, and the PostgreSQL
backends serving the executors' and the gateway's connections (found by their client ports in
pg_stat_activity; PostgreSQL's own background processes, such as the WAL writer, are left out). On
a machine with few cores the rate flattens as executors are added; the CPU per run is the figure
that predicts a bigger machine.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.durable import create_agent
from bench.stack import Stack
from bench.throughput import under_load
from bench.workload import bench_agent
from cli.launcher import Service
from eventstore.persistence import StoreConfig

EXECUTOR_COUNTS = (1, 2, 3)
CLIENTS = 16
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class ScalePoint:
    executors: int
    runs: int
    wall_seconds: float
    runs_per_second: float
    cpu_ms_per_run: dict[str, float]  # part -> CPU milliseconds per run


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime: fields 14 and 15


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _local_ports(inodes: set[int]) -> set[int]:
    """Local TCP ports of the sockets with these inodes."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if int(parts[9]) in inodes:
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def postgres_backends(url: str, services: list[Service]) -> list[int]:
    """Process ids of the PostgreSQL backends serving ``services``' connections (none when the
    store is not PostgreSQL or the server is on another machine)."""
    postgres = StoreConfig.from_url(url).postgres
    if postgres is None:
        return []
    inodes: set[int] = set()
    for service in services:
        inodes |= _socket_inodes(service.process.pid)
    ports = _local_ports(inodes)
    with psycopg.connect(postgres.conninfo(), autocommit=True) as conn:
        rows = conn.execute("SELECT pid, client_port FROM pg_stat_activity").fetchall()
    return [pid for pid, port in rows if port in ports and Path(f"/proc/{pid}").exists()]


class CpuMeter:
    """CPU seconds of each part, from ``start`` to ``stop``."""

    def __init__(self, url: str, parts: dict[str, list[Service]]) -> None:
        self._url = url
        self._parts = parts
        self._before: dict[str, float] = {}

    def _pids(self) -> dict[str, list[int]]:
        pids = {part: [s.process.pid for s in services] for part, services in self._parts.items()}
        everyone = [s for services in self._parts.values() for s in services]
        pids["postgres"] = postgres_backends(self._url, everyone)
        self._postgres = pids["postgres"]
        return pids

    def start(self) -> None:
        self._before = {
            part: sum(cpu_seconds(pid) for pid in pids) for part, pids in self._pids().items()
        }

    def stop(self) -> dict[str, float]:
        # The backends measured are those that existed at the start (pools keep them open).
        pids = {part: [s.process.pid for s in services] for part, services in self._parts.items()}
        pids["postgres"] = self._postgres
        return {
            part: sum(cpu_seconds(pid) for pid in pids[part]) - self._before[part]
            for part in self._before
        }


async def scale_out(url: str, tmp: Path, runs: int, warm_up: int) -> list[ScalePoint]:
    """``runs`` durable runs by CLIENTS clients with each count of executors: one nats-server;
    an executor is added for each point, with a new gateway whose target lists them all."""
    points: list[ScalePoint] = []
    stack = Stack(url, tmp / "scale")
    try:
        executors: list[Service] = []
        gateway: Service | None = None
        for count in EXECUTOR_COUNTS:
            while len(executors) < count:
                executors.append(stack.executor()[1])
            if gateway is not None:
                gateway.stop()
            gateway = stack.gateway(executors)
            agent_id = f"scale-{count}-{uuid.uuid4().hex[:6]}"
            await create_agent(gateway.address, bench_agent(agent_id, "durable"))
            await under_load(gateway.address, agent_id, warm_up, CLIENTS)
            meter = CpuMeter(
                url, {"executors": list(executors), "gateway": [gateway], "nats": [stack.nats]}
            )
            meter.start()
            load = await under_load(gateway.address, agent_id, runs, CLIENTS)
            spent = meter.stop()
            per_run = {part: seconds * 1000 / runs for part, seconds in spent.items()}
            per_run["total"] = sum(per_run.values())
            points.append(ScalePoint(count, runs, load.wall, load.runs_per_second, per_run))
    finally:
        stack.stop()
    return points
