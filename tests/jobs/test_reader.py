"""The training reader yields the tuples the model trains on: motion frames
are the true previous frames in grayscale, audio windows are edge-padded."""
from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import pytest
import torch

from dheads.jobs import preprocess as pp
from dheads.jobs import shards as shard_format
from dheads.jobs.reader import FOOTER_ACTORS_ENV, iter_training_batches, load_clip_rows, training_dataset
from dheads.model.audio import feature_shape
from dheads.platform.config import compose

GRAY = np.array([0.299, 0.587, 0.114], np.float32)


@pytest.fixture(scope="module")
def shards(ray_session, synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    cfg = compose("preprocess", [f"input={synth_dir}", f"output={out}", "data.workers=2",
                                 "data.clips_per_shard=3"])
    assert pp.preprocess(cfg, progress=False).ok == 6
    return str(out), cfg


def _unit(frames_uint8: np.ndarray) -> np.ndarray:
    return np.moveaxis(frames_uint8, -1, -3).astype(np.float32) / 127.5 - 1.0


def test_tuples_are_true_frames_motion_and_audio_windows(shards):
    out, cfg = shards
    data = compose("train", ["data.frames_per_clip_epoch=5", "data.shuffle_buffer=16"]).data
    clips = load_clip_rows(out)
    assert len(clips) == 6
    # identity as it is (the preset's pose_warp moves it: checked below)
    still = dataclasses.replace(cfg.model, motion=dataclasses.replace(cfg.model.motion, pose_warp=False))
    ds = training_dataset(out, still, data)
    m = cfg.model.audio.context
    size = cfg.model.image_size
    n = 0
    for batch in iter_training_batches(ds, batch_size=4, data=data, drop_last=False):
        b = batch["target"].shape[0]
        assert batch["target"].shape == (b, 3, size, size) and batch["target"].dtype == torch.float32
        assert batch["motion"].shape == (b, 2, size, size)
        assert batch["audio"].shape == (b, 2 * m + 1, *feature_shape(cfg.model.audio))
        for i in range(b):
            ident = batch["identity"][i].numpy()
            clip = next(c for c in clips if np.allclose(_unit(c["frames"][0]), ident))
            k = int(batch["frame_index"][i])
            frames = _unit(clip["frames"])
            np.testing.assert_allclose(batch["target"][i].numpy(), frames[k], atol=1e-6)
            for ch, j in enumerate((k - 2, k - 1)):
                prev = frames[j] if j >= 0 else ident          # identity before the start
                gray = np.tensordot(GRAY, prev, axes=1)
                np.testing.assert_allclose(batch["motion"][i, ch].numpy(), gray, atol=1e-5)
            idx = np.clip(np.arange(k - m, k + m + 1), 0, len(frames) - 1)
            np.testing.assert_allclose(batch["audio"][i].numpy(),
                                       clip["audio_features"][idx], atol=1e-6)
            np.testing.assert_allclose(batch["mouth_box"][i].numpy(), clip["mouth_boxes"][k])
        n += b
    assert n == 6 * 5
    assert batch["target"].min() >= -1 and batch["target"].max() <= 1


def test_the_footer_reader_pool_is_sized_to_the_shards(shards, monkeypatch):
    """Ray Data plans 32 footer-reader actors per Parquet read; two shards get one."""
    out, cfg = shards
    data = compose("train").data

    def pool(ds) -> int:
        op = ds._logical_plan.dag
        while type(op).__name__ != "ListFiles":
            op = op.input_dependencies[0]
        return op.file_indexer._num_actors

    monkeypatch.delenv(FOOTER_ACTORS_ENV, raising=False)
    assert len(shard_format.shard_uris(out, cfg.storage)) == 2
    assert pool(training_dataset(out, cfg.model, data)) == 1
    assert FOOTER_ACTORS_ENV not in os.environ           # set only while the read is planned
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "5")            # the user's setting wins
    assert pool(training_dataset(out, cfg.model, data)) == 5


def test_first_frames_pad_motion_with_identity(shards):
    from dheads.jobs.reader import clip_tuples

    out, cfg = shards
    import pyarrow.parquet as pq

    row = pq.read_table(shard_format.shard_uris(out, cfg.storage)[0]).to_pylist()[0]
    tuples = {t["frame_index"]: t for t in clip_tuples(row, 2, row["n_frames"], seed=0)}
    ident_gray = np.tensordot(GRAY, tuples[0]["identity"], axes=1)
    np.testing.assert_allclose(tuples[0]["motion"][0], ident_gray, atol=1e-5)
    np.testing.assert_allclose(tuples[0]["motion"][1], ident_gray, atol=1e-5)
    np.testing.assert_allclose(tuples[1]["motion"][0], ident_gray, atol=1e-5)
    np.testing.assert_allclose(tuples[1]["motion"][1], np.tensordot(GRAY, tuples[0]["target"], axes=1),
                               atol=1e-5)
    feats = tuples[0]["audio"]
    np.testing.assert_allclose(feats[0], feats[2])                  # k-2, k-1 clamp to frame 0


def test_pose_warp_moves_the_identity_to_the_targets_measured_pose(shards):
    """With pose_warp (the tiny preset) the identity is frame 0 warped by the
    shard's head_pose of frame k; eye_open is the shard's eye openness."""
    from dheads.jobs.reader import clip_tuples
    from dheads.model.posewarp import warp_to_pose

    out, cfg = shards
    import pyarrow.parquet as pq

    assert cfg.model.motion.pose_warp and cfg.model.motion.eye_embed
    row = pq.read_table(shard_format.shard_uris(out, cfg.storage)[0]).to_pylist()[0]
    poses = np.asarray(row["head_pose"], np.float32)
    assert poses.shape == (row["n_frames"], 3) and not poses[0].any()
    plain = {t["frame_index"]: t for t in clip_tuples(row, 2, row["n_frames"], seed=0)}
    warped = clip_tuples(row, 2, row["n_frames"], seed=0, pose_warp=True, eye_embed=True)
    moved = 0
    for t in warped:
        k = int(t["frame_index"])
        want = warp_to_pose(torch.from_numpy(plain[k]["identity"])[None], torch.from_numpy(poses[k])[None])[0]
        np.testing.assert_allclose(t["identity"], want.numpy(), atol=1e-6)
        assert t["eye_open"] == pytest.approx(row["eye_open"][k])
        np.testing.assert_allclose(t["target"], plain[k]["target"])
        moved += bool(np.abs(poses[k]).max() > 0.2)
    assert moved > 0  # the synthetic clips' heads move


def test_stabilize_tuples_put_the_identity_at_the_older_motion_frame(shards):
    """stabilize_tuples p: in about a share p of tuples (k >= 2) the older motion
    frame is the identity at frame k-2's pose, as the frame loop's stabilize
    gives it; the newer one stays the true previous frame."""
    from dheads.jobs.reader import clip_tuples
    from dheads.model.posewarp import warp_to_pose

    out, cfg = shards
    import pyarrow.parquet as pq

    rows = pq.read_table(shard_format.shard_uris(out, cfg.storage)[0]).to_pylist()
    swapped = total = 0
    for row in rows:
        plain = {t["frame_index"]: t for t in clip_tuples(row, 2, row["n_frames"], seed=0)}
        poses = np.asarray(row["head_pose"], np.float32)
        for t in clip_tuples(row, 2, row["n_frames"], seed=0, pose_warp=True, stabilize_tuples=0.5):
            k = int(t["frame_index"])
            true = plain[k]["motion"]
            np.testing.assert_allclose(t["motion"][1], true[1], atol=1e-5)
            if k < 2:
                np.testing.assert_allclose(t["motion"][0], true[0], atol=1e-5)
                continue
            total += 1
            older = warp_to_pose(torch.from_numpy(plain[k]["identity"])[None],
                                 torch.from_numpy(poses[k - 2])[None])[0].numpy()
            if np.allclose(t["motion"][0], np.tensordot(GRAY, older, axes=1), atol=1e-5):
                swapped += 1
            else:
                np.testing.assert_allclose(t["motion"][0], true[0], atol=1e-5)
    assert total > 20 and 0.25 < swapped / total < 0.75


def test_streaming_split_feeds_two_workers(shards):
    out, cfg = shards
    data = compose("train", ["data.frames_per_clip_epoch=4", "data.shuffle_buffer=0"]).data
    parts = training_dataset(out, cfg.model, data).streaming_split(2, equal=True)
    counts = [0, 0]

    def consume(i):
        for batch in iter_training_batches(parts[i], batch_size=2, data=data):
            counts[i] += batch["target"].shape[0]

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert counts[0] == counts[1] and sum(counts) == 24


def test_blink_tuples_draw_that_share_of_targets_at_blinks():
    from dheads.jobs.reader import target_frames
    from dheads.platform.facemotion import detect_blinks

    eyes = np.ones(200, np.float32)
    for start in (30, 90, 150):  # three 4-frame blinks: 12 of 200 frames, 18 with their neighbours
        eyes[start:start + 4] = 0.4
    near = detect_blinks(eyes)
    near = near | np.r_[near[1:], False] | np.r_[False, near[:-1]]
    assert near.sum() == 18
    rng = np.random.default_rng(0)
    for share, want in ((0.25, 4), (0.5, 8), (1.0, 16)):
        ks = target_frames(200, 16, rng, eyes, share)
        assert len(ks) == 16 and len(set(ks.tolist())) == 16 and (np.diff(ks) > 0).all()
        assert near[ks].sum() == want
    # more blink frames asked for than the clip has: all of them, the rest elsewhere
    ks = target_frames(200, 40, rng, eyes, 1.0)
    assert len(set(ks.tolist())) == 40 and near[ks].sum() == 18
    # off, or no blinks in the clip: uniform draws, still distinct
    hits = sum(near[target_frames(200, 16, rng, eyes, 0.0)].sum() for _ in range(200))
    assert hits < 0.25 * 16 * 200  # uniform expectation 18/200 of them (9 %)
    assert len(set(target_frames(200, 16, rng, np.ones(200), 0.5).tolist())) == 16
    assert sorted(target_frames(5, 16, rng, eyes[:5], 0.5).tolist()) == [0, 1, 2, 3, 4]
