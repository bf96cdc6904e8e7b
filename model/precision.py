"""Whether bf16 autocast is worth it on this CPU.

oneDNN runs bf16 convolutions and matmuls natively on CPUs with AVX512-BF16
or AMX (measured here, an AVX512-BF16 x86 core: 1.5-1.9x per training step
and per sampling step of the tiny UNet) and not at all, or emulated, on
others. `None` in a config (`trainer.cpu_bf16`, `dub.cpu_bf16`) means: use
bf16 where oneDNN says the CPU supports it.
"""
from __future__ import annotations

from typing import Optional

import torch


def cpu_bf16_supported() -> bool:
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def use_cpu_bf16(setting: Optional[bool]) -> bool:
    """A config's `cpu_bf16` (True, False or None = auto) -> on or off here."""
    return cpu_bf16_supported() if setting is None else bool(setting)


__all__ = ["cpu_bf16_supported", "use_cpu_bf16"]
