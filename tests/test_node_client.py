"""The Node.js client example (examples/node) against the shared stack of real processes: it
executes the agent's client tool in JavaScript and prints the run's final answer."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import grpc
import pytest

from agentrun.v1 import agent_pb2
from tests.client import Client, kinds
from tests.stack import Stack

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node" / "client_tool.js"
GUARD = 120.0  # seconds; only bounds a hang so that a broken example fails instead of stalling


async def run_example(*args: str) -> tuple[int, str, str]:
    node = shutil.which("node")
    assert node, "the Node.js example needs `node` on PATH (make setup installs its packages)"
    process = await asyncio.create_subprocess_exec(
        node,
        str(EXAMPLE),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), GUARD)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("mode", ["classic", "durable"])
async def test_the_node_example_executes_its_client_tool(
    stack: Stack, channels: list[grpc.aio.Channel], mode: str
) -> None:
    code, out, err = await run_example("--target", stack.gateways[0].address, "--mode", mode)
    assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"
    lines = out.splitlines()
    run_id = lines[0].removeprefix("run ").removesuffix(" started")
    assert lines[1] == 'executing weather {"city":"Paris"}'
    assert lines[-1] == "answer: It is clear and 21 degrees in Paris."

    # The run's own history says the same: the result the JavaScript tool computed reached it.
    history = await Client(channels[1]).watch_all(run_id)
    assert "client_tool_call_required" in kinds(history)
    result = next(e.tool_result for e in history if e.HasField("tool_result"))
    weather = json.loads(result.output)
    assert weather["city"] == "Paris"
    assert weather["reported_by"].startswith("node v")
    assert f"tool result: {result.output}" in lines
    expected = (
        agent_pb2.EXECUTION_MODE_DURABLE if mode == "durable" else agent_pb2.EXECUTION_MODE_CLASSIC
    )
    assert history[0].run_started.run.execution_mode == expected
