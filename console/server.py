"""Serving the console with uvicorn: one process, one channel to the gateway."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable

import uvicorn

from cli.client import ClientTls
from console.app import create_app
from console.gateway import Gateway

SECRET_ENV = "AGENTRUN_CONSOLE_SECRET"
# Open event streams end within this at shutdown.
SHUTDOWN_GRACE = 3


def split_listen(listen: str) -> tuple[str, int]:
    host, separator, port = listen.rpartition(":")
    if not separator or not port.isdigit():
        raise ValueError(f"listen address must look like HOST:PORT, not {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def run_console(
    listen: str,
    target: str,
    tls: ClientTls | None = None,
    *,
    https_only: bool = False,
    ready: Callable[[int], None] = lambda port: None,
) -> None:
    """Serves the console for the gateway at ``target`` until SIGINT or SIGTERM.

    The session cookies are signed with $AGENTRUN_CONSOLE_SECRET (give every console behind one
    address the same), or with a key made at start, which ends all sessions at a restart.
    """
    host, port = split_listen(listen)
    secret = os.environ.get(SECRET_ENV) or secrets.token_urlsafe(32)
    app = create_app(Gateway(target, tls), secret, https_only=https_only)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=os.environ.get("AGENTRUN_LOG_LEVEL", "info").lower(),
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
        proxy_headers=False,
    )
    await _Server(config, ready).serve()


class _Server(uvicorn.Server):
    """Says where it listens once it does (the port, when it was 0)."""

    def __init__(self, config: uvicorn.Config, ready: Callable[[int], None]) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._ready(self.servers[0].sockets[0].getsockname()[1])
