"""Fit the motion prior (`model/motionprior.py`) on the training shards'
measured tracks, once, in the driver before training starts: the fitted
numbers go into the model config, so every checkpoint and export carries
them (JSON, no pickle)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq

from dheads.model import motionprior
from dheads.model.config import ModelConfig
from dheads.platform import facemotion, storage
from dheads.platform.config import StorageConfig


def fit_from_shards(shards_uri: str, model_cfg: ModelConfig, storage_cfg: StorageConfig) -> ModelConfig:
    """`model_cfg` with `motion.prior` fitted on every clip of the shards
    (unchanged when the model has no explicit motion or its prior is already
    fitted, e.g. given by the user or kept from the run being resumed)."""
    from dheads.jobs.reader import MOTION_COLUMNS, check_motion_columns, require_shards

    if not model_cfg.motion.conditioned or model_cfg.motion.prior.fitted:
        return model_cfg
    check_motion_columns(shards_uri, model_cfg, storage_cfg)
    poses, eyes = [], []
    for uri in require_shards(shards_uri, storage_cfg):
        fs, path = storage.resolve(uri, storage_cfg)
        table = pq.read_table(path, filesystem=fs, columns=MOTION_COLUMNS)
        for pose, eye in zip(table.column("head_pose").to_pylist(), table.column("eye_open").to_pylist()):
            poses.append(np.asarray(pose, np.float64).reshape(-1, 3))
            eyes.append(np.asarray(eye, np.float64))
    flags = [facemotion.detect_blinks(e) for e in eyes]
    prior = motionprior.fit(poses, eyes, flags)
    print(f"[train] motion prior fitted on {prior.clips} clips ({prior.frames} frames): "
          f"{prior.blinks / max(prior.frames, 1) * model_cfg.audio.fps:.2f} blinks/s in them, pose step σ "
          f"{', '.join(f'{s:.3f}' for s in prior.sigma)} (angle°, tx, ty px)", flush=True)
    return dataclasses.replace(model_cfg, motion=dataclasses.replace(model_cfg.motion, prior=prior))
