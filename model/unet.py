"""The Diffused Heads UNet (guided-diffusion topology, Stypułkowski et al. 2024).

Input: noisy target x_t (3) ⊕ identity frame (3) ⊕ two grayscale motion
frames (2) = 8 channels at `image_size`. Output: 6 channels, ε (3) and the
variance interpolation v (3) of improved DDPM.

Conditioning: the timestep embedding MLP(sin(t)) and the audio embedding
MLP(flatten(AudioEncoder(y_{k-m_y} .. y_{k+m_y}))) act on every ResBlock
through GroupNorm scale/shift, applied one after the other as in the official
`double_pre_gn` mode:

    h ← GN(h) · (1 + γ_t) + β_t,   h ← h · (1 + γ_a) + β_a

with (γ_t, β_t) = Linear(SiLU(e_t)) and (γ_a, β_a) = Linear(SiLU(e_a)), one
pair of projections per ResBlock. Keeping the audio projections separate
(instead of adding e_a to e_t) is what the official training config does and
what reproduces its ≈204 M parameters.

With `motion.embed_noise` (dheads extension) the σ of the noise added to
the motion frames is embedded like the timestep (sinusoids of 1000 σ, an
MLP) and added to the timestep embedding.

The UNet never sees a β of the noise schedule: timesteps are integers.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dheads.model.audio import AudioEncoder
from dheads.model.config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `[B] -> [B, dim]` (guided-diffusion `nn.timestep_embedding`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, scale/shift conditioning, GN-SiLU-dropout-conv, skip.

    `up`/`down` resample inside the block (guided-diffusion `resblock_updown`):
    nearest ×2 or 2×2 average pooling on both the residual and the skip path.
    """

    def __init__(self, ch: int, emb_ch: int, out_ch: int, groups: int, dropout: float,
                 up: bool = False, down: bool = False):
        super().__init__()
        self.in_norm = nn.GroupNorm(groups, ch)
        self.in_conv = nn.Conv2d(ch, out_ch, 3, padding=1)
        self.up, self.down = up, down
        self.t_emb = nn.Linear(emb_ch, 2 * out_ch)
        self.a_emb = nn.Linear(emb_ch, 2 * out_ch)
        self.out_norm = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, a_emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        t_scale, t_shift = self.t_emb(F.silu(t_emb))[:, :, None, None].chunk(2, dim=1)
        a_scale, a_shift = self.a_emb(F.silu(a_emb))[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + t_scale) + t_shift
        h = h * (1 + a_scale) + a_shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention over H·W tokens, pre-GN, zero-initialised output."""

    def __init__(self, ch: int, num_heads: int, groups: int):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"{ch} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv1d(ch, ch, 1))

    def forward(self, x: torch.Tensor, *_) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        flat = x.reshape(b, c, hgt * wid)
        # Token-major q/k/v (the 1x1 convolutions applied as linear layers, same
        # weights): the head channels are then the contiguous last dimension,
        # which the fused (flash / memory-efficient / cuDNN) SDPA kernels need;
        # channel-major q/k/v fall back to the math kernel, which materialises
        # the [B, heads, L, L] attention matrix.
        tokens = self.norm(flat).transpose(1, 2)  # [B, L, C]
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)  # [B, L, 3C]
        q, k, v = qkv.reshape(b, hgt * wid, 3, self.num_heads, c // self.num_heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, head_ch]
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, hgt * wid, c)
        out = F.linear(a, self.proj.weight.squeeze(-1), self.proj.bias)  # [B, L, C]
        return (flat + out.transpose(1, 2)).reshape(b, c, hgt, wid)


class CondSequential(nn.ModuleList):
    """A UNet level: layers that all take (h, t_emb, a_emb)."""

    def forward(self, h: torch.Tensor, t_emb: torch.Tensor, a_emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            h = layer(h, t_emb, a_emb)
        return h


class Stem(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor, *_) -> torch.Tensor:
        return self.conv(x)


class DiffusedHeads(nn.Module):
    """`forward(x_t [B,3,H,W], t [B] long, identity [B,3,H,W], motion [B,2,H,W],
    audio [B, 2 m_y + 1, *feature_shape], motion_sigma [B] | None, eye_open [B] | None)
    -> [B, 6, H, W]`. `eye_open` (with `motion.eye_embed`): the target frame's
    eye openness (1 = open), embedded like σ; the pose enters as the warped
    identity frame (`model/posewarp.py`), not here."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        mc, g, drop = cfg.model_channels, cfg.num_groups, cfg.dropout
        emb = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.motion_noise_embed = (nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), _zero(nn.Linear(emb, emb)))
                                   if cfg.motion.embed_noise else None)
        self.audio_encoder = AudioEncoder(cfg.audio)
        self.audio_embed = nn.Sequential(
            nn.Linear(cfg.audio.window_frames * cfg.audio.embed_dim, emb), nn.SiLU(),
            nn.Linear(emb, emb))

        def attention(ch: int) -> AttentionBlock:
            heads = ch // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads
            return AttentionBlock(ch, heads, g)

        ch = mc * cfg.channel_mult[0]
        self.input_blocks = nn.ModuleList([CondSequential([Stem(cfg.in_channels, ch)])])
        skips, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb, mult * mc, g, drop)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(CondSequential(layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(CondSequential([ResBlock(ch, emb, ch, g, drop, down=True)]))
                skips.append(ch)
                ds *= 2
        self.middle_block = CondSequential([
            ResBlock(ch, emb, ch, g, drop), attention(ch), ResBlock(ch, emb, ch, g, drop)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb, mult * mc, g, drop)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, emb, ch, g, drop, up=True))
                    ds //= 2
                self.output_blocks.append(CondSequential(layers))
        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(),
                                 _zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))
        # built last, so turning it on leaves every other module's initialisation as it was
        self.eye_embed = (nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), _zero(nn.Linear(emb, emb)))
                          if cfg.motion.eye_embed else None)

    def blocks(self) -> Iterator[nn.Module]:
        """The sub-modules FSDP2 shards one by one (the root takes the rest:
        the embedding MLPs and the output head)."""
        yield self.audio_encoder
        yield from self.input_blocks
        yield self.middle_block
        yield from self.output_blocks

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, identity: torch.Tensor,
                motion: torch.Tensor, audio: torch.Tensor,
                motion_sigma: torch.Tensor | None = None,
                eye_open: torch.Tensor | None = None) -> torch.Tensor:
        # Compute in the parameters' dtype whatever the inputs' (bf16 weights on
        # the frame loop's fp32 state; under autocast the weights stay fp32).
        dtype = self.time_embed[0].weight.dtype
        t_emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))
        if self.motion_noise_embed is not None:
            sigma = torch.zeros_like(t, dtype=torch.float32) if motion_sigma is None else motion_sigma
            t_emb = t_emb + self.motion_noise_embed(
                timestep_embedding(sigma.float() * 1000.0, self.cfg.model_channels).to(dtype))
        if self.eye_embed is not None:
            eyes = torch.ones_like(t, dtype=torch.float32) if eye_open is None else eye_open
            t_emb = t_emb + self.eye_embed(
                timestep_embedding(eyes.float() * 1000.0, self.cfg.model_channels).to(dtype))
        a = self.audio_encoder(audio.to(dtype))  # [B, W, embed_dim]
        a_emb = self.audio_embed(a.reshape(a.shape[0], -1))
        h = torch.cat([x_t, identity, motion], dim=1).to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, t_emb, a_emb)
            skips.append(h)
        h = self.middle_block(h, t_emb, a_emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), t_emb, a_emb)
        return self.out(h)
