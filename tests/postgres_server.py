"""A throwaway PostgreSQL server for a test session, so that the PostgreSQL suites run on any
machine instead of being skipped for want of a database.

The binaries come from the ``pgserver`` package (a dev dependency that bundles PostgreSQL) or,
failing that, from a PostgreSQL installed on the machine. pgserver's Python API is not used: it
listens on a Unix socket only, while agentrun's database URLs name a host and a port, and as
root it adds a system user and opens up every parent directory of its data. Here the server
listens on 127.0.0.1 on a free port, trusts every connection, keeps its data in a temporary
directory that is deleted when it stops, and runs without fsync: nothing in it outlives the
session.

PostgreSQL refuses to run as root. As root, the server runs as ``nobody``, from a copy of the
binaries when ``nobody`` cannot reach them where they are installed (a virtualenv under /root).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cli.launcher import free_port

START_TIMEOUT = 60.0


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries, or none that start here."""


def candidate_bindirs() -> Iterator[tuple[Path, bool]]:
    """Directories with initdb and postgres, best first, each with whether it is pgserver's."""
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        yield Path(spec.origin).parent / "pginstall" / "bin", True
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    for bindir in sorted(debian, key=lambda path: path.parent.name.zfill(8), reverse=True):
        yield bindir, False
    on_path = shutil.which("initdb")
    if on_path is not None:
        yield Path(on_path).parent, False


def copy_pgserver(bindir: Path, into: Path) -> Path:
    """Copies pgserver's PostgreSQL (<site>/pgserver/pginstall, and the libraries its binaries
    find at $ORIGIN/../../../pgserver.libs) into ``into``; returns the copy's bindir."""
    site = bindir.parents[2]
    install = into / "pgserver" / "pginstall"
    shutil.copytree(bindir.parent, install, ignore=shutil.ignore_patterns("include"))
    if (site / "pgserver.libs").is_dir():
        shutil.copytree(site / "pgserver.libs", into / "pgserver.libs")
    return install / "bin"


def server_user() -> dict[str, Any]:
    """subprocess arguments that drop root for ``nobody`` (none when not root)."""
    if os.geteuid() != 0:
        return {}
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        raise PostgresUnavailable("PostgreSQL refuses root, and there is no user nobody") from None
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


class Server:
    """A PostgreSQL server started from ``bindir`` in a new temporary directory."""

    def __init__(self, bindir: Path, bundled: bool) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="agentrun-postgres-"))
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        try:
            # As root, everything runs as nobody, in a directory nobody may enter.
            self.run_as = {**server_user(), "cwd": self.tmp}
            self._start(bindir, bundled)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _start(self, bindir: Path, bundled: bool) -> None:
        data = self.tmp / "data"
        data.mkdir(mode=0o700)
        if "user" in self.run_as:
            self.tmp.chmod(0o711)
            os.chown(data, self.run_as["user"], self.run_as["group"])
            if bundled and not self._runs(str(bindir / "postgres"), "-V"):
                bindir = copy_pgserver(bindir, self.tmp / "copy")
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
        if not self._runs(*initdb, "--no-locale", "--encoding=UTF8", "--no-sync"):
            raise PostgresUnavailable(f"initdb failed:\n{self.log()[-2000:]}")
        self._bindir, self._data = bindir, data
        # The free port may be taken before the server binds it: then try another.
        for _ in range(3):
            self.port = free_port()
            if self._launch():
                return
            if "could not bind" not in self.log():
                break
        raise PostgresUnavailable(f"postgres did not start:\n{self.log()[-2000:]}")

    def _launch(self) -> bool:
        argv = [str(self._bindir / "postgres"), "-D", str(self._data), "-p", str(self.port)]
        argv += ["-k", "", "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log, **self.run_as)
        return self._wait_until_ready()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def halt(self) -> None:
        """Stops the server (fast shutdown: connections are closed) and keeps its data, for an
        outage that ``resume`` ends."""
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        self.process.wait(30)

    def resume(self) -> None:
        """Starts the halted server again, on the same port and data."""
        if not self._launch():
            raise PostgresUnavailable(f"postgres did not start again:\n{self.log()[-2000:]}")

    def _runs(self, *argv: str) -> bool:
        """Whether the command succeeds (its output goes to the log)."""
        with self.log_path.open("wb") as log:
            try:
                done = subprocess.run(argv, stdout=log, stderr=log, check=False, **self.run_as)
            except OSError as error:
                log.write(f"{argv[0]}: {error}\n".encode())
                return False
        return done.returncode == 0

    def _wait_until_ready(self) -> bool:
        assert self.process is not None
        conninfo = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        deadline = time.monotonic() + START_TIMEOUT
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                psycopg.connect(conninfo, connect_timeout=2).close()
            except psycopg.OperationalError:
                time.sleep(0.05)
            else:
                return True
        self.process.kill()
        self.process.wait()
        return False

    @property
    def log_path(self) -> Path:
        return self.tmp / "postgres.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then SIGKILL; deletes the data."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def start() -> Server:
    """The first installation that starts, or PostgresUnavailable saying what each one did."""
    failures = []
    for bindir, bundled in candidate_bindirs():
        if not (bindir / "initdb").is_file() or not (bindir / "postgres").is_file():
            continue
        try:
            return Server(bindir, bundled)
        except (OSError, PostgresUnavailable) as error:
            failures.append(f"{bindir}: {error}")
    found = "\n".join(failures) or "no PostgreSQL binaries found"
    raise PostgresUnavailable(found)


class Throwaway:
    """The session's server: started by the first url() call, stopped by stop(). A failure to
    start fails every test that needs it (once tried, never retried), so that a machine without
    PostgreSQL is red, not a green run with the PostgreSQL suites skipped."""

    def __init__(self) -> None:
        self._server: Server | None = None
        self._failure = ""

    def url(self) -> str:
        if self._server is None and not self._failure:
            try:
                self._server = start()
            except PostgresUnavailable as error:
                self._failure = str(error)
        if self._server is None:
            pytest.fail(
                "PostgreSQL suite: could not start a throwaway PostgreSQL server (install the "
                "dev extra with `make setup`, which brings pgserver, or install PostgreSQL; or "
                f"set AGENTRUN_TEST_POSTGRES_URL to a server):\n{self._failure}",
                pytrace=False,
            )
        return self._server.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
