"""The ``agentrun`` command: run the stack or one service, chat, inspect runs."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

import grpc

from cli.certs import add_certs_parser
from cli.chat import add_chat_parser
from cli.client import API_KEY_ENV, call_metadata
from cli.console import DEFAULT_LISTEN as CONSOLE_LISTEN
from cli.console import add_console_parser
from cli.health import add_health_parser
from cli.launcher import Service, start_agentrun, start_console, start_nats
from cli.runs import add_runs_parser
from cli.serve import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentrun", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole stack on this machine (SQLite, NATS)")
    up.add_argument("--data-dir", default=os.environ.get("AGENTRUN_DATA_DIR", ".agentrun"))
    up.add_argument("--gateway-listen", default="127.0.0.1:50051")
    up.add_argument("--nats-port", type=int, default=0, help="0 picks a free port")
    up.add_argument(
        "--console-listen",
        default=CONSOLE_LISTEN,
        metavar="HOST:PORT",
        help=f"where to serve the web console (default: {CONSOLE_LISTEN}; 'off': no console)",
    )
    up.set_defaults(func=_up)

    for name in ("gateway", "executor"):
        service = commands.add_parser(name, help=f"run one {name} (settings from AGENTRUN_*)")
        service.add_argument("--listen", help=f"overrides AGENTRUN_{name.upper()}_LISTEN")
        service.set_defaults(func=_serve, service=name)

    add_chat_parser(commands)
    add_runs_parser(commands)
    add_health_parser(commands)
    add_certs_parser(commands)
    add_console_parser(commands)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def _serve(args: argparse.Namespace) -> int:
    return serve(args.service, args.listen)


def _seed_demo_agents(gateway: str) -> str:
    """Creates the demo agents with the CLI's key ($AGENTRUN_API_KEY: a gateway with API keys
    refuses a call without one); says what became of them."""
    from cli.demo import seed_demo_agents

    try:
        created = asyncio.run(seed_demo_agents(gateway, call_metadata(os.environ.get(API_KEY_ENV))))
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
        return (
            f"not created: the gateway has API keys; set {API_KEY_ENV} to one of them "
            "and start again"
        )
    return f"demo-classic, demo-durable{' (created)' if created else ''}"


def _up(args: argparse.Namespace) -> int:
    """nats-server, an executor and a gateway as child processes; demo agents; until Ctrl-C."""
    data_dir = Path(args.data_dir).resolve()
    logs = data_dir / "logs"
    services: list[Service] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        nats = start_nats(data_dir / "nats", logs, args.nats_port)
        services.append(nats)
        env = {
            "AGENTRUN_DATA_DIR": str(data_dir),
            "AGENTRUN_NATS_URL": f"nats://{nats.address}",
            "AGENTRUN_EXECUTOR_LISTEN": "127.0.0.1:0",
            # Loopback only, yet other users of this machine should not reach the executor.
            "AGENTRUN_INTERNAL_TOKEN": os.environ.get("AGENTRUN_INTERNAL_TOKEN")
            or secrets.token_urlsafe(32),
            # Off: one AGENTRUN_METRICS_LISTEN of the caller's cannot serve two services.
            "AGENTRUN_METRICS_LISTEN": "",
        }
        executor = start_agentrun("executor", env, logs)
        services.append(executor)
        env |= {
            "AGENTRUN_EXECUTOR_TARGET": executor.address,
            "AGENTRUN_GATEWAY_LISTEN": args.gateway_listen,
        }
        gateway = start_agentrun("gateway", env, logs)
        services.append(gateway)
        demo = _seed_demo_agents(gateway.address)
        console = ""
        if args.console_listen != "off":
            services.append(start_console(gateway.address, logs, args.console_listen))
            host = args.console_listen.rpartition(":")[0]
            console = f"console: http://{host}:{services[-1].port}\n"
        print(
            f"agentrun is up: gateway {gateway.address}, executor {executor.address}, "
            f"NATS {nats.address}, data in {data_dir} (logs in {logs})\n"
            f"demo agents: {demo}\n"
            f"{console}"
            f"try:  agentrun chat --agent demo-classic --target {gateway.address}\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        while not stop.is_set():
            if any(s.process.poll() is not None for s in services):
                dead = [s.name for s in services if s.process.poll() is not None]
                print(f"stopped: {', '.join(dead)} exited (see {logs})", file=sys.stderr)
                return 1
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for service in reversed(services):
            service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
