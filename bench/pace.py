"""The workload at a real model's pace: 300 ms to the first token, then 20 ms per token.

The same run (20 tokens, a tool call, 20 tokens) done in process, classic and durable, one
client: at model speed agentrun's overhead should be invisible next to the model's own time.
"""

from __future__ import annotations

import uuid

from bench.durable import create_agent
from bench.latency import RunTimes, in_process, through_stack
from bench.workload import bench_agent

PACE = {"first_token_delay": 0.3, "token_delay": 0.02}
DESCRIPTION = "scripted model at 300 ms to the first token, then 20 ms per token"


async def paced(target: str, runs: int) -> dict[str, RunTimes]:
    """First token and whole run, ``runs`` runs each, by figure name: in process, classic and
    durable with one client."""
    results = {"paced_in_process": await in_process(runs, **PACE)}
    for mode in ("classic", "durable"):
        agent_id = f"paced-{mode}-{uuid.uuid4().hex[:6]}"
        await create_agent(target, bench_agent(agent_id, mode, **PACE))
        results[f"paced_{mode}_c1"], _ = await through_stack(target, agent_id, runs)
    return results
