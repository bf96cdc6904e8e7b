"""The dubbing engine: a queue of segments over the model's `FrameLoop`.

`ContinuousBatcher` is a pool of `batch_size` slots, every slot a segment at
its own frame and sampler step. One engine step = one batched UNet call over
all active slots + one vectorised sampler step (`dheads.model.frameloop`);
a slot whose segment finished takes the next queued segment at once.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from dheads.model.audio import AudioFeatures
from dheads.model.frameloop import Clip, FrameLoop
from dheads.model.images import to_uint8, to_unit
from dheads.platform.config import DubConfig, StorageConfig
from dheads.platform.dubbing.segments import PAD_FRAMES, Segment


@dataclass
class EngineStats:
    unet_s: float = 0.0         # Σ UNet forward time
    wall_s: float = 0.0         # wall time inside `step` (admission, UNet, sampler, bookkeeping)
    cpu_s: float = 0.0          # CPU time of the stepping thread inside `step` (all of it with 1 torch thread)
    steps: int = 0              # batched UNet calls
    frames: int = 0
    segments: int = 0
    # {UNet batch size: calls} since the last drain (bounded, unlike a list of calls)
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)

    @property
    def sampler_overhead(self) -> float:
        return self.wall_s / self.unet_s if self.unet_s else float("nan")

    def drain_batch_sizes(self) -> dict[int, int]:
        out, self.batch_sizes = dict(self.batch_sizes), collections.Counter()
        return out


class ContinuousBatcher:
    """Segments in, frames out, over one `FrameLoop`.

    Its admission policy: whenever a slot is free, the next queued segment
    takes it (first come, first served), so one UNet call advances every
    active segment, each at its own frame and step. Not thread-safe: one
    thread calls `add` / `step` (Serve runs it on a background thread).
    """

    def __init__(self, model: torch.nn.Module, sampler: Any, audio_cfg: Any, image_size: int,
                 batch_size: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, autocast: torch.dtype | None = None,
                 noise_correlation: float = 0.0):
        if audio_cfg.context > PAD_FRAMES - 2:
            raise ValueError(f"audio context {audio_cfg.context} needs PAD_FRAMES >= {audio_cfg.context + 2}")
        # frames kept as uint8 in the slots: a carried item is minutes of frames in one slot
        self.loop = FrameLoop(model, sampler, batch_size, device=device, dtype=dtype, autocast=autocast,
                              noise_correlation=noise_correlation, uint8_frames=True)
        self.loop.profile = self.loop.device.type == "cpu"  # UNet time for the stats; free on CPU
        self.features = AudioFeatures(audio_cfg)
        self.image_size = image_size
        self.queue: collections.deque[Segment] = collections.deque()
        self._running: dict[int, Segment] = {}
        self._next_key = 0
        self.stats = EngineStats()

    # -- queue
    def add(self, segment: Segment) -> None:
        self.queue.append(segment)

    @property
    def busy(self) -> bool:
        return bool(self.queue) or self.loop.active > 0

    def in_flight(self) -> list[Segment]:
        """The segments in the slots now."""
        return [self._running[k] for k in self.loop.keys]

    def reset(self) -> None:
        """Drop every segment in the slots (after a failed batch)."""
        for key in list(self.loop.keys):
            self.loop.cancel(key)
        self._running.clear()

    def cancel(self, match: Callable[[Segment], bool]) -> list[Segment]:
        """Drop the segments `match` selects: queued ones, and those in a slot
        (`FrameLoop.cancel` frees the slot now, so the next step runs without
        them). Returns the dropped segments."""
        dropped = [s for s in self.queue if match(s)]
        if dropped:
            self.queue = collections.deque(s for s in self.queue if not match(s))
        for key in list(self.loop.keys):
            if match(self._running[key]):
                self.loop.cancel(key)
                dropped.append(self._running.pop(key))
        return dropped

    def _admit(self) -> None:
        while self.loop.free and self.queue:
            seg = self.queue.popleft()
            feats = self.features(seg.audio, seg.n_frames + 2 * PAD_FRAMES)
            key, self._next_key = self._next_key, self._next_key + 1
            self._running[key] = seg
            # windows clamp at the item's ends, not the segment's (see PAD_FRAMES)
            self.loop.admit(Clip(key, torch.from_numpy(to_unit(seg.identity)), feats, seg.n_frames,
                                 seed=seg.seed, row_of_frame0=PAD_FRAMES, frame_lo=-seg.start,
                                 frame_hi=seg.item_frames - 1 - seg.start,
                                 # one motion track per item: segment 0's seed (segment_seed)
                                 motion_seed=seg.seed - seg.index))

    # -- one batched denoising step
    def step(self) -> list[tuple[Segment, np.ndarray]]:
        """Admit queued segments, run one batched step over all active slots;
        returns the segments that finished `[(segment, frames [T, H, W, 3] uint8)]`."""
        t0, c0 = time.perf_counter(), time.thread_time()
        self._admit()
        active = self.loop.active
        if not active:
            return []
        calls, done = self.loop.unet_calls, self.loop.frames_done
        finished = [(self._running.pop(key), to_uint8(frames)) for key, frames in self.loop.step()]
        self.stats.steps += self.loop.unet_calls - calls
        self.stats.frames += self.loop.frames_done - done
        self.stats.segments += len(finished)
        self.stats.batch_sizes[active] += 1
        self.stats.unet_s += self.loop.unet_s_last
        self.stats.wall_s += time.perf_counter() - t0
        self.stats.cpu_s += time.thread_time() - c0
        return finished

    def run(self, segments: Iterable[Segment]) -> dict[tuple[str, int], np.ndarray]:
        """Generate `segments` to completion: `{segment.key: frames}`."""
        for seg in segments:
            self.add(seg)
        out = {}
        while self.busy:
            for seg, frames in self.step():
                out[seg.key] = frames
        return out


def build_engine(checkpoint: str, sampler_cfg: Any, cfg: DubConfig,
                 storage_cfg: StorageConfig | None = None,
                 device: str | None = None) -> ContinuousBatcher:
    """Load a checkpoint (local or s3://) and wrap it in a `ContinuousBatcher`
    of `cfg.batch_size` slots (the UNet under bf16 autocast with `cfg.cpu_bf16` on a CPU)."""
    from dheads.model.checkpoint import load_checkpoint
    from dheads.model.diffusion import GaussianDiffusion
    from dheads.model.samplers import make_sampler
    from dheads.platform.modelfetch import fetch_model_checkpoint

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    device = device or ("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    loaded = load_checkpoint(fetch_model_checkpoint(checkpoint, storage_cfg), device=device)
    motion = loaded.model.cfg.motion
    if cfg.motion_noise is not None:  # inference-time choices, not the checkpoint's
        motion.infer_noise = float(cfg.motion_noise)
    if cfg.stabilize_every is not None:
        motion.stabilize_every = int(cfg.stabilize_every)
    sampler = make_sampler(GaussianDiffusion(loaded.diffusion_cfg), sampler_cfg)
    from dheads.model.precision import use_cpu_bf16

    autocast = torch.bfloat16 if torch.device(device).type == "cpu" and use_cpu_bf16(cfg.cpu_bf16) \
        else None
    return ContinuousBatcher(loaded.model, sampler, loaded.model_cfg.audio,
                             loaded.model_cfg.image_size, cfg.batch_size, device, autocast=autocast,
                             noise_correlation=sampler_cfg.noise_correlation)


__all__ = ["ContinuousBatcher", "EngineStats", "build_engine"]
