"""``agentrun health``: whether a gateway or an executor serves, by the standard gRPC health
check (``grpc.health.v1.Health/Check``).

Exits 0 when the answer is SERVING and 1 otherwise: another status, a service the server does
not know, or no answer within ``--timeout`` (nothing listening, a hung server). Made for
container health checks (docker-compose.yml): ``agentrun health --target 127.0.0.1:50052``.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.client import (
    DEFAULT_TARGET,
    TARGET_ENV,
    ClientTls,
    add_tls_args,
    client_tls,
    rpc_error_message,
)
from common.settings import ConfigurationError

DEFAULT_TIMEOUT = 3.0
EXIT_SERVING = 0
EXIT_NOT_SERVING = 1


def add_health_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Registers ``health``; the parsed namespace's ``func`` returns the exit code."""
    parser = subparsers.add_parser(
        "health",
        help="check that a gateway or an executor serves (exit 0) or not (exit 1)",
        description=(
            "Ask a gateway or an executor for its health (grpc.health.v1 Check): "
            "exit 0 when SERVING, 1 otherwise or when it does not answer in time."
        ),
    )
    parser.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"the server's address (default: ${TARGET_ENV} or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--service",
        default="",
        metavar="NAME",
        help="a service's full name, e.g. agentrun.v1.RunService (default: the whole server)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the answer (default: {DEFAULT_TIMEOUT:g})",
    )
    add_tls_args(parser)
    parser.set_defaults(func=run_health)
    return parser


def run_health(args: argparse.Namespace) -> int:
    serving, status = check_health(args.target, args.service, args.timeout, client_tls(args))
    what = f"{args.target} {args.service}".rstrip()
    if serving:
        print(f"{what}: {status}")
        return EXIT_SERVING
    print(f"{what}: {status}", file=sys.stderr)
    return EXIT_NOT_SERVING


def check_health(
    target: str, service: str, timeout: float, tls: ClientTls | None = None
) -> tuple[bool, str]:
    """Whether ``service`` ("" for the whole server) at ``target`` is SERVING, and what was
    answered: the status's name, or the error of a call that failed."""
    try:
        channel = (
            grpc.secure_channel(target, tls.credentials())
            if tls is not None
            else grpc.insecure_channel(target)
        )
    except ConfigurationError as exc:
        return False, f"error: {exc}"
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            if isinstance(error, grpc.Call):
                return False, rpc_error_message(error)
            return False, f"error: {error}"
    status: int = response.status
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    return status == health_pb2.HealthCheckResponse.SERVING, name


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value
