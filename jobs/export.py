"""`dheads export run=URI out=URI [weights=ema|model]`: the EMA (default) or raw weights of a training run's latest
checkpoint as a model checkpoint (`model.safetensors` + `config.json`), the
format `dheads.model.checkpoint.load_checkpoint` and every inference job read.

Runs in one process without Ray or a process group: DCP reassembles the
shards every rank wrote. `run` is the Ray Train run folder
(`<trainer.storage_path>/<trainer.name>`), local or s3://; `out` as well.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from torch import nn

from dheads.model.config import DiffusionConfig, ModelConfig
from dheads.platform import storage
from dheads.platform.checkpointing import checkpoint_dir_name, latest_checkpoint, load_ema_model
from dheads.platform.config import ExportJob, StorageConfig
from dheads.platform.errors import UserError


def write_export(model: nn.Module, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig,
                 out_uri: str, storage_cfg: StorageConfig) -> str:
    """Save a plain model as a model checkpoint at `out_uri` (local or s3://)."""
    from dheads.model.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory(prefix="dheads-export-") as tmp:
        save_checkpoint(tmp, model, model_cfg, diffusion_cfg)
        for f in sorted(Path(tmp).iterdir()):
            storage.upload_file(f, storage.join(out_uri, f.name), storage_cfg)
    return out_uri


def run(cfg: ExportJob) -> int:
    if cfg.step > 0:
        checkpoint = storage.join(cfg.run, checkpoint_dir_name(cfg.step))
        if not storage.exists(storage.join(checkpoint, ".metadata"), cfg.storage):
            raise UserError(f"run={cfg.run} step={cfg.step}: no complete checkpoint "
                            f"{checkpoint_dir_name(cfg.step)} there (the run keeps its last "
                            "trainer.keep_checkpoints; step=0 takes the latest)")
    else:
        checkpoint = latest_checkpoint(cfg.run, cfg.storage)
    if checkpoint is None:
        raise UserError(f"run={cfg.run}: no training checkpoint (step_*/) there; "
                        "pass the run folder <trainer.storage_path>/<trainer.name> of `dheads train`")
    with tempfile.TemporaryDirectory(prefix="dheads-dcp-") as tmp:
        model, model_cfg, diffusion_cfg, step = load_ema_model(storage.download_dir(checkpoint, tmp, cfg.storage),
                                                              use_ema=cfg.weights == "ema")
    write_export(model, model_cfg, diffusion_cfg, cfg.out, cfg.storage)
    print(json.dumps({"checkpoint": checkpoint, "step": step, "weights": cfg.weights.value,
                      "out": cfg.out}))
    return 0
