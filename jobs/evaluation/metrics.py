"""Frame and sequence metrics of a generated clip against its reference.

Conventions (also written into every report, see report.METHODS):
- frames are uint8 RGB `[T, H, W, 3]`; the generated clip is resized to the
  reference's size (cv2 INTER_AREA when shrinking, INTER_CUBIC when growing)
  and both are cut to their common prefix of frames;
- PSNR: 10 log10(255² / MSE) over RGB per frame, capped at 100 dB, averaged
  over frames;
- SSIM: Wang et al. 2004 with a Gaussian window σ = 1.5 truncated to 11×11,
  K1 = 0.01, K2 = 0.03, L = 255, per RGB channel then averaged; the SSIM map
  is averaged over the region without its 5-px frame border (as skimage);
- the upper face is the rows above the mouth box's top.
"""
from __future__ import annotations

import cv2
import numpy as np

SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
PSNR_CAP_DB = 100.0
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


def match_frames(generated: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resize `generated` to the reference's H×W and cut both to the common prefix."""
    h, w = reference.shape[1:3]
    if generated.shape[1:3] != (h, w):
        shrink = generated.shape[1] * generated.shape[2] > h * w
        interp = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
        generated = np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in generated])
    t = min(len(generated), len(reference))
    return generated[:t], reference[:t]


def mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame mean squared error over RGB (0-255) of `[T, H, W, 3]` pairs: `[T]`."""
    d = a.astype(np.float64) - b.astype(np.float64)
    return (d * d).reshape(len(a), -1).mean(axis=1)


def db(mse_value):
    """PSNR in dB for an MSE (scalar or array), capped at PSNR_CAP_DB."""
    with np.errstate(divide="ignore"):
        return np.minimum(10.0 * np.log10(255.0 ** 2 / np.asarray(mse_value, np.float64)), PSNR_CAP_DB)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame PSNR in dB of `[T, H, W, 3]` uint8 pairs: `[T]`."""
    return db(mse(a, b))


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM map of two `[H, W, 3]` uint8 images, averaged over channels: `[H, W]`."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x, y = a.astype(np.float64), b.astype(np.float64)

    def blur(z):
        return cv2.GaussianBlur(z, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(axis=-1)


def ssim(a: np.ndarray, b: np.ndarray, upper_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame SSIM of `[T, H, W, 3]` pairs over the full frame and over rows
    [0, upper_rows) (the upper face; the full frame when None): two `[T]`."""
    pad = SSIM_WINDOW // 2
    full, upper = np.empty(len(a)), np.empty(len(a))
    for i in range(len(a)):
        m = ssim_map(a[i], b[i])[pad:-pad, pad:-pad]
        full[i] = m.mean()
        rows = m.shape[0] if upper_rows is None else max(1, upper_rows - pad)
        upper[i] = m[:rows].mean()
    return full, upper


def gray(frames: np.ndarray) -> np.ndarray:
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])


def flow_magnitude(frames: np.ndarray) -> float:
    """Mean Farneback optical-flow magnitude (px/frame) over all pixels and
    consecutive frame pairs (cv2.calcOpticalFlowFarneback with FARNEBACK)."""
    g = gray(frames)
    if len(g) < 2:
        return 0.0
    mags = [np.linalg.norm(cv2.calcOpticalFlowFarneback(g[i - 1], g[i], None, **FARNEBACK), axis=-1).mean()
            for i in range(1, len(g))]
    return float(np.mean(mags))


def frame_mse(frames: np.ndarray) -> float:
    """Mean squared difference of consecutive frames (RGB, 0-255 scale)."""
    if len(frames) < 2:
        return 0.0
    f = frames.astype(np.float32)
    return float(np.mean((f[1:] - f[:-1]) ** 2))


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson r, or None when either side is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 3 or a.std() < 1e-9 or b.std() < 1e-9:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def lagged_pearson(reference: np.ndarray, generated: np.ndarray, max_lag: int = 5) -> dict[int, float | None]:
    """r(lag) = Pearson(reference[t], generated[t + lag]) over the overlap, for
    lag in −max_lag..max_lag.

    Sign: a positive lag means the generated mouth moves *later* than the
    reference (e.g. driving audio delayed by 5 frames gives lag +5).
    """
    t = min(len(reference), len(generated))
    out = {}
    for lag in range(-max_lag, max_lag + 1):
        if lag >= 0:
            a, b = reference[:t - lag], generated[lag:t]
        else:
            a, b = reference[-lag:t], generated[:t + lag]
        out[lag] = pearson(a, b)
    return out


def window_psnr(mse_series: np.ndarray, fps: float, seconds: float = 3.0) -> tuple[float, float, int]:
    """PSNR of the mean MSE over the first and over the last `seconds` (a
    frame identical to the target cannot inflate it as a 100 dB frame would);
    the windows shrink to half the clip for clips under 2 × seconds, so they
    never overlap. Returns (first dB, last dB, window frames)."""
    n = max(1, min(int(round(seconds * fps)), len(mse_series) // 2))
    return float(db(np.mean(mse_series[:n]))), float(db(np.mean(mse_series[-n:]))), n
