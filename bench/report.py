"""The benchmark report as a markdown table: every figure, then the derived figures beside the
targets they are held to."""

from __future__ import annotations

from typing import Any

# Derived figure -> the target it is held to.
TARGETS = {
    "classic_first_token_p50_over_in_process_ms": "<= 2",
    "classic_first_token_p99_over_in_process_ms": "<= 10",
    "durable_first_token_p50_over_classic_ms": "<= 5",
    "durable_first_token_p99_over_classic_ms": "<= 20",
    "classic_runs_per_second_c16": ">= 200",
    "durable_runs_per_second_c16": ">= 100",
    "durable_step_late_over_early": "<= 1.5",
    "replay_list_run_events_p50_ms": "<= 50",
    "replay_load_p50_ms": "<= 50",
    "replay_from_events_p50_ms": "<= 50",
    "durable_executor_death_to_next_token_p50_s": "<= 2",
    "suspended_durable_run_bytes": "< 2048",
}
# Derived figures shown without a target of their own.
INFORMATIVE = (
    "classic_runs_per_second_c64",
    "durable_runs_per_second_c64",
    "classic_tokens_per_second_c64",
    "durable_tokens_per_second_c64",
    "paced_classic_first_token_p50_over_in_process_ms",
    "paced_durable_first_token_p50_over_in_process_ms",
    "paced_classic_whole_run_p50_over_in_process_ms",
    "paced_durable_whole_run_p50_over_in_process_ms",
)


def derived(report: dict[str, Any]) -> dict[str, float]:
    f = report["figures"]
    return {
        **report["overhead"],
        **report["rates"],
        "replay_list_run_events_p50_ms": f["replay_list_run_events"]["p50_ms"],
        "replay_load_p50_ms": f["replay_load"]["p50_ms"],
        "replay_from_events_p50_ms": f["replay_from_events"]["p50_ms"],
        "durable_executor_death_to_next_token_p50_s": f["durable_executor_death_to_next_token"][
            "p50_ms"
        ]
        / 1000,
        "suspended_durable_run_bytes": report["suspended"]["bytes_per_run"],
    }


def render(report: dict[str, Any]) -> str:
    f = report["figures"]

    def row(label: str, name: str) -> str:
        s = f[name]
        return f"| {label} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['count']} |"

    def both(label: str, name: str) -> list[str]:
        return [
            row(f"{label}: first token", f"{name}_first_token"),
            row(f"{label}: whole run", f"{name}_whole_run"),
        ]

    machine, suspended, events = report["machine"], report["suspended"], report["replay_events"]
    speeds = list(machine.get("loop_ms_by_phase", {}).values()) or [0.0]
    lines = [
        f"Machine: {machine['cpus']} CPUs, {machine['platform']}, Python {machine['python']}; "
        f"store: {report['store']}; {report['time']}"
        + (" (SMOKE RUN: the numbers mean nothing)" if report["smoke"] else ""),
        f"The machine's speed during the run (bench.machine's fixed loop, as each part ended): "
        f"{min(speeds):.1f} to {max(speeds):.1f} ms (lower is faster).",
        f"Workload: {report['workload']}. Paced: {report['paced_workload']}.",
        "",
        "| figure | p50 ms | p99 ms | n |",
        "|---|---|---|---|",
        *both("in process (no services)", "in_process"),
        *both("classic, 1 client", "classic_c1"),
        *both("classic, 16 clients", "classic_c16"),
        *both("classic, 64 clients", "classic_c64"),
        *both("durable, 1 client", "durable_c1"),
        *both("durable, 16 clients", "durable_c16"),
        *both("durable, 64 clients", "durable_c64"),
        *both("paced, in process", "paced_in_process"),
        *both("paced, classic, 1 client", "paced_classic_c1"),
        *both("paced, durable, 1 client", "paced_durable_c1"),
        row("durable step, steps 3-12", "durable_step_early"),
        row(f"durable step, last 10 of {report['steps']}", "durable_step_late"),
        row(f"ListRunEvents of a run of {events} events", "replay_list_run_events"),
        row(f"RunStore.load of {events} events (fresh store)", "replay_load"),
        row(f"replay of all {events} events, no snapshot", "replay_from_events"),
        row("durable: executor SIGKILL to next token", "durable_executor_death_to_next_token"),
        "",
        f"Suspended durable runs: {suspended['runs']} awaiting approval after "
        f"{suspended['seconds_to_suspend_all']:.1f} s; executor RSS "
        f"{suspended['rss_before_bytes'] / 2**20:.1f} MiB before, "
        f"{suspended['rss_after_bytes'] / 2**20:.1f} MiB after.",
        "",
        *_rounds(report),
        *_scale(report),
        "| derived figure | measured | target |",
        "|---|---|---|",
    ]
    values = derived(report)
    for name, target in TARGETS.items():
        lines.append(f"| {name} | {values[name]:.2f} | {target} |")
    for name in INFORMATIVE:
        lines.append(f"| {name} | {values[name]:.2f} | - |")
    return "\n".join(lines) + "\n"


def _rounds(report: dict[str, Any]) -> list[str]:
    """Each measurement taken in rounds: the best round (in the tables), the median, the worst."""
    measured = report.get("rounds")
    if not measured:
        return []
    lines = [
        "Rounds (bench.rounds): the tables above give the best round of each; the machine's "
        "speed (bench.machine's loop, ms) after each round beside.",
        "",
        "| measurement | rounds | first token p50 ms: best / median / worst "
        "| runs/s: best / median / worst | loop ms |",
        "|---|---|---|---|---|",
    ]
    for name, described in measured.items():
        each = described["rounds"]
        firsts = sorted(r["first_token_p50_ms"] for r in each)
        rates = sorted((r["runs_per_second"] for r in each), reverse=True)
        loops = [r["loop_ms"] for r in each]
        lines.append(
            f"| {name} | {len(each)} "
            f"| {firsts[0]:.2f} / {described['median_first_token_p50_ms']:.2f} / {firsts[-1]:.2f} "
            f"| {rates[0]:.1f} / {described['median_runs_per_second']:.1f} / {rates[-1]:.1f} "
            f"| {min(loops):.1f}-{max(loops):.1f} |"
        )
    return [*lines, ""]


def _scale(report: dict[str, Any]) -> list[str]:
    """Durable runs per second and CPU per run of each part, by number of executors."""
    scale = report.get("scale")
    if not scale:
        return []
    lines = [
        f"Scale out: durable runs, {scale['clients']} clients, one gateway; CPU ms per run of "
        "each part (user + system time of its processes; PostgreSQL: the backends serving "
        "the stack's connections).",
        "",
        "| executors | runs/s | runs | executors ms | gateway ms | nats ms | postgres ms "
        "| total ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for point in scale["points"]:
        cpu = point["cpu_ms_per_run"]
        lines.append(
            f"| {point['executors']} | {point['runs_per_second']:.1f} | {point['runs']} "
            f"| {cpu['executors']:.2f} | {cpu['gateway']:.2f} | {cpu['nats']:.2f} "
            f"| {cpu['postgres']:.2f} | {cpu['total']:.2f} |"
        )
    return [*lines, ""]
