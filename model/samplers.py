"""Samplers: ancestral DDPM, respaced ancestral, DDIM. Not nn.Modules.

A sampler owns a (possibly respaced) copy of the schedule and never changes
the trained `GaussianDiffusion`. Its `step()` is vectorised per sample:
`step_idx [B]` may differ across the batch (continuous batching in dubbing).
Step indices count down from `num_steps − 1` to 0; `model_timesteps(step_idx)`
maps them to the original timestep numbers the UNet was trained on.

Respacing (guided-diffusion `respace.py`): keep timesteps S = {s_0 < … < s_K}
and recompute β'_k = 1 − ᾱ_{s_k} / ᾱ_{s_{k−1}} so the respaced process has
exactly the original ᾱ at every kept step; the learned variance then
interpolates between the respaced β'_k and β̃'_k.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Optional

import numpy as np
import torch

from dheads.model.config import SamplerConfig, SamplerKind
from dheads.model.diffusion import GaussianDiffusion


def space_timesteps(num_steps: int, spec: str) -> list[int]:
    """Timesteps to keep, sorted.

    `"trailingN"`: N steps evenly spaced down from T−1 (round(T − i·T/N) − 1,
    i = 0..N−1; "trailing" spacing, Lin et al. 2024): sampling starts at
    the last training step, where x_T is pure noise as it was in training.
    `"ddimN"` (guided-diffusion / DDIM paper): range(0, T, stride) with
    exactly N elements; it starts at T − stride (950 for N = 20), where
    training still saw √ᾱ ≈ 0.08 of the image, not at T−1.
    `"10,15,20"`: split the process into equal sections and take that many
    evenly spaced (rounded) steps from each, ends included (so T−1 too).
    `"100"`: one section. `""`: all steps.
    """
    spec = spec.strip()
    if not spec:
        return list(range(num_steps))
    if spec.startswith("trailing"):
        desired = int(spec[len("trailing"):])
        if not 0 < desired <= num_steps:
            raise ValueError(f"cannot take {desired} trailing steps from {num_steps}")
        steps = np.round(np.arange(num_steps, 0, -num_steps / desired)).astype(int) - 1
        return sorted(set(int(s) for s in steps))
    if spec.startswith("ddim"):
        desired = int(spec[len("ddim"):])
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == desired:
                return list(range(0, num_steps, stride))
        if desired == num_steps:
            return list(range(num_steps))
        raise ValueError(f"cannot create exactly {desired} steps with an integer stride "
                         f"from {num_steps}")
    counts = [int(x) for x in spec.split(",")]
    size_per, extra = divmod(num_steps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def respaced_betas(alphas_cumprod: np.ndarray, keep: list[int]) -> np.ndarray:
    """β' of the process that visits only `keep` and has the same ᾱ there."""
    betas, last = [], 1.0
    for i in keep:
        betas.append(1.0 - alphas_cumprod[i] / last)
        last = alphas_cumprod[i]
    return np.array(betas, dtype=np.float64)


class Sampler(abc.ABC):
    """Shared machinery: the respaced schedule and the timestep map."""

    needs_noise = True

    def __init__(self, diffusion: GaussianDiffusion, keep: list[int], clip_denoised: bool = True):
        self.original = diffusion
        self.keep = list(keep)
        if self.keep == list(range(diffusion.num_timesteps)):
            self.process = diffusion  # nothing to respace; shared read-only
        else:
            ac = diffusion.alphas_cumprod.numpy()
            cfg = dataclasses.replace(diffusion.cfg, steps=len(self.keep))
            self.process = GaussianDiffusion(cfg, betas=respaced_betas(ac, self.keep))
        self.num_steps = len(self.keep)
        self.timestep_map = torch.tensor(self.keep, dtype=torch.long)
        self._maps: dict[torch.device, torch.Tensor] = {}
        self.clip_denoised = clip_denoised

    def model_timesteps(self, step_idx: torch.Tensor) -> torch.Tensor:
        """`[B]` step indices -> `[B]` original timesteps fed to the UNet."""
        table = self._maps.get(step_idx.device)
        if table is None:  # once per device: a blocking host->GPU copy per step syncs the host
            table = self._maps[step_idx.device] = self.timestep_map.to(step_idx.device)
        return table[step_idx]

    def _noise(self, x_t: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.randn_like(x_t) if noise is None else noise

    def step(self, model_out: torch.Tensor, x_t: torch.Tensor, step_idx: torch.Tensor,
             noise: Optional[torch.Tensor] = None,
             offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_{s_{k−1}} from x_{s_k} `[B, 3, H, W]` and the UNet output at
        `model_timesteps(step_idx)`. `offset` `[B, 3, H, W]` (identity
        residual): x̂₀ + offset is what is clipped to [-1, 1]. Computed in (at
        least) float32, returned in x_t's dtype."""
        work = torch.promote_types(x_t.dtype, torch.float32)
        noise = None if noise is None else noise.to(work)
        offset = None if offset is None else offset.to(work)
        return self._step(model_out, x_t.to(work), step_idx, noise, offset).to(x_t.dtype)

    @abc.abstractmethod
    def _step(self, model_out, x_t, step_idx, noise, offset) -> torch.Tensor:
        """One reverse step in the working dtype (see `step`)."""


class AncestralSampler(Sampler):
    """x_{t−1} = μ_θ(x_t, t) + σ_θ(x_t, t) z, z ~ N(0, I), no noise at the last step."""

    def _step(self, model_out, x_t, step_idx, noise, offset):
        out = self.process.p_mean_variance(model_out, x_t, step_idx, self.clip_denoised, offset)
        nonzero = (step_idx != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * self._noise(x_t, noise)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12) with σ = η √((1−ᾱ')/(1−ᾱ)) √(1 − ᾱ/ᾱ'),
    ᾱ' = ᾱ of the previous kept step. η = 0 is deterministic; η = 1 is the
    ancestral step with the posterior variance β̃.

    The coefficients are computed once in float64 (STYLE: schedule math in
    float64): in float32, 1 − ᾱ' − σ² at the first trailing step (t = T−1,
    ᾱ ≈ 2e-9) rounds to −6e-8 and its square root is NaN, which turned
    every frame of an η = 1 run into NaN (tests/model/test_samplers.py)."""

    def __init__(self, diffusion: GaussianDiffusion, keep: list[int], eta: float = 0.0,
                 clip_denoised: bool = True):
        super().__init__(diffusion, keep, clip_denoised)
        self.eta = float(eta)
        self.needs_noise = self.eta > 0
        ab = self.process.alphas_cumprod
        ab_prev = self.process.alphas_cumprod_prev
        sigma = self.eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt((1 - ab / ab_prev).clamp(min=0))
        self._coef = {"sqrt_ab_prev": torch.sqrt(ab_prev),
                      "eps_coef": torch.sqrt((1 - ab_prev - sigma ** 2).clamp(min=0)),
                      "sigma": sigma}
        self._coef_on: dict = {}

    def _gather(self, name: str, step_idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        key = (name, step_idx.device)
        table = self._coef_on.get(key)
        if table is None:
            table = self._coef_on[key] = self._coef[name].to(step_idx.device)
        return table[step_idx].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def _step(self, model_out, x_t, step_idx, noise, offset):
        out = self.process.p_mean_variance(model_out, x_t, step_idx, self.clip_denoised, offset)
        mean = (out["pred_xstart"] * self._gather("sqrt_ab_prev", step_idx, x_t)
                + self._gather("eps_coef", step_idx, x_t) * out["eps"])
        if self.eta == 0:
            return mean
        nonzero = (step_idx != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return mean + nonzero * self._gather("sigma", step_idx, x_t) * self._noise(x_t, noise)


def make_sampler(diffusion: GaussianDiffusion, cfg: SamplerConfig) -> Sampler:
    kind = SamplerKind(cfg.kind)
    n = diffusion.num_timesteps
    if kind == SamplerKind.ddpm:
        return AncestralSampler(diffusion, list(range(n)))
    keep = space_timesteps(n, cfg.steps)
    if kind == SamplerKind.respaced:
        return AncestralSampler(diffusion, keep)
    return DDIMSampler(diffusion, keep, eta=cfg.eta)
