"""The CLI speaks to people: a mistake a user can fix prints one line on
stderr saying what is wrong, exits 2, and shows no traceback unless asked."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

BAD_INPUTS = {
    "unknown job": (["trian"], "unknown job 'trian'"),
    "typo in a key": (["train", "trainer.stepz=3"], "trainer.stepz"),
    "wrong type": (["train", "trainer.steps=many"], "trainer.steps"),
    "unknown config option": (["train", "model=huge"], "model"),
    "missing checkpoint (dub)": (["dub", "checkpoint={tmp}/nothing", "manifest={tmp}/m.jsonl"],
                                 "checkpoint"),
    "missing checkpoint (serve)": (["serve", "checkpoint={tmp}/nothing", "serve.token=" + "t" * 40],
                                   "dheads export"),
    "missing shards (train)": (["train", "data.shards={tmp}/no-shards"], "dheads preprocess"),
    "missing input (preprocess)": (["preprocess", "input={tmp}/no-videos", "output={tmp}/out"],
                                   "no such folder"),
    "no training checkpoint (export)": (["export", "run={tmp}", "out={tmp}/x"], "no training checkpoint"),
    "nothing to evaluate (eval)": (["eval", "generated={tmp}", "reference={tmp}", "out={tmp}/e"],
                                   "no clip stems"),
    "unreachable S3 endpoint": (["preprocess", "input=s3://bucket/videos", "output={tmp}/out",
                                 "storage.endpoint_url=http://127.0.0.1:9"], "reachable"),
}


def dheads(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dheads.platform.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HYDRA_FULL_ERROR": "", **env})


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_user_errors_are_one_line_and_exit_2(case, tmp_path):
    args, needle = BAD_INPUTS[case]
    proc = dheads([a.format(tmp=tmp_path) for a in args], AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    # Ray / library warnings may precede it, but the message is one line naming the problem
    assert lines and lines[-1].startswith("dheads"), proc.stderr
    assert needle in lines[-1], lines[-1]


def test_debug_shows_the_traceback(tmp_path):
    proc = dheads(["export", f"run={tmp_path}", f"out={tmp_path}/x", "--debug"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UserError" in proc.stderr
    proc = dheads(["export", f"run={tmp_path}", f"out={tmp_path}/x"], HYDRA_FULL_ERROR="1")
    assert "Traceback" in proc.stderr


def test_help_lists_the_discovered_jobs():
    proc = dheads(["--help"])
    assert proc.returncode == 0
    jobs = proc.stdout.split("jobs:")[1].replace(",", " ").split()
    assert {"train", "dub", "serve", "preprocess", "eval", "export", "info", "synth"} <= set(jobs)
