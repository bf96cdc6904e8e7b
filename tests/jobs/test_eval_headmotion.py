"""The head-motion, blink, identity, flicker, sharpness and variety measures of
`dheads eval` on real val clips, against what each must show: the reference
re-encoded (at 64 px) moves and blinks as the reference does, a still frame
neither moves nor blinks nor flickers, the identity frame moved rigidly with
the reference's ground-truth pose keeps its identity whatever the pose, a face
that turns into someone else loses it, and the same clip twice has the same
motion while a time-reversed copy does not."""
from __future__ import annotations


import cv2
import numpy as np
import pytest

from dheads.jobs.evaluation.headmotion import AXES
from dheads.jobs.evaluation.scoring import GroundTruth, reference_motion, score_clip
from dheads.platform import facemotion as fm
from dheads.platform.media import read_video, write_video

CLIPS = ("val_0004", "val_0020", "val_0001")  # 63, 73, 99 frames; 1, 0, 3 blinks


@pytest.fixture(scope="module")
def clips(val_clip):
    out = {}
    for stem in CLIPS:
        frames, meta = val_clip(stem)
        truth = GroundTruth.from_json(meta)
        out[stem] = (frames, truth, reference_motion(frames, truth))
    return out


def _codec(tmp_path, frames: np.ndarray, size: int | None = None) -> np.ndarray:
    """Through H.264 (optionally at `size` px), as a generated mp4 would be."""
    if size:
        frames = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])
    path = tmp_path / "clip.mp4"
    write_video(path, frames)
    return read_video(path, require_audio=False).frames


def _score(clip, generated, **kw):
    frames, truth, motion = clip
    return score_clip(generated, frames, truth=truth, ref_motion=motion, **kw).metrics


def test_reference_re_encoded_at_64px_moves_and_blinks_like_the_reference(clips, tmp_path):
    for stem, clip in clips.items():
        m = _score(clip, _codec(tmp_path, clip[0], 64))
        for axis in AXES:
            assert m[f"head_track_r_gt_{axis}"] > 0.9, (stem, axis, m[f"head_track_r_gt_{axis}"])
            assert abs(m[f"head_motion_ratio_{axis}"] - 1) < 0.1, (stem, axis, m[f"head_motion_ratio_{axis}"])
        assert m["blinks_gen"] == m["blinks_ref_measured"] == m["blinks_ref"], stem
        if m["blinks_ref"]:
            assert m["blink_rate_ratio_measured"] == pytest.approx(1.0)
        assert 0.8 < m["flicker_ratio"] < 1.3, (stem, m["flicker_ratio"])
        assert m["sharpness_ratio"] < 0.3, (stem, m["sharpness_ratio"])  # 64 px upscaled is blurred
        assert np.isfinite(m["identity_psnr_gen"]) and abs(m["identity_psnr_gen"] - m["identity_psnr_ref"]) < 5


def test_reference_against_itself_has_the_same_identity_psnr(clips):
    m = _score(clips["val_0001"], clips["val_0001"][0])
    assert 15 < m["identity_psnr_ref"] < 60  # finite: the reference's head and eyes move
    assert m["identity_psnr_gen"] == m["identity_psnr_ref"]
    assert m["identity_psnr_first"] == m["identity_psnr_ref_first"]
    assert m["identity_psnr_last"] == m["identity_psnr_ref_last"]


def test_still_frame_neither_moves_nor_blinks_nor_flickers(clips, tmp_path):
    for stem, clip in clips.items():
        frames = clip[0]
        m = _score(clip, _codec(tmp_path, np.repeat(frames[:1], len(frames), axis=0)))
        for axis in AXES:
            assert m[f"head_motion_ratio_{axis}"] < 0.05, (stem, axis, m[f"head_motion_ratio_{axis}"])
        assert m["blinks_gen"] == 0
        assert m["flicker_ratio"] < 0.15, (stem, m["flicker_ratio"])
        # the still frame is not warped, the reference is: its sharpness must not gain from that
        assert 0.85 < m["sharpness_ratio"] < 1.15, (stem, m["sharpness_ratio"])
        assert m["identity_psnr_gen"] > m["identity_psnr_ref"] + 5  # it *is* the identity frame
        assert m["variety_track_r"] is None and m["variety_reason"]


def test_identity_frame_moved_rigidly_keeps_its_identity_whatever_the_pose(clips, tmp_path):
    for stem, clip in clips.items():
        frames, truth, _ = clip
        pose = truth.pose[:, :3] - truth.pose[:1, :3]
        moved = np.stack([cv2.warpAffine(frames[0], fm.pose_matrix(p, 128), (128, 128),
                                         borderMode=cv2.BORDER_REPLICATE) for p in pose])
        m = _score(clip, _codec(tmp_path, moved))
        for axis in AXES:
            assert abs(m[f"head_motion_ratio_{axis}"] - 1) < 0.15, (stem, axis, m[f"head_motion_ratio_{axis}"])
        # the unaligned upper face (drift_*) loses the identity as the head moves; aligned it stays
        assert m["identity_psnr_gen"] > 28, (stem, m["identity_psnr_gen"])
        assert m["identity_psnr_last"] > m["drift_last_db"] + 5, stem


def test_a_face_turning_into_someone_else_drifts_in_the_last_window(clips, tmp_path):
    frames, _, _ = clip = clips["val_0001"]
    other = clips["val_0004"][0][0].astype(np.float32)   # another identity's face
    half = len(frames) // 2  # a 4 s clip: its windows are its halves; the second one blends away
    w = np.concatenate([np.zeros(half), np.linspace(0.2, 0.6, len(frames) - half)])[:, None, None, None]
    drifting = np.clip((1 - w) * frames + w * other, 0, 255).astype(np.uint8)
    m = _score(clip, _codec(tmp_path, drifting))
    assert m["identity_window_frames"] == half  # halves, not 10 s windows
    assert abs(m["identity_psnr_first"] - m["identity_psnr_ref_first"]) < 1.5
    assert m["identity_psnr_last"] < m["identity_psnr_ref_last"] - 3


def test_variety_same_clip_twice_vs_time_reversed(clips, tmp_path):
    for stem, clip in clips.items():
        frames = clip[0]
        same = _score(clip, _codec(tmp_path, frames, 64), generated_b=_codec(tmp_path, frames))
        assert same["variety_track_r"] > 0.95, (stem, same["variety_track_r"])
        assert all(same[f"variety_track_r_{a}"] > 0.9 for a in AXES), stem
        if same["blinks_gen"]:
            assert same["variety_blink_r"] > 0.8, (stem, same["variety_blink_r"])
        else:
            assert same["variety_blink_r"] is None and "never blinks" in same["variety_reason"]
        reversed_ = _score(clip, frames, generated_b=frames[::-1].copy())
        assert reversed_["variety_track_r"] < 0.5, (stem, reversed_["variety_track_r"])
        if reversed_["blinks_gen"]:
            assert reversed_["variety_blink_r"] < 0.5, (stem, reversed_["variety_blink_r"])


def test_variety_without_a_second_run_is_null_with_the_reason(clips):
    m = _score(clips["val_0004"], clips["val_0004"][0], missing_b="no clip val_0004.mp4 in the second run b/")
    assert all(m[f"variety_track_r_{a}"] is None for a in AXES)
    assert m["variety_track_r"] is None and m["variety_blink_r"] is None
    assert m["variety_reason"] == "no clip val_0004.mp4 in the second run b/"
