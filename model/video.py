"""Video-level helpers around the frame loop (`model/frameloop.py`).

`generate()` admits B clips into a `FrameLoop` and runs it to the end. The
training reader builds the same conditioning from real frames with
`clip_motion_frames` and `audio_windows` (clean motion frames; the noise
augmentation is applied in the training step).
"""
from __future__ import annotations

import torch
from torch import nn

from dheads.model.audio import AudioFeatures
from dheads.model.frameloop import GRAY, Clip, FrameLoop, grayscale, motion_frames
from dheads.model.samplers import Sampler


def clip_motion_frames(frames: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """Motion frames for every frame of a real clip at once (training).

    `frames [T, 3, H, W]`, `identity [3, H, W]` (both [-1, 1]) -> `[T, 2, H, W]`;
    frame k gets frames k−2, k−1 with the identity frame before the start."""
    gray = grayscale(torch.cat([identity[None], identity[None], frames], dim=0))
    t = frames.shape[0]
    return torch.cat([gray[0:t], gray[1:t + 1]], dim=1)


def window_indices(k: int | torch.Tensor, context: int, n_frames: int) -> torch.Tensor:
    """Frame indices k−context … k+context clamped to the clip: `[2c+1]`, or
    `[B, 2c+1]` for a tensor `k [B]`."""
    offsets = torch.arange(-context, context + 1)
    if isinstance(k, torch.Tensor):
        offsets = offsets.to(k.device)
        return (k.reshape(-1, 1) + offsets).clamp(0, n_frames - 1)
    return (k + offsets).clamp(0, n_frames - 1)


def audio_windows(features: torch.Tensor, k: int | torch.Tensor, context: int,
                  dim: int = 0) -> torch.Tensor:
    """The audio window of frame k: `features [T, *feat]` -> `[2c+1, *feat]`
    (indices clamped: edge frames replicated). With `dim=1`, `features
    [B, T, *feat]` and k an int or `[B]` -> `[B, 2c+1, *feat]`."""
    if dim == 0:
        return features[window_indices(int(k), context, features.shape[0]).to(features.device)]
    if dim != 1:
        raise ValueError("dim must be 0 ([T, ...]) or 1 ([B, T, ...])")
    b, t = features.shape[:2]
    kk = k if isinstance(k, torch.Tensor) else torch.full((b,), int(k))
    idx = window_indices(kk.to(features.device), context, t)  # [B, W]
    return features[torch.arange(b, device=features.device)[:, None], idx]


def clip_seed(seed: int, index: int) -> int:
    """The seed of clip `index` of a `generate(seed=...)` call."""
    return int(seed) * 1_000_003 + int(index)


@torch.no_grad()
def generate(model: nn.Module, sampler: Sampler, identity: torch.Tensor, audio: torch.Tensor,
             n_frames: int, seed: int = 0, noise_correlation: float = 0.0,
             autocast: torch.dtype | None = None) -> torch.Tensor:
    """Generate `n_frames` frames for B clips: `[B, T, 3, H, W]` in [-1, 1].

    `identity [B, 3, H, W]` in [-1, 1]; `audio [B, S]` 16 kHz mono (or
    precomputed features `[B, T, *feature_shape]`). Clip b is seeded with
    `clip_seed(seed, b)` (its own generator in the frame loop), so equal
    inputs and seed give equal frames, whatever the batch. `noise_correlation`,
    `autocast`: see `FrameLoop`.
    """
    cfg = getattr(model, "cfg", None) or model.module.cfg
    device = identity.device
    if audio.ndim == 2:
        features = AudioFeatures(cfg.audio)
        feats = torch.stack([features(a.cpu(), n_frames) for a in audio])
    else:
        feats = audio
        if feats.shape[1] < n_frames:
            raise ValueError(f"{feats.shape[1]} feature frames for {n_frames} video frames")
    loop = FrameLoop(model, sampler, capacity=identity.shape[0], device=device, dtype=identity.dtype,
                     autocast=autocast, noise_correlation=noise_correlation)
    for b in range(identity.shape[0]):
        loop.admit(Clip(b, identity[b], feats[b], n_frames, seed=clip_seed(seed, b)))
    out = loop.run()
    return torch.stack([out[b] for b in range(identity.shape[0])])


__all__ = ["generate", "clip_seed", "clip_motion_frames", "audio_windows", "window_indices",
           "grayscale", "motion_frames", "GRAY"]
