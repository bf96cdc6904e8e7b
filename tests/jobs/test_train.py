"""`dheads train` end to end on CPU: Ray Train + FSDP2 (2 gloo workers), real
shards from `dheads preprocess`, checkpoints on local disk and on an S3
endpoint (moto_server), exact resume, a worker killed mid-run, export.

Two runs share one set of shards (6 benchmark clips at 32 px):
  A  local, 8 steps, uninterrupted: loss goes down, CSV/PNG/samples/export;
  B  s3://, stopped at step 4, then the same command again, whose rank 1 is
     SIGKILLed after the step-6 checkpoint: Ray Train restarts the worker
     group from it, and steps 1..8 reproduce A's losses exactly.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dheads.platform.config import compose

N_CLIPS = 6
STEPS = 8


@pytest.fixture(scope="module")
def tiny_shards(ray_session, benchmark_dir, copy_clips, tmp_path_factory) -> str:
    """6 benchmark clips preprocessed once by the real `dheads preprocess` (32 px)."""
    from dheads.platform.cli import main

    src = tmp_path_factory.mktemp("clips")
    copy_clips(benchmark_dir / "train", src, N_CLIPS)
    out = tmp_path_factory.mktemp("shards")
    assert main(["preprocess", f"input={src}", f"output={out}", "model.image_size=32"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def val_dir(benchmark_dir, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("val")
    shutil.copy(benchmark_dir / "val" / "val_0000.mp4", d / "val_0000.mp4")
    return str(d)


def train_job(shards: str, storage_path: str, name: str, *extra: str):
    return compose("train", [
        "model=tiny", "model.image_size=32", f"data.shards={shards}", "trainer=cpu",
        "trainer.num_workers=2", "trainer.batch_size=4", f"trainer.steps={STEPS}",
        "trainer.lr=1e-3", "trainer.warmup_steps=0", "trainer.lr_schedule=constant",
        "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2", "trainer.max_failures=2",
        f"trainer.storage_path={storage_path}", f"trainer.name={name}", *extra])


def read_csv(text: str) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(text.splitlines())]


@pytest.fixture(scope="module")
def run_a(tiny_shards, val_dir, tmp_path_factory) -> Path:
    """Uninterrupted reference run, with sample videos every 4 steps."""
    from dheads.jobs import train

    root = tmp_path_factory.mktemp("runs")
    job = train_job(tiny_shards, str(root), "a", f"val={val_dir}", "trainer.sample_every=4",
                    "trainer.sample_clips=1", "trainer.sample_frames=2", "sampler.steps=ddim2")
    assert train.run(job) == 0
    return root / "a"


def test_two_worker_fsdp_run_lowers_loss_and_writes_its_run_folder(run_a):
    rows = read_csv((run_a / "metrics.csv").read_text())
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    for r in rows:
        assert r["grad_norm"] > 0 and r["samples_per_s"] > 0 and 0 < r["mfu"] < 1
    assert (run_a / "loss_curve.png").stat().st_size > 1000
    # keep the last 2 of the checkpoints at steps 2, 4, 6, 8
    assert sorted(p.name for p in run_a.glob("step_*")) == ["step_00000006", "step_00000008"]
    assert all((p / "COMPLETE").is_file() for p in run_a.glob("step_*"))  # marked once uploaded
    for step in (4, 8):
        mp4 = run_a / "samples" / f"step_{step:08d}" / "val_0000.mp4"
        assert mp4.stat().st_size > 0
    from dheads.platform import media

    clip = media.read_video(mp4)
    assert clip.frames.shape[1:] == (32, 64, 3)  # generated | ground truth
    assert (run_a / "export" / "model.safetensors").exists()
    assert {json.loads(p.read_text())["start_step"] for p in (run_a / "workers").glob("*.json")} == {0}


def test_exported_ema_weights_load_into_generate(run_a, tmp_path):
    import torch

    from dheads.model.checkpoint import load_checkpoint
    from dheads.model.config import SamplerConfig
    from dheads.model.diffusion import GaussianDiffusion
    from dheads.model.samplers import make_sampler
    from dheads.model.video import generate
    from dheads.platform.cli import main

    # `dheads export` from the run folder's latest DCP checkpoint, too
    assert main(["export", f"run={run_a}", f"out={tmp_path / 'export'}"]) == 0
    from_cli = load_checkpoint(tmp_path / "export")
    at_end = load_checkpoint(run_a / "export")
    for k, v in at_end.model.state_dict().items():
        assert torch.equal(v, from_cli.model.state_dict()[k]), k

    diffusion = GaussianDiffusion(at_end.diffusion_cfg)
    sampler = make_sampler(diffusion, SamplerConfig(steps="ddim2"))
    identity = torch.rand(1, 3, 32, 32) * 2 - 1
    video = generate(at_end.model, sampler, identity, torch.zeros(1, 2 * 640), 2, seed=0)
    assert video.shape == (1, 2, 3, 32, 32) and torch.isfinite(video).all()


# Why comparing losses of two separate runs bit for bit is sound here: every
# worker runs one intra-op thread (trainer.cpus_per_worker=1, set by the loop
# whatever the host's cores), so no reduction order depends on the machine;
# the step's t and noise come from a generator seeded by (seed, step, rank);
# the data order is a function of (seed, epoch); and the only cross-rank
# arithmetic is gloo's sum of two ranks' values, a + b, which is exact and
# order-free (floating-point addition is commutative). The resumed and the
# uninterrupted run therefore execute the same operations on the same bits.
def test_a_stopped_run_on_s3_resumes_and_a_killed_worker_restarts_with_the_same_losses(
        run_a, tiny_shards, s3_bucket):
    """One run on S3, interrupted both ways (one Ray Train start-up fewer than
    two runs): stopped at step 4, then the same command again, whose rank 1 is
    SIGKILLed once Ray Train has registered the step-6 checkpoint. The losses
    of steps 1..8 are the uninterrupted run's."""
    from dheads.jobs import train
    from dheads.platform import storage

    bucket, storage_cfg = s3_bucket
    root = f"s3://{bucket}/runs"
    run = f"{root}/b"
    extra = f"storage.endpoint_url={storage_cfg.endpoint_url}"
    assert train.run(train_job(tiny_shards, root, "b", extra, "trainer.stop_at_step=4")) == 0
    assert storage.exists(f"{run}/step_00000004/.metadata", storage_cfg)

    def read_json(name: str) -> dict | None:
        try:
            return json.loads(storage.read_bytes(f"{run}/{name}", storage_cfg))
        except Exception:  # noqa: BLE001 - not written yet, or being replaced
            return None

    seen: dict = {}

    def kill_rank1_after_the_step_6_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and "killed" not in seen:
            snapshot = read_json("checkpoint_manager_snapshot.json") or {}
            latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
            rank1 = read_json("workers/rank1.json")
            if latest == "step_00000006" and rank1 and rank1["start_step"] == 4:
                seen["resumed_from"] = rank1["start_step"]     # the second command's start
                os.kill(rank1["pid"], signal.SIGKILL)
                seen["killed"] = rank1["pid"]
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank1_after_the_step_6_checkpoint, daemon=True)
    killer.start()
    assert train.run(train_job(tiny_shards, root, "b", extra)) == 0  # the same command again
    killer.join(timeout=1)
    assert "killed" in seen, "rank 1 was never killed"
    assert seen["resumed_from"] == 4                        # the stopped run resumed, not restarted
    restarted = read_json("workers/rank1.json")
    assert restarted["pid"] != seen["killed"] and restarted["start_step"] >= 6  # from a checkpoint

    resumed = read_csv(storage.read_bytes(f"{run}/metrics.csv", storage_cfg).decode())
    reference = read_csv((run_a / "metrics.csv").read_text())
    assert [int(r["step"]) for r in resumed] == list(range(1, STEPS + 1))
    for key in ("loss", "loss_simple", "loss_vlb", "loss_ls", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in reference], key
    assert storage.exists(f"{run}/export/model.safetensors", storage_cfg)

    # `dheads export` reads the DCP shards back from S3 and writes to S3
    from dheads.model.checkpoint import load_checkpoint
    from dheads.platform.cli import main

    assert main(["export", f"run={run}", f"out={run}/export-cli", extra]) == 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("model.safetensors", "config.json"):
            Path(tmp, name).write_bytes(storage.read_bytes(f"{run}/export-cli/{name}", storage_cfg))
        assert load_checkpoint(tmp).model_cfg.image_size == 32
