"""A throw-away PostgreSQL server for tests (Debian's ``postgresql`` package).

One server per test process, started on first use on a free loopback port in a temp
directory and stopped at exit. ``initdb`` refuses to run as root, so as root the server runs
as the ``postgres`` user the Debian package creates. Each caller gets a fresh database.

It is a process-wide singleton rather than a fixture because two conftest scopes need it
(``tests/privacy`` for the ledger, ``tests/test_deploy.py`` for the migrations) and the
top-level conftest belongs to another package of tests.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests._net import free_port

_server: PostgresServer | None = None


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine (``apt-get install postgresql``)."""


def _bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    # Debian keeps the server binaries off PATH, one folder per major version.
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                  key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if not dirs:
        raise PostgresUnavailable("PostgreSQL server binaries not found (initdb, pg_ctl)")
    return Path(dirs[-1]).parent



class PostgresServer:
    def __init__(self) -> None:
        self.bindir = _bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="bulle-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.owner_pid = os.getpid()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root and runuser is missing")
            shutil.chown(self.dir, "postgres", "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]
        try:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--locale=C", "--no-sync")
            # 100 concurrent processes each hold a connection in the ledger tests; fsync
            # off because the server itself is never crashed here (client processes are).
            opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c max_connections=300 "
                    f"-c unix_socket_directories={self.dir} -c fsync=off")
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"),
                      "-o", opts, "-w", "-t", "60", "start")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self._as_user, str(self.bindir / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr[-2000:]}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if os.getpid() != self.owner_pid:  # a forked child must not stop its parent's server
            return
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def server() -> PostgresServer:
    """The process's server, started on first call (raises PostgresUnavailable)."""
    global _server
    if _server is None:
        _server = PostgresServer()
        atexit.register(_server.stop)
    return _server


def fresh_database() -> str:
    """URL of a new database for one test; skipped where PostgreSQL is not installed, failed
    in CI (.ci/run installs it: a skip there would hide a missing install step)."""
    import pytest

    try:
        import psycopg  # noqa: F401

        return server().create_database()
    except (ImportError, PostgresUnavailable) as e:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {e}")
        pytest.skip(f"PostgreSQL not available: {e}")
