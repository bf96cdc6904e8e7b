"""Training checkpoints: one interface for everything a run needs to go on.

A checkpoint is a torch.distributed.checkpoint (DCP) directory — each rank
writes its own shard of the model, the optimizer and the EMA weights — plus a
`job.json` with the model and diffusion configs (so `dheads export` can build
the network without the training config). It travels through
`ray.train.report(checkpoint=...)`, which merges the ranks' directories into
`<storage_path>/<name>/step_XXXXXXXX/` (a local path or `s3://`), keeps the
last `CheckpointConfig.num_to_keep`, and hands the latest back to a restarted
run through `ray.train.get_checkpoint()` (after a worker failure, or when the
same command is run again with the same storage_path and name).

What is saved (`TrainingState`, a DCP `Stateful`, as in Ray's FSDP2
template's `AppState`): sharded model and optimizer state, sharded EMA
weights, the progress counters (step, data epoch, batches consumed in that
epoch) and each rank's torch RNG state.

Every read goes through `platform/safedcp.py`, which refuses anything in a
checkpoint beyond plain data (DCP's `.metadata` is a pickle).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from dheads.model.config import DiffusionConfig, ModelConfig, from_dict, to_dict
from dheads.platform import storage
from dheads.platform.config import StorageConfig
from dheads.platform.safedcp import SafeLoadPlanner, dcp_load, read_checkpoint_metadata

CHECKPOINT_PREFIX = "step_"
JOB_FILE = "job.json"
# Written into a step's folder in the run's storage after Ray Train has
# uploaded every rank's files: `.metadata` alone can arrive before the shards
# (an upload cut short), so only a step with the marker counts as complete.
COMPLETE_FILE = "COMPLETE"


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


@dataclass
class Progress:
    """Where training stands: optimizer steps done and the data position."""
    step: int = 0
    epoch: int = 0              # passes over the training set started so far - 1
    batches_in_epoch: int = 0   # batches of `epoch` already consumed by every rank

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.step, self.epoch, self.batches_in_epoch], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Progress":
        step, epoch, pos = (int(v) for v in t.tolist())
        return cls(step, epoch, pos)


class TrainingState(Stateful):
    """Model + optimizer + EMA + progress + RNG of one rank, as DCP sees it.

    `ema` maps parameter names to tensors shaped like the (sharded) parameters.
    Counters and RNG states are tensors, so nothing here is pickled.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema: dict[str, torch.Tensor], progress: Progress):
        self.model = model
        self.optimizer = optimizer
        self.ema = ema
        self.progress = progress

    @staticmethod
    def _rng_key() -> str:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return f"rank{rank}"

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {
            "model": model_sd,
            "optim": optim_sd,
            "ema": self.ema,
            "progress": self.progress.as_tensor(),
            # Per-rank keys: DCP would otherwise keep one copy of a plain tensor.
            "rng": {self._rng_key(): rng},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer,
                       model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        with torch.no_grad():
            for name, t in sd["ema"].items():
                if t is not self.ema[name]:
                    self.ema[name].copy_(t)
        # in place: the training loop holds this very Progress object
        vars(self.progress).update(vars(Progress.from_tensor(sd["progress"])))
        rng = sd.get("rng", {}).get(self._rng_key())
        if rng:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])


class Checkpointer:
    """Saves and restores a `TrainingState` through Ray Train's storage.

    Every rank calls `save` / `restore` (both are collective).
    """

    def __init__(self, state: TrainingState, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig,
                 run_uri: str | None = None, storage_cfg: StorageConfig | None = None):
        self.state = state
        self.model_cfg = model_cfg
        self.diffusion_cfg = diffusion_cfg
        self.run_uri, self.storage_cfg = run_uri, storage_cfg  # where Ray Train persists the steps

    def restore(self) -> bool:
        """Load the latest checkpoint Ray Train has for this run, if any."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as path:
            self.load_from(path)
        return True

    def load_from(self, path: str) -> None:
        keys = read_checkpoint_metadata(path).state_dict_metadata
        state: dict[str, Any] = {"app": self.state}
        # RNG states are per rank: a run resumed on a different number of
        # workers keeps its own generators instead.
        if not any(k.startswith(f"app.rng.{TrainingState._rng_key()}.") for k in keys):
            state = {"app": _WithoutRng(self.state)}
        dcp_load(state, path)

    def save(self, metrics: dict[str, float]) -> None:
        """Write the DCP shards of every rank and report them as one checkpoint."""
        import ray.train

        step = self.state.progress.step
        with tempfile.TemporaryDirectory(prefix="dheads-ckpt-") as tmp:
            dcp.save({"app": self.state}, checkpoint_id=tmp)
            if not dist.is_initialized() or dist.get_rank() == 0:
                Path(tmp, JOB_FILE).write_text(json.dumps({
                    "step": step,
                    "model": to_dict(self.model_cfg),
                    "diffusion": to_dict(self.diffusion_cfg),
                }, indent=2))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(step))
        # report returns once every rank's upload is done (it synchronises the ranks)
        if self.run_uri is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            storage.write_bytes(storage.join(self.run_uri, checkpoint_dir_name(step), COMPLETE_FILE),
                                json.dumps({"step": step}).encode(), self.storage_cfg)


class _WithoutRng(Stateful):
    def __init__(self, inner: TrainingState):
        self.inner = inner

    def state_dict(self) -> dict[str, Any]:
        sd = self.inner.state_dict()
        sd.pop("rng")
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.inner.load_state_dict(sd)


# ------------------------------------------------------------ offline reading
def latest_checkpoint(run_uri: str, storage_cfg: StorageConfig | None = None) -> str | None:
    """URI of the newest complete `step_*` checkpoint directory of a run
    folder, or None: one with `COMPLETE_FILE`; in a run that has no marker
    at all (written before markers existed), one with `.metadata`."""
    fs, path = storage.resolve(run_uri, storage_cfg)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    steps = sorted(i.base_name for i in infos
                   if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX))
    marked = [n for n in steps if storage.exists(storage.join(run_uri, n, COMPLETE_FILE), storage_cfg)]
    if marked:
        return storage.join(run_uri, marked[-1])
    for name in reversed(steps):  # a directory without metadata is an upload cut short
        if storage.exists(storage.join(run_uri, name, ".metadata"), storage_cfg):
            return storage.join(run_uri, name)
    return None


def load_ema_model(checkpoint_dir: str, use_ema: bool = True
                   ) -> tuple[nn.Module, ModelConfig, DiffusionConfig, int]:
    """Plain (unsharded) DiffusedHeads holding the EMA weights (or, with
    `use_ema=False`, the raw weights) of a local DCP checkpoint.

    Runs in one process without a process group: DCP reassembles the shards
    written by all ranks. Buffers come from the trained model's state.
    """
    from dheads.model.unet import DiffusedHeads

    meta = json.loads(Path(checkpoint_dir, JOB_FILE).read_text())
    model_cfg = from_dict(ModelConfig, meta["model"])
    diffusion_cfg = from_dict(DiffusionConfig, meta["diffusion"])
    model = DiffusedHeads(model_cfg)
    model_sd = model.state_dict()
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    dcp_load({"app": {"model": model_sd, "ema": ema}}, checkpoint_dir,
             planner=SafeLoadPlanner(allow_partial_load=False))
    if use_ema:
        model_sd.update(ema)
    model.load_state_dict(model_sd)
    return model.eval(), model_cfg, diffusion_cfg, int(meta["step"])


__all__ = ["Progress", "TrainingState", "Checkpointer", "latest_checkpoint", "load_ema_model",
           "checkpoint_dir_name", "JOB_FILE", "COMPLETE_FILE", "CHECKPOINT_PREFIX"]
