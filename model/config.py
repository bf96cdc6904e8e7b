"""Typed configuration of the model, the diffusion process and the samplers.

Plain dataclasses (no Hydra import): the platform layer registers them as
Hydra structured configs, checkpoints store them as JSON.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional


class AudioEncoderKind(str, Enum):
    conv = "conv"          # log-mel windows -> small CNN, trained jointly (default)
    wav2vec2 = "wav2vec2"  # torchaudio wav2vec2-base architecture, weights from a user file
    hubert = "hubert"      # torchaudio HuBERT-base architecture, weights from a user file


class BetaSchedule(str, Enum):
    linear = "linear"
    cosine = "cosine"


class SamplerKind(str, Enum):
    ddpm = "ddpm"          # ancestral sampling over all training steps
    respaced = "respaced"  # ancestral sampling over a respaced subset
    ddim = "ddim"          # DDIM with eta over a respaced subset


@dataclass
class AudioConfig:
    sample_rate: int = 16000
    fps: int = 25
    # Features over 0.2 s windows at a 40 ms hop: one window per video frame.
    window_s: float = 0.2
    n_mels: int = 80
    mel_hop: int = 160            # 10 ms -> 20 mel frames per 0.2 s window
    encoder: AudioEncoderKind = AudioEncoderKind.conv
    # Weights for wav2vec2/hubert: a safetensors file the user gives. Never downloaded.
    encoder_weights: Optional[str] = None
    embed_dim: int = 256          # one embedding per video frame
    context: int = 2              # m_y: frames k-m_y .. k+m_y condition frame k

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.fps

    @property
    def window_samples(self) -> int:
        return int(round(self.window_s * self.sample_rate))

    @property
    def window_frames(self) -> int:
        return 2 * self.context + 1


@dataclass
class ModelConfig:
    preset: str = "tiny"
    image_size: int = 64
    # noisy target (3) + identity frame (3) + two grayscale motion frames (2)
    in_channels: int = 8
    # epsilon (3) + variance interpolation v (3)
    out_channels: int = 6
    model_channels: int = 32
    channel_mult: List[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    # Extra self-attention at these downsample factors (1 = full res). The
    # middle block always has one attention layer (the paper's choice); the
    # official training config also used [4] at 128 px (the 32x32 level).
    attention_resolutions: List[int] = field(default_factory=list)
    # Attention heads as in guided-diffusion: num_head_channels > 0 fixes the
    # channels per head (heads = channels // num_head_channels) and wins;
    # num_head_channels = -1 uses num_heads. Neither changes params or FLOPs.
    num_head_channels: int = 64
    num_heads: int = 4
    dropout: float = 0.0
    num_groups: int = 32
    audio: AudioConfig = field(default_factory=AudioConfig)


@dataclass
class DiffusionConfig:
    steps: int = 1000
    schedule: BetaSchedule = BetaSchedule.cosine
    learn_sigma: bool = True
    lambda_vlb: float = 1e-4
    lambda_ls: float = 0.2


@dataclass
class SamplerConfig:
    kind: SamplerKind = SamplerKind.ddim
    # space_timesteps spec: "100", "ddim50", "10,10,10". Ignored for ddpm.
    steps: str = "ddim20"
    eta: float = 0.0


def to_dict(cfg: Any) -> dict:
    """Dataclass -> JSON-able dict (enums as their values)."""
    def conv(v):
        if isinstance(v, Enum):
            return v.value
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return {k: conv(v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls: type, data: dict) -> Any:
    """Inverse of to_dict, strict: unknown keys raise ValueError."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs = {}
    for k, v in data.items():
        default = getattr(cls(), k)
        if dataclasses.is_dataclass(default):
            kwargs[k] = from_dict(type(default), v)
        elif isinstance(default, Enum):
            kwargs[k] = type(default)(v)
        else:
            kwargs[k] = v
    return cls(**kwargs)
