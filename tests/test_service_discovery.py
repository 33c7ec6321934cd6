"""Health checking and server reflection (v1 and v1alpha) on the gateway and the executor, and a
generic gRPC client (``buf curl``) that knows nothing of agentrun but what reflection tells it."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from agentrun.v1 import agent_pb2, run_pb2, run_service_pb2
from common.settings import ConfigurationError, Settings
from tests.client import Client, scripted_agent
from tests.stack import Stack

GUARD = 60.0  # seconds; only bounds a hang
BUF = Path(__file__).resolve().parent.parent / "node_modules" / ".bin" / "buf"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
RUN_SERVICE = "agentrun.v1.RunService"
AGENT_SERVICE = "agentrun.v1.AgentService"
EXECUTOR_SERVICE = "agentrun.internal.v1.ExecutorService"

needs_buf = pytest.mark.skipif(
    not BUF.exists(), reason=f"buf is not installed at {BUF} (npm install in the project root)"
)


async def health_status(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=GUARD)
        status: int = response.status
        return status


async def reflect(
    address: str,
    *requests: reflection_pb2.ServerReflectionRequest,
    service: str = REFLECTION,
) -> list[reflection_pb2.ServerReflectionResponse]:
    """Sends the requests on one ServerReflectionInfo stream of ``service`` (v1alpha or v1:
    their messages are the same on the wire); returns one response each."""
    async with grpc.aio.insecure_channel(address) as channel:
        info: Any = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = info(timeout=GUARD)
        responses: list[reflection_pb2.ServerReflectionResponse] = []
        for request in requests:
            await call.write(request)
            responses.append(await call.read())
        await call.done_writing()
        return responses


async def listed_services(address: str, service: str = REFLECTION) -> list[str]:
    (response,) = await reflect(
        address, reflection_pb2.ServerReflectionRequest(list_services=""), service=service
    )
    return [s.name for s in response.list_services_response.service]


async def file_of_symbol(
    address: str, symbol: str, service: str = REFLECTION
) -> list[descriptor_pb2.FileDescriptorProto]:
    (response,) = await reflect(
        address,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol),
        service=service,
    )
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]


def service_in(
    files: list[descriptor_pb2.FileDescriptorProto], full_name: str
) -> descriptor_pb2.ServiceDescriptorProto:
    package, _, name = full_name.rpartition(".")
    for file in files:
        for service in file.service:
            if file.package == package and service.name == name:
                return service
    raise AssertionError(f"{full_name} is in none of {[f.name for f in files]}")


# --- health -------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", RUN_SERVICE, AGENT_SERVICE])
async def test_the_gateway_is_serving(stack: Stack, service: str) -> None:
    for gateway in stack.gateways:
        status = await health_status(gateway.address, service)
        assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", ["", EXECUTOR_SERVICE])
async def test_the_executor_is_serving(stack: Stack, service: str) -> None:
    status = await health_status(stack.executors[0].address, service)
    assert status == health_pb2.HealthCheckResponse.SERVING


async def test_health_of_an_unknown_service_is_not_found(stack: Stack) -> None:
    for address in (stack.gateways[0].address, stack.executors[0].address):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_status(address, "agentrun.v1.NoSuchService")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_gateway_does_not_claim_the_executors_service(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_status(stack.gateways[0].address, EXECUTOR_SERVICE)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --- reflection ---------------------------------------------------------------------------


async def test_the_gateway_lists_its_services(stack: Stack) -> None:
    services = await listed_services(stack.gateways[0].address)
    assert {RUN_SERVICE, AGENT_SERVICE, HEALTH} <= set(services)
    assert EXECUTOR_SERVICE not in services


async def test_the_executor_lists_its_services(stack: Stack) -> None:
    """Its internal service, and the public ones its gateways forward calls to."""
    services = await listed_services(stack.executors[0].address)
    assert {EXECUTOR_SERVICE, RUN_SERVICE, AGENT_SERVICE, HEALTH} <= set(services)


async def test_reflection_describes_the_run_service_with_its_methods(stack: Stack) -> None:
    files = await file_of_symbol(stack.gateways[0].address, RUN_SERVICE)
    assert files[0].name == "agentrun/v1/run_service.proto"
    service = service_in(files, RUN_SERVICE)
    expected = run_service_pb2.DESCRIPTOR.services_by_name["RunService"]
    assert [m.name for m in service.method] == [m.name for m in expected.methods]
    methods = {m.name: m for m in service.method}
    assert {"StreamRun", "Converse", "StartRun", "WatchRun", "GetRun", "ListRuns"} <= set(methods)
    assert methods["StreamRun"].server_streaming
    assert not methods["StreamRun"].client_streaming
    assert methods["Converse"].client_streaming
    assert methods["Converse"].server_streaming
    assert methods["StartRun"].input_type == ".agentrun.v1.StartRunRequest"
    assert methods["StartRun"].output_type == ".agentrun.v1.StartRunResponse"


async def test_reflection_also_serves_the_files_the_service_depends_on(stack: Stack) -> None:
    files = await file_of_symbol(stack.gateways[0].address, RUN_SERVICE)
    names = {f.name for f in files}
    # Every import comes along, bar well-known types a client may have built in.
    missing = set(files[0].dependency) - names
    assert all(d.startswith("google/protobuf/") for d in missing), missing
    assert {"agentrun/v1/run.proto", "agentrun/v1/agent.proto"} <= names
    run_file = next(f for f in files if f.name == "agentrun/v1/run.proto")
    assert run_pb2.RunEvent.DESCRIPTOR.name in {m.name for m in run_file.message_type}
    agent_file = next(f for f in files if f.name == "agentrun/v1/agent.proto")
    assert agent_pb2.Agent.DESCRIPTOR.name in {m.name for m in agent_file.message_type}


async def test_reflection_describes_the_executor_service(stack: Stack) -> None:
    files = await file_of_symbol(stack.executors[0].address, EXECUTOR_SERVICE)
    service = service_in(files, EXECUTOR_SERVICE)
    assert [m.name for m in service.method] == ["ExecuteRun"]


@pytest.mark.parametrize("side", ["gateway", "executor"])
async def test_reflection_v1_lists_the_same_services_as_v1alpha(stack: Stack, side: str) -> None:
    address = stack.gateways[0].address if side == "gateway" else stack.executors[0].address
    v1 = await listed_services(address, service=REFLECTION_V1)
    assert set(v1) == set(await listed_services(address))
    assert {REFLECTION_V1, REFLECTION, HEALTH} <= set(v1)
    assert (RUN_SERVICE if side == "gateway" else EXECUTOR_SERVICE) in v1


async def test_reflection_v1_describes_the_run_service(stack: Stack) -> None:
    files = await file_of_symbol(stack.gateways[0].address, RUN_SERVICE, service=REFLECTION_V1)
    assert files[0].name == "agentrun/v1/run_service.proto"
    service = service_in(files, RUN_SERVICE)
    expected = run_service_pb2.DESCRIPTOR.services_by_name["RunService"]
    assert [m.name for m in service.method] == [m.name for m in expected.methods]


async def test_reflection_v1_describes_itself(stack: Stack) -> None:
    # A listed service must be describable: generic clients describe every service they list.
    files = await file_of_symbol(stack.gateways[0].address, REFLECTION_V1, service=REFLECTION_V1)
    (method,) = service_in(files, REFLECTION_V1).method
    assert method.name == "ServerReflectionInfo"
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert method.output_type == ".grpc.reflection.v1.ServerReflectionResponse"
    assert method.client_streaming
    assert method.server_streaming


async def test_reflection_of_an_unknown_symbol_is_not_found(stack: Stack) -> None:
    (response,) = await reflect(
        stack.gateways[0].address,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="agentrun.v1.Nothing"),
    )
    assert response.WhichOneof("message_response") == "error_response"
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


# --- buf curl -----------------------------------------------------------------------------


async def buf_curl(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args]
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=GUARD
    )


@needs_buf
async def test_buf_curl_lists_the_gateways_methods_through_reflection(stack: Stack) -> None:
    result = await buf_curl("--list-methods", f"http://{stack.gateways[0].address}")
    assert result.returncode == 0, result.stderr
    methods = result.stdout.split()
    assert f"{RUN_SERVICE}/StreamRun" in methods
    assert f"{RUN_SERVICE}/StartRun" in methods
    assert f"{AGENT_SERVICE}/CreateAgent" in methods


@needs_buf
@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
async def test_buf_curl_lists_the_gateways_services_with_either_reflection_protocol(
    stack: Stack, protocol: str
) -> None:
    result = await buf_curl(
        "--reflect-protocol", protocol, "--list-services", f"http://{stack.gateways[0].address}"
    )
    assert result.returncode == 0, result.stderr
    assert {RUN_SERVICE, AGENT_SERVICE, HEALTH} <= set(result.stdout.split())


@needs_buf
async def test_buf_curl_starts_a_run_from_json(
    stack: Stack, channels: list[grpc.aio.Channel]
) -> None:
    client = Client(channels[0])
    agent = await client.create_agent(scripted_agent(turns=[("Hi there.", [])]))
    result = await buf_curl(
        "-d",
        json.dumps({"agent_id": agent.id, "input": "hi"}),
        f"http://{stack.gateways[0].address}/{RUN_SERVICE}/StartRun",
    )
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    run_id = response["run"]["id"]
    assert run_id
    assert response["run"]["agentId"] == agent.id
    assert response["run"]["input"] == "hi"
    finished = await client.watch_all(run_id)
    assert finished[-1].run_completed.output == "Hi there."


@needs_buf
async def test_buf_curl_reports_an_error_status(stack: Stack) -> None:
    result = await buf_curl(
        "-d",
        json.dumps({"agent_id": "no-such-agent", "input": "hi"}),
        f"http://{stack.gateways[0].address}/{RUN_SERVICE}/StartRun",
    )
    assert result.returncode != 0
    assert "not_found" in result.stderr.lower(), result.stderr


async def reflection_status(address: str, service: str) -> grpc.StatusCode:
    """How a call of ``service`` ends. It sends no request: a server that does not serve the
    method ends the call at once, and a request still on its way then fails on the client's
    side (INTERNAL) instead."""
    async with grpc.aio.insecure_channel(address) as channel:
        info: Any = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = info(iter(()), timeout=GUARD)
        code: grpc.StatusCode = await call.code()
        return code


async def test_reflection_can_be_turned_off_and_health_still_answers(stack: Stack) -> None:
    """AGENTRUN_REFLECTION=off on a gateway and an executor of the shared stack's store: neither
    answers reflection, under either name; both answer health checks. The default is on."""
    assert RUN_SERVICE in await listed_services(stack.gateways[0].address)
    executor = stack.start_executor(AGENTRUN_REFLECTION="off")
    gateway = stack.start_gateway(executor_target=executor.address, AGENTRUN_REFLECTION="off")
    try:
        for address in (gateway.address, executor.address):
            for service in (REFLECTION, REFLECTION_V1):
                assert await reflection_status(address, service) == grpc.StatusCode.UNIMPLEMENTED
            assert await health_status(address, "") == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            client = Client(channel)
            agent = await client.create_agent(scripted_agent(turns=[("no reflection", [])]))
            events = await client.run(agent.id, "hi")
            assert events[-1].run_completed.output == "no reflection"
    finally:
        gateway.stop()
        stack.gateways.remove(gateway)
        executor.stop()
        stack.executors.remove(executor)


def test_reflection_setting_is_on_or_off() -> None:
    assert Settings.from_env({}).reflection
    assert not Settings.from_env({"AGENTRUN_REFLECTION": "off"}).reflection
    assert Settings.from_env({"AGENTRUN_REFLECTION": "on"}).reflection
    with pytest.raises(ConfigurationError, match="on or off"):
        Settings.from_env({"AGENTRUN_REFLECTION": "maybe"})
