"""Face regions and the per-frame signals measured inside them: mouth opening
and eye openness (blinks).

All functions take RGB frames `[T, H, W, 3]` uint8 and work on luminance
`Y = 0.299 R + 0.587 G + 0.114 B`. Regions are fixed per clip (one box for the
whole clip, not per frame), so a measurement can only change when the pixels
inside the box change: a box that grew with the reference's open mouth would
leak the reference's motion into a frozen generated video.

Validated on ../shared/benchmark/val against its ground truth
(tests/jobs/test_eval_estimators.py): over the 40 clips the mouth opening
measured on the real video correlates with `mouth_open` at r = 0.986 on
average (≈ 0.97 after a 64 px round trip); on the real videos the blink
detector finds 67 of the 68 ground-truth blinks with no false ones, the same
after a 64 px round trip.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dheads.platform.faces import MOUTH_IN_CROP
from dheads.platform.facemotion import (BLINK_BASELINE_FRAMES, BLINK_DROP, blink_events,  # noqa: F401
                                        detect_blinks, gradient_energy)

# Mouth opening: a pixel's "darkness" ramps from 0 at 0.715·m to 1 at 0.385·m,
# m = the clip's median luminance inside the mouth box (mostly lips and skin).
# Chosen on val clips among hard/soft thresholds 0.35..0.65·m (docs in
# report.METHODS); the soft ramp keeps the signal smooth on upscaled 64 px video.
DARK_CENTRE = 0.55
DARK_HALF_WIDTH = 0.165
# Blinks: the detector of platform/facemotion.py (the one preprocessing and
# the motion prior use), re-exported here for the scoring code.


@dataclass(frozen=True)
class FaceRegions:
    """Per-clip regions in pixels of the reference frame, `[x0, y0, x1, y1]`
    integer bounds (x1, y1 exclusive)."""
    mouth: tuple[int, int, int, int]
    eyes: tuple[int, int, int, int]
    source: str  # "ground truth" | "face geometry"

    @property
    def upper_rows(self) -> int:
        """The upper face: rows [0, upper_rows), everything above the mouth box."""
        return self.mouth[1]


def _clamp(box, w: int, h: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    x0, x1 = int(np.clip(np.floor(x0), 0, w - 1)), int(np.clip(np.ceil(x1), 1, w))
    y0, y1 = int(np.clip(np.floor(y0), 0, h - 1)), int(np.clip(np.ceil(y1), 1, h))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def face_regions(height: int, width: int, mouth_boxes: np.ndarray | None = None) -> FaceRegions:
    """Mouth box and eye band of a clip.

    With ground-truth boxes `[T, 4]` the mouth box is their union over the
    clip; without, it is the mouth's place in a face crop
    (`platform.faces.MOUTH_IN_CROP`: frames are face crops, as the benchmark's
    and the dubbing job's). The eye band is derived from the mouth box of width
    w: x within ±0.95 w of its centre, y from 0.95 w to 0.1 w above its top
    (on the benchmark's 20 val identities the eye centres lie 0.30-0.69 w above
    the mouth top and 0.47-0.77 w to the side).
    """
    if mouth_boxes is not None and len(mouth_boxes):
        b = np.asarray(mouth_boxes, np.float64)
        box = (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())
        source = "ground truth"
    else:
        fx0, fy0, fx1, fy1 = MOUTH_IN_CROP
        box = (fx0 * width, fy0 * height, fx1 * width, fy1 * height)
        source = "face geometry"
    mouth = _clamp(box, width, height)
    w = mouth[2] - mouth[0]
    cx = 0.5 * (mouth[0] + mouth[2])
    eyes = _clamp((cx - 0.95 * w, mouth[1] - 0.95 * w, cx + 0.95 * w, mouth[1] - 0.1 * w), width, height)
    return FaceRegions(mouth=mouth, eyes=eyes, source=source)


def luminance(frames: np.ndarray) -> np.ndarray:
    """`[..., 3]` uint8 RGB -> `[...]` float32 luma in [0, 255]."""
    f = frames.astype(np.float32)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def crop(frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return frames[:, y0:y1, x0:x1]


def mouth_opening(frames: np.ndarray, box, level: float | None = None) -> np.ndarray:
    """Soft vertical extent of the dark mouth interior, in pixel rows: `[T]`.

    Each pixel gets a darkness d = clip((0.715 m − Y) / (0.33 m), 0, 1); the
    opening is Σ_rows max_cols d — the number of rows of the box crossed by
    the dark interior, with partial rows counted fractionally. `level` is `m`
    (default: this clip's own median); pass the reference's to measure a
    generated clip on the same scale.
    """
    lum = luminance(crop(frames, box))
    m = float(np.median(lum)) if level is None else level
    m = max(m, 1.0)
    dark = np.clip(((DARK_CENTRE + DARK_HALF_WIDTH) * m - lum) / (2 * DARK_HALF_WIDTH * m), 0.0, 1.0)
    return dark.max(axis=2).sum(axis=1).astype(np.float64)


def eye_openness(frames: np.ndarray, box) -> np.ndarray:
    """Gradient energy of the eye band, `[T]`: mean |∂Y/∂y| + |∂Y/∂x|.

    Open eyes (sclera, iris, lash lines) carry most of the band's edges; a
    closed lid is smooth skin. On the val clips this follows the ground-truth
    `eyelid` at r ≈ 0.93 (best of luminance std, dark/bright pixel fractions).
    """
    return gradient_energy(frames, box)
