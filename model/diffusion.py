"""Gaussian diffusion: noise schedule, forward process, posterior, losses.

Follows improved DDPM (Nichol & Dhariwal 2021) and guided-diffusion's
`gaussian_diffusion.py`: the schedule is computed once in float64 and kept as
tensors; every per-timestep quantity is gathered at `t` and cast to the
input's dtype only at the point of use.

The UNet's first three output channels predict ε (the paper), x₀ or
v = √ᾱ ε − √(1−ᾱ) x₀ (`DiffusionConfig.prediction`); all three convert to
x̂₀ and ε̂ for the posterior. With learned-range variance the last three
are the interpolation v_Σ ∈ [-1, 1]:

    log Σ_θ = (v_Σ+1)/2 · log β_t + (1 − (v_Σ+1)/2) · log β̃_t    (improved DDPM eq. 15)

Losses (Diffused Heads, Stypułkowski et al. 2024, eq. 4–6), with y the
prediction target (ε, x₀ or v) and w_t the min-SNR-γ weight (1 when off):

    L_simple = w_t ‖y − y_θ‖²                      (mean over pixels)
    L_vlb    = KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t)) in bits/dim,
               −log p_θ(x_0|x_1) (discretised Gaussian) at t = 0,
               with the mean stop-gradiented so L_vlb only trains Σ_θ
    L_ls     = w_t ‖y − y_θ‖² over each sample's mouth box (+ margin) only
    L_eye    = the same over each sample's eye band (dheads, `lambda_eye`; 0 in the paper)
    L        = (1 − λ_vlb − λ_ls − λ_eye) L_simple + λ_vlb L_vlb + λ_ls L_ls + λ_eye L_eye

Identity residual (dheads extension, `identity_residual`): the process
runs on r = x₀ − identity; clipping and the decoder likelihood still act on
x₀ = r + identity ∈ [-1, 1], through the `offset` argument below.

This object is never changed after construction: respaced samplers build a
new `GaussianDiffusion` from their own β (see samplers.py).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from dheads.model.config import BetaSchedule, DiffusionConfig, Prediction, VarianceType


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    """ᾱ(t) of the cosine schedule, t ∈ [0, 1] (improved DDPM eq. 17)."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def make_betas(schedule: BetaSchedule, steps: int) -> np.ndarray:
    """float64 β_1..β_T. Linear: DDPM's 1e-4..0.02 scaled to `steps`;
    cosine: β_t = min(1 − ᾱ(t/T)/ᾱ((t−1)/T), 0.999)."""
    schedule = BetaSchedule(schedule)
    if schedule == BetaSchedule.linear:
        scale = 1000.0 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    return np.array([min(1 - cosine_alpha_bar((i + 1) / steps) / cosine_alpha_bar(i / steps), 0.999)
                     for i in range(steps)], dtype=np.float64)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log p(x) of 8-bit data rescaled to [-1, 1] under a Gaussian discretised
    into 256 bins (DDPM's decoder L_0), elementwise, in nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mouth_mask(mouth_box: torch.Tensor, height: int, width: int, margin: float = 0.0) -> torch.Tensor:
    """`[B, 4]` boxes (x0, y0, x1, y1 in pixels) -> `[B, 1, H, W]` float mask
    of the pixels the box, grown by `margin` pixels on every side, overlaps."""
    box = mouth_box.to(torch.float32)
    # no torch.tensor(..., device=): a blocking host->GPU copy every training step
    box = torch.cat([box[:, :2] - margin, box[:, 2:] + margin], dim=1)
    xs = torch.arange(width, device=box.device, dtype=torch.float32)
    ys = torch.arange(height, device=box.device, dtype=torch.float32)
    in_x = (xs[None] + 1 > box[:, 0:1]) & (xs[None] < box[:, 2:3])  # [B, W]
    in_y = (ys[None] + 1 > box[:, 1:2]) & (ys[None] < box[:, 3:4])  # [B, H]
    return (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1).float()


def eye_mask(mouth_box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`[B, 4]` mouth boxes -> `[B, 1, H, W]` mask of each face's eye band:
    x within ±0.95 w of the mouth centre, y from 0.95 w to 0.1 w above its top
    (w the mouth width; the geometry of `platform/facemotion.py::eye_band`)."""
    box = mouth_box.to(torch.float32)
    w, cx, top = box[:, 2] - box[:, 0], 0.5 * (box[:, 0] + box[:, 2]), box[:, 1]
    band = torch.stack([cx - 0.95 * w, top - 0.95 * w, cx + 0.95 * w, top - 0.1 * w], dim=1)
    return mouth_mask(band, height, width)


class GaussianDiffusion:
    """Schedule tensors (float64, CPU; cached per device on use) and the
    diffusion math. `betas` overrides the configured schedule (respacing)."""

    def __init__(self, cfg: DiffusionConfig, betas: Optional[np.ndarray] = None):
        self.cfg = cfg
        b = make_betas(cfg.schedule, cfg.steps) if betas is None else np.asarray(betas, np.float64)
        if b.ndim != 1 or not ((b > 0).all() and (b <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.num_timesteps = len(b)
        alphas = 1.0 - b
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        t64 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))  # noqa: E731
        self.betas = t64(b)
        self.alphas_cumprod = t64(ac)
        self.alphas_cumprod_prev = t64(ac_prev)
        self.sqrt_alphas_cumprod = t64(np.sqrt(ac))
        self.sqrt_one_minus_alphas_cumprod = t64(np.sqrt(1.0 - ac))
        self.sqrt_recip_alphas_cumprod = t64(np.sqrt(1.0 / ac))
        self.sqrt_recipm1_alphas_cumprod = t64(np.sqrt(1.0 / ac - 1))
        self.posterior_variance = t64(post_var)
        # β̃_0 = 0: clip its log to β̃_1 as guided-diffusion does
        self.posterior_log_variance_clipped = t64(
            np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 else np.log(b))
        self.log_betas = t64(np.log(b))
        # fixed_large: β_t, with β̃_1 at t = 0 (guided-diffusion: a better decoder L_0)
        self.log_betas_large = t64(np.log(np.append(post_var[1], b[1:])) if len(b) > 1 else np.log(b))
        self.snr = t64(ac / (1.0 - ac))
        self.posterior_mean_coef1 = t64(b * np.sqrt(ac_prev) / (1.0 - ac))
        self.posterior_mean_coef2 = t64((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))
        self._on_device: dict = {}

    # -- gathering ---------------------------------------------------------
    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Schedule tensor `name` at `t` [B], shaped [B, 1, 1, 1] in like's dtype."""
        key = (name, t.device)
        arr = self._on_device.get(key)
        if arr is None:
            arr = getattr(self, name).to(t.device)
            self._on_device[key] = arr
        out = arr[t].to(like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    # -- forward process and posterior ---------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε  (DDPM eq. 4)."""
        return (self._extract("sqrt_alphas_cumprod", t, x0) * x0
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0) (DDPM eq. 6–7)."""
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x0
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        var = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_var = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, var, log_var

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t, t, x0):
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def predict_xstart(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂₀ from the UNet's prediction of `cfg.prediction`."""
        kind = Prediction(self.cfg.prediction)
        if kind == Prediction.eps:
            return self.predict_xstart_from_eps(x_t, t, pred)
        if kind == Prediction.x0:
            return pred
        # v: x₀ = √ᾱ x_t − √(1−ᾱ) v
        return (self._extract("sqrt_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * pred)

    def prediction_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet should output for x_t = q_sample(x0, t, noise)."""
        kind = Prediction(self.cfg.prediction)
        if kind == Prediction.eps:
            return noise
        if kind == Prediction.x0:
            return x0
        return (self._extract("sqrt_alphas_cumprod", t, x0) * noise
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * x0)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """`[B]` min-SNR-γ weights of the MSE on the prediction target
        (Hang et al. 2023; ε: min(SNR, γ)/SNR, x₀: min(SNR, γ),
        v: min(SNR, γ)/(SNR+1)); ones when γ = 0."""
        gamma = float(self.cfg.min_snr_gamma)
        if gamma <= 0:
            return torch.ones(t.shape, device=t.device, dtype=torch.float32)
        snr = self._extract("snr", t, torch.empty(0, dtype=torch.float64)).reshape(-1)
        clipped = snr.clamp(max=gamma)
        kind = Prediction(self.cfg.prediction)
        if kind == Prediction.eps:
            w = clipped / snr
        elif kind == Prediction.x0:
            w = clipped
        else:
            w = clipped / (snr + 1)
        return w.to(torch.float32)

    def split_output(self, model_out: torch.Tensor):
        """`[B, 6, H, W]` -> (prediction [B,3,H,W], v_Σ [B,3,H,W] or None), at
        least float32 (a bf16 UNet output is upcast before any schedule math).
        Fixed variances use the first 3 channels only."""
        model_out = model_out.to(torch.promote_types(model_out.dtype, torch.float32))
        if self.cfg.learn_sigma:
            return model_out.chunk(2, dim=1)
        return model_out[:, :3], None

    def p_mean_variance(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = True, offset: Optional[torch.Tensor] = None) -> dict:
        """p_θ(x_{t−1} | x_t) from the model output: dict `mean`, `variance`,
        `log_variance`, `pred_xstart`, `eps` (ε̂ consistent with the clipped
        x̂₀). `offset` (identity residual): x̂₀ + offset is clipped to [-1, 1]."""
        pred, v = self.split_output(model_out)
        variance = VarianceType(self.cfg.variance)
        if variance == VarianceType.learned_range:
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        elif variance == VarianceType.fixed_small:
            log_var = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        else:
            log_var = self._extract("log_betas_large", t, x_t).expand_as(x_t)
        x0 = self.predict_xstart(pred, x_t, t)
        if clip_denoised:
            x0 = x0.clamp(-1, 1) if offset is None else (x0 + offset).clamp(-1, 1) - offset
        mean, _, _ = self.q_posterior_mean_variance(x0, x_t, t)
        return dict(mean=mean, variance=torch.exp(log_var), log_variance=log_var,
                    pred_xstart=x0, eps=self.predict_eps_from_xstart(x_t, t, x0))

    # -- losses --------------------------------------------------------------
    def vlb_terms(self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                  t: torch.Tensor, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample L_t in bits/dim: the KL at t > 0, the decoder NLL at t = 0
        (of the 8-bit image x₀ + offset)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_out, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
        shift = 0.0 if offset is None else offset
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0 + shift, means=out["mean"] + shift, log_scales=0.5 * out["log_variance"]))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def training_losses(self, model: Callable, x0: torch.Tensor, cond: dict,
                        mouth_box: torch.Tensor, t: Optional[torch.Tensor] = None,
                        noise: Optional[torch.Tensor] = None) -> dict:
        """Diffused Heads loss for a batch. `x0` [B,3,H,W] in [-1,1];
        `cond = dict(identity=[B,3,H,W], motion=[B,2,H,W], audio=[B,W,*feat]
        [, motion_sigma=[B]] [, eye_open=[B]])` (identity already warped to
        the target's pose with `motion.pose_warp`); `mouth_box` [B,4] pixels. Returns `[B]`
        tensors `loss`, `mse` (the weighted L_simple), `vlb`, `ls`, `eye` (0 without `lambda_eye`)."""
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        offset = cond["identity"] if self.cfg.identity_residual else None
        data = x0 if offset is None else x0 - offset
        x_t = self.q_sample(data, t, noise)
        extra = {k: cond[k] for k in ("motion_sigma", "eye_open") if cond.get(k) is not None}
        model_out = model(x_t, t, cond["identity"], cond["motion"], cond["audio"], **extra)
        pred, v = self.split_output(model_out)
        weight = self.loss_weight(t).to(pred.dtype)
        sq = (self.prediction_target(data, noise, t) - pred) ** 2
        mse = weight * mean_flat(sq)
        margin = self.cfg.mouth_margin * x0.shape[-1]
        mask = mouth_mask(mouth_box.to(x0.device), x0.shape[-2], x0.shape[-1], margin).to(sq.dtype)
        area = mask.sum(dim=(1, 2, 3)) * sq.shape[1]
        ls = weight * (sq * mask).sum(dim=(1, 2, 3)) / area.clamp(min=1.0)
        lam_eye = self.cfg.lambda_eye
        if lam_eye > 0:
            eyes = eye_mask(mouth_box.to(x0.device), x0.shape[-2], x0.shape[-1]).to(sq.dtype)
            eye = weight * (sq * eyes).sum(dim=(1, 2, 3)) / (eyes.sum(dim=(1, 2, 3)) * sq.shape[1]).clamp(min=1.0)
        else:
            eye = torch.zeros_like(mse)
        if v is None:
            vlb = torch.zeros_like(mse)
        else:
            # stop-gradient on the mean: L_vlb trains only the variance
            frozen = torch.cat([pred.detach(), v], dim=1)
            vlb = self.vlb_terms(frozen, data, x_t, t, offset)
        lam_vlb = self.cfg.lambda_vlb if v is not None else 0.0
        lam_ls = self.cfg.lambda_ls
        loss = (1.0 - lam_vlb - lam_ls - lam_eye) * mse + lam_vlb * vlb + lam_ls * ls + lam_eye * eye
        return dict(loss=loss, mse=mse, vlb=vlb, ls=ls, eye=eye)
