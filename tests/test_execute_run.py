"""executor.api.execute_run: a durable run streams whole to its client through the executor
that started it, whichever executor takes it up."""

from __future__ import annotations

import grpc

from agentrun.v1 import agent_pb2
from tests.client import Client, scripted_agent
from tests.stack import Stack

DURABLE = agent_pb2.EXECUTION_MODE_DURABLE


async def test_a_durable_run_taken_up_by_another_executor_streams_whole(
    empty_stack: Stack,
) -> None:
    """The executor the gateway reaches takes no durable runs (AGENTRUN_MAX_DURABLE_RUNS=0):
    it stores the run, another executor takes it up, and the stream comes from the run's
    subject as soon as that executor publishes to it."""
    storing = empty_stack.start_executor(AGENTRUN_MAX_DURABLE_RUNS="0")
    empty_stack.start_executor()
    gateway = empty_stack.start_gateway(executor_target=storing.address)
    turns = [("Let me check.", [("calculator", '{"expression": "6 * 7"}')]), ("It is 42.", [])]
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        client = Client(channel)
        agent = await client.create_agent(scripted_agent(turns=turns, mode=DURABLE))
        for _ in range(3):
            events = await client.run(agent.id, "what is six times seven?")
            assert [e.sequence for e in events] == list(range(1, len(events) + 1))
            assert events[-1].run_completed.output == "It is 42."
