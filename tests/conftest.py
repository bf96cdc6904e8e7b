"""Shared fixtures: one local Ray instance per session, and an S3 endpoint
(moto_server over HTTP on 127.0.0.1) started and killed by the tests."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARK = (REPO.parent / "shared" / "benchmark").resolve()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto_server on a free port of 127.0.0.1; yields its endpoint URL."""
    port = _free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env_keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env_keys}
    os.environ.update(env_keys)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    yield endpoint
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto endpoint: yields (bucket name, StorageConfig)."""
    import uuid

    import boto3

    from dheads.platform.config import StorageConfig

    name = f"b-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name, StorageConfig(endpoint_url=s3_server)


@pytest.fixture(scope="session")
def benchmark_dir() -> Path:
    if not (BENCHMARK / "val" / "manifest.jsonl").exists():
        pytest.skip(f"benchmark set not found at {BENCHMARK}")
    return BENCHMARK
