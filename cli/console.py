"""``agentrun console``: the web console, a client of one gateway."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from cli.client import DEFAULT_TARGET, TARGET_ENV, add_tls_args, client_tls
from cli.launcher import READY_PREFIX

DEFAULT_LISTEN = "127.0.0.1:8080"
LISTEN_ENV = "AGENTRUN_CONSOLE_LISTEN"


def add_console_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "console",
        help="serve the web console (runs, approvals, agents, playground)",
        description="Serve the web console: a client of the gateway at --target that asks "
        "each user for an API key.",
    )
    parser.add_argument(
        "--listen",
        default=os.environ.get(LISTEN_ENV) or DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"where to serve it (default: ${LISTEN_ENV} or {DEFAULT_LISTEN}; "
        "anything but loopback exposes it)",
    )
    parser.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"the gateway's address (default: ${TARGET_ENV} or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--https-only",
        action="store_true",
        help="mark the session cookie Secure (behind a proxy that serves HTTPS)",
    )
    add_tls_args(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from console.server import run_console  # the web stack only for this command

    def ready(port: int) -> None:
        print(f"{READY_PREFIX} {port}", flush=True)

    try:
        asyncio.run(
            run_console(
                args.listen, args.target, client_tls(args), https_only=args.https_only, ready=ready
            )
        )
    except ValueError as exc:
        print(f"agentrun console: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
