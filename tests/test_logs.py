"""The services' logs: text or JSON lines, and the run a line is about."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc

from agentrun.v1 import agent_pb2
from common import logs
from tests.client import Client, scripted_agent, until
from tests.stack import Stack

DURABLE = agent_pb2.EXECUTION_MODE_DURABLE
CALCULATE = [("Let me work it out.", [("calculator", '{"expression": "6*7"}')]), ("42.", [])]


async def test_an_executors_log_lines_about_a_run_are_json_naming_it(empty_stack: Stack) -> None:
    executor = empty_stack.start_executor(AGENTRUN_LOG_FORMAT="json")
    gateway = empty_stack.start_gateway()
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        client = Client(channel)
        agent = await client.create_agent(
            scripted_agent(turns=CALCULATE, mode=DURABLE, token_delay_ms=200)
        )
        call = client.stream(agent.id, "6*7?")
        run_id = (await until(call, "text_delta"))[0].run_id
        executor.stop()  # it drains: the durable run is handed back, which it logs
        call.cancel()
    lines = [json.loads(line) for line in executor.log().splitlines() if line.startswith("{")]
    assert any(line["message"].startswith("executor ") for line in lines)
    about = [line for line in lines if line.get("run_id") == run_id]
    assert any("handed back" in line["message"] for line in about), lines
    for line in about:
        assert line["tenant"] == "local"
        assert line["agent"] == agent.id
        assert {"timestamp", "level", "logger"} <= line.keys()
    # Every line of its own is JSON (only the readiness line, for its launcher, is not).
    others = [line for line in executor.log().splitlines() if not line.startswith("{")]
    assert all(line.startswith("agentrun-ready") for line in others), others


def test_a_text_line_about_a_run_names_it() -> None:
    formatter = logs.TextFormatter()

    async def in_a_run() -> logging.LogRecord:
        logs.about_run("run-1", "acme", "helper")
        return record()

    def record() -> logging.LogRecord:
        made = logging.LogRecord("x", logging.INFO, __file__, 1, "step %d", (3,), None)
        logs.RunFilter().filter(made)
        return made

    assert formatter.format(asyncio.run(in_a_run())).endswith("step 3 [run_id=run-1]")
    assert formatter.format(record()).endswith("step 3")
