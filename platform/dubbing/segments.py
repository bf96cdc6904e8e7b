"""The dubbing core shared by `dheads dub` (Ray Data) and `dheads serve`.

An item is an identity (image, or a video whose chosen frame is cropped as in
preprocessing) + audio (any audio file or a video's audio track) + an output
URI. Its audio is cut at low-energy points into segments of at most
`DubConfig.max_segment_s`; every segment is an independent unit that starts
from the identity frame, so segments of one item run side by side. Each
segment but the last runs `crossfade_frames` past its end; `stitch` blends
that tail into the next segment's first frames.

`ContinuousBatcher` is the sampling engine: a pool of `batch_size` slots,
every slot a segment at its own frame and DDIM step. One engine step = one
batched UNet call over all active slots + one vectorised sampler step; a slot
whose segment finished takes the next queued segment at once.

Timing (ARCHITECTURE.md): 16 kHz mono, 25 fps, frame i covers samples
[640 i, 640 (i+1)).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from dheads.platform import storage
from dheads.platform.config import DubConfig, FaceDetector, StorageConfig
from dheads.platform.media import IMAGE_EXTS, MediaError, read_audio, read_image, read_video, write_video

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640


class ItemError(ValueError):
    """An item that cannot be dubbed; the message is the reason shown to users."""


# ------------------------------------------------------------------- items
@dataclass
class DubItem:
    item_id: str
    identity: str                       # URI of an image or a video
    audio: str                          # URI of an audio file or a video with audio
    output: str                         # URI of the mp4 to write
    identity_frame: Optional[int] = None  # frame of an identity video; None: DubConfig's

    @classmethod
    def from_row(cls, row: dict, output_dir: str | None = None) -> "DubItem":
        """A manifest row / request item -> DubItem. `output` defaults to
        `<output_dir>/<item_id>.mp4`; `item_id` to the audio file's stem."""
        missing = [k for k in ("identity", "audio") if not row.get(k)]
        if missing:
            raise ItemError(f"missing field(s) {missing}")
        item_id = str(row.get("item_id") or row.get("id") or Path(str(row["audio"])).stem)
        output = row.get("output")
        if not output:
            if not output_dir:
                raise ItemError("missing field 'output' and no output directory configured")
            output = storage.join(output_dir, f"{item_id}.mp4")
        frame = row.get("identity_frame")
        frame = None if frame is None or (isinstance(frame, float) and np.isnan(frame)) else int(frame)
        return cls(item_id=item_id, identity=str(row["identity"]), audio=str(row["audio"]),
                   output=str(output), identity_frame=frame)


def load_identity(uri: str, size: int, cfg: DubConfig, frame: Optional[int] = None,
                  storage_cfg: StorageConfig | None = None) -> np.ndarray:
    """The identity frame `[size, size, 3]` uint8: an image, or frame `frame` of
    a video, face-cropped with the preprocessing detector and margin."""
    from dheads.platform.faces import crop_boxes, crop_resize, face_track

    with storage.local_path(uri, storage_cfg) as path:
        if Path(uri).suffix.lower() in IMAGE_EXTS:
            image = read_image(path)
        else:
            clip = read_video(path, fps=FPS, require_audio=False)
            index = cfg.identity_frame if frame is None else frame
            image = clip.frames[min(max(index, 0), clip.n_frames - 1)]
    detector = FaceDetector(cfg.face_detector)
    boxes = crop_boxes(face_track(image[None], detector), cfg.face_margin, detector)
    return crop_resize(image[None], boxes, size)[0]


def load_audio(uri: str, storage_cfg: StorageConfig | None = None) -> np.ndarray:
    """Any audio file, or a video's audio track -> `[S]` float32, 16 kHz mono."""
    with storage.local_path(uri, storage_cfg) as path:
        audio = read_audio(path, SAMPLE_RATE)
    if not np.isfinite(audio).all():
        raise MediaError("audio", "audio holds NaN/inf samples")
    return audio


def n_video_frames(n_samples: int) -> int:
    """Frames of the output video: the audio's duration rounded to one frame."""
    return max(1, int(round(n_samples / SAMPLES_PER_FRAME)))


# ---------------------------------------------------------------- segments
def frame_energy(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """RMS energy per video frame `[n_frames]`, smoothed over 3 frames."""
    pcm = np.zeros(n_frames * SAMPLES_PER_FRAME, np.float32)
    pcm[: min(len(audio), len(pcm))] = audio[: len(pcm)]
    rms = np.sqrt((pcm.reshape(n_frames, SAMPLES_PER_FRAME) ** 2).mean(1) + 1e-12)
    return np.convolve(np.pad(rms, 1, mode="edge"), np.ones(3) / 3, mode="valid")


def plan_segments(energy: np.ndarray, max_frames: int, min_frames: int,
                  overlap: int = 0) -> list[tuple[int, int]]:
    """Cut `[0, T)` into contiguous `(start, end)` frame ranges at low-energy frames.

    Every range but the last is generated `overlap` frames longer (for the
    cross-fade), so its cut lies in `[start + min_frames, start + max_frames -
    overlap]` and leaves at least `min_frames` for the rest. It is the latest
    frame of that window whose energy is within 10 % (of the window's
    min-to-median range) of the quietest: a pause, and as few segments as
    the pauses allow.
    """
    total = len(energy)
    max_frames = max(max_frames, 2 * overlap + 2)
    min_frames = max(1, min(min_frames, max_frames - overlap - 1))
    bounds, start = [], 0
    while total - start > max_frames:
        lo = start + min_frames
        hi = min(start + max_frames - overlap, total - min_frames)
        hi = max(hi, lo)
        window = energy[lo:hi + 1]
        quiet = window.min() + 0.1 * (np.median(window) - window.min())
        cut = lo + int(np.flatnonzero(window <= quiet)[-1])
        bounds.append((start, cut))
        start = cut
    bounds.append((start, total))
    return bounds


@dataclass
class Segment:
    """One unit of generation: `n_frames` frames from frame `start` of an item."""
    item_id: str
    index: int
    count: int                  # segments of the item
    start: int                  # first frame in the item
    n_frames: int               # frames to generate (incl. the cross-fade tail)
    identity: np.ndarray        # [H, W, 3] uint8
    audio: np.ndarray           # float32 samples of frames [start - PAD, start + n_frames + PAD)
    item_frames: int            # frames of the whole item (audio windows clamp at its ends)
    seed: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.item_id, self.index)


# A frame's feature window reaches 2 frames either side of it, and the audio
# context m_y reaches m_y frames further: segments carry PAD_FRAMES frames of
# real audio past both ends (zeros past the item's), so their features equal
# those of the whole clip. Holds for m_y <= PAD_FRAMES - 2.
PAD_FRAMES = 8


def segment_item(item_id: str, identity: np.ndarray, audio: np.ndarray, cfg: DubConfig,
                 seed: int = 0) -> list[Segment]:
    """Split an item's audio into `Segment`s at low-energy points."""
    n = n_video_frames(len(audio))
    bounds = plan_segments(frame_energy(audio, n), int(round(cfg.max_segment_s * FPS)),
                           int(round(cfg.min_segment_s * FPS)), cfg.crossfade_frames)
    pad = PAD_FRAMES * SAMPLES_PER_FRAME
    padded = np.zeros(n * SAMPLES_PER_FRAME + 2 * pad + cfg.crossfade_frames * SAMPLES_PER_FRAME,
                      np.float32)
    padded[pad: pad + min(len(audio), n * SAMPLES_PER_FRAME)] = audio[: n * SAMPLES_PER_FRAME]
    segments = []
    for i, (s, e) in enumerate(bounds):
        length = e - s + (min(cfg.crossfade_frames, bounds[i + 1][1] - bounds[i + 1][0])
                          if i + 1 < len(bounds) else 0)
        lo, hi = s * SAMPLES_PER_FRAME, (s + length) * SAMPLES_PER_FRAME + 2 * pad
        segments.append(Segment(item_id, i, len(bounds), s, length, identity,
                                padded[lo:hi].copy(), n, seed=seed * 1_000_003 + i))
    return segments


@dataclass
class PreparedItem:
    item: DubItem
    audio: np.ndarray           # [S] float32 16 kHz: the original audio, muxed into the output
    n_frames: int
    segments: list[Segment]


def prepare_item(item: DubItem, cfg: DubConfig, image_size: int,
                 storage_cfg: StorageConfig | None = None, seed: int = 0) -> PreparedItem:
    """Decode identity and audio, check limits, and segment. Raises ItemError
    (with the media stage in the message) for anything a user must fix."""
    try:
        audio = load_audio(item.audio, storage_cfg)
    except (MediaError, storage.StorageError) as e:
        raise ItemError(f"audio {item.audio}: {e}") from e
    seconds = len(audio) / SAMPLE_RATE
    if seconds > cfg.max_audio_s:
        raise ItemError(f"audio is {seconds:.1f} s, over the limit of {cfg.max_audio_s:g} s")
    if seconds < 1.0 / FPS:
        raise ItemError("audio is shorter than one video frame")
    try:
        identity = load_identity(item.identity, image_size, cfg, item.identity_frame, storage_cfg)
    except (MediaError, storage.StorageError, ValueError) as e:
        raise ItemError(f"identity {item.identity}: {e}") from e
    segments = segment_item(item.item_id, identity, audio, cfg, seed)
    return PreparedItem(item, audio, n_video_frames(len(audio)), segments)


# ---------------------------------------------------------------- stitching
def stitch(segments: list[tuple[int, np.ndarray]], n_frames: int) -> np.ndarray:
    """Join `(start, frames [t, H, W, 3] uint8)` segments into `[n_frames, H, W, 3]`.

    A segment's frames past the next segment's start overlap it; over the
    overlap the output fades linearly from the earlier into the later
    segment (weights (j+1)/(X+1), j = 0..X-1), hiding the jump back to a
    pose that starts from the identity frame.
    """
    segments = sorted(segments, key=lambda s: s[0])
    first = segments[0][1]
    out = np.zeros((n_frames, *first.shape[1:]), np.float32)
    filled = 0
    for start, frames in segments:
        if start > filled:
            raise ValueError(f"gap in segments: frames [{filled}, {start}) missing")
        x = min(filled - start, len(frames))
        if x > 0:
            w = (np.arange(1, x + 1, dtype=np.float32) / (x + 1))[:, None, None, None]
            out[start:start + x] = (1 - w) * out[start:start + x] + w * frames[:x]
        end = min(start + len(frames), n_frames)
        out[start + x:end] = frames[x:end - start]
        filled = max(filled, end)
    if filled < n_frames:
        raise ValueError(f"segments cover {filled} of {n_frames} frames")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_output(uri: str, frames: np.ndarray, audio: np.ndarray,
                 storage_cfg: StorageConfig | None = None) -> float:
    """Encode H.264 + AAC (the item's own audio) and write atomically to `uri`
    (temporary name, then rename / copy). Returns the video's seconds."""
    with tempfile.TemporaryDirectory(prefix="dheads-dub-") as tmp:
        local = os.path.join(tmp, "out.mp4")
        write_video(local, frames, fps=FPS, audio=audio, sample_rate=SAMPLE_RATE)
        storage.upload_file(local, uri, storage_cfg)
    return len(frames) / FPS


def finish_item(prepared: PreparedItem, results: dict[int, np.ndarray],
                storage_cfg: StorageConfig | None = None) -> float:
    """Stitch an item's generated segments (by index) and write its mp4."""
    parts = [(s.start, results[s.index]) for s in prepared.segments]
    frames = stitch(parts, prepared.n_frames)
    return write_output(prepared.item.output, frames, prepared.audio, storage_cfg)


# ---------------------------------------------------------- sampling engine
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
    """The dubbing engine: a queue of segments over the model's `FrameLoop`.

    Its admission policy: whenever a slot is free, the next queued segment
    takes it (first come, first served), so one UNet call advances every
    active segment, each at its own frame and step. Not thread-safe: one
    thread calls `add` / `step` (see `BackgroundBatcher`).
    """

    def __init__(self, model: torch.nn.Module, sampler: Any, audio_cfg: Any, image_size: int,
                 batch_size: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from dheads.model.audio import AudioFeatures
        from dheads.model.frameloop import FrameLoop

        self.context = int(audio_cfg.context)
        if self.context > PAD_FRAMES - 2:
            raise ValueError(f"audio context {self.context} needs PAD_FRAMES >= {self.context + 2}")
        self.loop = FrameLoop(model, sampler, batch_size, device=device, dtype=dtype)
        self.loop.profile = self.loop.device.type == "cpu"  # UNet time for the stats; free on CPU
        self.features = AudioFeatures(audio_cfg)
        self.size, self.image_size = batch_size, image_size
        self.device, self.dtype = self.loop.device, dtype
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

    @property
    def active(self) -> int:
        return self.loop.active

    def in_flight(self) -> list[Segment]:
        """The segments in the slots now."""
        return [self._running[k] for k in self.loop.keys]

    def reset(self) -> None:
        """Drop every segment in the slots (after a failed batch)."""
        for key in list(self.loop.keys):
            self.loop.cancel(key)
        self._running.clear()

    def _admit(self) -> None:
        from dheads.model.frameloop import Clip

        while self.loop.free and self.queue:
            seg = self.queue.popleft()
            feats = self.features(seg.audio, seg.n_frames + 2 * PAD_FRAMES)
            ident = torch.from_numpy(np.array(seg.identity, np.uint8)).permute(2, 0, 1)
            key, self._next_key = self._next_key, self._next_key + 1
            self._running[key] = seg
            # windows clamp at the item's ends, not the segment's (see PAD_FRAMES)
            self.loop.admit(Clip(key, ident.float() / 127.5 - 1.0, feats, seg.n_frames, seed=seg.seed,
                                 row_of_frame0=PAD_FRAMES, frame_lo=-seg.start,
                                 frame_hi=seg.item_frames - 1 - seg.start))

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
        finished = [(self._running.pop(key), to_uint8(frames))
                    for key, frames in self.loop.step()]
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


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """`[T, 3, H, W]` in [-1, 1] -> `[T, H, W, 3]` uint8."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8) \
        .permute(0, 2, 3, 1).cpu().numpy()


class BackgroundBatcher:
    """Runs a `ContinuousBatcher` on its own thread; `submit` from any thread
    (e.g. an asyncio replica) returns a `concurrent.futures.Future` of the
    segment's frames."""

    def __init__(self, engine: ContinuousBatcher):
        self.engine = engine
        self._cv = threading.Condition()
        self._incoming: list[tuple[Segment, concurrent.futures.Future]] = []
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="dheads-batcher", daemon=True)
        self._thread.start()

    def submit(self, segment: Segment) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._incoming.append((segment, fut))
            self._cv.notify()
        return fut

    @property
    def queue_depth(self) -> int:
        return len(self._incoming) + len(self.engine.queue)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._incoming and not self.engine.busy:
                    self._cv.wait()
                if self._stop:
                    return
                incoming, self._incoming = self._incoming, []
            for seg, fut in incoming:
                self._futures[id(seg)] = fut
                self.engine.add(seg)
            try:
                finished = self.engine.step()
            except Exception as e:  # a broken batch fails its segments, never the loop
                for seg in self.engine.in_flight():
                    with contextlib.suppress(KeyError):
                        self._futures.pop(id(seg)).set_exception(e)
                self.engine.reset()
                continue
            for seg, frames in finished:
                self._futures.pop(id(seg)).set_result(frames)


# ------------------------------------------------------------------ loading
def build_engine(checkpoint: str, sampler_cfg: Any, cfg: DubConfig,
                 storage_cfg: StorageConfig | None = None,
                 device: str | None = None) -> ContinuousBatcher:
    """Load a checkpoint and wrap it in a `ContinuousBatcher` of `cfg.batch_size` slots."""
    from dheads.model.checkpoint import load_checkpoint
    from dheads.model.diffusion import GaussianDiffusion
    from dheads.model.samplers import make_sampler
    from dheads.platform.checkpointing import fetch_model_checkpoint

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    device = device or ("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    loaded = load_checkpoint(fetch_model_checkpoint(checkpoint, storage_cfg), device=device)
    sampler = make_sampler(GaussianDiffusion(loaded.diffusion_cfg), sampler_cfg)
    return ContinuousBatcher(loaded.model, sampler, loaded.model_cfg.audio,
                             loaded.model_cfg.image_size, cfg.batch_size, device)


def dub_items(engine: ContinuousBatcher, items: list[DubItem], cfg: DubConfig,
              storage_cfg: StorageConfig | None = None, seed: int = 0) -> list[dict]:
    """Dub `items` in this process (all their segments share the engine's slot
    pool). Returns one result row per item; per-item errors become rows."""
    prepared, rows = [], {}
    for item in items:
        try:
            prepared.append(prepare_item(item, cfg, engine.image_size, storage_cfg, seed))
        except ItemError as e:
            rows[item.item_id] = result_row(item, "failed", reason=str(e))
    frames = engine.run(s for p in prepared for s in p.segments)
    for p in prepared:
        try:
            seconds = finish_item(p, {s.index: frames[s.key] for s in p.segments}, storage_cfg)
            rows[p.item.item_id] = result_row(p.item, "succeeded", seconds=seconds)
        except (MediaError, storage.StorageError, ValueError) as e:
            rows[p.item.item_id] = result_row(p.item, "failed", reason=f"output: {e}")
    return [rows[i.item_id] for i in items]


def result_row(item: DubItem, status: str, seconds: float | None = None,
               reason: str | None = None) -> dict:
    """One row of the results table."""
    return {"item": item.item_id, "status": status, "output": item.output,
            "seconds": seconds, "reason": reason}
