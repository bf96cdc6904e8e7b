"""Head motion and eye openness measured on face crops: the signals that
`dheads preprocess` stores per frame (the motion conditioning of the model)
and that `dheads eval` scores. Plain numpy + OpenCV, no ground truth needed.

- **Head track** `[T, 3]`: the rigid transform (angle in degrees, counter-
  clockwise; tx, ty in pixels of a 128-px frame) that carries the clip's
  first frame onto frame k, about the image centre, found by OpenCV's ECC
  alignment (`findTransformECC`, MOTION_EUCLIDEAN) of the blurred luma over
  an ellipse on the face without the mouth and chin (they move with the
  speech). Frames are worked on at `TRACK_SIZE` px (smaller crops are
  upscaled first: at 64 px ECC's angle is noisy), each frame starting from
  the previous frame's transform.
  Measured on ../shared/benchmark/val against the ground-truth `pose`
  relative to frame 0 (40 clips, Pearson r per clip, averaged): angle 0.988,
  tx 0.993, ty 0.970 at 128 px; after a 64-px round trip 0.986 / 0.992 /
  0.969 (tests/platform/test_facemotion.py).
- **Alignment**: `align(frames, track)` warps every frame back onto the
  first frame's pose, so a fixed region (eyes, upper face) stays on the same
  part of the face while the head moves.
- **Eye openness** `[T]`: gradient energy of the eye band of the
  pose-aligned frames, divided by the clip's median (1 = as open as usual,
  a blink dips towards 0.5). Open eyes (sclera, iris, lash lines) carry most
  of the band's edges; a closed lid is smooth skin.

Pose convention (the benchmark's `pose`): a point x of frame 0 is at
R(−angle) (x − c) + c + (tx, ty) in frame k, y pointing down, so a positive
angle turns the head counter-clockwise on screen.
"""
from __future__ import annotations

import cv2
import numpy as np

from dheads.platform.faces import MOUTH_IN_CROP

TRACK_SIZE = 128          # px the tracker works at (pose units are 128-px pixels)
TRACK_BLUR = 1.0          # Gaussian σ (px at TRACK_SIZE) before ECC
ECC_ITERATIONS = 50
ECC_EPS = 1e-5
# The face ellipse (fractions of the crop side) the tracker aligns.
FACE_ELLIPSE = (0.5, 0.5, 0.36, 0.46)     # centre x, centre y, half-width, half-height


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    interp = cv2.INTER_AREA if frames.shape[1] > size else cv2.INTER_CUBIC
    return np.stack([cv2.resize(f, (size, size), interpolation=interp) for f in frames])


def mouth_region(mouth_boxes: np.ndarray | None, size: int) -> tuple[float, float, float, float]:
    """The union of the clip's mouth boxes `[T, 4]` (pixels of a `size`-px
    crop), or the mouth's place in a face crop when none are given."""
    if mouth_boxes is None or not len(mouth_boxes):
        return tuple(float(v) * size for v in MOUTH_IN_CROP)
    b = np.asarray(mouth_boxes, np.float64)
    return float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())


def track_mask(size: int, mouth: tuple[float, float, float, float]) -> np.ndarray:
    """uint8 `[size, size]`: the face ellipse without the mouth box and the
    chin below it (half the box's height again)."""
    mask = np.zeros((size, size), np.uint8)
    cx, cy, rx, ry = FACE_ELLIPSE
    cv2.ellipse(mask, (int(cx * size), int(cy * size)), (int(rx * size), int(ry * size)),
                0, 0, 360, 255, -1)
    x0, y0, x1, y1 = (int(round(v)) for v in mouth)
    mask[max(y0, 0):max(y1 + (y1 - y0) // 2, 0), max(x0, 0):max(x1, 0)] = 0
    return mask


def _luma(frames: np.ndarray) -> list[np.ndarray]:
    return [cv2.GaussianBlur(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), TRACK_BLUR)
            for f in frames]


def _pose_of(warp: np.ndarray, size: int) -> np.ndarray:
    """ECC's warp W (frame_k(W x) ≈ frame_0(x)) -> (angle°, tx, ty) about the centre."""
    a, t = warp[:, :2].astype(np.float64), warp[:, 2].astype(np.float64)
    c = np.full(2, (size - 1) / 2.0)
    shift = a @ c + t - c
    scale = TRACK_SIZE / size
    return np.array([-np.degrees(np.arctan2(a[1, 0], a[0, 0])), shift[0] * scale, shift[1] * scale])


def pose_matrix(pose: np.ndarray, size: int) -> np.ndarray:
    """(angle°, tx, ty) -> the 2×3 matrix taking frame-0 points to frame k, in `size`-px pixels."""
    ang = np.radians(-float(pose[0]))
    r = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    c = np.full(2, (size - 1) / 2.0)
    t = np.array([pose[1], pose[2]], np.float64) * size / TRACK_SIZE
    return np.concatenate([r, (c + t - r @ c)[:, None]], axis=1)


def head_track(frames: np.ndarray, mouth_boxes: np.ndarray | None = None) -> np.ndarray:
    """`[T, H, W, 3]` uint8 face crops -> `[T, 3]` float64 (angle°, tx, ty) of
    each frame relative to frame 0 (row 0 is zeros). `mouth_boxes` `[T, 4]`
    in pixels of the crop (default: the face geometry). A frame ECC cannot
    align keeps the previous frame's pose."""
    if len(frames) == 0:
        return np.zeros((0, 3))
    h = frames.shape[1]
    mouth = mouth_region(mouth_boxes, h)
    frames = _resize(frames, TRACK_SIZE)
    mouth = tuple(v * TRACK_SIZE / h for v in mouth)
    g = _luma(frames)
    mask = track_mask(TRACK_SIZE, mouth)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, ECC_ITERATIONS, ECC_EPS)
    warp = np.eye(2, 3, dtype=np.float32)
    out = np.zeros((len(g), 3))
    for k in range(1, len(g)):
        try:
            _, warp = cv2.findTransformECC(g[0], g[k], warp.copy(), cv2.MOTION_EUCLIDEAN, criteria, mask, 5)
        except cv2.error:  # no convergence (e.g. a flat frame): keep the last pose
            pass
        out[k] = _pose_of(warp, TRACK_SIZE)
    return out


def align(frames: np.ndarray, track: np.ndarray) -> np.ndarray:
    """Warp each frame `[T, H, W, 3]` back onto frame 0's pose (edges replicated)."""
    h, w = frames.shape[1:3]
    out = np.empty_like(frames)
    for k, (f, p) in enumerate(zip(frames, track)):
        m = pose_matrix(p, w)
        # frame_0(x) = frame_k(M x): warpAffine with WARP_INVERSE_MAP samples f at M x
        out[k] = cv2.warpAffine(f, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_REPLICATE)
    return out


def eye_band(size: int, mouth: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """The eye band `[x0, y0, x1, y1]` of a crop, from its mouth box of width w:
    x within ±0.95 w of its centre, y from 0.95 w to 0.1 w above its top (on
    the benchmark's 20 val identities the eye centres lie 0.30–0.69 w above
    the mouth top and 0.47–0.77 w to the side)."""
    x0, y0, x1, _ = mouth
    w, cx = x1 - x0, 0.5 * (x0 + x1)
    box = (cx - 0.95 * w, y0 - 0.95 * w, cx + 0.95 * w, y0 - 0.1 * w)
    bx0, by0 = int(np.clip(np.floor(box[0]), 0, size - 1)), int(np.clip(np.floor(box[1]), 0, size - 1))
    bx1, by1 = int(np.clip(np.ceil(box[2]), 1, size)), int(np.clip(np.ceil(box[3]), 1, size))
    return bx0, by0, max(bx1, bx0 + 1), max(by1, by0 + 1)


def gradient_energy(frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Mean |∂Y/∂y| + |∂Y/∂x| of the luma inside `box`, per frame: `[T]`."""
    x0, y0, x1, y1 = box
    f = frames[:, y0:y1, x0:x1].astype(np.float32)
    lum = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    gy = np.abs(np.diff(lum, axis=1))[:, :, 1:]
    gx = np.abs(np.diff(lum, axis=2))[:, 1:, :]
    return (gx + gy).mean(axis=(1, 2)).astype(np.float64)


def eye_openness(frames: np.ndarray, mouth_boxes: np.ndarray | None = None,
                 track: np.ndarray | None = None) -> np.ndarray:
    """Eye openness `[T]` of face crops: the eye band's gradient energy on the
    pose-aligned frames (`track` from `head_track`; measured when None) over
    its median for the clip."""
    if len(frames) == 0:
        return np.zeros(0)
    track = head_track(frames, mouth_boxes) if track is None else track
    h = frames.shape[1]
    energy = gradient_energy(align(frames, track), eye_band(h, mouth_region(mouth_boxes, h)))
    return energy / max(float(np.median(energy)), 1e-9)


def motion_signals(frames: np.ndarray, mouth_boxes: np.ndarray | None = None) -> dict:
    """Both signals of a clip: `{"head_pose": [T, 3], "eye_open": [T]}` (float32)."""
    track = head_track(frames, mouth_boxes)
    return {"head_pose": track.astype(np.float32),
            "eye_open": eye_openness(frames, mouth_boxes, track).astype(np.float32)}


# Blinks: eye openness below this fraction of its 15-frame (0.6 s) running
# median. Blinks last 3-5 frames, so the median ignores them.
BLINK_DROP = 0.85
BLINK_BASELINE_FRAMES = 15


def detect_blinks(openness: np.ndarray) -> np.ndarray:
    """Blink flags `[T]` bool: openness below BLINK_DROP × its running median."""
    from scipy.ndimage import median_filter

    x = np.asarray(openness, np.float64)
    if x.size == 0:
        return np.zeros(0, bool)
    base = median_filter(x, size=min(BLINK_BASELINE_FRAMES, x.size), mode="nearest")
    return x < BLINK_DROP * np.maximum(base, 1e-9)


def blink_events(flags: np.ndarray) -> int:
    """Number of runs of consecutive True flags (one run = one blink)."""
    f = np.asarray(flags, bool)
    if f.size == 0:
        return 0
    return int(f[0]) + int((f[1:] & ~f[:-1]).sum())
