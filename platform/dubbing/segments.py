"""Segment planning and stitching: pure numpy, no I/O.

With `DubConfig.joints = carry` (the default) an item is one segment: the
frame loop generates it in order in one slot, so every frame's motion frames
are the two frames before it and nothing restarts from the identity.

With `joints = crossfade` an item's audio is cut at low-energy frames into
segments of at most `DubConfig.max_segment_s`. Every segment is an
independent unit that starts from the identity frame, so the segments of one
item run side by side. Each segment but the last runs `crossfade_frames` past
its end; `stitch` blends that tail into the next segment's first frames. Each
segment but the first starts `lead_in_frames` before its cut and those frames
are dropped: the first frames a segment makes, while its motion frames are
still copies of the identity, move more than the rest (`bench/quality.py
--long-clip`).

A segment carries its own audio with `PAD_FRAMES` frames of context either
side, so its audio features equal those of the whole item, and so the item's
audio can be put back together from its segments (`item_audio`) without
decoding the input again.

Timing (docs/architecture.md): 16 kHz mono, 25 fps, frame i covers samples
[640 i, 640 (i+1)).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from dheads.platform.config import DubConfig, Joints

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640

# A frame's feature window reaches 2 frames either side of it, and the audio
# context m_y reaches m_y frames further: segments carry PAD_FRAMES frames of
# real audio past both ends (zeros past the item's), so their features equal
# those of the whole clip. Holds for m_y <= PAD_FRAMES - 2.
PAD_FRAMES = 8
PAD_SAMPLES = PAD_FRAMES * SAMPLES_PER_FRAME


def item_seed(seed: int, item_id: str) -> int:
    """The seed of item `item_id` in a job dubbed with `seed` (32 bits): the
    same item and job seed give the same video, and two items of one job
    draw their own noise and their own head motion and blinks."""
    digest = hashlib.blake2b(f"{int(seed)}:{item_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def segment_seed(seed: int, index: int) -> int:
    """The seed of segment `index` of an item dubbed with `seed`: the numbers
    of `dheads.model.video.clip_seed` (a test holds them equal), written here
    so that decoding and encoding workers never import torch (~2.5 s a worker)."""
    return int(seed) * 1_000_003 + int(index)


def n_video_frames(n_samples: int) -> int:
    """Frames of the output video: the audio's duration rounded to one frame."""
    return max(1, int(round(n_samples / SAMPLES_PER_FRAME)))


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
    audio: np.ndarray           # [(n_frames + 2 PAD_FRAMES) * 640] float32: frames [start - PAD, start + n_frames + PAD)
    item_frames: int            # frames of the whole item (audio windows clamp at its ends)
    seed: int = 0
    lead: int = 0               # the first `lead` frames generated are dropped (the lead-in)

    @property
    def key(self) -> tuple[str, int]:
        return (self.item_id, self.index)

    # -- a flat row of scalars and bytes, for Ray Data blocks
    def to_row(self) -> dict:
        h, w = self.identity.shape[:2]
        return {"item_id": self.item_id, "index": self.index, "count": self.count,
                "start": self.start, "n_frames": self.n_frames, "item_frames": self.item_frames,
                "seed": self.seed, "lead": self.lead, "height": h, "width": w,
                "identity": np.ascontiguousarray(self.identity, np.uint8).tobytes(),
                "audio": np.ascontiguousarray(self.audio, np.float32).tobytes()}

    @classmethod
    def from_row(cls, row: dict) -> "Segment":
        """The inverse of `to_row`; other keys of `row` are ignored."""
        h, w = int(row["height"]), int(row["width"])
        return cls(str(row["item_id"]), int(row["index"]), int(row["count"]), int(row["start"]),
                   int(row["n_frames"]),
                   np.frombuffer(row["identity"], np.uint8).reshape(h, w, 3).copy(),
                   np.frombuffer(row["audio"], np.float32).copy(), int(row["item_frames"]),
                   seed=int(row["seed"]), lead=int(row["lead"]))


# the columns of `Segment.to_row`, with the values a row that is not a segment carries
EMPTY_SEGMENT_ROW = {"item_id": "", "index": 0, "count": 0, "start": 0, "n_frames": 0,
                     "item_frames": 0, "seed": 0, "lead": 0, "height": 0, "width": 0,
                     "identity": b"", "audio": b""}


def carries(cfg: DubConfig) -> bool:
    """Whether `cfg` generates an item as one carried unit (`joints = carry`)."""
    return Joints(cfg.joints) == Joints.carry


def lead_in(cfg: DubConfig) -> int:
    """Frames a segment after the first generates before its cut, and drops:
    `lead_in_frames`, kept below `min_segment_s` so it never reaches back
    past the previous cut (0 when the item is carried: there is no cut)."""
    if carries(cfg):
        return 0
    return max(0, min(int(cfg.lead_in_frames), int(round(cfg.min_segment_s * FPS)) - 1))


def crossfade(cfg: DubConfig) -> int:
    """Frames each segment but the last runs past its cut (0 when carried)."""
    return 0 if carries(cfg) else int(cfg.crossfade_frames)


def segment_bounds(audio: np.ndarray, cfg: DubConfig) -> list[tuple[int, int]]:
    """The `(start, end)` frame ranges `segment_item` cuts `audio` [S] into
    (before the cross-fade tails and lead-ins): every segment, with both,
    is at most `max_segment_s` long; one range for a carried item."""
    n = n_video_frames(len(audio))
    if carries(cfg):
        return [(0, n)]
    return plan_segments(frame_energy(audio, n), int(round(cfg.max_segment_s * FPS)),
                         int(round(cfg.min_segment_s * FPS)), crossfade(cfg) + lead_in(cfg))


def segment_item(item_id: str, identity: np.ndarray, audio: np.ndarray, cfg: DubConfig,
                 seed: int = 0) -> list[Segment]:
    """Split an item's audio `[S]` (16 kHz) into `Segment`s at low-energy
    points (one segment when carried); segment i is seeded `segment_seed(seed, i)`."""
    n = n_video_frames(len(audio))
    bounds, tail = segment_bounds(audio, cfg), crossfade(cfg)
    padded = np.zeros((n + tail) * SAMPLES_PER_FRAME + 2 * PAD_SAMPLES, np.float32)
    padded[PAD_SAMPLES: PAD_SAMPLES + min(len(audio), n * SAMPLES_PER_FRAME)] = \
        audio[: n * SAMPLES_PER_FRAME]
    segments = []
    for i, (s, e) in enumerate(bounds):
        lead = min(lead_in(cfg), s)
        length = lead + e - s + (min(tail, bounds[i + 1][1] - bounds[i + 1][0])
                                 if i + 1 < len(bounds) else 0)
        lo = (s - lead) * SAMPLES_PER_FRAME
        hi = lo + length * SAMPLES_PER_FRAME + 2 * PAD_SAMPLES
        segments.append(Segment(item_id, i, len(bounds), s - lead, length, identity,
                                padded[lo:hi].copy(), n, seed=segment_seed(seed, i), lead=lead))
    return segments


def item_audio(segments: list[Segment]) -> np.ndarray:
    """The item's audio `[item_frames * 640]` back from its segments' windows:
    the input trimmed or zero-padded to the video's duration, the audio track
    of the output."""
    n = segments[0].item_frames
    out = np.zeros(n * SAMPLES_PER_FRAME, np.float32)
    for seg in segments:
        lo, hi = seg.start * SAMPLES_PER_FRAME, min(seg.start + seg.n_frames, n) * SAMPLES_PER_FRAME
        out[lo:hi] = seg.audio[PAD_SAMPLES: PAD_SAMPLES + hi - lo]
    return out


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


def assemble(segments: list[Segment], frames: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """An item's generated segments (`frames` by segment index) -> its video
    `[item_frames, H, W, 3]` uint8 and audio `[item_frames * 640]`. Raises
    ValueError when a segment is missing."""
    if not segments:
        raise ValueError("no segments")
    count = segments[0].count
    if len({s.index for s in segments}) != count or set(frames) != {s.index for s in segments}:
        raise ValueError(f"{len(frames)} of {count} segments came back")
    video = stitch([(s.start + s.lead, frames[s.index][s.lead:]) for s in segments],
                   segments[0].item_frames)
    return video, item_audio(segments)


__all__ = ["SAMPLE_RATE", "FPS", "SAMPLES_PER_FRAME", "PAD_FRAMES", "Segment", "EMPTY_SEGMENT_ROW",
           "carries", "lead_in", "crossfade", "segment_bounds",
           "item_seed", "segment_seed", "n_video_frames", "frame_energy", "plan_segments", "segment_item", "item_audio",
           "stitch", "assemble"]
