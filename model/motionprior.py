"""The motion prior: head-pose and eye-openness tracks for a clip, drawn
from its seed (so two seeds move the head and blink differently).

`fit(tracks)` estimates `MotionPrior` (see its docstring in
`model/config.py`) from measured training tracks; `sample(prior, n, seed)`
draws `[n, 3]` poses and `[n]` eye openness. Pure numpy: the frame loop
calls it once per clip (per item for a segmented one, so the head moves on
across segment joints instead of returning to the identity's pose).

The benchmark's head motion and blinks are independent of the speech, so
this prior does not read the audio; a generator conditioned on it (real
footage nods with the speech) is the next step the paper names.
"""
from __future__ import annotations

import numpy as np

from dheads.model.config import MotionPrior

BLINK_SHAPE_FRAMES = 7   # the blink curve: from its first flagged frame, this many frames
OPEN = 1.0


def _axis_fit(tracks: list[np.ndarray]) -> tuple[float, float, float, float, float]:
    """φ, κ, σ, μ_std, v_std of v_t = φ v_{t−1} − κ (p_{t−1} − μ_clip) + σ ε
    over tracks `[T]` (least squares within clips: μ_clip is a per-clip intercept)."""
    ys, xs, alphas, vs = [], [], [], []
    for p in tracks:
        if len(p) < 4:
            continue
        v = np.diff(p)
        y, v1, p1 = v[1:], v[:-1], p[1:-1]
        ys.append(y - y.mean())
        xs.append(np.stack([v1 - v1.mean(), -(p1 - p1.mean())], 1))
        alphas.append((y, v1, p1))
        vs.append(v)
    if not ys:
        return 0.0, 0.0, 0.0, 0.0, 0.0
    x, y = np.concatenate(xs), np.concatenate(ys)
    (phi, kappa), *_ = np.linalg.lstsq(x, y, rcond=None)
    phi, kappa = float(np.clip(phi, -0.99, 0.99)), float(np.clip(kappa, 0.0, 1.0))
    sigma = float(np.std(y - x @ np.array([phi, kappa])))
    mus = []
    for yc, v1, p1 in alphas:  # intercept α = κ μ  ->  μ
        alpha = float(np.mean(yc - phi * v1 + kappa * p1))
        if kappa > 1e-4:
            mus.append(alpha / kappa)
    mu_std = float(np.std(mus)) if mus else 0.0
    return phi, kappa, sigma, mu_std, float(np.std(np.concatenate(vs)))


def fit(poses: list[np.ndarray], eyes: list[np.ndarray], blinks: list[np.ndarray]) -> MotionPrior:
    """A prior from measured tracks of training clips: `poses [T, 3]`
    (relative to each clip's frame 0), `eyes [T]` (openness, 1 = open) and
    `blinks [T]` bool (the frames a blink detector flags)."""
    axes = [_axis_fit([np.asarray(p, np.float64)[:, a] for p in poses]) for a in range(3)]
    starts, shapes, gaps, firsts = 0, [], [], []
    for e, b in zip(eyes, blinks):
        e, b = np.asarray(e, np.float64), np.asarray(b, bool)
        first = np.flatnonzero(b & ~np.concatenate([[False], b[:-1]]))
        firsts.append((b, first))
        starts += len(first)
        gaps += list(np.diff(first))
        for s in first:
            if s + BLINK_SHAPE_FRAMES <= len(e):
                shapes.append(e[s:s + BLINK_SHAPE_FRAMES])
    gap = int(np.percentile(gaps, 5)) if len(gaps) >= 5 else 10
    # the frames where `sample` may start a blink: open, and `gap` frames or
    # more after the last start (counting all open frames would spread the
    # starts over frames the refractory gap rules out: too few blinks drawn)
    eligible = 0
    for b, first in firsts:
        ruled_out = np.zeros(len(b), bool)
        for s in first:
            ruled_out[s:s + gap] = True
        eligible += int((~b & ~ruled_out).sum())
    shape = np.mean(shapes, axis=0) if shapes else np.zeros(0)
    if len(shape):  # the curve returns to open at its end
        shape = np.minimum(shape / max(np.median(np.concatenate(eyes)), 1e-9), OPEN)
    return MotionPrior(
        fitted=True,
        phi=[a[0] for a in axes], kappa=[a[1] for a in axes], sigma=[a[2] for a in axes],
        mu_std=[a[3] for a in axes], v_std=[a[4] for a in axes],
        blink_rate=starts / max(eligible + starts, 1),
        blink_gap=gap,
        blink_shape=[float(x) for x in shape],
        clips=len(poses), frames=int(sum(len(p) for p in poses)), blinks=starts)


def sample(prior: MotionPrior, n_frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(pose [n, 3] float32, eye_open [n] float32)` for a clip of `n_frames`
    frames whose frame 0 is the identity frame's pose (pose[0] = 0). An
    unfitted prior gives a still head with open eyes."""
    pose = np.zeros((n_frames, 3))
    eyes = np.full(n_frames, OPEN)
    if not prior.fitted or n_frames == 0:
        return pose.astype(np.float32), eyes.astype(np.float32)
    rng = np.random.default_rng(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    for a in range(3):
        phi, kappa, sigma = prior.phi[a], prior.kappa[a], prior.sigma[a]
        mu = rng.normal(0.0, prior.mu_std[a]) if prior.mu_std[a] > 0 else 0.0
        v = rng.normal(0.0, prior.v_std[a]) if prior.v_std[a] > 0 else 0.0
        p = 0.0
        eps = rng.normal(0.0, 1.0, n_frames)
        for t in range(1, n_frames):
            p += v
            pose[t, a] = p
            v = phi * v - kappa * (p - mu) + sigma * eps[t]
    shape = np.asarray(prior.blink_shape, np.float64)
    starts = rng.random(n_frames)
    t, last = 0, -10 ** 9
    while t < n_frames:
        if len(shape) and t - last >= prior.blink_gap and starts[t] < prior.blink_rate:
            end = min(n_frames, t + len(shape))
            eyes[t:end] = shape[:end - t]
            last = t
            t = end
            continue
        t += 1
    return pose.astype(np.float32), eyes.astype(np.float32)


__all__ = ["fit", "sample", "MotionPrior"]
