"""The autoregressive frame loop: joins the UNet, the schedule and a sampler.

Frame k is denoised conditioned on the identity frame, the grayscale motion
frames k−2 and k−1 (identity copies before the clip starts) and the audio
window k−m_y … k+m_y (edge frames replicated). B clips advance together, so
one denoising step is one batched UNet call. The building blocks
(`motion_frames`, `clip_motion_frames`, `audio_windows`) are shared with the
training data reader and the dubbing engine.
"""
from __future__ import annotations

import torch
from torch import nn

from dheads.model.audio import AudioFeatures
from dheads.model.diffusion import GaussianDiffusion
from dheads.model.samplers import Sampler

# ITU-R BT.601 luma, applied to [-1, 1] images
GRAY = (0.299, 0.587, 0.114)


def grayscale(img: torch.Tensor) -> torch.Tensor:
    """`[..., 3, H, W]` -> `[..., 1, H, W]`."""
    r, g, b = img.unbind(dim=-3)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(-3)


def motion_frames(prev2: torch.Tensor, prev1: torch.Tensor) -> torch.Tensor:
    """Frames k−2 and k−1 `[..., 3, H, W]` in [-1, 1] -> `[..., 2, H, W]`
    (channel 0 = k−2, channel 1 = k−1)."""
    return torch.cat([grayscale(prev2), grayscale(prev1)], dim=-3)


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


def _model_cfg(model: nn.Module):
    cfg = getattr(model, "cfg", None) or getattr(getattr(model, "module", None), "cfg", None)
    if cfg is None:
        raise TypeError("generate() needs a DiffusedHeads model (with .cfg)")
    return cfg


@torch.no_grad()
def generate(model: nn.Module, diffusion: GaussianDiffusion, sampler: Sampler,
             identity: torch.Tensor, audio: torch.Tensor, n_frames: int,
             seed: int = 0) -> torch.Tensor:
    """Generate `n_frames` frames for B clips: `[B, T, 3, H, W]` in [-1, 1].

    `identity [B, 3, H, W]` in [-1, 1]; `audio [B, S]` 16 kHz mono (or
    precomputed features `[B, T, *feature_shape]`). All randomness comes
    from one `torch.Generator` seeded with `seed`, so equal inputs and seed
    give equal frames. `diffusion` is the trained process the sampler was
    made from; it is not changed.
    """
    del diffusion  # the sampler holds its (respaced) copy of the schedule
    cfg = _model_cfg(model)
    device = identity.device
    b = identity.shape[0]
    if audio.ndim == 2:
        features = AudioFeatures(cfg.audio)
        feats = torch.stack([features(a.cpu(), n_frames) for a in audio]).to(device)
    else:
        feats = audio.to(device)
        if feats.shape[1] < n_frames:
            raise ValueError(f"{feats.shape[1]} feature frames for {n_frames} video frames")
    gen = torch.Generator(device=device).manual_seed(int(seed))
    prev2 = prev1 = identity
    frames = []
    for k in range(n_frames):
        motion = motion_frames(prev2, prev1)
        window = audio_windows(feats, k, cfg.audio.context, dim=1)
        x = torch.randn(identity.shape, generator=gen, device=device, dtype=identity.dtype)
        for i in reversed(range(sampler.num_steps)):
            idx = torch.full((b,), i, device=device, dtype=torch.long)
            out = model(x, sampler.model_timesteps(idx), identity, motion, window)
            noise = (torch.randn(x.shape, generator=gen, device=device, dtype=x.dtype)
                     if sampler.needs_noise else None)
            x = sampler.step(out, x, idx, noise)
        x = x.clamp(-1, 1)
        frames.append(x)
        prev2, prev1 = prev1, x
    return torch.stack(frames, dim=1)

