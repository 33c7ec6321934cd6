"""A durable run whose taking up keeps failing with an error (not a crash, not an outage) ends
after AGENTRUN_MAX_DISPATCH_FAILURES deliveries of its dispatch: RunFailed(DISPATCH_FAILED),
recorded once, one dead letter, the same failure in WatchRun and GetRun; the executor goes on
serving other runs. Before, its message was taken up again for ever and the run never ended.

The failing runs are real data in the store, not a patched process: durable runs with data in
a form this version cannot read, written straight into the stack's store (as a version with
another format would have left them): an agent that says null where this version reads a
number (taking the run up fails before anything is streamed), and a conversation whose earlier
assistant message has null content, as the Chat Completions API writes it next to tool calls
(the model call fails after it streamed its text). The reconciler finds each run (nobody holds
it) and dispatches it.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest

from agentrun.v1 import agent_pb2, run_pb2
from common.settings import LOCAL_TENANT
from eventstore.agent_config import AgentConfig, ModelSettings, ScriptedSettings, ScriptedTurn
from eventstore.persistence import StoreConfig
from eventstore.run import Run
from eventstore.run_store import RunStore
from tests.client import Client, kinds, scripted_agent
from tests.stack import Stack
from tests.test_durable_runs import history
from tests.test_poison_runs import read_dead_letters

MAX_FAILURES = 3
ENV = {
    "AGENTRUN_MAX_DISPATCH_FAILURES": str(MAX_FAILURES),
    # Fewer than the failures: failed take-ups must not count as attempts that crashed.
    "AGENTRUN_MAX_STEP_ATTEMPTS": "2",
    "AGENTRUN_DISPATCH_ACK_WAIT": "0.3",
    "AGENTRUN_RECONCILE_INTERVAL": "0.3",
}
GUARD = 30.0  # fails a test that would otherwise wait for ever; never reached when it passes


AGENT = AgentConfig(
    agent_id="older-format",
    model=ModelSettings(
        provider="scripted", scripted=ScriptedSettings(turns=(ScriptedTurn("Hi."),))
    ),
    execution_mode="durable",
).with_version(1)
# The run's agent and conversation so far, as stored.
UNREADABLE: dict[str, tuple[dict[str, Any], list[Any]]] = {
    "agent": (AGENT.to_json() | {"approval_timeout": None}, []),
    "history": (
        AGENT.to_json(),
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
    ),
}


def store_a_run_this_version_cannot_take_up(stack: Stack, unreadable: str) -> str:
    run = Run(
        run_id=str(uuid.uuid4()),
        tenant=LOCAL_TENANT,
        request_id="",
        input="hi again",
        conversation_id=str(uuid.uuid4()),
        execution_mode="durable",
        agent=UNREADABLE[unreadable][0],
        history=UNREADABLE[unreadable][1],
    )
    store = RunStore(StoreConfig.from_url(stack.database_url, stack.data_dir))
    try:
        store.create(run)
    finally:
        store.close()
    return run.run_id


@pytest.mark.parametrize("unreadable", sorted(UNREADABLE))
async def test_a_run_whose_taking_up_keeps_failing_is_failed_once_and_dead_lettered(
    empty_stack: Stack, unreadable: str
) -> None:
    empty_stack.start_executor(**ENV)
    gateway = empty_stack.start_gateway()
    run_id = await asyncio.to_thread(
        store_a_run_this_version_cannot_take_up, empty_stack, unreadable
    )
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        client = Client(channel)
        events = await asyncio.wait_for(client.watch_all(run_id), GUARD)
        assert events[-1].HasField("run_failed"), events
        error = events[-1].run_failed.error
        assert error.code == run_pb2.RUN_ERROR_CODE_DISPATCH_FAILED
        assert "the last time with TypeError: " in error.message
        assert f"delivered {MAX_FAILURES} times; the limit is {MAX_FAILURES}" in error.message
        assert not error.retryable
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        # What a take-up streamed before it failed stays in the stream, the failure after it.
        assert ("text_delta" in kinds(events)) == (unreadable == "history")
        record = await client.get_run(run_id)
        assert record.status == run_pb2.RUN_STATUS_FAILED
        assert record.error == error

        stored = [e.type for e in await history(client, run_id)]
        assert stored.count("Failed") == 1
        assert stored[-1] == "Failed"
        assert stored.count("Released") >= MAX_FAILURES - 1  # each failed take-up let it go

        agent = await client.create_agent(
            scripted_agent(turns=[("Still serving.", [])], mode=agent_pb2.EXECUTION_MODE_DURABLE)
        )
        assert (await client.run(agent.id, "hi"))[-1].run_completed.output == "Still serving."

    dead_letters = await read_dead_letters(empty_stack)
    assert [d["run_id"] for d in dead_letters] == [run_id]
    assert dead_letters[0]["error"] == {
        "code": "DISPATCH_FAILED",
        "message": error.message,
        "retryable": False,
    }
    assert dead_letters[0]["deliveries"] == MAX_FAILURES
