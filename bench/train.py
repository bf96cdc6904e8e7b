"""Training throughput as one JSON line: Ray Train + FSDP2 at 1 and 2 workers
against a plain single-process torch loop on the same model and per-worker
batch, measured in the same run.

    python bench/train.py [--model tiny] [--image-size 64] [--batch-size 8] [--steps 30]
                          [--clips 8] [--shards URI] [--gpu] [--smoke]

`--smoke` (the test suite): 32 px, 2 clips, 4 steps of batch 2, and no
2-worker run (the 1-worker run covers the same code; `*_2w` are null).

- `samples_per_s_plain`: `train_step` (the job's own step: forward, losses,
  backward, clipping, AdamW, EMA) in one process on batches already in memory,
  `cpus_per_worker` torch threads.
- `samples_per_s_fsdp_{1,2}w`: `dheads train` through TorchTrainer with
  FSDP2, data streamed by the reader from real shards (preprocessed here from
  ../shared/benchmark unless --shards is given), metrics reported to Ray Train
  every step. Steady state: the median over steps after `--warmup`,
  excluding start-up and the checkpoint at the end.
- `overhead_ratio`: FSDP2 1-worker wall time per step ÷ plain time per step.
- `mfu`: of the 1-worker FSDP2 run, against the matmul peak measured on this
  machine (`dheads.platform.peak`); `mfu_2w` and `mfu_plain` alongside.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
JSON_KEYS = ("model", "image_size", "batch_size_per_worker", "device", "samples_per_s_plain",
             "samples_per_s_fsdp_1w", "samples_per_s_fsdp_2w", "overhead_ratio",
             "overhead_ratio_compute_only", "mfu", "mfu_2w", "mfu_plain", "peak_tflops",
             "train_gflops_per_sample", "fsdp_1w_step_s", "worker_torch_threads", "steps", "smoke")


def overrides(args, shards: str, storage: str, name: str, workers: int) -> list[str]:
    out = [f"model={args.model}", f"data.shards={shards}", f"trainer={'gpu' if args.gpu else 'cpu'}",
           f"trainer.num_workers={workers}", f"trainer.batch_size={args.batch_size}",
           f"trainer.steps={args.steps}", f"trainer.checkpoint_every={args.steps}",
           f"trainer.cpus_per_worker={args.cpus_per_worker}", "trainer.sample_every=0",
           "trainer.export_at_end=false", "trainer.max_failures=0",
           f"trainer.storage_path={storage}", f"trainer.name={name}"]
    if args.image_size:
        out.append(f"model.image_size={args.image_size}")
    return out


def preprocess(args, work: Path) -> str:
    from dheads.platform.cli import main

    from _paths import benchmark_dir, copy_clips

    src = work / "clips"
    copy_clips(benchmark_dir() / "train", src, args.clips)
    out = work / "shards"
    extra = [f"model.image_size={args.image_size}"] if args.image_size else []
    assert main(["preprocess", f"input={src}", f"output={out}", f"model={args.model}", *extra]) == 0
    return str(out)


def plain_batches(args, job, shards: str) -> list:
    """8 batches of the job's tuples in memory, read once for every plain loop
    (a Ray Data pass costs more start-up than the steps it feeds)."""
    from dheads.jobs.reader import TENSOR_COLUMNS, iter_training_batches, training_dataset
    from dheads.jobs.training.loop import to_model_batch

    device = torch.device("cuda" if args.gpu else "cpu")
    ds = training_dataset(shards, job.model, job.data).select_columns(list(TENSOR_COLUMNS))
    batches = []
    for b in iter_training_batches(ds, args.batch_size, job.data):
        batches.append(to_model_batch(b, device))
        if len(batches) == 8:
            break
    return batches


def plain_loop(args, job, batches: list) -> dict:
    """The job's train_step in this process on `batches`, no Ray Train, no FSDP."""
    from dheads.jobs.training.ema import EMA
    from dheads.jobs.training.loop import step_generator, train_step
    from dheads.jobs.training.schedule import learning_rate
    from dheads.model.diffusion import GaussianDiffusion
    from dheads.model.unet import DiffusedHeads

    device = torch.device("cuda" if args.gpu else "cpu")
    threads = torch.get_num_threads()
    if not args.gpu:
        torch.set_num_threads(args.cpus_per_worker)
    torch.manual_seed(0)
    model = DiffusedHeads(job.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.trainer.lr, foreach=True)
    ema = EMA(model, job.trainer.ema_rate)
    diffusion = GaussianDiffusion(job.diffusion)
    autocast = torch.autocast("cuda", torch.bfloat16) if args.gpu else _null()
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        lr = learning_rate(step, job.trainer.lr, job.trainer.warmup_steps, job.trainer.steps)
        with autocast:
            train_step(model, diffusion, optimizer, batches[step % len(batches)], lr,
                       job.trainer.grad_clip, step_generator(0, step, 0, device))
        ema.update(step)
        if args.gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return {"step_s": statistics.median(times[args.warmup:])}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fsdp_run(args, shards: str, storage: Path, workers: int) -> dict:
    from dheads.jobs import train
    from dheads.platform.config import compose

    name = f"bench-{workers}w"
    job = compose("train", overrides(args, shards, str(storage), name, workers))
    assert train.run(job) == 0
    rows = list(csv.DictReader((storage / name / "metrics.csv").read_text().splitlines()))
    steady = rows[args.warmup:]
    global_batch = args.batch_size * workers
    iter_s = [global_batch / float(r["samples_per_s"]) for r in steady]
    return {"step_s": statistics.median(iter_s),
            "compute_s": statistics.median(float(r["step_time_s"]) for r in steady),
            "mfu": statistics.median(float(r["mfu"]) for r in steady)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--image-size", type=int, default=0, help="0: the preset's")
    p.add_argument("--batch-size", type=int, default=8, help="per worker")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--shards", default=None)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--smoke", action="store_true", help="seconds, tiny inputs (the test suite)")
    args = p.parse_args()
    if args.smoke:
        args.image_size, args.clips, args.steps, args.warmup, args.batch_size = 32, 2, 4, 1, 2

    import ray

    from dheads.model.flops import count_flops
    from dheads.platform.config import compose
    from dheads.platform.peak import peak_flops

    ray.init(num_cpus=max(4, 2 * args.cpus_per_worker + 1), include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = Path(tempfile.mkdtemp(prefix="dheads-bench-train-"))
    try:
        shards = args.shards or preprocess(args, work)
        job = compose("train", overrides(args, shards, str(work), "plain", 1))
        device = torch.device("cuda" if args.gpu else "cpu")
        dtype = torch.bfloat16 if args.gpu else torch.float32
        if not args.gpu:
            torch.set_num_threads(args.cpus_per_worker)
        peak = peak_flops(device, dtype)
        flops_per_sample = 3 * count_flops(job.model, 1)
        # plain before and after the Ray runs: on a shared machine the load
        # drifts, and the ratio should not depend on which ran first
        batches = plain_batches(args, job, shards)
        before = plain_loop(args, job, batches)
        one = fsdp_run(args, shards, work, 1)
        after = plain_loop(args, job, batches)
        two = fsdp_run(args, shards, work, 2) \
            if not args.smoke and (not args.gpu or torch.cuda.device_count() > 1) else None
        plain = {"step_s": (before["step_s"] + after["step_s"]) / 2}
        threads = json.loads((work / "bench-1w" / "workers" / "rank0.json").read_text())["torch_threads"]
        b = args.batch_size
        plain_sps = b / plain["step_s"]
        out = {
            "model": args.model, "image_size": job.model.image_size, "batch_size_per_worker": b,
            "device": torch.cuda.get_device_name() if args.gpu else f"cpu x{args.cpus_per_worker} threads/worker",
            "samples_per_s_plain": round(plain_sps, 3),
            "samples_per_s_fsdp_1w": round(b / one["step_s"], 3),
            "samples_per_s_fsdp_2w": round(2 * b / two["step_s"], 3) if two else None,
            "overhead_ratio": round(one["step_s"] / plain["step_s"], 3),
            "overhead_ratio_compute_only": round(one["compute_s"] / plain["step_s"], 3),
            "mfu": round(one["mfu"], 4),
            "mfu_2w": round(two["mfu"], 4) if two else None,
            "mfu_plain": round(flops_per_sample * plain_sps / peak, 4),
            "peak_tflops": round(peak / 1e12, 4),
            "train_gflops_per_sample": round(flops_per_sample / 1e9, 3),
            "plain_step_s_before_after": [round(before["step_s"], 4), round(after["step_s"], 4)],
            "fsdp_1w_step_s": round(one["step_s"], 4), "worker_torch_threads": threads,
            "steps": args.steps, "warmup_steps_excluded": args.warmup,
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "smoke": args.smoke,
        }
        print(json.dumps(out), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
