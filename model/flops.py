"""Parameter and FLOP counts of a model preset, measured rather than estimated.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over one
forward on the meta device (no memory, no compute): a multiply-add counts as 2
FLOPs; convolutions, matmuls and scaled-dot-product attention are counted,
elementwise ops and normalisations are not (they are < 1 % here).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dheads.model.audio import feature_shape
from dheads.model.config import ModelConfig


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def example_inputs(cfg: ModelConfig, batch: int = 1, device="cpu") -> tuple:
    """A `(x_t, t, identity, motion, audio)` tuple of the right shapes."""
    s = cfg.image_size
    return (torch.zeros(batch, 3, s, s, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
            torch.zeros(batch, 3, s, s, device=device),
            torch.zeros(batch, 2, s, s, device=device),
            torch.zeros(batch, cfg.audio.window_frames, *feature_shape(cfg.audio), device=device))


def build_meta(cfg: ModelConfig) -> nn.Module:
    from dataclasses import replace

    from dheads.model.unet import DiffusedHeads

    # encoder weights are irrelevant for counting and cannot load onto meta
    cfg = replace(cfg, audio=replace(cfg.audio, encoder_weights=None))
    with torch.device("meta"):
        return DiffusedHeads(cfg)


def count_flops(cfg: ModelConfig, batch: int = 1) -> int:
    """FLOPs of one forward of `DiffusedHeads(cfg)` at `batch`."""
    model = build_meta(cfg)
    inputs = example_inputs(cfg, batch, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return int(counter.get_total_flops())
