"""What the Diffused Heads paper claims beyond lip sync, measured per clip on
the pose-aligned face (`dheads.platform.facemotion`): head motion, blinks,
identity whatever the pose, flicker, sharpness, and the variety between two
runs of the same clip.

Every clip is tracked against the identity frame (the reference's first
frame): `head_track([identity] + frames)` gives each frame's pose relative to
the identity frame's, so the generated and the reference tracks share one
origin, and `align` warps every frame back onto the identity frame's pose —
a fixed region (upper face, eye band) then covers the same part of the face
whatever the head does. No I/O here; frames are uint8 `[T, H, W, 3]` on the
reference's frame grid (`metrics.match_frames`).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from dheads.jobs.evaluation import metrics as M
from dheads.jobs.evaluation.mouth import detect_blinks
from dheads.platform import facemotion as fm

AXES = ("angle", "tx", "ty")
# A reference whose track varies less than this (std: degrees, 128-px pixels)
# holds still: the gen ÷ ref motion ratio is undefined (the tracker's own noise
# on a repeated frame is ~1e-5).
STILL_STD = 0.01
# Identity drift windows: the first and the last 10 s (half the clip if shorter).
IDENTITY_WINDOW_S = 10.0
# Blink flags are smoothed by a Gaussian of this σ (frames) before two runs'
# blink series are correlated: two blinks a frame apart are the same behaviour.
VARIETY_BLINK_SIGMA = 2.0


@dataclass
class FaceMotion:
    """One clip's head track and what the pose-aligned frames show."""
    track: np.ndarray     # [T, 3] (angle°, tx, ty in 128-px pixels) relative to the identity frame
    eye_open: np.ndarray  # [T] eye-band gradient energy of the aligned frames / its median
    blinks: np.ndarray    # [T] bool blink flags (mouth.detect_blinks of eye_open)
    aligned: np.ndarray   # [T, H, W, 3] uint8, each frame warped onto the identity frame's pose
    laplacian2: np.ndarray  # [T, H, W] float32: squared Laplacian of the luma, then aligned

    def cut(self, t: int) -> "FaceMotion":
        return FaceMotion(self.track[:t], self.eye_open[:t], self.blinks[:t], self.aligned[:t],
                          self.laplacian2[:t])


def measure(frames: np.ndarray, identity: np.ndarray, mouth_boxes: np.ndarray | None) -> FaceMotion:
    """Track `frames` `[T, H, W, 3]` against `identity` `[H, W, 3]` and measure
    the aligned eye band. `mouth_boxes` `[*, 4]` (pixels of the frames; their
    union masks the mouth out of the tracker) or None for the face geometry."""
    track = fm.head_track(np.concatenate([identity[None], frames]), mouth_boxes)[1:]
    eye = fm.eye_openness(frames, mouth_boxes, track)
    # The Laplacian is taken before the warp: interpolating the image itself
    # would blur it (a moving clip would lose half its Laplacian variance to
    # the warp, a still one none); interpolating its square keeps the mean.
    lap2 = np.stack([cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_32F) ** 2 for f in frames])
    return FaceMotion(track=track, eye_open=eye, blinks=detect_blinks(eye), aligned=fm.align(frames, track),
                      laplacian2=fm.align(lap2, track))


def head_motion(gen: FaceMotion, ref: FaceMotion) -> dict:
    """Per axis: std over time of both tracks, and `head_motion_ratio_<axis>` = gen ÷ ref."""
    out = {}
    for i, axis in enumerate(AXES):
        g, r = float(gen.track[:, i].std()), float(ref.track[:, i].std())
        out[f"head_std_gen_{axis}"], out[f"head_std_ref_{axis}"] = g, r
        out[f"head_motion_ratio_{axis}"] = g / r if r > STILL_STD else None
    return out


def track_vs_truth(ref: FaceMotion, pose: np.ndarray | None) -> dict:
    """`head_track_r_gt_<axis>`: Pearson r of the reference's measured track and
    its ground-truth `pose` `[T, 4]` relative to frame 0 (None without one)."""
    t = len(ref.track)
    if pose is None or len(pose) < t:
        return {f"head_track_r_gt_{axis}": None for axis in AXES}
    gt = pose[:t, :3] - pose[:1, :3]
    return {f"head_track_r_gt_{axis}": M.pearson(ref.track[:, i], gt[:, i]) for i, axis in enumerate(AXES)}


def identity_psnr(m: FaceMotion, identity: np.ndarray, upper_rows: int, fps: float) -> tuple[float, float, float, int]:
    """Upper face (rows [0, upper_rows)) of the aligned frames against the
    identity frame's: PSNR of the mean MSE over all frames, over the first and
    over the last IDENTITY_WINDOW_S; and the window length in frames."""
    target = np.broadcast_to(identity[None, :upper_rows], m.aligned[:, :upper_rows].shape)
    mse = M.mse(m.aligned[:, :upper_rows], target)
    first, last, win = M.window_psnr(mse, fps, IDENTITY_WINDOW_S)
    return float(M.db(mse.mean())), first, last, win


def flicker(m: FaceMotion, upper_rows: int) -> float:
    """Mean |frame k+1 − frame k| of the aligned upper face (RGB, 0–255)."""
    up = m.aligned[:, :upper_rows].astype(np.float32)
    return float(np.abs(np.diff(up, axis=0)).mean()) if len(up) > 1 else 0.0


def sharpness(m: FaceMotion, upper_rows: int) -> float:
    """Variance of the Laplacian (cv2, 3×3 aperture) of the luma over the aligned
    upper face, averaged over frames: the mean of the aligned squared Laplacian
    (its mean over a face region is ~0, so the mean square is the variance)."""
    return float(m.laplacian2[:, :upper_rows].mean(dtype=np.float64))


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def face_quality(gen: FaceMotion, ref: FaceMotion, identity: np.ndarray, upper_rows: int,
                 fps: float) -> dict:
    """Identity PSNR (all frames, first / last window), flicker and sharpness of gen and ref."""
    out: dict = {}
    for side, m in (("gen", gen), ("ref", ref)):
        mean, first, last, win = identity_psnr(m, identity, upper_rows, fps)
        out[f"identity_psnr_{side}"] = mean
        key = "identity_psnr" if side == "gen" else "identity_psnr_ref"
        out[f"{key}_first"], out[f"{key}_last"] = first, last
        out[f"flicker_{side}"] = flicker(m, upper_rows)
        out[f"sharpness_{side}"] = sharpness(m, upper_rows)
    out["identity_window_frames"] = win
    out["flicker_ratio"] = _ratio(out["flicker_gen"], out["flicker_ref"])
    out["sharpness_ratio"] = _ratio(out["sharpness_gen"], out["sharpness_ref"])
    return out


def blink_series(flags: np.ndarray) -> np.ndarray:
    """Blink flags `[T]` smoothed by a Gaussian of σ = VARIETY_BLINK_SIGMA frames."""
    return gaussian_filter1d(np.asarray(flags, np.float64), VARIETY_BLINK_SIGMA, mode="nearest")


def variety(a: FaceMotion | None, b: FaceMotion | None, missing: str | None = None) -> dict:
    """How alike two runs of the same clip move: Pearson r of their head tracks
    per axis (`variety_track_r_<axis>`, mean `variety_track_r`) and of their
    smoothed blink series (`variety_blink_r`), over their common frames. 1:
    the same motion twice; near 0: unrelated. `variety_reason` says why a
    value is None (`missing`: why there is no second run)."""
    out: dict = {f"variety_track_r_{axis}": None for axis in AXES}
    out.update(variety_track_r=None, variety_blink_r=None, variety_frames=None)
    if a is None or b is None:
        out["variety_reason"] = missing or "no second run"
        return out
    t = min(len(a.track), len(b.track))
    reasons = []
    rs = [M.pearson(a.track[:t, i], b.track[:t, i]) for i in range(len(AXES))]
    for axis, r in zip(AXES, rs):
        out[f"variety_track_r_{axis}"] = r
        if r is None:
            reasons.append(f"{axis}: a run's head track is constant")
    defined = [r for r in rs if r is not None]
    out["variety_track_r"] = float(np.mean(defined)) if defined else None
    out["variety_blink_r"] = M.pearson(blink_series(a.blinks[:t]), blink_series(b.blinks[:t]))
    if out["variety_blink_r"] is None:
        reasons.append("blinks: a run never blinks")
    out["variety_reason"] = "; ".join(reasons) or None
    out["variety_frames"] = t
    return out
