"""An HTTP endpoint for HTTP tools to call, in the test process: it answers each path with the
responses a test scripts, records every request it receives, and can hold a request until the
test releases it (to kill an executor while its call is in flight)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GUARD = 60.0  # seconds; only bounds a hang


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b'{"ok": true}'
    headers: tuple[tuple[str, str], ...] = ()
    # Held until ToolServer.release(): the request stays in flight.
    hold: bool = False


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: Any
    number: int  # 1 for the first request to its path
    at: float  # when it arrived (epoch seconds)


@dataclass
class ToolServer:
    """Serves on 127.0.0.1 in threads of its own (start/stop)."""

    replies: dict[str, list[Reply]] = field(default_factory=dict)
    received: dict[str, list[Received]] = field(default_factory=lambda: defaultdict(list))
    _arrived: threading.Condition = field(default_factory=threading.Condition)
    _released: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None

    def url(self, path: str) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def script(self, path: str, *replies: Reply) -> str:
        """Answers the n-th request to ``path`` with replies[n] (the last one repeats)."""
        self.replies[path] = list(replies)
        return self.url(path)

    def release(self) -> None:
        self._released.set()

    async def wait_for(self, path: str, count: int) -> list[Received]:
        """Returns once ``path`` has received ``count`` requests."""

        def wait() -> list[Received]:
            with self._arrived:
                if not self._arrived.wait_for(lambda: len(self.received[path]) >= count, GUARD):
                    raise TimeoutError(f"{path} received {len(self.received[path])} requests")
                return list(self.received[path])

        return await asyncio.to_thread(wait)

    def start(self) -> None:
        tool_server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # (headers and body are two writes)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                with tool_server._arrived:
                    seen = tool_server.received[self.path]
                    headers = dict(self.headers.items())
                    seen.append(Received(self.path, headers, body, len(seen) + 1, time.time()))
                    number = len(seen)
                    tool_server._arrived.notify_all()
                script = tool_server.replies.get(self.path) or [Reply(404, b"no such tool")]
                reply = script[min(number, len(script)) - 1]
                if reply.hold:
                    tool_server._released.wait(GUARD)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers:
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except OSError:
                    pass  # the caller went away (a killed executor, or a cut result)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
