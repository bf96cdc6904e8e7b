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


@pytest.fixture(scope="session")
def postgres_server(free_port):
    """A PostgreSQL server on 127.0.0.1 (trust auth, loopback only); yields a
    function that creates a fresh database and returns its URL."""
    bindir = _bindir()
    data = tempfile.mkdtemp(prefix="dheads-pg-")
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, f"{bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=300)
    port = free_port()
    proc = subprocess.Popen([*as_user, f"{bindir}/postgres", "-D", data, "-p", str(port),
                             "-h", "127.0.0.1", "-k", data, "-c", "fsync=on"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import psycopg

    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    deadline = time.time() + 120
    while True:
        try:
            psycopg.connect(admin, connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("PostgreSQL did not start")
            time.sleep(0.2)

    def new_database() -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{port}/{name}"

    yield new_database
    os.killpg(proc.pid, signal.SIGINT)          # fast shutdown
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """The job store's location for each backend: a local folder (SQLite) or a
    fresh database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "jobstore")
    return request.getfixturevalue("postgres_server")()


@pytest.fixture(scope="session")
def ray_session():
    """The session's local Ray (as tests/conftest.py's), started with retries:
    on a loaded host the raylet can miss Ray's fixed 30 s registration deadline."""
    import ray

    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for it
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()
