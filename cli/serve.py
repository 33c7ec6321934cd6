"""``agentrun gateway`` and ``agentrun executor``: run one service with settings from AGENTRUN_*.

Also runnable as ``python -m cli.serve gateway|executor|console ...`` (what the launcher does).
Prints ``agentrun-ready <port>`` once the service listens. Started that way, the service stops
(as on SIGTERM) when the process that started it is gone: a killed test run or a killed
``agentrun up`` must not leave services running on their own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from dataclasses import replace

from cli.launcher import READY_PREFIX
from common import logs
from common.settings import ConfigurationError, Settings


def serve(service: str, listen: str | None = None) -> int:
    try:
        logs.configure(
            os.environ.get("AGENTRUN_LOG_LEVEL", "INFO"),
            os.environ.get("AGENTRUN_LOG_FORMAT", "") or "text",
        )
    except ValueError as exc:
        print(f"agentrun {service}: {exc}", file=sys.stderr)
        return 2
    try:
        return _serve(service, listen)
    except ConfigurationError as exc:
        print(f"agentrun {service}: {exc}", file=sys.stderr)
        return 2


def _serve(service: str, listen: str | None) -> int:
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


PARENT_CHECK_INTERVAL = 1.0


def stop_with_parent() -> None:
    """SIGTERMs this process once its parent has exited (it is then adopted by another)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_INTERVAL)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    stop_with_parent()
    if sys.argv[1:2] == ["console"]:
        from cli.main import main

        sys.exit(main(sys.argv[1:]))
    sys.exit(serve(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
