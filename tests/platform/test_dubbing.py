"""The dubbing core without Ray: segmenting, stitching, continuous batching, mp4 out."""
from __future__ import annotations

import numpy as np
import pytest

from dheads.model.config import SamplerConfig
from dheads.platform.config import DubConfig
from dheads.platform.dubbing import (
    FPS, SAMPLES_PER_FRAME, DubItem, build_engine, dub_items, frame_energy, plan_segments,
    segment_item, stitch,
)
from dheads.platform.media import probe
from dheads.serve.demo import face_image, speech, tiny_checkpoint, write_audio


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_segments_cut_at_quiet_frames_and_respect_max_length():
    rng = np.random.default_rng(0)
    n = 20 * FPS
    energy = rng.uniform(0.5, 1.0, n)
    quiet = [170, 330]                       # the only silent frames
    energy[quiet] = 0.0
    bounds = plan_segments(energy, max_frames=200, min_frames=50, overlap=3)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))       # contiguous
    assert all(e - s + 3 <= 200 for s, e in bounds[:-1]) and bounds[-1][1] - bounds[-1][0] <= 200
    assert [e for _, e in bounds[:-1]] == quiet


def test_segment_item_covers_audio_with_crossfade_tails():
    audio = speech(20.0, seed=1)
    cfg = DubConfig(max_segment_s=8.0, crossfade_frames=3)
    segs = segment_item("x", np.zeros((16, 16, 3), np.uint8), audio, cfg)
    assert len(segs) == 3 and segs[0].start == 0
    n = len(audio) // SAMPLES_PER_FRAME
    for a, b in zip(segs, segs[1:]):
        assert a.start + a.n_frames == b.start + 3                    # 3-frame overlap
    assert segs[-1].start + segs[-1].n_frames == n
    assert all(s.n_frames <= 8 * FPS for s in segs)
    # cut points are quieter than the typical frame
    e = frame_energy(audio, n)
    assert all(e[s.start] <= np.median(e) for s in segs[1:])


def test_stitch_crossfades_linearly_at_joints():
    a = np.full((10, 2, 2, 3), 0, np.uint8)
    b = np.full((8, 2, 2, 3), 200, np.uint8)
    out = stitch([(0, a), (7, b)], 15)                                # a overlaps b on frames 7..9
    assert out.shape == (15, 2, 2, 3)
    assert out[6, 0, 0, 0] == 0 and out[10, 0, 0, 0] == 200
    assert list(out[7:10, 0, 0, 0]) == [50, 100, 150]                 # 200 * j / 4


def test_continuous_batching_refills_slots_and_matches_single_runs(checkpoint):
    engine = build_engine(checkpoint, SamplerConfig(steps="ddim2"), DubConfig(batch_size=2, num_threads=1))
    cfg = DubConfig(max_segment_s=0.4, min_segment_s=0.12, crossfade_frames=1)
    ident = face_image(0, 16)
    segs = segment_item("x", ident, speech(1.0, seed=2), cfg)          # several short segments
    assert len(segs) >= 3
    frames = engine.run(segs)
    calls = engine.stats.batch_sizes                                   # {batch size: UNet calls}
    total = sum(s.n_frames for s in segs) * 2
    assert sum(k * v for k, v in calls.items()) == total and max(calls) == 2  # all active slots
    assert engine.stats.steps == sum(calls.values()) < total            # batched, not one by one
    assert calls[2] >= total // 2 - max(s.n_frames for s in segs) * 2   # freed slots refilled
    single = build_engine(checkpoint, SamplerConfig(steps="ddim2"), DubConfig(batch_size=1, num_threads=1))
    alone = single.run([segs[1]])[segs[1].key]
    assert frames[segs[1].key].shape == (segs[1].n_frames, 16, 16, 3)
    assert np.abs(alone.astype(int) - frames[segs[1].key].astype(int)).max() <= 2
    assert engine.stats.frames == sum(s.n_frames for s in segs) and engine.stats.segments == len(segs)


def test_dub_items_writes_mp4_with_original_audio_and_reports_errors(checkpoint, tmp_path):
    from PIL import Image

    Image.fromarray(face_image(3)).save(tmp_path / "id.png")
    write_audio(tmp_path / "a.flac", speech(2.5, seed=3))
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wav")
    engine = build_engine(checkpoint, SamplerConfig(steps="ddim2"), DubConfig(batch_size=4, num_threads=1))
    cfg = DubConfig(max_segment_s=1.0, min_segment_s=0.3)
    items = [DubItem("ok", str(tmp_path / "id.png"), str(tmp_path / "a.flac"), str(tmp_path / "o/ok.mp4")),
             DubItem("bad", str(tmp_path / "id.png"), str(tmp_path / "bad.wav"), str(tmp_path / "o/bad.mp4"))]
    rows = dub_items(engine, items, cfg)
    assert [r["status"] for r in rows] == ["succeeded", "failed"]
    assert "audio" in rows[1]["reason"] and not (tmp_path / "o/bad.mp4").exists()
    info = probe(tmp_path / "o/ok.mp4")
    assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
    assert abs(info["video"]["frames"] - 2.5 * FPS) <= 1
    assert abs(info["audio"]["duration_s"] - 2.5) <= 1 / FPS + 1e-6
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith("_tmp")]
