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


class Prediction(str, Enum):
    """What the UNet's first 3 output channels predict (and L_simple compares)."""
    eps = "eps"   # the noise ε (DDPM, the paper)
    x0 = "x0"     # the clean sample x₀ (Ramesh et al. 2022; strong at low SNR)
    v = "v"       # v = √ᾱ ε − √(1−ᾱ) x₀ (Salimans & Ho 2022)


class VarianceType(str, Enum):
    """Σ_θ of the reverse steps."""
    learned_range = "learned_range"  # interpolate log β and log β̃ (improved DDPM; the paper)
    fixed_small = "fixed_small"      # β̃_t, the posterior variance
    fixed_large = "fixed_large"      # β_t


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
class MotionPrior:
    """The generator of head-pose and eye-openness tracks at inference
    (`model/motionprior.py`), fitted on the training shards' measured tracks
    by `dheads train` and stored in the checkpoint's JSON config.

    Per pose axis (angle°, tx, ty in 128-px pixels; `platform/facemotion.py`)
    a damped random walk of the track relative to the identity frame,
    v_t = φ v_{t−1} − κ (p_{t−1} − μ) + σ ε_t, with μ ~ N(0, μ_std²) per clip
    (the identity frame's own offset from the head's resting pose) and
    v_1 ~ N(0, v_std²). Blinks: a per-frame start probability with a
    refractory gap, each blink the mean eye-openness curve of the training
    blinks (`blink_shape`; 1 = open)."""
    fitted: bool = False
    phi: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    kappa: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    sigma: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    mu_std: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    v_std: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    blink_rate: float = 0.0          # blink starts per frame where one may start (open, blink_gap after the last)
    blink_gap: int = 10              # frames from one blink start to the next, at least
    blink_shape: List[float] = field(default_factory=list)
    clips: int = 0                   # training clips it was fitted on
    frames: int = 0
    blinks: int = 0                  # blinks in them (their starts)


@dataclass
class MotionConfig:
    """The motion frames (the two previous frames, grayscale).

    Training shows the UNet clean previous frames, inference its own outputs:
    errors compound frame by frame (exposure bias). Gaussian noise of σ drawn
    per sample from U(0, `train_noise_max`) on the motion channels in
    training, and a fixed σ = `infer_noise` at inference, make the model
    rely on them less for detail (dheads extension). With `embed_noise` the
    UNet also sees σ (an embedding added to the timestep's).
    `stabilize_every` > 0 resets the older motion frame to the identity frame
    every that many generated frames (the official code's `stabilize`)."""
    train_noise_max: float = 0.0
    infer_noise: float = 0.0
    embed_noise: bool = False
    stabilize_every: int = 0
    # Explicit motion (dheads extension, issue 18): the identity frame is
    # warped to the target frame's head pose (`model/posewarp.py`), and the
    # target's eye openness is embedded like the timestep. Both signals are
    # measured by `dheads preprocess` in training and drawn from `prior` at
    # inference. A checkpoint whose config lacks them was trained without.
    pose_warp: bool = False
    eye_embed: bool = False
    prior: MotionPrior = field(default_factory=MotionPrior)

    @property
    def conditioned(self) -> bool:
        return self.pose_warp or self.eye_embed

    def describe(self) -> str:
        """What motion conditioning this model has, in words (for `dheads info` / logs)."""
        if not self.conditioned:
            return ("no explicit motion conditioning (head pose and blinks come only from the "
                    "motion frames; trained before pose_warp/eye_embed or without them)")
        parts = [n for n, on in (("head pose (warped identity)", self.pose_warp),
                                 ("eye openness", self.eye_embed)) if on]
        prior = (f"motion prior fitted on {self.prior.clips} clips" if self.prior.fitted
                 else "no fitted motion prior: the head stays at the identity's pose, eyes open")
        return "conditioned on " + " and ".join(parts) + "; " + prior


@dataclass
class ModelConfig:
    """The UNet. Defaults: the tiny network (configs/model/tiny.yaml), whose
    file names only what it sets beyond them: its smaller audio front end and
    the motion extensions. `audio` and `motion` default to what a stored
    config without those keys means (the paper's front end, no extensions),
    so checkpoints written before a key existed load as they were trained."""
    preset: str = "tiny"
    image_size: int = 64
    # noisy target (3) + identity frame (3) + two grayscale motion frames (2)
    in_channels: int = 8
    # epsilon (3) + variance interpolation v (3)
    out_channels: int = 6
    model_channels: int = 32
    channel_mult: List[int] = field(default_factory=lambda: [1, 2, 3])
    num_res_blocks: int = 1
    # Extra self-attention at these downsample factors (1 = full res). The
    # middle block always has one attention layer (the paper's choice); the
    # official training config also used [4] at 128 px (the 32x32 level).
    attention_resolutions: List[int] = field(default_factory=list)
    # Attention heads as in guided-diffusion: num_head_channels > 0 fixes the
    # channels per head (heads = channels // num_head_channels) and wins;
    # num_head_channels = -1 uses num_heads. Neither changes params or FLOPs.
    num_head_channels: int = 32
    num_heads: int = 4
    dropout: float = 0.0
    num_groups: int = 16
    audio: AudioConfig = field(default_factory=AudioConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)


@dataclass
class DiffusionConfig:
    """The diffusion process and its loss. Defaults: the paper's (configs/
    diffusion/paper.yaml names nothing): ε-prediction, the cosine schedule
    over 1000 steps, learned-range variance, λ_vlb = 1e-4, λ_ls = 0.2 (mouth
    box without margin here; the official code adds 5 px). dheads' default
    (configs/diffusion/default.yaml) names its three extensions. The paper's
    values stay the dataclass's because a stored config without a key (written
    before the extension existed) was trained without it."""
    steps: int = 1000
    schedule: BetaSchedule = BetaSchedule.cosine
    variance: VarianceType = VarianceType.learned_range
    prediction: Prediction = Prediction.eps
    # Min-SNR-γ loss weighting (Hang et al. 2023); 0: off (the paper).
    min_snr_gamma: float = 0.0
    # Diffuse r = x₀ − identity instead of x₀ (dheads extension): a UNet
    # whose output is zero then samples the identity frame exactly.
    identity_residual: bool = False
    lambda_vlb: float = 1e-4
    lambda_ls: float = 0.2
    # L_ls box grown by this fraction of the image size on every side
    # (official: 5 px at 128 px ≈ 0.04).
    mouth_margin: float = 0.0
    # L_eye (dheads extension): the same loss over each sample's eye band (from
    # its mouth box, as `platform/facemotion.py::eye_band`), weighted like L_ls.
    # A blink changes a few hundred pixels for a few frames: in L_simple it is
    # noise; the band's own mean makes it a signal the eye embedding can learn.
    lambda_eye: float = 0.0

    @property
    def learn_sigma(self) -> bool:
        return VarianceType(self.variance) == VarianceType.learned_range

    @staticmethod
    def upgrade(data: dict) -> dict:
        """Configs written before `variance` existed said `learn_sigma`."""
        data = dict(data)
        if "learn_sigma" in data:
            learned = data.pop("learn_sigma")
            data.setdefault("variance", "learned_range" if learned else "fixed_small")
        return data


@dataclass
class SamplerConfig:
    """Defaults: the measured default sampler (configs/sampler/ddim.yaml names
    nothing), DDIM (eta 0) on 5 steps spaced back from T−1 ("trailing", so
    sampling starts where training saw pure noise): best on val at half the
    cost of trailing10 (docs/quality.md)."""
    kind: SamplerKind = SamplerKind.ddim
    # space_timesteps spec: "trailing20" (includes T−1), "100", "ddim50"
    # (guided-diffusion: starts below T−1), "10,10,10". Ignored for ddpm.
    steps: str = "trailing5"         # the measured default (docs/quality.md)
    eta: float = 0.0
    # ρ of x_T (and of the motion-frame noise) from one frame to the next:
    # 0 a fresh draw per frame (the paper), 1 one draw per clip; in between
    # the details drift smoothly (dheads extension against flicker).
    noise_correlation: float = 0.0


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
    if hasattr(cls, "upgrade"):
        data = cls.upgrade(data)
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
