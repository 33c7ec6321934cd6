"""``agentrun certs``: a development CA and the certificates a deployment needs (common.certs).

Existing certificates are kept (so that a compose job may run it at every start); ``--force``
writes a new set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.certs import DEFAULT_HOSTS, expected_files, write_dev_certificates


def add_certs_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "certs",
        help="write a development CA and certificates for TLS and internal mTLS",
        description=(
            "Write two development CAs and their certificates into DIR: internal/ (ca.pem, "
            "executor.pem, gateway.pem and their -key.pem) for the mTLS between gateways and "
            "executors, and public/ (ca.pem, server.pem, client.pem and their -key.pem) for a "
            "gateway's TLS. The CAs' private keys are not kept."
        ),
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write them")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "a DNS name or IP address the servers are reached by (repeatable; "
            f"{', '.join(DEFAULT_HOSTS)} are always included)"
        ),
    )
    parser.add_argument("--force", action="store_true", help="replace existing certificates")
    parser.set_defaults(func=run_certs)
    return parser


def run_certs(args: argparse.Namespace) -> int:
    folder = Path(args.out)
    existing = [path for path in expected_files(folder) if path.exists()]
    if existing and not args.force:
        if len(existing) == len(expected_files(folder)):
            print(f"{folder}: certificates exist; kept (--force replaces them)")
            return 0
        print(
            f"{folder}: some certificates exist ({', '.join(map(str, existing))}) but not all: "
            "--force writes a new set",
            file=sys.stderr,
        )
        return 1
    for path in write_dev_certificates(folder, args.host):
        print(path)
    return 0
