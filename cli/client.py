"""Connecting the command line to the gateway: channel, call metadata, flags and error lines."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.settings import ConfigurationError
from common.tls import channel_credentials

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "AGENTRUN_TARGET"
API_KEY_ENV = "AGENTRUN_API_KEY"

Metadata = tuple[tuple[str, str], ...]

_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    # A chat can sit idle for minutes while a human decides on an approval; pings keep
    # proxies and NATs from dropping the stream (the gateway tolerates one every 10 s).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def call_metadata(api_key: str | None) -> Metadata:
    """The metadata every call carries: the API key as a bearer token, if there is one."""
    if not api_key:
        return ()
    return (("authorization", f"Bearer {api_key}"),)


@dataclass(frozen=True)
class ClientTls:
    """TLS to a server: the CA to trust (None: the system's), and a client certificate for a
    server that requires one."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.ca, self.cert, self.key)


def client_tls(args: argparse.Namespace) -> ClientTls | None:
    """The TLS that --tls, --ca, --cert and --key ask for (any of them means TLS), or None."""
    if (args.cert is None) != (args.key is None):
        raise SystemExit("error: --cert and --key go together")
    if not (args.tls or args.ca or args.cert):
        return None
    return ClientTls(
        Path(args.ca) if args.ca else None,
        Path(args.cert) if args.cert else None,
        Path(args.key) if args.key else None,
    )


def connect(
    target: str, api_key: str | None, tls: ClientTls | None = None
) -> tuple[grpc.aio.Channel, Metadata]:
    """A channel to the gateway at ``target`` (TLS if ``tls``) and the metadata to send with
    each call.

    Must be called with an event loop running (grpc.aio binds the channel to it).
    """
    if tls is None:
        channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
    else:
        try:
            credentials = tls.credentials()
        except ConfigurationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from exc
        channel = grpc.aio.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
    return channel, call_metadata(api_key)


def add_tls_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Adds --tls, --ca, --cert and --key."""
    parser.add_argument(
        "--tls", action="store_true", help="connect over TLS (implied by --ca and --cert)"
    )
    parser.add_argument(
        "--ca",
        metavar="PEM",
        help="the CA that signed the server's certificate (default: the system's CAs)",
    )
    parser.add_argument(
        "--cert", metavar="PEM", help="a client certificate, for a server that requires one"
    )
    parser.add_argument("--key", metavar="PEM", help="the client certificate's private key")


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """Adds --target and --api-key, defaulting to $AGENTRUN_TARGET and $AGENTRUN_API_KEY."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"the gateway's address (default: ${TARGET_ENV} or {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        metavar="KEY",
        help=f"the API key to authenticate with (default: ${API_KEY_ENV}; none if unset)",
    )
    add_tls_args(group)


def rpc_error_message(error: grpc.aio.AioRpcError | grpc.Call) -> str:
    """A one-line message for the user: ``error: <CODE>: <details>``."""
    code = error.code()
    name = code.name if code is not None else "UNKNOWN"
    details = " ".join((error.details() or "").split())
    if not details:
        details = (
            "the server does not implement this call"
            if code == grpc.StatusCode.UNIMPLEMENTED
            else "(no details)"
        )
    return f"error: {name}: {details}"
