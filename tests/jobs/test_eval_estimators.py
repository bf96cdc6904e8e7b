"""The eval estimators checked against the benchmark's ground truth: the real
video scores r ≈ 1 at lag 0 against its own `mouth_open`, a frozen mouth
scores r ≈ 0, a 5-frame delay shows lag +5, blinks match the `blink` flags."""
from __future__ import annotations


import cv2
import numpy as np
import pytest
from scipy.ndimage import binary_dilation, gaussian_filter, label

from dheads.jobs.evaluation import metrics as M
from dheads.jobs.evaluation import mouth
from dheads.jobs.evaluation.scoring import GroundTruth, score_clip
from dheads.platform.media import read_video, write_video

CLIPS = ("val_0001", "val_0012", "val_0017")  # short clips with blinks (99, 76, 96 frames)


@pytest.fixture(scope="module")
def clips(val_clip):
    out = {}
    for stem in CLIPS:
        frames, meta = val_clip(stem)
        out[stem] = (frames, GroundTruth.from_json(meta))
    return out


def _through_codec(tmp_path, frames: np.ndarray) -> np.ndarray:
    """Encode to H.264 and decode again, as a generated mp4 would be."""
    path = tmp_path / "clip.mp4"
    write_video(path, frames)
    return read_video(path, require_audio=False).frames


def test_ground_truth_video_scores_r_near_one_at_lag_zero(clips):
    for stem, (frames, truth) in clips.items():
        m = score_clip(frames, frames, truth=truth).metrics
        assert m["reference_mouth"] == "ground truth"
        assert m["sync_r"] > 0.9, (stem, m["sync_r"])
        assert m["sync_lag"] == 0, (stem, m["sync_lag"])
        assert m["mouth_measure_r"] > 0.9
        assert m["psnr"] == M.PSNR_CAP_DB and m["ssim"] == pytest.approx(1.0)
        assert m["flow_ratio"] == pytest.approx(1.0) and m["blink_rate_ratio"] == pytest.approx(1.0)


def test_ground_truth_video_at_64px_still_in_sync(clips):
    frames, truth = clips["val_0001"]
    small = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in frames])
    m = score_clip(small, frames[:-1], truth=truth).metrics  # a frame shorter, too
    assert m["resized"] and m["generated_size"] == [64, 64] and m["reference_size"] == [128, 128]
    assert m["frames"] == len(frames) - 1
    assert m["sync_r"] > 0.9 and m["sync_lag"] == 0
    assert m["blinks_gen"] == m["blinks_ref"]


def _assert_no_sync(m):
    # A static mouth is reported as r = 0 with an undefined lag; if the codec
    # leaves some flicker the measured r must still be near zero.
    assert m["sync_static"] or abs(m["sync_r"]) < 0.2, m
    assert abs(m["sync_r"]) < 0.2


def test_frozen_video_scores_r_near_zero(clips, tmp_path):
    frames, truth = clips["val_0001"]
    frozen = _through_codec(tmp_path, np.repeat(frames[:1], len(frames), axis=0))
    m = score_clip(frozen, frames, truth=truth).metrics
    _assert_no_sync(m)
    assert m["sync_lag"] is None
    assert m["blinks_gen"] == 0 and m["blink_rate_ratio"] == 0.0
    assert m["flow_ratio"] < 0.05
    assert abs(m["drift_db"]) < 0.1  # a still image never drifts


def test_frozen_mouth_region_scores_r_near_zero(clips, tmp_path):
    frames, truth = clips["val_0012"]
    reg = mouth.face_regions(*frames.shape[1:3], truth.mouth_box)
    x0, y0, x1, y1 = reg.mouth
    moving_face = frames.copy()
    moving_face[:, y0 - 3:y1 + 3, x0 - 3:x1 + 3] = frames[0, y0 - 3:y1 + 3, x0 - 3:x1 + 3]
    m = score_clip(_through_codec(tmp_path, moving_face), frames, truth=truth).metrics
    _assert_no_sync(m)
    assert m["blinks_gen"] == m["blinks_ref"]  # the eyes still blink


@pytest.mark.parametrize("shift", [5, -5])
def test_shifted_video_shows_the_lag(clips, shift):
    frames, truth = clips["val_0017"]
    if shift > 0:  # the generated mouth moves 5 frames late (audio delayed)
        shifted = np.concatenate([np.repeat(frames[:1], shift, 0), frames[:-shift]])
    else:
        shifted = np.concatenate([frames[-shift:], np.repeat(frames[-1:], -shift, 0)])
    m = score_clip(shifted, frames, truth=truth).metrics
    assert m["sync_lag"] == shift
    assert m["sync_r_best"] > 0.9
    assert m["sync_r"] < m["sync_r_best"] - 0.3


def test_lag_sign_on_signals():
    rng = np.random.default_rng(0)
    ref = gaussian_filter(rng.normal(size=200), 2)
    late = np.concatenate([np.zeros(3), ref[:-3]])
    rs = M.lagged_pearson(ref, late, 5)
    assert max(rs, key=rs.get) == 3 and rs[3] > 0.99


def test_blinks_match_ground_truth(clips):
    for stem, (frames, truth) in clips.items():
        reg = mouth.face_regions(*frames.shape[1:3], truth.mouth_box)
        found = mouth.detect_blinks(mouth.eye_openness(frames, reg.eyes))
        runs, n = label(found)
        near_truth = binary_dilation(truth.blink, iterations=2)
        hits = sum(near_truth[runs == i].any() for i in range(1, n + 1))
        assert n == mouth.blink_events(truth.blink) == hits, stem


def test_ssim_matches_gaussian_window_definition():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)

    def blur(z):  # σ = 1.5, truncated at 3.5 σ: an 11×11 window
        return gaussian_filter(z, M.SSIM_SIGMA, truncate=3.5, mode="reflect")

    want = []
    for c in range(3):
        x, y = a[..., c].astype(float), b[..., c].astype(float)
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        want.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    np.testing.assert_allclose(M.ssim_map(a, b), np.mean(want, 0), atol=1e-9)
    assert M.ssim(a[None], a[None], 10)[1][0] == pytest.approx(1.0)
    assert M.psnr(a[None], b[None])[0] == pytest.approx(
        10 * np.log10(255 ** 2 / np.mean((a.astype(float) - b) ** 2)))


def test_upper_face_ignores_everything_from_the_mouth_box_down(clips):
    frames, truth = clips["val_0012"]
    reg = mouth.face_regions(*frames.shape[1:3], truth.mouth_box)
    changed = frames.copy()
    changed[:, reg.upper_rows:] = 0
    m = score_clip(changed, frames, truth=truth).metrics
    assert m["upper_face_rows"] == reg.mouth[1]
    assert m["psnr_upper"] == M.PSNR_CAP_DB and m["psnr"] < 20
    assert m["ssim_upper"] > 0.95 > m["ssim"]  # only the windows touching the box edge see it
