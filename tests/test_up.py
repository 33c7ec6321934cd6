"""``agentrun up`` as a real subprocess: nats-server, an executor and a gateway on one machine.

The test waits for the banner on up's stdout (no sleeps), talks to the gateway with a grpc.aio
client, then stops up with SIGTERM and checks that it takes its children with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from agentrun.v1 import (
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
)
from cli.launcher import READY_PREFIX, Service, _start, free_port
from tests.client import rest, text_of

GUARD = 120.0  # seconds; only bounds a hang so that a broken `up` fails instead of stalling CI
UP_LINE = "agentrun is up"
LAST_BANNER_LINE = "Ctrl-C stops everything."
_ADDRESSES = re.compile(r"gateway (\S+), executor (\S+), NATS (\S+), data in")


def up_env() -> dict[str, str]:
    """The test's environment without AGENTRUN_* settings: `up` must work from its flags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def child_pids(pid: int) -> list[int]:
    """The live children of process ``pid`` (Linux: /proc/<pid>/task/<tid>/children)."""
    children: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                children += [int(c) for c in (task / "children").read_text().split()]
    return children


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Up:
    process: asyncio.subprocess.Process
    gateway: str
    banner: list[str] = field(default_factory=list)
    children: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.banner)

    def addresses(self) -> tuple[str, str, str]:
        """(gateway, executor, NATS) as the banner names them."""
        found = _ADDRESSES.search(self.text)
        assert found is not None, self.text
        gateway, executor, nats = found.groups()
        return gateway, executor, nats

    async def stop(self) -> tuple[int, str]:
        """SIGTERM; returns the exit code and what it wrote to stderr."""
        self.process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(self.process.communicate(), GUARD)
        assert self.process.returncode is not None
        return self.process.returncode, err.decode(errors="replace")


@pytest.fixture
async def ups() -> AsyncIterator[list[Up]]:
    """The `up` processes a test starts; any still running at the end are stopped."""
    started: list[Up] = []
    yield started
    for up in started:
        children = child_pids(up.process.pid) or up.children
        if up.process.returncode is None:
            up.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(up.process.communicate(), GUARD)
            except TimeoutError:
                up.process.kill()
                await up.process.wait()
        for pid in children:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


async def start_up(ups: list[Up], data_dir: Path, **env: str) -> Up:
    """Starts `agentrun up` (``env``: settings besides its flags) and reads its stdout up to
    the end of its banner."""
    gateway = f"127.0.0.1:{free_port()}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "up",
        "--data-dir",
        str(data_dir),
        "--gateway-listen",
        gateway,
        "--console-listen",
        "127.0.0.1:0",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**up_env(), **env},
    )
    up = Up(process, gateway)
    ups.append(up)
    assert process.stdout is not None
    while True:
        line = (await asyncio.wait_for(process.stdout.readline(), GUARD)).decode()
        if not line:
            _, err = await asyncio.wait_for(process.communicate(), GUARD)
            raise AssertionError(
                f"`up` ended (exit {process.returncode}) before its banner:\n{up.text}\n"
                f"{err.decode(errors='replace')}"
            )
        if up.banner or UP_LINE in line:
            up.banner.append(line)
        if LAST_BANNER_LINE in line:
            break
    up.children = child_pids(process.pid)
    return up


async def refuses_connections(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except ConnectionRefusedError:
        return True
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return False


async def get_agent(channel: grpc.aio.Channel, agent_id: str) -> agent_pb2.Agent:
    stub = agent_service_pb2_grpc.AgentServiceStub(channel)
    response = await stub.GetAgent(agent_service_pb2.GetAgentRequest(agent_id=agent_id))
    agent: agent_pb2.Agent = response.agent
    return agent


async def test_up_serves_the_demo_agents_and_stops_with_its_children_on_sigterm(
    ups: list[Up], tmp_path: Path
) -> None:
    up = await start_up(ups, tmp_path / "data")
    assert up.banner[0].startswith(f"agentrun is up: gateway {up.gateway}, "), up.text
    assert "demo agents: demo-classic, demo-durable (created)" in up.text
    gateway, executor, nats = up.addresses()
    assert gateway == up.gateway
    commands = sorted(command_line(pid) for pid in up.children)
    assert len(commands) == 4, commands
    assert any("nats-server" in c for c in commands), commands
    assert any("cli.serve executor" in c for c in commands), commands
    assert any("cli.serve gateway" in c for c in commands), commands
    assert any("cli.serve console" in c for c in commands), commands
    console = re.search(r"console: (http://\S+)", up.text)
    assert console is not None, up.text
    async with httpx.AsyncClient(base_url=console.group(1), timeout=GUARD) as http:
        login = await http.get("/login")
        assert login.status_code == 200
        assert "Sign in" in login.text

    async with grpc.aio.insecure_channel(up.gateway) as channel:
        classic = await get_agent(channel, "demo-classic")
        durable = await get_agent(channel, "demo-durable")
        assert classic.execution_mode == agent_pb2.EXECUTION_MODE_CLASSIC
        assert durable.execution_mode == agent_pb2.EXECUTION_MODE_DURABLE
        for agent in (classic, durable):
            assert agent.model.provider == "scripted"
            assert {t.name: t.requires_approval for t in agent.tools} == {
                "clock": False,
                "calculator": False,
                "send_email": True,
            }
        runs = run_service_pb2_grpc.RunServiceStub(channel)
        events: list[run_pb2.RunEvent] = await rest(
            runs.StreamRun(
                run_service_pb2.StreamRunRequest(agent_id="demo-classic", input="count to 3")
            )
        )
        assert events[-1].HasField("run_completed"), events[-1]
        assert events[-1].run_completed.output == "1 2 3"
        assert text_of(events) == "1 2 3"
        run = events[0].run_started.run
        assert run.execution_mode == agent_pb2.EXECUTION_MODE_CLASSIC

    # The executor, on loopback, still admits only its gateway (a token of up's making).
    async with grpc.aio.insecure_channel(executor) as stranger:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await run_service_pb2_grpc.RunServiceStub(stranger).ListRuns(
                run_service_pb2.ListRunsRequest(), metadata=(("agentrun-tenant", "local"),)
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value

    code, err = await up.stop()
    assert code == 0, err
    for address in (gateway, executor, nats, console.group(1).removeprefix("http://")):
        assert await refuses_connections(address), address
    assert not [pid for pid in up.children if alive(pid)], [command_line(p) for p in up.children]
    logs = tmp_path / "data" / "logs"
    assert {p.name for p in logs.iterdir()} >= {"nats.log", "executor.log", "gateway.log"}


async def test_up_with_api_keys_seeds_the_demo_agents_with_the_clis_key(
    ups: list[Up], tmp_path: Path
) -> None:
    up = await start_up(
        ups, tmp_path / "data", AGENTRUN_API_KEYS="team:k-team", AGENTRUN_API_KEY="k-team"
    )
    assert "demo agents: demo-classic, demo-durable (created)" in up.text
    async with grpc.aio.insecure_channel(up.gateway) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        got = await stub.GetAgent(
            agent_service_pb2.GetAgentRequest(agent_id="demo-classic"),
            metadata=(("authorization", "Bearer k-team"),),
        )
        assert got.agent.id == "demo-classic"
    code, err = await up.stop()
    assert code == 0, err


async def test_up_with_api_keys_and_no_key_for_itself_says_why_it_seeds_nothing(
    ups: list[Up], tmp_path: Path
) -> None:
    up = await start_up(ups, tmp_path / "data", AGENTRUN_API_KEYS="team:k-team")
    assert "demo agents: not created" in up.text, up.text
    assert "AGENTRUN_API_KEY" in up.text, up.text
    code, err = await up.stop()
    assert code == 0, err


async def test_a_second_up_on_the_same_data_dir_finds_the_agents_and_the_runs(
    ups: list[Up], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = await start_up(ups, data_dir)
    assert "(created)" in first.text
    async with grpc.aio.insecure_channel(first.gateway) as channel:
        runs = run_service_pb2_grpc.RunServiceStub(channel)
        events = await rest(
            runs.StreamRun(
                run_service_pb2.StreamRunRequest(agent_id="demo-classic", input="count to 2")
            )
        )
        run_id = events[0].run_id
    code, err = await first.stop()
    assert code == 0, err

    second = await start_up(ups, data_dir)
    assert "demo agents: demo-classic, demo-durable\n" in second.text, second.text
    assert "(created)" not in second.text
    async with grpc.aio.insecure_channel(second.gateway) as channel:
        durable = await get_agent(channel, "demo-durable")
        assert durable.execution_mode == agent_pb2.EXECUTION_MODE_DURABLE
        assert durable.version == 1  # found, not created again
        runs = run_service_pb2_grpc.RunServiceStub(channel)
        response = await runs.GetRun(run_service_pb2.GetRunRequest(run_id=run_id))
        assert response.run.status == run_pb2.RUN_STATUS_COMPLETED
        assert response.run.output == "1 2"
        watched = await rest(runs.WatchRun(run_service_pb2.WatchRunRequest(run_id=run_id)))
        assert watched[-1].run_completed.output == "1 2"
    code, err = await second.stop()
    assert code == 0, err


async def test_up_stops_everything_and_exits_1_when_a_child_dies(
    ups: list[Up], tmp_path: Path
) -> None:
    up = await start_up(ups, tmp_path / "data")
    gateway_pid = next(p for p in up.children if "serve gateway" in command_line(p))
    os.kill(gateway_pid, signal.SIGKILL)
    _, err = await asyncio.wait_for(up.process.communicate(), GUARD)
    assert up.process.returncode == 1, err
    assert "stopped: gateway exited" in err.decode()
    _, executor, nats = up.addresses()
    for address in (executor, nats):
        assert await refuses_connections(address), address
    assert not [pid for pid in up.children if alive(pid)], [command_line(p) for p in up.children]


async def test_up_stops_with_its_children_on_ctrl_c(ups: list[Up], tmp_path: Path) -> None:
    up = await start_up(ups, tmp_path / "data")
    gateway, executor, nats = up.addresses()
    up.process.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(up.process.communicate(), GUARD)
    assert up.process.returncode == 0, err
    for address in (gateway, executor, nats):
        assert await refuses_connections(address), address
    assert not [pid for pid in up.children if alive(pid)], [command_line(p) for p in up.children]


async def test_up_with_its_gateway_port_taken_fails_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    nats_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        gateway = f"127.0.0.1:{taken.getsockname()[1]}"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli.main",
            "up",
            "--data-dir",
            str(data_dir),
            "--gateway-listen",
            gateway,
            "--nats-port",
            str(nats_port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=up_env(),
        )
        out, err = await asyncio.wait_for(process.communicate(), GUARD)
    assert process.returncode == 1, err.decode(errors="replace")
    assert UP_LINE not in out.decode()
    assert f"Failed to bind to address {gateway}" in (data_dir / "logs" / "gateway.log").read_text()
    executor_port = ready_port(data_dir / "logs" / "executor.log")
    for address in (f"127.0.0.1:{nats_port}", f"127.0.0.1:{executor_port}"):
        assert await refuses_connections(address), address


def ready_port(log: Path) -> int:
    found = re.search(rf"^{READY_PREFIX} (\d+)$", log.read_text(), re.MULTILINE)
    assert found is not None, log.read_text()
    return int(found.group(1))


def test_a_service_whose_output_ends_without_the_ready_line_is_not_started(
    tmp_path: Path,
) -> None:
    # Deterministic stand-in for the race: the output ends a while before the process does.
    argv = [
        sys.executable,
        "-c",
        "import os, time; print('cannot listen', flush=True); os.close(1); os.close(2); "
        "time.sleep(5)",
    ]
    started: list[Service] = []
    try:
        with pytest.raises(RuntimeError, match="service did not start") as caught:
            started.append(_start("service", argv, os.environ, tmp_path, READY_PREFIX))
    finally:
        for service in started:
            service.kill()
    assert "cannot listen" in str(caught.value)


async def exited(pid: int) -> None:
    """Returns once process ``pid`` (not a child of ours) has exited: its pidfd turns readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_services_stop_when_up_is_killed(ups: list[Up], tmp_path: Path) -> None:
    up = await start_up(ups, tmp_path / "data")
    services = [p for p in up.children if "cli.serve" in command_line(p)]
    others = [p for p in up.children if p not in services]
    assert len(services) == 3, [command_line(p) for p in up.children]
    os.kill(up.process.pid, signal.SIGKILL)
    await up.process.wait()

    try:
        await asyncio.wait_for(asyncio.gather(*(exited(pid) for pid in services)), GUARD)
    finally:
        for pid in services + others:  # nats-server has no such watch: it goes here
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
