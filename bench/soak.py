"""The soak: does the cost of a run grow with the work done? (minutes; ``make soak``, not in CI)

    python -m bench.soak [--runs 100000] [--window 10000] [--clients 16] [--database-url URL]
                         [--output FILE]

One long-lived stack (nats-server, an executor, a gateway: bench.stack) serves ``--runs``
durable runs of the benchmark workload (bench.workload), ``--clients`` at a time, a window of
runs after another. For each window: runs per second, the CPU milliseconds per run of every
process (executor, gateway, nats-server, PostgreSQL, this client) and the executor's and the
gateway's resident memory at its end. Then the first window against the last: each figure
PASSes if it is within 15% of the first window's.

Without ``--database-url`` the soak starts a PostgreSQL server of its own (a throwaway one, as
the tests do: tests.postgres_server) with pg_stat_statements preloaded: PostgreSQL's CPU is
that of all of the cluster's processes (background ones too), and the statements whose mean
time grew from the first window to the last are listed (the view is reset at every window's
start). With ``--database-url`` PostgreSQL's CPU is that of the backends serving the stack's
connections (as bench.scale measures it), in a schema of its own that it drops at the end;
statements are listed only if the server preloads pg_stat_statements (the soak then resets the
view at every window), and they and the WAL figures include whatever else the server runs.
A statement's time is its execution's wall time: waits for locks included. WAL kB and
full-page images per run come from pg_stat_wal.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from bench.durable import create_agent
from bench.scale import CpuMeter, cpu_seconds
from bench.stack import Stack, rss_bytes
from bench.throughput import under_load
from bench.workload import bench_agent
from eventstore.persistence import StoreConfig
from tests.postgres_server import PostgresUnavailable, Server, candidate_bindirs

TOLERANCE = 0.15
TOP_STATEMENTS = 10
MIN_CALLS = 5  # in the first window and the last, for a statement to be compared
MB = 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class StatementsServer(Server):
    """A throwaway PostgreSQL server (tests.postgres_server) with pg_stat_statements."""

    def _launch(self) -> bool:
        argv = [str(self._bindir / "postgres"), "-D", str(self._data), "-p", str(self.port)]
        argv += ["-k", "", "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]
        argv += ["-c", "shared_preload_libraries=pg_stat_statements"]
        argv += ["-c", "pg_stat_statements.track=all"]  # statements in functions too
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log, **self.run_as)
        return self._wait_until_ready()


def start_postgres() -> StatementsServer:
    """A server from the first installation that has pg_stat_statements."""
    for bindir, bundled in candidate_bindirs():
        if (bindir.parent / "lib" / "pg_stat_statements.so").is_file():
            return StatementsServer(bindir, bundled)
    raise PostgresUnavailable("no PostgreSQL installation with pg_stat_statements")


def cluster_cpu(postmaster: int) -> float:
    """CPU seconds of a PostgreSQL cluster so far: the postmaster, the children it reaped
    (cutime, cstime) and the children alive."""
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    reaped = (int(fields[13]) + int(fields[14])) / CLOCK_TICKS  # cutime, cstime
    total = cpu_seconds(postmaster) + reaped
    for task in Path(f"/proc/{postmaster}/task").iterdir():
        children = (task / "children").read_text().split()
        total += sum(cpu_seconds(int(pid)) for pid in children)
    return total


@dataclass
class Statement:
    query: str
    calls: int
    mean_ms: float
    total_ms: float


@dataclass
class Window:
    runs: int
    runs_per_second: float
    cpu_ms: dict[str, float]  # part -> CPU ms per run
    rss_mb: dict[str, float]  # service -> MB at the window's end
    rows: int  # rows of the run list at the window's end
    wal: tuple[float, float]  # WAL kB and full-page images per run (pg_stat_wal)
    statements: dict[int, Statement] = field(default_factory=dict)


class Statements:
    """pg_stat_statements of the database at ``conninfo`` (none unless the server preloads it),
    and the server's WAL and the run list's rows in ``schema``."""

    def __init__(self, conninfo: str, schema: str) -> None:
        self._conn = psycopg.connect(conninfo, autocommit=True)
        self._schema = schema or "public"
        preloaded = self._conn.execute("SHOW shared_preload_libraries").fetchone()
        self.available = preloaded is not None and "pg_stat_statements" in str(preloaded[0])
        if self.available:
            self._conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self._conn.execute("SELECT pg_stat_statements_reset()")

    def reset(self) -> None:
        if self.available:
            self._conn.execute("SELECT pg_stat_statements_reset()")

    def read(self) -> dict[int, Statement]:
        if not self.available:
            return {}
        rows = self._conn.execute(
            "SELECT queryid, query, calls, mean_exec_time, total_exec_time "
            "FROM pg_stat_statements WHERE queryid IS NOT NULL "
            "AND query NOT LIKE '%pg_stat%'"
        ).fetchall()
        return {row[0]: Statement(row[1], row[2], row[3], row[4]) for row in rows}

    def wal(self) -> tuple[int, int]:
        """WAL bytes and full-page images written so far (pg_stat_wal)."""
        row = self._conn.execute("SELECT wal_bytes, wal_fpi FROM pg_stat_wal").fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def run_list_rows(self) -> int:
        row = self._conn.execute(
            "SELECT coalesce(sum(n_live_tup), 0) FROM pg_stat_user_tables "
            "WHERE relname = 'agentrun_runs' AND schemaname = %s",
            (self._schema,),
        ).fetchone()
        return int(row[0]) if row else 0

    def drop_schema(self, schema: str) -> None:
        self._conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    def close(self) -> None:
        self._conn.close()


async def soak(url: str, tmp: Path, runs: int, window: int, clients: int, postmaster: int) -> str:
    """Serves the runs and returns the report (markdown)."""
    postgres = StoreConfig.from_url(url).postgres
    assert postgres is not None, "the soak needs PostgreSQL"
    statements = Statements(postgres.conninfo(), postgres.schema)
    stack = Stack(url, tmp)
    windows: list[Window] = []
    started = time.monotonic()
    try:
        _, executor = stack.executor()
        gateway = stack.gateway([executor])
        agent_id = f"soak-{uuid.uuid4().hex[:6]}"
        await create_agent(gateway.address, bench_agent(agent_id, "durable"))
        await under_load(gateway.address, agent_id, 4 * clients, clients)
        print(
            f"| window | runs | runs/s | CPU ms/run: {PARTS_HEADER} | RSS MB: executor, gateway "
            "| WAL kB/run, FPI/run | run list rows |",
            flush=True,
        )
        services = {"executor": executor, "gateway": gateway}
        parts = {"executor": [executor], "gateway": [gateway], "nats": [stack.nats]}
        done = 0
        while done < runs:
            size = min(window, runs - done)
            meter = CpuMeter(url, parts)
            meter.start()
            pg_before = cluster_cpu(postmaster) if postmaster else 0.0
            statements.reset()
            wal_before = statements.wal()
            before = resource.getrusage(resource.RUSAGE_SELF)
            load = await under_load(gateway.address, agent_id, size, clients)
            after = resource.getrusage(resource.RUSAGE_SELF)
            spent = meter.stop()
            if postmaster:
                spent["postgres"] = cluster_cpu(postmaster) - pg_before
            spent["client"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            done += size
            wal_after = statements.wal()
            wal = (
                (wal_after[0] - wal_before[0]) / 1024 / size,
                (wal_after[1] - wal_before[1]) / size,
            )
            current = Window(
                size,
                load.runs_per_second,
                {part: spent[part] * 1000 / size for part in PARTS},
                {name: rss_bytes(service) / MB for name, service in services.items()},
                statements.run_list_rows(),
                wal,
                statements.read(),
            )
            windows.append(current)
            print(window_line(len(windows), done, current), flush=True)
    finally:
        stack.stop()
        if postgres.schema and not postmaster:  # a schema of its own in the given database
            statements.drop_schema(postgres.schema)
        statements.close()
    return report(windows, runs, clients, time.monotonic() - started, postmaster != 0)


PARTS = ("executor", "gateway", "nats", "postgres", "client")
PARTS_HEADER = ", ".join(PARTS)


def window_line(number: int, done: int, w: Window) -> str:
    cpu = ", ".join(f"{w.cpu_ms[part]:.2f}" for part in PARTS)
    rss = f"{w.rss_mb['executor']:.0f}, {w.rss_mb['gateway']:.0f}"
    wal = f"{w.wal[0]:.1f}, {w.wal[1]:.2f}"
    return f"| {number} | {done} | {w.runs_per_second:.1f} | {cpu} | {rss} | {wal} | {w.rows} |"


def verdict(first: float, last: float, higher_is_worse: bool) -> str:
    change = (last - first) / first if first else 0.0
    worse = change if higher_is_worse else -change
    return f"{change:+.1%} {'PASS' if worse <= TOLERANCE else 'FAIL'}"


def report(windows: list[Window], runs: int, clients: int, seconds: float, cluster: bool) -> str:
    first, last = windows[0], windows[-1]
    scope = "all of the cluster's processes" if cluster else "the stack's backends"
    lines = [
        f"## Soak: {runs} durable runs, {clients} clients, {len(windows)} windows "
        f"of {first.runs} ({seconds / 60:.1f} minutes)",
        "",
        f"CPU in ms per run (PostgreSQL: {scope}); RSS in MB at the window's end.",
        "",
        f"| window | runs | runs/s | CPU ms/run: {PARTS_HEADER} | RSS MB: executor, gateway "
        "| WAL kB/run, FPI/run | run list rows |",
        "|---|---|---|---|---|---|---|",
    ]
    done = 0
    for number, w in enumerate(windows, 1):
        done += w.runs
        lines.append(window_line(number, done, w))
    lines += [
        "",
        f"First window against the last (PASS: no more than {TOLERANCE:.0%} worse):",
        "",
        "| figure | first | last | change |",
        "|---|---|---|---|",
        f"| runs/s | {first.runs_per_second:.1f} | {last.runs_per_second:.1f} | "
        f"{verdict(first.runs_per_second, last.runs_per_second, False)} |",
    ]
    for part in PARTS:
        a, b = first.cpu_ms[part], last.cpu_ms[part]
        lines.append(f"| CPU {part} ms/run | {a:.2f} | {b:.2f} | {verdict(a, b, True)} |")
    for name in first.rss_mb:
        a, b = first.rss_mb[name], last.rss_mb[name]
        lines.append(f"| RSS {name} MB | {a:.0f} | {b:.0f} | {verdict(a, b, True)} |")
    lines += ["", *grown_statements(windows)]
    return "\n".join(lines)


def grown_statements(windows: list[Window]) -> list[str]:
    """The statements whose time per run grew most from the first window to the last, and
    those whose mean time grew most (a statement run every few seconds costs little per run
    but may show what grows with the tables), with their mean time in every window."""
    first, last = windows[0], windows[-1]
    if not first.statements or not last.statements:
        return ["(no pg_stat_statements: statements not compared)"]
    both = {
        q
        for q in first.statements.keys() & last.statements.keys()
        if min(first.statements[q].calls, last.statements[q].calls) >= MIN_CALLS
    }

    def per_run(q: int) -> float:
        return last.statements[q].total_ms / last.runs - first.statements[q].total_ms / first.runs

    def mean_ratio(q: int) -> float:
        return last.statements[q].mean_ms / max(first.statements[q].mean_ms, 1e-6)

    lines: list[str] = []
    for title, key, count in (
        ("time per run", per_run, TOP_STATEMENTS),
        ("mean time", mean_ratio, TOP_STATEMENTS // 2),
    ):
        lines += [
            f"Statements by the growth of their {title}, first window to last "
            "(pg_stat_statements, reset at each window's start):",
            "",
            "| statement | calls/run first, last | ms/run first, last | mean ms by window |",
            "|---|---|---|---|",
        ]
        for queryid in sorted(both, key=key, reverse=True)[:count]:
            a, b = first.statements[queryid], last.statements[queryid]
            means = ", ".join(
                f"{w.statements[queryid].mean_ms:.3f}" if queryid in w.statements else "-"
                for w in windows
            )
            lines.append(
                f"| `{shortened(b.query)}` | {a.calls / first.runs:.2f}, "
                f"{b.calls / last.runs:.2f} | {a.total_ms / first.runs:.3f}, "
                f"{b.total_ms / last.runs:.3f} | {means} |"
            )
        lines.append("")
    return lines


def shortened(query: str) -> str:
    """The statement on one line, a long column list elided (its WHERE clause is what tells
    statements apart)."""
    text = re.sub(r"^SELECT (.{60,}?) FROM ", "SELECT … FROM ", " ".join(query.split()))
    return text[:200].replace("|", "\\|")


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.soak", description=__doc__)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="agentrun-soak-"))
    server: StatementsServer | None = None
    url: str = args.database_url
    postmaster = 0
    if not url:
        server = start_postgres()
        assert server.process is not None
        url, postmaster = server.url, server.process.pid
        print(f"PostgreSQL: a throwaway server with pg_stat_statements at {url}", flush=True)
    else:
        url = f"{url}{'&' if '?' in url else '?'}schema=soak_{uuid.uuid4().hex[:8]}"
    try:
        text = asyncio.run(soak(url, tmp, args.runs, args.window, args.clients, postmaster))
    finally:
        if server is not None:
            server.stop()
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
