"""The per-worker training loop (runs inside Ray Train's TorchTrainer).

Each worker builds DiffusedHeads from the typed config, shards it with FSDP2,
restores the latest checkpoint if the run has one, then repeats `train_step`
over its `streaming_split` shard of the training set until `steps`.

Exact resume: everything random in a step is a pure function of the run's
seed, the step and the rank (the timesteps and noise come from a generator
seeded with them), and the data order is deterministic given the epoch
(`preserve_order` in the split, a local shuffle seeded by the epoch). The
checkpoint records the epoch and how many batches of it were consumed; a
resumed worker skips exactly those. So a restarted run computes bit-for-bit
the next-step loss an uninterrupted run computes.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dheads.jobs.training.ema import EMA
from dheads.jobs.training.schedule import learning_rate
from dheads.model.config import MotionConfig
from dheads.model.diffusion import GaussianDiffusion
from dheads.model.frameloop import noisy_motion
from dheads.model.precision import use_cpu_bf16
from dheads.platform import storage
from dheads.platform.checkpointing import Checkpointer, Progress, TrainingState
from dheads.platform.config import DataConfig, TrainJob

TRAIN_DATASET = "train"


def run_folder(job: TrainJob) -> str:
    return storage.join(job.trainer.storage_path, job.trainer.name)


# ------------------------------------------------------------------ one step
def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The RNG of one step of one rank: resumed runs draw the same t and noise."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 4096 + rank)


def train_step(model: nn.Module, diffusion: GaussianDiffusion, optimizer: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor], lr: float, grad_clip: float,
               generator: torch.Generator, motion: MotionConfig | None = None,
               cpu_bf16: bool = False) -> dict[str, torch.Tensor]:
    """One optimizer step on `batch` (this rank's part of the global batch).

    With `motion.train_noise_max` > 0 the motion frames get Gaussian noise of
    σ ~ U(0, max) per sample (drawn, like t and the diffusion noise, from
    `generator`). Returns this rank's mean losses (`loss`, `loss_simple`,
    `loss_vlb`, `loss_ls`, `loss_eye`) and the global gradient norm before clipping.
    `cpu_bf16`: forward and loss under bf16 autocast on a CPU (weights,
    gradients and the optimizer stay fp32; the loss math is upcast).
    """
    x0 = batch["target"]
    b = x0.shape[0]
    t = torch.randint(0, diffusion.num_timesteps, (b,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    cond = {"identity": batch["identity"], "motion": batch["motion"], "audio": batch["audio"]}
    if "eye_open" in batch:
        cond["eye_open"] = batch["eye_open"]
    if motion is not None and motion.train_noise_max > 0:
        sigma = torch.rand(b, generator=generator, device=x0.device) * motion.train_noise_max
        z = torch.randn(cond["motion"].shape, generator=generator, device=x0.device, dtype=x0.dtype)
        cond["motion"] = noisy_motion(cond["motion"], sigma, z)
        if motion.embed_noise:
            cond["motion_sigma"] = sigma
    with torch.autocast("cpu", torch.bfloat16, enabled=cpu_bf16 and x0.device.type == "cpu"):
        losses = diffusion.training_losses(model, x0, cond, batch["mouth_box"], t=t, noise=noise)
    loss = losses["loss"].mean()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if isinstance(grad_norm, DTensor):  # partial norms of the shards -> the global norm
        grad_norm = grad_norm.full_tensor()
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm, foreach=True)
    optimizer.step()
    return {"loss": loss.detach(), "loss_simple": losses["mse"].detach().mean(),
            "loss_vlb": losses["vlb"].detach().mean(), "loss_ls": losses["ls"].detach().mean(),
            "loss_eye": losses["eye"].detach().mean(),
            "grad_norm": grad_norm.detach()}


def to_model_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Reader rows (float32 already: `jobs/reader.py`) -> model inputs on `device`."""
    return {k: batch[k].to(device, torch.float32, non_blocking=True)
            for k in ("target", "identity", "motion", "audio", "mouth_box", "eye_open") if k in batch}


# ------------------------------------------------------------------- the data
@dataclass
class EpochBatches:
    """Batches of this worker's dataset shard, epoch after epoch, from `progress`.

    `progress.epoch` / `progress.batches_in_epoch` advance as batches are
    handed out; a resumed iterator skips the batches its epoch already used.
    The reader's local shuffle is seeded by (data seed, epoch).
    """
    shard: object          # ray.data.DataIterator from ray.train.get_dataset_shard
    batch_size: int
    data: DataConfig
    progress: Progress

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from dheads.jobs.reader import iter_training_batches

        while True:
            skip, n = self.progress.batches_in_epoch, 0
            epoch_data = replace(self.data, seed=self.data.seed * 100_003 + self.progress.epoch)
            for batch in iter_training_batches(self.shard, self.batch_size, epoch_data):
                n += 1
                if n <= skip:
                    continue
                self.progress.batches_in_epoch = n
                yield batch
            if n == 0:
                raise RuntimeError("the training set has fewer rows per worker than one batch")
            self.progress.epoch += 1
            self.progress.batches_in_epoch = 0


def global_mean(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Mean over ranks of per-rank scalars (one all-reduce for all of them)."""
    keys = sorted(values)
    stacked = torch.stack([values[k].float().reshape(()) for k in keys])
    if world > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= world
    return dict(zip(keys, stacked.cpu().tolist()))


# ------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from dheads.jobs.training.reporting import RankZeroReporter
    from dheads.model.flops import count_flops
    from dheads.model.unet import DiffusedHeads
    from dheads.platform.fsdp import shard_model

    job: TrainJob = config["job"]
    tc = job.trainer
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    run_uri = run_folder(job)
    if device.type == "cpu":
        # as many intra-op threads as the worker's CPUs, whatever the host's
        # core count: the step's arithmetic (and so exact resume) then does not
        # depend on the machine it lands on
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))

    torch.manual_seed(tc.seed)  # equal initial weights on every rank, before sharding
    model = DiffusedHeads(job.model).to(device)
    shard_model(model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                  foreach=True)
    ema = EMA(model, tc.ema_rate)
    progress = Progress()
    checkpointer = Checkpointer(TrainingState(model, optimizer, ema.shadow, progress),
                                job.model, job.diffusion, run_uri, job.storage)
    checkpointer.restore()
    # Each worker says where it runs and where it started from, so an operator
    # (or a test) can find the process and see what a restart resumed from.
    storage.write_bytes(storage.join(run_uri, "workers", f"rank{rank}.json"),
                        json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                    "start_step": progress.step,
                                    "torch_threads": torch.get_num_threads()}).encode(), job.storage)
    diffusion = GaussianDiffusion(job.diffusion)

    cpu_bf16 = device.type == "cpu" and use_cpu_bf16(tc.cpu_bf16)
    end = min(tc.steps, tc.stop_at_step) if tc.stop_at_step > 0 else tc.steps
    reporter = RankZeroReporter(job, run_uri, rank, world, device, count_flops(job.model, 1),
                                resume_step=progress.step) if rank == 0 else None
    batches = iter(EpochBatches(ray.train.get_dataset_shard(TRAIN_DATASET), tc.batch_size,
                                job.data, progress))
    last = time.perf_counter()
    while progress.step < end:
        t_data = time.perf_counter()
        batch = to_model_batch(next(batches), device)
        data_s = time.perf_counter() - t_data
        step = progress.step
        lr = learning_rate(step, tc.lr, tc.warmup_steps, tc.steps, tc.lr_schedule, tc.min_lr_ratio)
        t0 = time.perf_counter()
        out = train_step(model, diffusion, optimizer, batch, lr, tc.grad_clip,
                         step_generator(tc.seed, step, rank, device), job.model.motion, cpu_bf16)
        ema.update(step)
        progress.step += 1
        metrics = global_mean(out, world)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        metrics.update(step=progress.step, epoch=progress.epoch, lr=lr, step_time_s=now - t0,
                       data_s=data_s, iter_time_s=now - last, global_batch=tc.batch_size * world)
        last = now
        if reporter:
            reporter.log(metrics)
        if progress.step % tc.checkpoint_every == 0 or progress.step == end:
            if reporter:
                reporter.flush()
            checkpointer.save(metrics)
            last = time.perf_counter()  # checkpoint time is not step time
        elif progress.step % max(1, tc.log_every) == 0:
            ray.train.report(metrics)
        if tc.sample_every and job.val and progress.step % tc.sample_every == 0:
            full = ema.full_state(model)  # collective
            if reporter:
                reporter.write_samples(full)
            last = time.perf_counter()
    if tc.export_at_end and progress.step >= tc.steps:
        full = ema.full_state(model)
        if reporter:
            reporter.export(full)
    if reporter:
        reporter.close()

