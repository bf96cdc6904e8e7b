"""Face location and cropping: detectors `none` and `haar`.

- `none`: the frames are already face crops (like ../shared/benchmark); the
  crop is the central square of the frame.
- `haar`: OpenCV 4.x's frontal-face Haar cascade, run on every `every`-th
  frame (grayscale, downscaled to ≤ 320 px), largest face per frame; boxes of
  the frames in between are interpolated and the track is smoothed, so the
  crop follows a moving or zooming face without jitter.

Crops are squares around the face box grown by `margin` on each side, clamped
to the frame (padded with edge pixels where the face touches the border).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from dheads.platform.config import FaceDetector

# Where the mouth sits inside a face crop, as fractions of the crop side:
# [x0, y0, x1, y1]. Measured on ../shared/benchmark (mouth_y ≈ 0.71 of the
# frame, half-width ≤ 0.12) and on Haar boxes grown by the default margin.
MOUTH_IN_CROP = (0.33, 0.60, 0.67, 0.84)


class FaceError(ValueError):
    """No face found in a clip."""


@lru_cache(maxsize=1)
def _cascade():
    import cv2

    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    c = cv2.CascadeClassifier(path)
    if c.empty():
        raise RuntimeError(f"cannot load Haar cascade {path} (needs opencv-python-headless 4.x)")
    return c


def haar_face(frame: np.ndarray) -> np.ndarray | None:
    """Largest face `[x0, y0, x1, y1]` in an RGB frame `[H, W, 3]`, or None."""
    import cv2

    h, w = frame.shape[:2]
    s = min(1.0, 320 / max(h, w))
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    if s < 1.0:
        gray = cv2.resize(gray, (int(w * s), int(h * s)), interpolation=cv2.INTER_AREA)
    found = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                        minSize=(max(16, gray.shape[0] // 10),) * 2)
    if len(found) == 0:
        return None
    x, y, fw, fh = max(found, key=lambda r: r[2] * r[3])
    return np.array([x, y, x + fw, y + fh], np.float64) / s


def face_track(frames: np.ndarray, detector: FaceDetector, every: int = 5) -> np.ndarray:
    """Face boxes `[T, 4]` (x0, y0, x1, y1, frame pixels) for frames `[T, H, W, 3]`."""
    t, h, w = frames.shape[:3]
    if detector == FaceDetector.none:
        side = min(h, w)
        x0, y0 = (w - side) / 2, (h - side) / 2
        return np.tile([x0, y0, x0 + side, y0 + side], (t, 1)).astype(np.float64)
    if detector != FaceDetector.haar:
        raise ValueError(f"unknown face detector {detector!r}")
    idx = sorted(set(range(0, t, every)) | {t - 1})
    hits = [(i, b) for i in idx if (b := haar_face(frames[i])) is not None]
    if not hits:
        raise FaceError(f"no face found by the haar detector in {len(idx)} sampled frames")
    ii = np.array([i for i, _ in hits], np.float64)
    bb = np.stack([b for _, b in hits])
    track = np.stack([np.interp(np.arange(t), ii, bb[:, j]) for j in range(4)], 1)
    k = min(t, 2 * every + 1)
    if k > 1:  # moving average, edge-padded: removes detector jitter
        pad = np.pad(track, ((k // 2, k - 1 - k // 2), (0, 0)), mode="edge")
        track = np.stack([np.convolve(pad[:, j], np.ones(k) / k, mode="valid") for j in range(4)], 1)
    return track


def crop_boxes(face_boxes: np.ndarray, margin: float, detector: FaceDetector) -> np.ndarray:
    """Square crop boxes `[T, 4]` around face boxes, grown by `margin` of the side on each side."""
    if detector == FaceDetector.none:
        return face_boxes.copy()
    cx = (face_boxes[:, 0] + face_boxes[:, 2]) / 2
    cy = (face_boxes[:, 1] + face_boxes[:, 3]) / 2
    side = np.maximum(face_boxes[:, 2] - face_boxes[:, 0], face_boxes[:, 3] - face_boxes[:, 1])
    half = side * (0.5 + margin)
    cy = cy + 0.05 * side  # Haar boxes sit high (brows to lips): centre a little lower
    return np.stack([cx - half, cy - half, cx + half, cy + half], 1)


def crop_resize(frames: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Crop each frame to its box and resize to `[T, size, size, 3]` uint8 (INTER_AREA)."""
    import cv2

    t, h, w = frames.shape[:3]
    ib = np.round(boxes).astype(int)
    if (ib == ib[0]).all() and tuple(ib[0]) == (0, 0, w, h) and h == w == size:
        return frames                                  # already the crop (detector none)
    out = np.empty((t, size, size, 3), np.uint8)
    for i in range(t):
        x0, y0, x1, y1 = ib[i]
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            pad = max(0, -x0, -y0, x1 - w, y1 - h)
            img = cv2.copyMakeBorder(frames[i], pad, pad, pad, pad, cv2.BORDER_REPLICATE)
            x0, y0, x1, y1 = x0 + pad, y0 + pad, x1 + pad, y1 + pad
        else:
            img = frames[i]
        crop = img[y0:y1, x0:x1]
        if crop.shape[0] == size and crop.shape[1] == size:
            out[i] = crop
        else:
            interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
            out[i] = cv2.resize(crop, (size, size), interpolation=interp)
    return out


def boxes_to_crop(boxes: np.ndarray, crops: np.ndarray, size: int) -> np.ndarray:
    """Map boxes `[T, 4]` in frame pixels into the `size`-px crop of each frame."""
    side = (crops[:, 2] - crops[:, 0])[:, None]
    off = np.concatenate([crops[:, :2], crops[:, :2]], 1)
    return ((boxes - off) * size / side).astype(np.float32)


def mouth_from_geometry(n_frames: int, size: int) -> np.ndarray:
    """Mouth boxes `[T, 4]` in crop pixels when no sidecar gives them."""
    return np.tile(np.array(MOUTH_IN_CROP, np.float32) * size, (n_frames, 1))
