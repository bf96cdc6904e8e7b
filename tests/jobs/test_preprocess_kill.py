"""Kill -9 the `dheads preprocess` driver mid-run, re-run: every clip exactly
once, and no half-written shard is ever taken by a reader."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq

from dheads.jobs import preprocess as pp
from dheads.jobs import shards as shard_format
from dheads.jobs.reader import load_clip_rows
from dheads.platform.config import compose


def test_killed_driver_then_rerun_gives_every_clip_once(ray_session, benchmark_dir, tmp_path):
    src, out = tmp_path / "in", tmp_path / "shards"
    src.mkdir()
    for k in range(12):
        for ext in ("mp4", "json"):
            shutil.copy(benchmark_dir / "val" / f"val_{k:04d}.{ext}", src)
    args = [f"input={src}", f"output={out}", "data.clips_per_shard=1"]
    # The driver joins the session's Ray (as `dheads submit`/a cluster would); Ray
    # kills a job's actors when its driver dies.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "dheads.platform.cli", "preprocess", *args,
                             "data.workers=1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(out.glob("shard-*.parquet"))) < 2:
            assert proc.poll() is None, "the driver ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)             # the driver only, mid-run
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Ray kills the dead driver's tasks and actors; once it has, their CPUs are
    # free again and nothing of the old run can still write a shard
    total = ray_session.cluster_resources()["CPU"]
    deadline = time.time() + 60
    while ray_session.available_resources().get("CPU", 0) < total:
        assert time.time() < deadline, "the killed driver's workers still hold CPUs after 60 s"
        time.sleep(0.1)
    before = shard_format.shard_uris(str(out), compose("preprocess").storage)
    assert 2 <= len(before) < 12, "killed too late to test anything"
    assert not (out / "summary.json").exists()
    for uri in before:                                # every visible shard is complete
        assert pq.read_table(uri).num_rows == 1
    done = shard_format.done_set(str(out), compose("preprocess").storage)

    cfg = compose("preprocess", [*args, "data.workers=2"])
    summary = pp.preprocess(cfg, progress=False)
    assert summary.skipped == len(done) and summary.ok == 12 - len(done) and summary.failed == 0
    ids = [c["clip_id"] for c in load_clip_rows(str(out))]
    assert len(ids) == 12 and len(set(ids)) == 12
    assert not list(out.glob("_tmp*"))
