"""The paper preset (128 px, ~204 M parameters) with bf16 FSDP2 over NCCL for
a few steps. Needs CUDA; skipped cleanly without it."""
from __future__ import annotations

import csv
import json
import math
import shutil

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_paper_preset_trains_in_bf16_with_fsdp2(ray_session, benchmark_dir, tmp_path):
    from dheads.jobs import train
    from dheads.platform.cli import main
    from dheads.platform.config import compose

    src = tmp_path / "clips"
    src.mkdir()
    for line in (benchmark_dir / "train" / "manifest.jsonl").read_text().splitlines()[:4]:
        stem = json.loads(line)["video"].rsplit(".", 1)[0]
        for ext in (".mp4", ".json"):
            shutil.copy(benchmark_dir / "train" / f"{stem}{ext}", src / f"{stem}{ext}")
    shards = tmp_path / "shards"
    assert main(["preprocess", f"input={src}", f"output={shards}", "model=paper"]) == 0

    workers = min(2, torch.cuda.device_count())
    job = compose("train", [
        "model=paper", "trainer=gpu", f"data.shards={shards}", f"trainer.num_workers={workers}",
        "trainer.cpus_per_worker=1", "trainer.batch_size=4", "trainer.steps=4",
        "trainer.warmup_steps=0", "trainer.checkpoint_every=4", "trainer.sample_every=0",
        "trainer.export_at_end=false", "trainer.max_failures=0",
        f"trainer.storage_path={tmp_path / 'runs'}", "trainer.name=paper"])
    assert train.run(job) == 0

    run = tmp_path / "runs" / "paper"
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert math.isfinite(float(r["loss"])) and float(r["grad_norm"]) > 0
        assert 0 < float(r["mfu"]) < 1
    assert (run / "step_00000004" / ".metadata").exists()
