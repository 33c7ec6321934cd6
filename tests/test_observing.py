"""The services' Prometheus metrics, scraped after known work."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from cli.launcher import free_port
from tests.client import Client, kinds, scripted_agent, until
from tests.stack import Stack, holder_of

DURABLE = agent_pb2.EXECUTION_MODE_DURABLE
CALCULATE = [("Let me work it out.", [("calculator", '{"expression": "6*7"}')]), ("42.", [])]
EMAIL = [("I will send it.", [("send_email", '{"to": "a@b.c", "subject": "s", "body": "b"}')])]
GUARD = 30.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
    response.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape_until(port: int, settled: Callable[[Samples], bool]) -> Samples:
    """Scrapes until ``settled`` (a session lets its run go once the run's stream is published,
    a moment after the client saw the end; the run list follows the store a moment later)."""
    deadline = asyncio.get_running_loop().time() + GUARD
    while not settled(samples := await scrape(port)):
        assert asyncio.get_running_loop().time() < deadline, "the metrics did not settle"
        await asyncio.sleep(0.05)
    return samples


async def test_metrics_count_the_work_done(empty_stack: Stack) -> None:
    executor_port, gateway_port = free_port(), free_port()
    executor = empty_stack.start_executor(AGENTRUN_METRICS_LISTEN=f"127.0.0.1:{executor_port}")
    gateway = empty_stack.start_gateway(AGENTRUN_METRICS_LISTEN=f"127.0.0.1:{gateway_port}")
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        client = Client(channel)
        classic = await client.create_agent(scripted_agent(turns=CALCULATE))
        durable = await client.create_agent(scripted_agent(turns=CALCULATE, mode=DURABLE))
        failing = scripted_agent(turns=CALCULATE)
        failing.max_model_calls = 1  # it needs 2: the run fails with MAX_MODEL_CALLS
        failing = await client.create_agent(failing)
        approving = await client.create_agent(scripted_agent(turns=EMAIL, mode=DURABLE))
        for _ in range(3):
            assert kinds(await client.run(classic.id, "6*7?"))[-1] == "run_completed"
        for _ in range(2):
            assert kinds(await client.run(durable.id, "6*7?"))[-1] == "run_completed"
        assert kinds(await client.run(failing.id, "6*7?"))[-1] == "run_failed"
        suspended = []
        for _ in range(2):
            waiting = client.stream(approving.id, "email Ada")
            suspended.append((await until(waiting, "tool_approval_required"))[0].run_id)
            waiting.cancel()  # the run stays suspended: disconnecting is not deciding
        run_id, cancelled = suspended
        await client.runs.CancelRun(
            run_service_pb2.CancelRunRequest(run_id=cancelled), metadata=client.metadata
        )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await client.get_run(str(uuid.uuid4()))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await client.get_run(run_id)).status == run_pb2.RUN_STATUS_AWAITING_APPROVAL

    def settled(samples: Samples) -> bool:
        return (
            value(samples, "agentrun_runs_held", mode="classic") == 0
            and value(samples, "agentrun_runs_held", mode="durable") == 0
            and value(samples, "agentrun_durable_runs_awaiting_decision") == 1
        )

    ran = await scrape_until(executor_port, settled)
    started = {
        (classic.id, "classic"): 3,
        (durable.id, "durable"): 2,
        (failing.id, "classic"): 1,
        (approving.id, "durable"): 2,
    }
    for (agent, mode), count in started.items():
        assert value(ran, "agentrun_runs_started_total", mode=mode, agent=agent) == count
    assert value(ran, "agentrun_runs_completed_total", mode="classic", agent=classic.id) == 3
    assert value(ran, "agentrun_runs_completed_total", mode="durable", agent=durable.id) == 2
    failed = value(
        ran, "agentrun_runs_failed_total", mode="classic", agent=failing.id, code="MAX_MODEL_CALLS"
    )
    assert failed == 1
    assert sum(v for (name, _), v in ran.items() if name == "agentrun_runs_failed_total") == 1
    # The cancelled run was suspended: the executor that recorded its cancellation counts it.
    assert value(ran, "agentrun_runs_cancelled_total", mode="durable", agent=approving.id) == 1
    assert sum(v for (name, _), v in ran.items() if name == "agentrun_runs_cancelled_total") == 1
    # Every run's first token; the ends of those that ended.
    assert value(ran, "agentrun_first_token_seconds_count", mode="classic") == 4
    assert value(ran, "agentrun_first_token_seconds_count", mode="durable") == 4
    assert value(ran, "agentrun_run_duration_seconds_count", mode="classic") == 4
    assert value(ran, "agentrun_run_duration_seconds_count", mode="durable") == 3
    # Model calls: 2 per completed run, 1 for the failed one, 1 for each suspended one.
    assert value(ran, "agentrun_model_call_seconds_count", provider="scripted") == 13
    assert value(ran, "agentrun_step_duration_seconds_count", kind="model_call") == 13
    # Tool calls: one per completed run, and one before the failure.
    assert value(ran, "agentrun_tool_call_seconds_count", tool="calculator") == 6
    assert value(ran, "agentrun_step_duration_seconds_count", kind="tool_call") == 6
    tokens_out = value(ran, "agentrun_model_tokens_total", provider="scripted", direction="out")
    assert tokens_out is not None
    assert tokens_out > 0
    # Durable commits: 3 per completed run (a model call, the tool, the final answer and its
    # end in one save), 2 for each suspended run (its model call, its approval request).
    assert value(ran, "agentrun_store_commit_seconds_count") == 10
    assert value(ran, "agentrun_dispatch_pending") == 0
    assert value(ran, "agentrun_dispatch_redelivered") == 0
    assert not [name for name, _ in ran if name == "agentrun_handovers_total"]

    create = "/agentrun.v1.AgentService/CreateAgent"
    get = "/agentrun.v1.RunService/GetRun"
    stream = "/agentrun.v1.RunService/StreamRun"
    cancel = "/agentrun.v1.RunService/CancelRun"
    forwarded: Mapping[tuple[str, str], int] = {
        (create, "OK"): 4,
        (get, "NOT_FOUND"): 1,
        (cancel, "OK"): 1,
    }

    def streams_ended(samples: Samples) -> bool:
        """Every StreamRun has its status (a cancelled call's comes after the client left)."""
        return value(samples, "agentrun_grpc_server_handling_seconds_count", method=stream) == 8

    served = await scrape_until(gateway_port, streams_ended)
    for (method, code), calls in {
        **forwarded,
        (get, "OK"): 1,
        (stream, "OK"): 6,
        (stream, "CANCELLED"): 2,
    }.items():
        handled = value(served, "agentrun_grpc_server_handled_total", method=method, code=code)
        assert handled == calls, (method, code)
    assert value(served, "agentrun_grpc_server_handling_seconds_count", method=create) == 4
    assert value(ran, "agentrun_grpc_server_handling_seconds_count", method=create) == 4
    for (method, code), calls in {**forwarded, (get, "OK"): 1}.items():
        handled = value(ran, "agentrun_grpc_server_handled_total", method=method, code=code)
        assert handled == calls, (method, code)
    # Runs are not the gateway's business.
    assert not [name for name, _ in served if name.startswith("agentrun_runs_")]
    # Every scrape (and registering the cluster gauges, at start) read the cluster's numbers.
    assert "metrics: cannot" not in executor.log()


async def test_a_run_handed_over_is_counted_where_it_resumes(empty_stack: Stack) -> None:
    ports = {name: free_port() for name in ("exec-a", "exec-b")}
    executors = {
        name: empty_stack.start_executor(
            AGENTRUN_EXECUTOR_ID=name, AGENTRUN_METRICS_LISTEN=f"127.0.0.1:{port}"
        )
        for name, port in ports.items()
    }
    gateway = empty_stack.start_gateway()
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        client = Client(channel)
        agent = await client.create_agent(
            scripted_agent(turns=CALCULATE, mode=DURABLE, token_delay_ms=100)
        )
        call = client.stream(agent.id, "6*7?")
        run_id = (await until(call, "text_delta"))[0].run_id
        holder = await holder_of(empty_stack, run_id)
        assert holder in executors
        (other,) = set(executors) - {holder}
        executors[holder].stop()  # it drains: the run is handed back; the other resumes it
        call.cancel()
        assert kinds(await client.watch_all(run_id))[-1] == "run_completed"

    def ended(samples: Samples) -> bool:
        return value(samples, "agentrun_runs_held", mode="durable") == 0

    resumed = await scrape_until(ports[other], ended)
    assert value(resumed, "agentrun_handovers_total", kind="resumed") == 1
    assert value(resumed, "agentrun_runs_completed_total", mode="durable", agent=agent.id) == 1
    # Handed back by the executor that drained, not by this one.
    assert value(resumed, "agentrun_handovers_total", kind="released") is None
