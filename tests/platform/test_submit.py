"""`dheads submit` against a real Ray head started by the test (`ray start
--head` with the dashboard, which serves the Job Submission API), with Ray
2.60's default token auth left on."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dheads.platform.submit import auth_headers, main

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(free_port):
    """A Ray head with the dashboard on a free port of 127.0.0.1: yields its URL.

    `ray start --block` keeps its daemons as children and stops them when it
    is terminated, so the test ends only what it started (never `ray stop`,
    which would stop every Ray instance on the machine).
    """
    dash, gcs = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: unix socket paths
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         # fixed defaults (52365 ...) collide with other Ray instances on the machine
         f"--dashboard-agent-listen-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--metrics-export-port={free_port()}",
         "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"ray start --head exited with {proc.returncode}: dashboard cannot start here")
        try:
            req = urllib.request.Request(f"{url}/api/version", headers=auth_headers())
            urllib.request.urlopen(req, timeout=2)
            break
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.skip("the Ray dashboard did not come up within 90 s")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # its daemons share its process group
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _wait(url: str, job_id: str, states: tuple[str, ...], timeout: float = 120) -> dict:
    from dheads.platform.submit import status

    deadline = time.time() + timeout
    while time.time() < deadline:
        st = status(job_id, url)
        if st["status"] in states:
            return st
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} never reached {states}: {st}")


def test_token_auth_is_on_and_required(ray_head):
    assert auth_headers(), "Ray 2.60 writes ~/.ray/auth_token for a new head"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{ray_head}/api/jobs/", timeout=5)
    assert e.value.code in (401, 403)


def test_submit_runs_the_job_and_reports_status_and_logs(ray_head, capsys):
    assert main(["info", "model=tiny", "--no-wait", "--address", ray_head]) == 0
    job_id = json.loads(capsys.readouterr().out)["job_id"]
    assert _wait(ray_head, job_id, ("SUCCEEDED", "FAILED"))["status"] == "SUCCEEDED"

    assert main(["status", job_id, "--address", ray_head]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["status"] == "SUCCEEDED" and st["entrypoint"] == "dheads info model=tiny"
    assert main(["logs", job_id, "--address", ray_head]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["preset"] == "tiny" and info["params"] > 0


def test_stop_ends_a_running_job(ray_head, capsys, tmp_path):
    # a train job with no shards would fail on its own: stop it while it starts
    assert main(["train", f"data.shards={tmp_path}/none", f"trainer.storage_path={tmp_path}",
                 f"cluster.dashboard_address={ray_head}", "--no-wait"]) == 0
    job_id = json.loads(capsys.readouterr().out)["job_id"]
    _wait(ray_head, job_id, ("RUNNING",))
    assert main(["stop", job_id, "--address", ray_head]) == 0
    assert json.loads(capsys.readouterr().out)["stop_requested"] is True
    assert _wait(ray_head, job_id, ("STOPPED", "FAILED", "SUCCEEDED"))["status"] == "STOPPED"


def test_a_config_typo_fails_before_anything_is_sent(capsys):
    assert main(["train", "trainer.no_such_field=1", "--address", "http://127.0.0.1:9"]) == 2
    assert "no_such_field" in capsys.readouterr().err
