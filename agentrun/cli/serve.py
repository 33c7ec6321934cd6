"""``agentrun gateway`` and ``agentrun executor``: run one service with settings from AGENTRUN_*.

Also runnable as ``python -m agentrun.cli.serve gateway|executor`` (what the launcher does).
Prints ``agentrun-ready <port>`` once the service listens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import replace

from agentrun.launcher import READY_PREFIX
from agentrun.settings import Settings


def serve(service: str, listen: str | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("AGENTRUN_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = Settings.from_env()
    if listen and service == "gateway":
        settings = replace(settings, gateway_listen=listen)
    elif listen:
        settings = replace(settings, executor_listen=listen)

    def ready(port: int) -> None:
        print(f"{READY_PREFIX} {port}", flush=True)

    if service == "gateway":
        from gateway.server import run_gateway

        asyncio.run(run_gateway(settings, ready=ready))
    elif service == "executor":
        from executor.server import run_executor

        asyncio.run(run_executor(settings, ready=ready))
    else:
        print(f"unknown service {service!r}: gateway or executor", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
