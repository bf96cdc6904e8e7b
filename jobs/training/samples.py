"""Sample videos during training: a few val clips generated with few DDIM
steps, written as side-by-side mp4s (generated | ground truth) with the
clip's audio, into `<run>/samples/step_XXXXXXXX/<clip>.mp4`."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dheads.model.config import DiffusionConfig, ModelConfig, SamplerConfig
from dheads.model.images import to_uint8, to_unit
from dheads.platform import media, storage
from dheads.platform.config import StorageConfig


@dataclass
class ValClip:
    name: str
    frames: torch.Tensor   # [T, 3, H, W] in [-1, 1] at the model's size
    audio: torch.Tensor    # [T * 640] float32, 16 kHz mono


def to_model_frames(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 `[T, H, W, 3]` -> float `[T, 3, size, size]` in [-1, 1]."""
    x = to_unit(torch.from_numpy(np.ascontiguousarray(frames)))
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1)


def load_val_clips(val_uri: str, n: int, n_frames: int, model_cfg: ModelConfig,
                   storage_cfg: StorageConfig) -> list[ValClip]:
    """The first `n` videos (sorted by name) under `val_uri`, cut to `n_frames`."""
    spf = model_cfg.audio.samples_per_frame
    clips = []
    for uri in storage.list_files(val_uri, media.VIDEO_EXTS, storage_cfg)[:n]:
        with storage.local_path(uri, storage_cfg) as path:
            clip = media.read_video(path, fps=model_cfg.audio.fps, sample_rate=model_cfg.audio.sample_rate)
        t = min(n_frames, clip.n_frames)
        audio = media.fit_length(clip.audio, t * spf)
        clips.append(ValClip(storage.basename(uri).rsplit(".", 1)[0],
                             to_model_frames(clip.frames[:t], model_cfg.image_size),
                             torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))))
    return clips


@torch.no_grad()
def write_samples(model: torch.nn.Module, diffusion_cfg: DiffusionConfig, sampler_cfg: SamplerConfig,
                  clips: list[ValClip], run_uri: str, step: int, storage_cfg: StorageConfig,
                  seed: int = 0) -> list[str]:
    """Generate every clip from its first frame and audio; returns the mp4 URIs."""
    from dheads.model.diffusion import GaussianDiffusion
    from dheads.model.samplers import make_sampler
    from dheads.model.video import generate

    diffusion = GaussianDiffusion(diffusion_cfg)
    sampler = make_sampler(diffusion, sampler_cfg)
    device = next(model.parameters()).device
    out = []
    for clip in clips:
        t = clip.frames.shape[0]
        video = generate(model, sampler, clip.frames[:1].to(device),
                         clip.audio[None].to(device), t, seed=seed)[0]
        side_by_side = np.concatenate([to_uint8(video), to_uint8(clip.frames)], axis=2)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, f"{clip.name}.mp4")
            media.write_video(path, side_by_side, fps=model.cfg.audio.fps, audio=clip.audio.numpy(),
                              sample_rate=model.cfg.audio.sample_rate)
            uri = storage.join(run_uri, "samples", f"step_{step:08d}", f"{clip.name}.mp4")
            storage.upload_file(path, uri, storage_cfg)
        out.append(uri)
    return out
