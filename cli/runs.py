"""``agentrun runs list|show|watch|replay|fork``: inspecting, following and forking runs."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
from google.protobuf.json_format import MessageToJson
from google.protobuf.message import Message

from agentrun.v1 import agent_pb2, run_service_pb2, run_service_pb2_grpc
from cli.client import Metadata, add_connection_args, client_tls, connect, rpc_error_message
from cli.render import (
    MODE_CHOICES,
    STATUS_CHOICES,
    EventRenderer,
    run_details,
    run_list_header,
    run_summary_line,
    stored_event_line,
)
from common.event_streams import TERMINAL_KINDS

if TYPE_CHECKING:
    from agentrun.v1.run_service_pb2_grpc import RunServiceAsyncStub

    Body = Callable[[RunServiceAsyncStub, Metadata, argparse.Namespace], Awaitable[int]]

DEFAULT_LIST_LIMIT = 20
MAX_PAGE_SIZE = 500
EXIT_RPC_ERROR = 1
EXIT_INTERRUPTED = 130


def add_runs_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Registers ``runs`` and its subcommands; each namespace's ``func`` returns the exit code."""
    parser = subparsers.add_parser(
        "runs", help="inspect, follow and fork runs", description="Inspect, follow and fork runs."
    )
    commands = parser.add_subparsers(dest="runs_command", metavar="COMMAND", required=True)

    list_parser = commands.add_parser(
        "list", help="list runs, newest first", description="List runs, newest first."
    )
    list_parser.add_argument("--agent", metavar="ID", help="only runs of this agent")
    list_parser.add_argument("--conversation", metavar="ID", help="only runs of this conversation")
    list_parser.add_argument(
        "--status",
        dest="statuses",
        action="append",
        choices=sorted(STATUS_CHOICES, key=STATUS_CHOICES.__getitem__),
        help="only runs in this status (repeat for several)",
    )
    list_parser.add_argument("--mode", choices=sorted(MODE_CHOICES), help="only runs in this mode")
    list_parser.add_argument(
        "--limit",
        type=_positive_int,
        default=DEFAULT_LIST_LIMIT,
        metavar="N",
        help=f"show at most N runs (default: {DEFAULT_LIST_LIMIT})",
    )
    _add_common_args(list_parser, _list)

    show_parser = commands.add_parser("show", help="show a run", description="Show a run.")
    show_parser.add_argument("run_id", metavar="RUN_ID")
    show_parser.add_argument(
        "--version",
        type=_positive_int,
        default=0,
        metavar="V",
        help="a durable run as it was at this version of its history",
    )
    _add_common_args(show_parser, _show)

    watch_parser = commands.add_parser(
        "watch",
        help="follow a run's events until it ends",
        description="Print a run's events, past and live, until its terminal event.",
    )
    watch_parser.add_argument("run_id", metavar="RUN_ID")
    watch_parser.add_argument(
        "--after",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="only events after sequence N (default: all)",
    )
    _add_common_args(watch_parser, _watch)

    replay_parser = commands.add_parser(
        "replay",
        help="print a durable run's stored history",
        description="Print a durable run's stored history as a timeline.",
    )
    replay_parser.add_argument("run_id", metavar="RUN_ID")
    replay_parser.add_argument(
        "--from",
        dest="from_version",
        type=_positive_int,
        default=0,
        metavar="V",
        help="start at version V (default: the first)",
    )
    replay_parser.add_argument(
        "--to",
        dest="to_version",
        type=_positive_int,
        default=0,
        metavar="V",
        help="end at version V (default: the last)",
    )
    _add_common_args(replay_parser, _replay)

    fork_parser = commands.add_parser(
        "fork",
        help="start a new durable run from a run's history",
        description="Start a new durable run whose history is a run's history up to a version.",
    )
    fork_parser.add_argument("run_id", metavar="RUN_ID")
    fork_parser.add_argument(
        "--at",
        dest="at_version",
        type=_non_negative_int,
        required=True,
        metavar="VERSION",
        help="the version of the history to fork from (0: the latest)",
    )
    _add_common_args(fork_parser, _fork)
    return parser


def _add_common_args(parser: argparse.ArgumentParser, body: Body) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print protobuf JSON (one object per line for lists and streams)",
    )
    add_connection_args(parser)
    parser.set_defaults(func=_command(body))


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _command(body: Body) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(_call(body, args))
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED

    return run


async def _call(body: Body, args: argparse.Namespace) -> int:
    channel, metadata = connect(args.target, args.api_key, client_tls(args))
    async with channel:
        try:
            return await body(run_service_pb2_grpc.RunServiceStub(channel), metadata, args)
        except grpc.aio.AioRpcError as error:
            print(rpc_error_message(error), file=sys.stderr, flush=True)
            return EXIT_RPC_ERROR


def _print_json(message: Message, *, one_line: bool) -> None:
    print(MessageToJson(message, indent=None if one_line else 2), flush=True)


def list_request(args: argparse.Namespace) -> run_service_pb2.ListRunsRequest:
    """The first ListRuns request for parsed ``runs list`` arguments."""
    return run_service_pb2.ListRunsRequest(
        page_size=min(args.limit, MAX_PAGE_SIZE),
        agent_id=args.agent or "",
        conversation_id=args.conversation or "",
        statuses=[STATUS_CHOICES[status] for status in args.statuses or ()],
        execution_mode=(
            MODE_CHOICES[args.mode] if args.mode else agent_pb2.EXECUTION_MODE_UNSPECIFIED
        ),
    )


async def _list(stub: RunServiceAsyncStub, metadata: Metadata, args: argparse.Namespace) -> int:
    request = list_request(args)
    remaining: int = args.limit
    shown = 0
    while remaining > 0:
        request.page_size = min(remaining, MAX_PAGE_SIZE)
        response = await stub.ListRuns(request, metadata=metadata)
        for run in response.runs[:remaining]:
            if args.json:
                _print_json(run, one_line=True)
            else:
                if shown == 0:
                    print(run_list_header())
                print(run_summary_line(run))
            shown += 1
        remaining = args.limit - shown
        token = response.next_page_token
        if not token or token == request.page_token:
            break
        request.page_token = token
    if shown == 0 and not args.json:
        print("no runs", file=sys.stderr)
    return 0


async def _show(stub: RunServiceAsyncStub, metadata: Metadata, args: argparse.Namespace) -> int:
    request = run_service_pb2.GetRunRequest(run_id=args.run_id, version=args.version)
    response = await stub.GetRun(request, metadata=metadata)
    if args.json:
        _print_json(response.run, one_line=False)
    else:
        print(run_details(response.run))
    return 0


async def _watch(stub: RunServiceAsyncStub, metadata: Metadata, args: argparse.Namespace) -> int:
    request = run_service_pb2.WatchRunRequest(run_id=args.run_id, after_sequence=args.after)
    renderer = EventRenderer()
    try:
        async for response in stub.WatchRun(request, metadata=metadata):
            for event in response.events:
                if args.json:
                    _print_json(event, one_line=True)
                else:
                    print(renderer.render(event), end="", flush=True)
                if event.WhichOneof("kind") in TERMINAL_KINDS:
                    return 0
    finally:
        print(renderer.finish(), end="", flush=True)
    print("error: the stream ended before the run finished", file=sys.stderr)
    return EXIT_RPC_ERROR


async def _replay(stub: RunServiceAsyncStub, metadata: Metadata, args: argparse.Namespace) -> int:
    request = run_service_pb2.ListRunEventsRequest(
        run_id=args.run_id, from_version=args.from_version, to_version=args.to_version
    )
    count = 0
    async for response in stub.ListRunEvents(request, metadata=metadata):
        for event in response.events:
            if args.json:
                _print_json(event, one_line=True)
            else:
                print(stored_event_line(event), flush=True)
            count += 1
    if count == 0 and not args.json:
        print("no stored events", file=sys.stderr)
    return 0


async def _fork(stub: RunServiceAsyncStub, metadata: Metadata, args: argparse.Namespace) -> int:
    request = run_service_pb2.ForkRunRequest(
        run_id=args.run_id, at_version=args.at_version, request_id=str(uuid.uuid4())
    )
    response = await stub.ForkRun(request, metadata=metadata)
    if args.json:
        _print_json(response.run, one_line=False)
    else:
        print(response.run.id)
    return 0
