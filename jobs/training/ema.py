"""Exponential moving average of the weights: `ema <- d * ema + (1 - d) * w`,
d = min(rate, (1 + step) / (10 + step)).

The warm-up of d (as in TensorFlow's ExponentialMovingAverage with
num_updates) keeps the average from being dominated by the random init in
short runs: with a constant 0.999, 300 steps leave 74 % of the init in the
EMA and the exported model samples noise. d is a function of the step only,
so a resumed run averages exactly like an uninterrupted one.

Works on FSDP2-sharded parameters as they are: each rank averages its own
shard (the EMA tensors are DTensors shaped like the parameters), so the EMA
costs 1/world of the model's memory per rank and no communication. The
shadow dict is what the checkpoint stores and what export reads.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    def __init__(self, model: nn.Module, rate: float):
        self.rate = rate
        self.params = [p for _, p in model.named_parameters()]
        self.shadow: dict[str, torch.Tensor] = {
            n: p.detach().clone() for n, p in model.named_parameters()}

    def decay(self, step: int) -> float:
        return min(self.rate, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the weights after optimizer step `step` (0-based)."""
        torch._foreach_lerp_([_local(e) for e in self.shadow.values()],
                             [_local(p.detach()) for p in self.params], 1.0 - self.decay(step))

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Unsharded EMA weights plus the model's buffers, on CPU.

        Collective under FSDP2: every rank must call it.
        """
        out = {}
        for n, e in self.shadow.items():
            full = e.full_tensor() if isinstance(e, DTensor) else e
            out[n] = full.detach().to("cpu", torch.float32).clone()
        for n, b in model.named_buffers():
            out[n] = (b.full_tensor() if isinstance(b, DTensor) else b).detach().cpu().clone()
        return out
