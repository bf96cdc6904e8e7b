"""A real PostgreSQL server for the job-store tests, started by the tests:
Debian's server binaries (scripts/install_postgres.sh), `initdb` into a
temporary folder and `postgres` on a free 127.0.0.1 port, as the `postgres`
user when the tests run as root (the server refuses to run as root)."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import pytest


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        pytest.fail("no PostgreSQL server binaries: run scripts/install_postgres.sh (make test does)")
    return os.path.dirname(found[-1])


class PostgresServer:
    """A PostgreSQL server on 127.0.0.1 (trust auth, loopback only). Calling it
    creates a fresh database and returns its URL; `restart(down_s)` stops
    the server (fast shutdown: every connection drops), waits and starts it
    again on the same port."""

    def __init__(self, port: int):
        self.bindir, self.port = _bindir(), port
        self.data = tempfile.mkdtemp(prefix="dheads-pg-")
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.data, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*self.as_user, f"{self.bindir}/initdb", "-D", self.data, "-U", "postgres",
                        "--auth=trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=300)
        self.admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        import psycopg

        self.proc = subprocess.Popen([*self.as_user, f"{self.bindir}/postgres", "-D", self.data,
                                      "-p", str(self.port), "-h", "127.0.0.1", "-k", self.data, "-c", "fsync=on"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while True:
            try:
                psycopg.connect(self.admin, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise RuntimeError("PostgreSQL did not start")
                time.sleep(0.2)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)          # fast shutdown
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def restart(self, down_s: float) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def __call__(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres_server(free_port):
    """The session's PostgreSQL server (`PostgresServer`)."""
    server = PostgresServer(free_port())
    yield server
    server.stop()
    shutil.rmtree(server.data, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """The job store's location for each backend: a local folder (SQLite) or a
    fresh database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "jobstore")
    return request.getfixturevalue("postgres_server")()
