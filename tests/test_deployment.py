"""The deployment files against the code they deploy, and ``agentrun health`` against real servers.

- docker-compose.yml: every service built from our Dockerfile runs a subcommand that the
  ``agentrun`` command line has (its real argparse parser, taken from ``cli.main``), its
  health check is ``agentrun health`` on the port it listens on, every AGENTRUN_* variable it sets
  is one that ``Settings.from_env`` reads (found by calling it with a mapping that records what is
  asked of it) and parses, and the addresses in those settings name services of the file.
- deploy/nats: the compose file's three NATS members, started from the same config file and
  command line (ports moved to free local ones), form one JetStream cluster.
- Dockerfile: its ENTRYPOINT is ``agentrun``, it copies what pyproject.toml packages, and
  .dockerignore leaves that in the build context.
- ``agentrun health`` as a real subprocess: exit 0 against the stack's gateways and executor,
  1 against a closed port, an unknown service, a NOT_SERVING server and one that never answers.

Docker itself is not needed: nothing here builds an image or runs a container.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import httpx
import nats
import nats.js.errors
import pytest
import yaml
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nats.js import JetStreamContext
from nats.js.api import StreamInfo

from cli import main as cli_main
from cli.launcher import NATS_READY, Service, _start, free_port, nats_server_path
from common.settings import Settings
from eventstore.persistence import StoreConfig
from gateway.executors import channel_target
from tests.client import Client, scripted_agent
from tests.stack import Stack

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
GUARD = 60.0  # seconds; only bounds a hang so that it fails instead of stalling CI
SETTINGS_PREFIX = "AGENTRUN_"


# --- docker-compose.yml ---------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(compose, dict), "docker-compose.yml is not a mapping"
    assert isinstance(compose.get("services"), dict), "docker-compose.yml has no services"
    return compose


_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: str, env: Mapping[str, str] | None = None) -> str:
    """A value as compose sees it with ``env`` (none by default: every variable must have a
    default, so that the file works with no .env)."""
    env = env or {}

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg")
        if op in (":-", "-") and (name not in env or (op == ":-" and not env[name])):
            return arg
        assert name in env, f"${{{name}}} in docker-compose.yml has no default ({value!r})"
        return env[name]

    return _VARIABLE.sub(replace, value)


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = load_compose()["services"]
    return found


def runs_our_image(service: Mapping[str, Any]) -> bool:
    """Built from this repository's Dockerfile."""
    build = service.get("build")
    if build is None:
        return False
    context, dockerfile = (
        (build, "Dockerfile")
        if isinstance(build, str)
        else (
            build.get("context", "."),
            build.get("dockerfile", "Dockerfile"),
        )
    )
    return (ROOT / context).resolve() == ROOT and (ROOT / context / dockerfile) == DOCKERFILE


def our_services() -> dict[str, dict[str, Any]]:
    ours = {name: s for name, s in services().items() if runs_our_image(s)}
    assert ours, "no service of docker-compose.yml is built from the Dockerfile"
    return ours


JOBS = ("certs",)  # subcommands that run once and exit, rather than serve


def our_servers() -> dict[str, dict[str, Any]]:
    """Our services that serve (executors and gateways), not one-shot jobs."""
    return {n: s for n, s in our_services().items() if command(s)[0] not in JOBS}


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment, interpolated (list or mapping form)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.partition("=")[::2] for item in raw)
    return {str(k): interpolate(str(v)) for k, v in raw.items()}


def command(service: Mapping[str, Any]) -> list[str]:
    raw = service.get("command")
    assert raw is not None, "a service of our image needs a command (the image's is --help)"
    return shlex.split(raw) if isinstance(raw, str) else [str(part) for part in raw]


def healthcheck_argv(service: Mapping[str, Any]) -> list[str]:
    test = service.get("healthcheck", {}).get("test")
    assert test, "no health check"
    if isinstance(test, str):
        return shlex.split(test)
    kind, *rest = (str(part) for part in test)
    if kind == "CMD-SHELL":
        return shlex.split(" ".join(rest))
    assert kind == "CMD", f"unexpected health check form {kind!r}"
    return rest


def service_settings(service: Mapping[str, Any]) -> Settings:
    return Settings.from_env(environment(service))


def listen_port(address: str) -> int:
    return int(address.rpartition(":")[2])


def listen_host(address: str) -> str:
    return address.rpartition(":")[0].strip("[]")


def network_names(name: str, service: Mapping[str, Any]) -> set[str]:
    """The names a service is reachable by: its own and its network aliases."""
    names = {name}
    networks = service.get("networks") or {}
    if isinstance(networks, dict):
        for network in networks.values():
            names.update((network or {}).get("aliases") or [])
    return names


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("parser captured")
        self.parser = parser


@pytest.fixture(scope="module")
def cli_parser() -> argparse.ArgumentParser:
    """The real parser of ``agentrun``: main() builds it; parse_args hands it over instead."""

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Captured(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(_Captured) as captured:
            cli_main.main([])
    return captured.value.parser


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("the agentrun parser has no subcommands")


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`agentrun {shlex.join(argv)}` does not parse") from exc


class _RecordingEnv(Mapping[str, str]):
    """An empty environment that records every variable asked of it."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def variables_settings_read() -> set[str]:
    env = _RecordingEnv()
    Settings.from_env(env)
    read = {name for name in env.asked if name.startswith(SETTINGS_PREFIX)}
    assert "AGENTRUN_DATABASE_URL" in read, f"recording Settings.from_env failed: {read}"
    return read


def test_the_cli_parser_is_the_real_one(cli_parser: argparse.ArgumentParser) -> None:
    assert cli_parser.prog == "agentrun"
    assert {"executor", "gateway", "health"} <= subcommands(cli_parser)
    with pytest.raises(AssertionError, match="does not parse"):
        parse(cli_parser, ["no-such-subcommand"])


def test_our_services_run_subcommands_of_the_cli(cli_parser: argparse.ArgumentParser) -> None:
    known = subcommands(cli_parser)
    ran: list[str] = []
    for name, service in our_services().items():
        argv = command(service)
        assert argv, f"{name}: no command"
        assert argv[0] in known, f"{name}: `agentrun {shlex.join(argv)}`: not in {known}"
        ran.append(parse(cli_parser, argv).command)
    assert ran.count("executor") >= 2, f"scaled out means two executors or more: {ran}"
    assert ran.count("gateway") >= 2, f"scaled out means two gateways or more: {ran}"


def test_health_checks_of_our_services_ask_their_own_port(
    cli_parser: argparse.ArgumentParser,
) -> None:
    for name, service in our_servers().items():
        argv = healthcheck_argv(service)
        assert argv[0] == "agentrun", f"{name}: the health check runs {argv[0]!r}"
        args = parse(cli_parser, argv[1:])
        assert args.command == "health", f"{name}: the health check runs `{shlex.join(argv)}`"
        settings = service_settings(service)
        role = parse(cli_parser, command(service)).command
        listen = settings.executor_listen if role == "executor" else settings.gateway_listen
        assert listen_port(args.target) == listen_port(listen), (
            f"{name}: the health check asks {args.target}, the {role} listens on {listen}"
        )


def test_every_agentrun_variable_is_a_setting_and_parses() -> None:
    known = variables_settings_read()
    for name, service in services().items():
        env = environment(service)
        unknown = {k for k in env if k.startswith(SETTINGS_PREFIX)} - known
        assert not unknown, f"{name}: common/settings.py reads no {sorted(unknown)}"
        if runs_our_image(service):
            Settings.from_env(env)  # raises on a value it cannot parse


def test_settings_point_at_services_of_the_file(cli_parser: argparse.ArgumentParser) -> None:
    all_services = services()
    nats_members = {
        n for n, s in all_services.items() if str(s.get("image", "")).startswith("nats")
    }
    assert len(nats_members) >= 3, f"a JetStream cluster needs three members: {nats_members}"
    executors: dict[str, Settings] = {}
    gateways: dict[str, Settings] = {}
    for name, service in our_servers().items():
        role = parse(cli_parser, command(service)).command
        settings = service_settings(service)
        (executors if role == "executor" else gateways)[name] = settings
        if role == "executor":  # gateways reach only the executors
            nats_hosts = {urlsplit(url).hostname for url in settings.nats_urls}
            assert nats_hosts == nats_members, f"{name}: NATS at {settings.nats_urls}"
        listen = settings.executor_listen if role == "executor" else settings.gateway_listen
        assert listen_host(listen) in ("0.0.0.0", "::"), f"{name}: {listen} is unreachable"

    ids = [s.executor_id for s in executors.values()]
    assert len(set(ids)) == len(ids), f"executors share an id: {ids}"
    for name, settings in executors.items():
        store = StoreConfig.from_url(settings.database_url)
        assert store.postgres is not None, f"{name}: {settings.database_url} is not PostgreSQL"
        assert store.postgres.host in all_services, f"{name}: no service {store.postgres.host}"
        db_env = environment(all_services[store.postgres.host])
        assert store.postgres.user == db_env.get("POSTGRES_USER", "postgres")
        assert store.postgres.password == db_env["POSTGRES_PASSWORD"]
        assert store.postgres.dbname == db_env.get("POSTGRES_DB", store.postgres.user)

    executor_names = {n: network_names(n, all_services[n]) for n in executors}
    executor_ports = {listen_port(s.executor_listen) for s in executors.values()}
    for name, settings in gateways.items():
        target = channel_target(settings.executor_target)
        if target.startswith(("ipv4:", "ipv6:")):
            for address in target.partition(":")[2].split(","):
                host = address.rpartition(":")[0].strip("[]")
                ipaddress.ip_address(host)  # a list takes IP addresses only, no host names
            continue
        match = re.fullmatch(r"dns:///(?P<host>[^:/]+):(?P<port>\d+)", target)
        assert match, f"{name}: executor target {target!r}"
        reached = [n for n, names in executor_names.items() if match["host"] in names]
        assert sorted(reached) == sorted(executors), f"{name}: {target} reaches {reached}"
        assert executor_ports == {int(match["port"])}, f"{name}: {target} vs {executor_ports}"
        for published in all_services[name].get("ports", []):
            container_port = int(str(published).rpartition(":")[2].partition("/")[0])
            assert container_port == listen_port(settings.gateway_listen), f"{name}: {published}"


def test_no_literal_database_password() -> None:
    for name, service in services().items():
        raw = service.get("environment") or {}
        if isinstance(raw, dict) and "POSTGRES_PASSWORD" in raw:
            assert str(raw["POSTGRES_PASSWORD"]).startswith("${POSTGRES_PASSWORD"), name
        for key, value in raw.items() if isinstance(raw, dict) else ():
            if str(key) == "AGENTRUN_DATABASE_URL":
                password = urlsplit(str(value)).password or ""
                assert password.startswith("${POSTGRES_PASSWORD"), f"{name}: {key}"


def test_depends_on_names_services_with_health_checks() -> None:
    all_services = services()
    for name, service in all_services.items():
        depends_on = service.get("depends_on") or {}
        conditions = (
            dict.fromkeys(depends_on, "service_started")
            if isinstance(depends_on, list)
            else {k: (v or {}).get("condition", "service_started") for k, v in depends_on.items()}
        )
        for other, condition in conditions.items():
            assert other in all_services, f"{name} depends on {other}, which is no service"
            assert other != name, f"{name} depends on itself"
            if condition == "service_healthy":
                assert all_services[other].get("healthcheck"), f"{other} has no health check"


def test_interpolation_follows_compose() -> None:
    assert interpolate("a${X:-b}c") == "abc"
    assert interpolate("${X:-b}", {"X": ""}) == "b"
    assert interpolate("${X-b}", {"X": ""}) == ""
    assert interpolate("${X:-b}$$", {"X": "y"}) == "y$"
    with pytest.raises(AssertionError, match="no default"):
        interpolate("${X}")


# --- deploy/nats ----------------------------------------------------------------------------


def _option(argv: list[str], *names: str) -> str:
    for i, part in enumerate(argv):
        if part in names:
            return argv[i + 1]
    raise AssertionError(f"none of {names} in {argv}")


def _replace_option(argv: list[str], names: tuple[str, ...], value: str) -> list[str]:
    out = list(argv)
    for i, part in enumerate(out):
        if part in names:
            out[i + 1] = value
            return out
    raise AssertionError(f"none of {names} in {argv}")


def _bind_source(service: Mapping[str, Any], target: str) -> Path:
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        if rest.partition(":")[0] == target and source.startswith("."):
            return (ROOT / source).resolve()
    raise AssertionError(f"nothing of the repository is mounted at {target}")


PEER_OFFLINE = 10005  # JetStream's "no suitable peers for placement, peer offline"
PLACEMENT_RETRY = 0.05  # seconds between asking again; the wait itself is bounded by GUARD


async def add_replicated_stream(js: JetStreamContext, stream: str) -> StreamInfo:
    """A stream of three replicas. A new cluster's leader learns that its peers are online a
    moment after it is elected, and no log line tells when: until then placement fails with
    PEER_OFFLINE, so the stream is asked for again (and any other error fails the test)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GUARD
    while True:
        try:
            return await js.add_stream(name=stream, subjects=[f"{stream}.>"], num_replicas=3)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != PEER_OFFLINE or loop.time() > deadline:
                raise
        await asyncio.sleep(PLACEMENT_RETRY)


async def test_the_nats_members_form_one_jetstream_cluster(tmp_path: Path) -> None:
    """Each member starts as compose starts it (its command, the mounted config file), moved to
    free local ports; they elect a metadata leader, hold a stream of three replicas and answer
    the compose health check's URL."""
    members = {n: s for n, s in services().items() if str(s.get("image", "")).startswith("nats")}
    assert len(members) == 3, f"three NATS members: {sorted(members)}"
    config_text = ""
    ports = {name: (free_port(), free_port(), free_port()) for name in members}
    routes = ",".join(f"nats://127.0.0.1:{cluster}" for _, _, cluster in ports.values())
    started: list[Service] = []
    try:
        for name, service in members.items():
            argv = command(service)
            config = _bind_source(service, _option(argv, "--config", "-c"))
            config_text = config.read_text()
            assert _option(argv, "--server_name", "-n") == name, "named after its service"
            assert "-js" in argv or "--jetstream" in argv, f"{name}: JetStream is off"
            store = _option(argv, "-sd", "--store_dir")
            assert any(str(v).endswith(f":{store}") for v in service.get("volumes", [])), (
                f"{name}: its JetStream store {store} is on no volume"
            )
            argv = _replace_option(argv, ("--config", "-c"), str(config))
            argv = _replace_option(argv, ("-sd", "--store_dir"), str(tmp_path / name))
            client, monitor, cluster = ports[name]
            argv += ["-a", "127.0.0.1", "-p", str(client), "-m", str(monitor)]
            argv += ["--cluster", f"nats://127.0.0.1:{cluster}", "--routes", routes]
            started.append(
                _start(name, [nats_server_path(), *argv], os.environ, tmp_path / "logs", NATS_READY)
            )
        routed = set(re.findall(r"nats-route://([\w.-]+):6222", config_text))
        assert routed == set(members), f"the config routes to {routed}, not to every member"

        for member in started:
            # "Self is new JetStream cluster metadata leader" / "... new metadata leader: x"
            await asyncio.to_thread(member.wait_for_output, "metadata leader", timeout=GUARD)

        urls = {name: f"nats://127.0.0.1:{client}" for name, (client, _, _) in ports.items()}
        nc = await nats.connect(servers=list(urls.values()), connect_timeout=5)
        try:
            stream = f"deploy_{uuid.uuid4().hex[:8]}"
            info = await add_replicated_stream(nc.jetstream(timeout=GUARD), stream)
        finally:
            await nc.close()
        assert info.cluster is not None
        assert info.cluster.name == "agentrun"
        assert info.cluster.leader in members, info.cluster
        assert len(info.cluster.replicas or []) == 2, info.cluster
        # Written through the stream's leader, which holds the stream's subscription from the
        # moment it answers the creation (interest reaches the other members a little later);
        # the acknowledgement comes once a majority of the three has stored the message.
        leader = await nats.connect(servers=[urls[info.cluster.leader]], connect_timeout=5)
        try:
            ack = await leader.jetstream(timeout=GUARD).publish(f"{stream}.one", b"x")
            assert ack.seq == 1
        finally:
            await leader.close()

        health_url = next(
            part for part in healthcheck_argv(next(iter(members.values()))) if "://" in part
        )
        parts = urlsplit(health_url)
        async with httpx.AsyncClient(timeout=GUARD) as http:
            for _, monitor, _ in ports.values():
                url = urlunsplit(parts._replace(netloc=f"127.0.0.1:{monitor}"))
                response = await http.get(url)
                assert response.status_code == 200, response.text
    finally:
        for member in started:
            member.stop()


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def test_the_image_runs_agentrun_as_a_user() -> None:
    stage = final_stage()
    assert stage[0][1].split()[0] == "python:3.11-slim"
    entrypoints = [json.loads(args) for keyword, args in stage if keyword == "ENTRYPOINT"]
    assert entrypoints, "the image has no ENTRYPOINT"
    assert entrypoints[-1] == ["agentrun"], entrypoints
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] not in ("root", "0"), users


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's patterns leave ``path`` out: a pattern matches the path or a
    folder above it (``**/`` at any depth); the last matching pattern wins (``!`` keeps)."""
    parts = path.strip("/").split("/")
    spans = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    anywhere = {
        "/".join(parts[start:end]) for end in range(1, len(parts) + 1) for start in range(end)
    }
    result = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch(span, pattern[3:]) for span in anywhere)
        else:
            hit = any(fnmatch(span, pattern) for span in spans)
        if hit:
            result = not negated
    return result


def test_the_image_gets_what_pyproject_packages() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes: list[str] = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").exists() and any(fnmatch(p.name, i) for i in includes)
    }
    assert packages, includes
    needed = {"pyproject.toml", pyproject["project"]["readme"], *packages}
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: set[str] = set()
    for keyword, arguments in dockerfile_instructions():
        if keyword != "COPY" or "--from" in arguments:
            continue
        sources = arguments.split()[:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert not ignored(source, patterns), f"COPY {source}: .dockerignore leaves it out"
            copied.add(source.strip("./"))
    assert needed <= copied, f"the image lacks {sorted(needed - copied)}"
    for heavy in (".venv", "node_modules", ".agentrun", ".git", "bench/results", ".mypy_cache"):
        assert ignored(heavy, patterns), f".dockerignore sends {heavy} to the build"


# --- agentrun health ------------------------------------------------------------------------


def agentrun_health(*args: str) -> subprocess.CompletedProcess[str]:
    """``agentrun health <args>`` as a real process, to its end."""
    env = {k: v for k, v in os.environ.items() if k != "AGENTRUN_TARGET"}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "health", *args],
        capture_output=True,
        text=True,
        timeout=GUARD,
        env=env,
    )


def test_health_exits_0_on_serving_gateways_and_executor(stack: Stack) -> None:
    for gateway in stack.gateways:
        done = agentrun_health("--target", gateway.address)
        assert done.returncode == 0, done.stderr
        assert "SERVING" in done.stdout
        done = agentrun_health("--target", gateway.address, "--service", "agentrun.v1.RunService")
        assert done.returncode == 0, done.stderr
    executor = stack.executors[0].address
    done = agentrun_health(
        "--target", executor, "--service", "agentrun.internal.v1.ExecutorService"
    )
    assert done.returncode == 0, done.stderr


def test_health_exits_1_for_a_service_the_server_lacks(stack: Stack) -> None:
    gateway = stack.gateways[0].address
    done = agentrun_health("--target", gateway, "--service", "agentrun.internal.v1.ExecutorService")
    assert done.returncode == 1, done.stdout
    assert "NOT_FOUND" in done.stderr


def test_health_exits_1_on_a_closed_port() -> None:
    done = agentrun_health("--target", f"127.0.0.1:{free_port()}")
    assert done.returncode == 1, done.stdout
    assert "UNAVAILABLE" in done.stderr


def test_health_exits_1_while_not_serving_and_0_once_serving() -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        done = agentrun_health("--target", f"127.0.0.1:{port}")
        assert done.returncode == 1, done.stdout
        assert "NOT_SERVING" in done.stderr
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        done = agentrun_health("--target", f"127.0.0.1:{port}")
        assert done.returncode == 0, done.stderr
    finally:
        server.stop(None)


def test_health_exits_1_when_the_server_does_not_answer_in_time() -> None:
    """A port that accepts connections and never speaks: the check gives up after --timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        done = agentrun_health("--target", f"127.0.0.1:{port}", "--timeout", "0.5")
    assert done.returncode == 1, done.stdout
    assert "DEADLINE_EXCEEDED" in done.stderr


def test_health_rejects_a_timeout_that_is_not_positive() -> None:
    done = agentrun_health("--timeout", "0")
    assert done.returncode == 2
    assert "must be more than 0" in done.stderr


# --- internal mTLS in docker-compose.yml --------------------------------------------------


def certs_job(cli_parser: argparse.ArgumentParser) -> tuple[str, argparse.Namespace]:
    jobs = [
        (name, parse(cli_parser, command(s)))
        for name, s in our_services().items()
        if command(s)[0] == "certs"
    ]
    assert len(jobs) == 1, f"one service writes the certificates: {jobs}"
    return jobs[0]


def moved(value: str, folder: str, local: Path) -> str:
    """``value``, a path under ``folder`` (in the containers), moved to ``local``."""
    return str(local) + value.removeprefix(folder) if value.startswith(f"{folder}/") else value


def internal_tls_of(env: Mapping[str, str], folder: str, local: Path) -> dict[str, str]:
    return {k: moved(v, folder, local) for k, v in env.items() if "INTERNAL_TLS" in k}


def test_executors_and_gateways_use_internal_mtls_from_the_certs_job(
    cli_parser: argparse.ArgumentParser,
) -> None:
    all_services = services()
    job, args = certs_job(cli_parser)
    folder = args.out
    job_volumes = {str(v).partition(":")[0] for v in all_services[job].get("volumes", [])}
    for name, service in our_servers().items():
        settings = service_settings(service)
        tls = settings.internal_tls
        assert tls is not None, f"{name}: no internal mTLS"
        assert tls.ca is not None
        for path in (tls.ca, tls.cert, tls.key):
            assert str(path).startswith(f"{folder}/"), f"{name}: {path} is not from the job"
        mounts = {
            str(v).partition(":")[0]: str(v).split(":")[1] for v in service.get("volumes", [])
        }
        assert any(
            source in job_volumes and target == folder for source, target in mounts.items()
        ), f"{name}: the certs job's volume is not mounted at {folder}: {mounts}"
        condition = (service.get("depends_on") or {}).get(job, {}).get("condition")
        assert condition == "service_completed_successfully", f"{name}: starts before {job}"


def compose_certificates(
    cli_parser: argparse.ArgumentParser, local: Path
) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Runs the certs job's command with its output moved to ``local``; checks that it wrote
    what the executors' and gateways' settings name, for the name the gateways dial. Returns
    their internal TLS settings and the executor's health check, moved to ``local``."""
    job, args = certs_job(cli_parser)
    argv = _replace_option(command(services()[job]), ("--out",), str(local))
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *argv], capture_output=True, text=True, timeout=GUARD
    )
    assert done.returncode == 0, done.stderr
    roles = {parse(cli_parser, command(s)).command: s for s in our_servers().values()}
    executor_env = internal_tls_of(environment(roles["executor"]), args.out, local)
    gateway_env = internal_tls_of(environment(roles["gateway"]), args.out, local)
    for env in (executor_env, gateway_env):
        assert len(env) == 3, env
        for path in env.values():
            assert Path(path).exists(), f"the certs job wrote no {path}"
    # The gateways check the executors' certificate against the name they dial.
    target = service_settings(roles["gateway"]).executor_target
    host = re.sub(r"^dns:///", "", target).rpartition(":")[0]
    cert = x509.load_pem_x509_certificate(
        Path(executor_env["AGENTRUN_INTERNAL_TLS_CERT"]).read_bytes()
    )
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert host in names.get_values_for_type(x509.DNSName), (host, names)
    check = [moved(part, args.out, local) for part in healthcheck_argv(roles["executor"])]
    assert check[:2] == ["agentrun", "health"], check
    return executor_env, gateway_env, check[2:]


async def test_the_compose_certificates_carry_a_real_run(
    cli_parser: argparse.ArgumentParser, nats_server: Service, tmp_path: Path
) -> None:
    """The certs job's command, run here, writes what the services' settings name; an executor
    and a gateway with the compose environment (paths and ports moved) run a run over mTLS;
    the executor's compose health check passes, and fails without the certificate."""
    executor_env, gateway_env, health_args = compose_certificates(cli_parser, tmp_path / "certs")
    stack = Stack(database_url=f"sqlite:///{tmp_path / 'data'}", nats=nats_server, tmp=tmp_path)
    try:
        executor = stack.start_executor(**executor_env, AGENTRUN_EXECUTOR_LISTEN="0.0.0.0:0")
        gateway = stack.start_gateway(**gateway_env)
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            client = Client(channel)
            agent = await client.create_agent(scripted_agent(turns=[("over mTLS", [])]))
            events = await client.run(agent.id, "hi")
            assert events[-1].run_completed.output == "over mTLS"
        done = agentrun_health(*_replace_option(health_args, ("--target",), executor.address))
        assert done.returncode == 0, done.stderr
        done = agentrun_health("--target", executor.address, "--timeout", "2")
        assert done.returncode == 1, done.stdout
    finally:
        stack.stop()
