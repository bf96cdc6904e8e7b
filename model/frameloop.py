"""The one autoregressive frame loop: a slot-based streaming sampler.

Each of `capacity` slots holds one clip at its own frame k and its own
denoising step. One `step()` runs one batched UNet call over every busy slot
and one vectorised sampler step; a slot whose frame reaches step 0 emits the
frame, updates its motion frames and starts frame k+1 from fresh noise; a
slot whose clip is done is freed, and whoever drives the loop may admit the
next clip into it at once (continuous batching). `generate()` is "admit B
clips, run to the end"; the dubbing engine admits queued segments as slots
free up. Nothing else in dheads builds motion frames, audio windows or the
sampling noise.

Per frame k of a clip (Diffused Heads, Stypułkowski et al. 2024):
- motion frames: grayscale frames k−2, k−1 (the identity frame before the
  clip starts); with `motion.infer_noise` σ, fixed Gaussian noise of that σ
  is added for the whole frame (training adds σ ~ U(0, train_noise_max));
  with `motion.stabilize_every` N, the older motion frame is reset to the
  identity every N frames (the official `stabilize`);
- audio window: feature rows of frames k−m_y … k+m_y, clamped to the
  clip's frame range (edge frames replicated);
- x_T ~ N(0, I), then the sampler's steps down to x_0; with the identity
  residual the frame is x_0 + identity;
- explicit motion (`motion.pose_warp` / `motion.eye_embed`): the clip's
  head-pose and eye-openness tracks, drawn once per clip from the model's
  motion prior with `Clip.motion_seed` (`model/motionprior.py`) over the
  whole item (`frame_lo … frame_hi`), so the segments of one item share one
  track and the head carries on across their joints. Frame k sees the
  identity warped to pose[k] (`model/posewarp.py`; also the residual's
  offset and the motion frames before the clip starts) and eye_open[k].

Randomness is per slot: a `torch.Generator` seeded with the clip's seed
draws, for each frame in order, the motion noise (if any), x_T, then one
noise tensor per step if the sampler needs it. With `noise_correlation` ρ > 0
(dheads extension against flicker) x_T and the motion noise of frame k are
ρ · (frame k−1's) + √(1−ρ²) · (a fresh draw), unit variance either way:
with a deterministic sampler the frames' details then drift smoothly instead
of re-rolling every frame (ρ = 1: one draw for the whole clip). So a clip's frames do not
depend on which other clips share the batch or when it was admitted, up to
the float differences of batched arithmetic (~1e-6; see tests/model).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Hashable, Optional

import numpy as np
import torch
from torch import nn

from dheads.model import motionprior
from dheads.model.images import quantize
from dheads.model.posewarp import warp_to_pose
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


def noisy_motion(motion: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Motion frames `[B, 2, H, W]` + σ `[B]` · noise: the augmentation of
    training (σ drawn per sample) and of inference (σ fixed)."""
    return motion + sigma.to(motion.dtype).reshape(-1, 1, 1, 1) * noise


@dataclass
class Clip:
    """A clip for the frame loop.

    `features [F, *feature_shape]` are the audio feature rows; frame k's
    window is rows `clamp(k + j, frame_lo, frame_hi) + row_of_frame0`,
    j = −m_y … m_y. For a whole clip: rows = frames, `frame_lo = 0`,
    `frame_hi = n_frames − 1`. A segment of a longer item passes its padded
    features and the item's range relative to the segment start, so its
    windows equal those of the whole item.
    """
    key: Hashable
    identity: torch.Tensor          # [3, H, W] in [-1, 1]
    features: torch.Tensor          # [F, *feature_shape]
    n_frames: int
    seed: int = 0
    row_of_frame0: int = 0
    frame_lo: int = 0
    frame_hi: Optional[int] = None  # None: n_frames - 1
    motion_seed: Optional[int] = None  # the motion prior's seed (None: `seed`); one per item


@dataclass
class _Slot:
    clip: Clip
    generator: torch.Generator
    frame_hi: int
    frames: list = field(default_factory=list)
    k: int = 0                      # the frame being denoised
    steps_left: int = 0             # its denoising steps still to run (host copy of step_idx + 1)
    x_T: Optional[torch.Tensor] = None           # the last frame's x_T
    motion_noise: Optional[torch.Tensor] = None  # the last frame's motion-frame noise
    pose: Optional[torch.Tensor] = None          # [n_frames, 3] head pose per frame (pose_warp)
    eye_open: Optional[torch.Tensor] = None      # [n_frames] eye openness per frame (eye_embed)


class FrameLoop:
    """`capacity` slots advanced together: see the module docstring.

    State is slot-major tensors (x_t, identity, motion, audio window, step
    index), so a step with every slot busy feeds the UNet without a copy.
    Not thread-safe: one thread calls `admit` / `step` / `cancel`.
    """

    def __init__(self, model: nn.Module, sampler: Sampler, capacity: int,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 autocast: torch.dtype | None = None, noise_correlation: float = 0.0,
                 fixed_batch: bool = False, uint8_frames: bool = False):
        cfg = getattr(model, "cfg", None) or getattr(getattr(model, "module", None), "cfg", None)
        if cfg is None:
            raise TypeError("FrameLoop needs a DiffusedHeads model (with .cfg)")
        from dheads.model.audio import feature_shape

        self.model, self.sampler, self.cfg = model.eval(), sampler, cfg
        self.residual = bool(sampler.process.cfg.identity_residual)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype, self.capacity = dtype, int(capacity)
        # fixed_batch: every step runs the UNet over all `capacity` slots (idle
        # ones compute values nobody reads), so its batch never changes: one
        # torch.compile graph and one CUDA graph, at the cost of the idle slots' compute.
        self.fixed_batch = bool(fixed_batch)
        # uint8_frames: a clip's finished frames are kept as uint8 levels
        # (`images.quantize`, on the device) and returned as `[T, 3, H, W]`
        # uint8: a quarter of float32's memory, for items minutes long
        self.uint8_frames = bool(uint8_frames)
        # the UNet call under autocast (e.g. bf16 on a CPU with AVX512-BF16);
        # the sampler's schedule math stays in float32 or better
        self.autocast = autocast
        if not 0.0 <= noise_correlation <= 1.0:
            raise ValueError(f"noise_correlation must be in [0, 1], got {noise_correlation}")
        self.rho = float(noise_correlation)
        self.context = int(cfg.audio.context)
        n, h = self.capacity, cfg.image_size
        zeros = lambda *shape: torch.zeros(*shape, device=self.device, dtype=dtype)  # noqa: E731
        self.x_t = zeros(n, 3, h, h)
        self.identity = zeros(n, 3, h, h)
        self.identity_in = self.identity          # what the UNet sees: warped with pose_warp
        if cfg.motion.pose_warp:
            self.identity_in = zeros(n, 3, h, h)
        self.eye_open = torch.ones(n, device=self.device)
        self.motion = zeros(n, 2, h, h)           # clean previous frames
        self.motion_in = zeros(n, 2, h, h)        # what the UNet sees (noised for the frame)
        self.audio = zeros(n, 2 * self.context + 1, *feature_shape(cfg.audio))
        self.step_idx = torch.zeros(n, dtype=torch.long, device=self.device)
        self.sigma = torch.full((n,), float(cfg.motion.infer_noise), device=self.device)
        self.slots: list[Optional[_Slot]] = [None] * n
        self._busy_index: tuple[tuple, Optional[torch.Tensor]] = ((), None)
        self.unet_calls = 0
        self.frames_done = 0
        # seconds of the last step's UNet call; only measured with `profile`
        # (on a GPU the measurement needs a sync)
        self.profile = False
        self.unet_s_last = 0.0

    # -- slots ---------------------------------------------------------------
    @property
    def free(self) -> int:
        return sum(s is None for s in self.slots)

    @property
    def active(self) -> int:
        return self.capacity - self.free

    @property
    def keys(self) -> list[Hashable]:
        return [s.clip.key for s in self.slots if s is not None]

    def admit(self, clip: Clip) -> int:
        """Put `clip` into a free slot (its frame 0 starts at the next step)."""
        if clip.n_frames < 1:
            raise ValueError(f"clip {clip.key!r}: n_frames must be >= 1")
        try:
            i = self.slots.index(None)
        except ValueError:
            raise RuntimeError("no free slot: step() until one frees up") from None
        hi = clip.n_frames - 1 if clip.frame_hi is None else int(clip.frame_hi)
        gen = torch.Generator(device=self.device).manual_seed(int(clip.seed) & 0x7FFF_FFFF_FFFF_FFFF)
        clip = Clip(clip.key, clip.identity.to(self.device, self.dtype),
                    clip.features.to(self.device, self.dtype), clip.n_frames, clip.seed,
                    clip.row_of_frame0, clip.frame_lo, hi)
        self.identity[i] = clip.identity
        slot = self.slots[i] = _Slot(clip, gen, hi)
        if self.cfg.motion.conditioned:
            slot.pose, slot.eye_open = self._tracks(clip, hi)
        start = clip.identity
        if slot.pose is not None:
            start = warp_to_pose(clip.identity[None], slot.pose[:1])[0]
        self.motion[i] = grayscale(start)  # both previous frames = identity ([1,H,W] broadcasts)
        self._start_frame(i)
        return i

    def _tracks(self, clip: Clip, hi: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """This clip's rows of its item's pose and eye tracks (frames
        frame_lo … hi of the item, drawn from the prior with motion_seed)."""
        mc = self.cfg.motion
        first = -clip.frame_lo            # this clip's frame 0 in item frames
        total = max(hi + 1 - clip.frame_lo, first + clip.n_frames)
        seed = clip.seed if clip.motion_seed is None else clip.motion_seed
        pose, eyes = motionprior.sample(mc.prior, total, seed)
        rows = slice(first, first + clip.n_frames)
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a[rows])).to(self.device)  # noqa: E731
        return (as_t(pose) if mc.pose_warp else None), (as_t(eyes) if mc.eye_embed else None)

    def cancel(self, key: Hashable) -> bool:
        """Drop the clip `key` from its slot now (its frames are discarded)."""
        for i, s in enumerate(self.slots):
            if s is not None and s.clip.key == key:
                self.slots[i] = None
                return True
        return False

    def _start_frame(self, i: int) -> None:
        slot = self.slots[i]
        clip, c, mc = slot.clip, self.context, self.cfg.motion
        if slot.pose is not None:
            self.identity_in[i] = warp_to_pose(self.identity[i:i + 1], slot.pose[slot.k:slot.k + 1])[0]
        if slot.eye_open is not None:
            self.eye_open[i] = slot.eye_open[slot.k]
        every = int(mc.stabilize_every)
        if every > 0 and slot.k > 0 and slot.k % every == 0:
            # frame k−2's place: the identity (at frame k−2's pose with pose_warp)
            older = self.identity[i] if slot.pose is None else \
                warp_to_pose(self.identity[i:i + 1], slot.pose[max(slot.k - 2, 0):max(slot.k - 2, 0) + 1])[0]
            self.motion[i, 0] = grayscale(older)[0]
        frames = (slot.k + torch.arange(-c, c + 1, device=self.device)).clamp(clip.frame_lo, slot.frame_hi)
        self.audio[i] = clip.features[frames + clip.row_of_frame0]
        if mc.infer_noise > 0:
            slot.motion_noise = self._correlated(slot, slot.motion_noise, self.motion.shape[1:])
            self.motion_in[i] = self.motion[i] + float(mc.infer_noise) * slot.motion_noise
        else:
            self.motion_in[i] = self.motion[i]
        slot.x_T = self._correlated(slot, slot.x_T, self.x_t.shape[1:])
        self.x_t[i] = slot.x_T
        self.step_idx[i] = self.sampler.num_steps - 1
        slot.steps_left = self.sampler.num_steps

    def _correlated(self, slot: _Slot, last: Optional[torch.Tensor], shape) -> torch.Tensor:
        """Unit Gaussian noise for this frame: ρ · last + √(1−ρ²) · fresh."""
        if last is not None and self.rho == 1.0:
            return last
        fresh = torch.randn(shape, generator=slot.generator, device=self.device, dtype=self.dtype)
        if last is None or self.rho == 0.0:
            return fresh
        return self.rho * last + (1.0 - self.rho ** 2) ** 0.5 * fresh

    def _finish_frame(self, i: int, x0: torch.Tensor) -> Optional[tuple[Hashable, torch.Tensor]]:
        slot = self.slots[i]
        frame = (x0 + self.identity_in[i] if self.residual else x0).clamp(-1, 1)
        slot.frames.append(quantize(frame) if self.uint8_frames else frame)
        self.motion[i, 0] = self.motion[i, 1]
        self.motion[i, 1] = grayscale(frame)[0]
        slot.k += 1
        self.frames_done += 1
        if slot.k < slot.clip.n_frames:
            self._start_frame(i)
            return None
        self.slots[i] = None
        return slot.clip.key, torch.stack(slot.frames)

    # -- one batched denoising step -------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, torch.Tensor]]:
        """One UNet call over every busy slot and one sampler step. Returns
        the clips that finished: `[(key, frames [T, 3, H, W] in [-1, 1])]`
        (uint8 levels with `uint8_frames`)."""
        busy = [i for i, s in enumerate(self.slots) if s is not None]
        if not busy:
            return []
        full = self.fixed_batch or len(busy) == self.capacity
        idx = slice(None) if full else self._index(busy)
        rows = range(self.capacity) if full else busy  # the slot of each batch row
        x_t, step_idx = self.x_t[idx], self.step_idx[idx].clone()  # views when every slot is busy
        extra = {"motion_sigma": self.sigma[idx]} if self.cfg.motion.embed_noise else {}
        if self.cfg.motion.eye_embed:
            extra["eye_open"] = self.eye_open[idx]
        t0 = time.perf_counter() if self.profile else 0.0
        with torch.autocast(self.device.type, self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            out = self.model(x_t, self.sampler.model_timesteps(step_idx), self.identity_in[idx],
                             self.motion_in[idx], self.audio[idx], **extra)
        if self.profile:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.unet_s_last = time.perf_counter() - t0
        self.unet_calls += 1
        noise = None
        if self.sampler.needs_noise:
            noise = torch.stack([torch.randn(x_t.shape[1:], generator=self.slots[i].generator,
                                             device=self.device, dtype=self.dtype)
                                 if self.slots[i] is not None else torch.zeros_like(x_t[0])
                                 for i in rows])
        offset = self.identity_in[idx] if self.residual else None
        x_prev = self.sampler.step(out, x_t, step_idx, noise, offset).to(self.dtype)
        self.x_t[idx] = x_prev
        self.step_idx[idx] = (step_idx - 1).clamp_(min=0)  # idle slots stay a valid index
        finished = []
        for j, i in enumerate(rows):  # host-side counters: reading step_idx back would sync
            if self.slots[i] is None:
                continue
            self.slots[i].steps_left -= 1
            if self.slots[i].steps_left == 0:
                result = self._finish_frame(i, x_prev[j])
                if result is not None:
                    finished.append(result)
        return finished

    def _index(self, busy: list[int]) -> torch.Tensor:
        """The device index of the busy slots, rebuilt only when they change
        (each build is a blocking host->GPU copy)."""
        key = tuple(busy)
        if self._busy_index[0] != key:
            self._busy_index = (key, torch.tensor(busy, device=self.device))
        return self._busy_index[1]

    def run(self) -> dict[Hashable, torch.Tensor]:
        """Step until every admitted clip is done: `{key: frames}`."""
        out = {}
        while self.active:
            out.update(self.step())
        return out


__all__ = ["Clip", "FrameLoop", "grayscale", "motion_frames", "noisy_motion", "GRAY"]
