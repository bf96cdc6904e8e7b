"""The head tracker and the eye-openness measure against the benchmark's
ground truth (`pose`, `blink`), at 128 px and after a 64-px round trip."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from dheads.jobs.evaluation.mouth import blink_events, detect_blinks
from dheads.platform import facemotion as fm
from dheads.platform.media import read_video

CLIPS = [f"val_{i:04d}" for i in range(8)]


@pytest.fixture(scope="module")
def clips(benchmark_dir):
    out = []
    for stem in CLIPS:
        base = benchmark_dir / "val" / stem
        frames = read_video(base.with_suffix(".mp4"), require_audio=False, decode_audio=False).frames
        out.append((frames, json.loads(base.with_suffix(".json").read_text())["frames"]))
    return out


def _small(frames):
    return np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in frames])


@pytest.mark.parametrize("size", [128, 64])
def test_head_track_follows_ground_truth_pose(clips, size):
    rs = []
    for frames, truth in clips:
        f = frames if size == 128 else _small(frames)
        track = fm.head_track(f, np.asarray(truth["mouth_box"]) * size / 128)
        pose = np.asarray(truth["pose"])[:, :3]
        gt = pose - pose[:1]
        assert track.shape == (len(frames), 3) and not track[0].any()
        rs.append([np.corrcoef(track[:, i], gt[:, i])[0, 1] for i in range(3)])
        # in 128-px pixels and degrees whatever the crop size: the spread matches
        assert np.allclose(track.std(0), gt.std(0), rtol=0.5, atol=0.05)
    assert (np.mean(rs, axis=0) >= 0.9).all(), np.mean(rs, axis=0)


def test_still_frame_has_no_motion_and_no_blinks(clips):
    frames, truth = clips[0]
    still = np.repeat(_small(frames[:1]), 60, axis=0)
    s = fm.motion_signals(still)
    assert np.abs(s["head_pose"]).max() < 1e-3
    assert blink_events(detect_blinks(s["eye_open"])) == 0


def test_blinks_found_at_64px(clips):
    truth_n = found = false = 0
    for frames, truth in clips:
        s = fm.motion_signals(_small(frames), np.asarray(truth["mouth_box"]) / 2)
        flags = detect_blinks(s["eye_open"])
        gt = np.asarray(truth["blink"]) > 0.5
        near = np.convolve(gt, np.ones(5), "same") > 0
        truth_n += blink_events(gt)
        found += blink_events(flags & near)
        false += blink_events(flags & ~near)
    assert truth_n >= 5
    assert found >= 0.9 * truth_n and false <= 1, (truth_n, found, false)


def test_align_undoes_a_known_pose(clips):
    img = clips[0][0][0]
    pose = np.array([3.0, 2.5, -1.5])
    moved = cv2.warpAffine(img, fm.pose_matrix(pose, 128), (128, 128), borderMode=cv2.BORDER_REPLICATE)
    track = fm.head_track(np.stack([img, moved]))
    assert np.allclose(track[1], pose, atol=0.15), track[1]
    back = fm.align(np.stack([img, moved]), track)[1].astype(float)
    inner = (slice(20, 108), slice(20, 108))
    assert np.abs(back[inner] - img[inner]).mean() < 3.0
