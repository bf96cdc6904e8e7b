"""uint8 RGB frames <-> the model's images in [-1, 1] (docs/architecture.md, "Conventions").

Frames on disk, in shards and in videos are `uint8 [..., H, W, 3]`; the
model sees float32 `[..., 3, H, W]` in [-1, 1], x = u / 127.5 − 1. The two
functions below are the only place that scale and layout change is written.
Both take numpy arrays or torch tensors.
"""
from __future__ import annotations

import numpy as np
import torch


def to_unit(frames: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """uint8 `[..., H, W, 3]` -> float32 `[..., 3, H, W]` in [-1, 1] (numpy in,
    numpy out; a tensor stays a tensor on its device)."""
    if isinstance(frames, torch.Tensor):
        return frames.movedim(-1, -3).to(torch.float32) / 127.5 - 1.0
    return np.moveaxis(np.asarray(frames), -1, -3).astype(np.float32) / 127.5 - 1.0


def quantize(images: torch.Tensor) -> torch.Tensor:
    """`[..., 3, H, W]` in [-1, 1] -> uint8 levels, same layout and device
    (clamped, rounded to the nearest level): `to_uint8` without the move to
    the host, so a GPU loop can keep its frames small without a sync."""
    x = images.detach().to(torch.float32)
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def to_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """`[..., 3, H, W]` in [-1, 1] (or levels from `quantize`) -> uint8
    `[..., H, W, 3]` numpy (clamped, rounded to the nearest level)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        x = quantize(x)
    return x.movedim(-3, -1).cpu().numpy()


__all__ = ["to_unit", "to_uint8", "quantize"]
