"""The dubbing package without Ray: segmenting, rows, stitching, items, continuous batching."""
from __future__ import annotations

import numpy as np
import pytest

from dheads.model.config import SamplerConfig
from dheads.model.video import clip_seed
from dheads.platform.config import DubConfig
from dheads.platform.dubbing.engine import build_engine
from dheads.platform.dubbing.items import DubItem, ItemError, finish_item, prepare_item
from dheads.platform.dubbing.segments import (
    FPS, PAD_SAMPLES, SAMPLES_PER_FRAME, Segment, assemble, frame_energy, item_audio,
    plan_segments, segment_bounds, segment_item, stitch,
)
from dheads.platform.media import fit_length, probe, read_audio


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dub_inputs):
    return dub_inputs.tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def speech(dub_inputs):
    return dub_inputs.speech


@pytest.fixture(scope="module")
def face_image(dub_inputs):
    return dub_inputs.face_image


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


def test_segment_item_covers_audio_with_crossfade_tails(speech):
    audio = speech(20.0, seed=1)
    cfg = DubConfig(max_segment_s=8.0, crossfade_frames=3, lead_in_frames=0, joints="crossfade")
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


def test_lead_in_starts_later_segments_before_their_cut_and_assemble_drops_it(speech):
    audio = speech(20.0, seed=1)
    cfg = DubConfig(max_segment_s=8.0, crossfade_frames=3, lead_in_frames=5, joints="crossfade")
    segs = segment_item("x", np.zeros((16, 16, 3), np.uint8), audio, cfg)
    cuts = [s for s, _ in segment_bounds(audio, cfg)]
    assert len(segs) == 3 and [s.lead for s in segs] == [0, 5, 5]
    assert [s.start + s.lead for s in segs] == cuts
    for a, b in zip(segs, segs[1:]):
        assert a.start + a.n_frames == b.start + b.lead + 3                # the cross-fade after the lead-in
    assert all(s.n_frames <= 8 * FPS for s in segs)                        # lead-in counts in the limit
    # a segment's audio window starts PAD frames before its first generated frame
    n = segs[0].item_frames
    padded = np.concatenate([np.zeros(PAD_SAMPLES, np.float32), fit_length(audio, n * SAMPLES_PER_FRAME)])
    b = segs[1]
    assert np.array_equal(b.audio[:b.n_frames * SAMPLES_PER_FRAME],
                          padded[b.start * SAMPLES_PER_FRAME:(b.start + b.n_frames) * SAMPLES_PER_FRAME])
    assert Segment.from_row(b.to_row()).lead == 5
    # lead-in frames never reach the video: mark them 255, the rest by segment
    frames = {s.index: np.full((s.n_frames, 2, 2, 3), 10 * (s.index + 1), np.uint8) for s in segs}
    for s in segs:
        frames[s.index][:s.lead] = 255
    video, track = assemble(segs, frames)
    assert video.shape[0] == n and video.max() < 255
    assert video[cuts[1] - 1, 0, 0, 0] == 10 and video[cuts[1] + 3, 0, 0, 0] == 20
    assert np.array_equal(track, fit_length(audio, n * SAMPLES_PER_FRAME))


def test_a_carried_item_is_one_segment_with_no_lead_in_or_tail(speech):
    audio = speech(20.0, seed=1)
    segs = segment_item("x", np.zeros((16, 16, 3), np.uint8), audio, DubConfig(max_segment_s=8.0))
    n = len(audio) // SAMPLES_PER_FRAME
    assert [(s.start, s.n_frames, s.lead, s.count) for s in segs] == [(0, n, 0, 1)]
    assert segment_bounds(audio, DubConfig()) == [(0, n)]
    padded = np.concatenate([np.zeros(PAD_SAMPLES, np.float32), fit_length(audio, n * SAMPLES_PER_FRAME)])
    assert np.array_equal(segs[0].audio[:n * SAMPLES_PER_FRAME], padded[:n * SAMPLES_PER_FRAME])
    frames = np.random.default_rng(0).integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
    video, track = assemble(segs, {0: frames})
    assert np.array_equal(video, frames) and np.array_equal(track, fit_length(audio, n * SAMPLES_PER_FRAME))


def test_a_carried_item_runs_in_one_slot_as_one_clip_of_the_frame_loop(checkpoint, speech, face_image):
    """The engine generates a carried item like `generate()` generates one
    clip (every frame's motion frames are the two generated before it), and
    keeps its frames as uint8 in the slot."""
    import torch

    from dheads.model.checkpoint import load_checkpoint
    from dheads.model.diffusion import GaussianDiffusion
    from dheads.model.images import to_uint8, to_unit
    from dheads.model.samplers import make_sampler
    from dheads.model.video import generate

    engine = build_engine(checkpoint, SamplerConfig(steps="ddim2"), DubConfig(batch_size=2, num_threads=1))
    ident, audio = face_image(0, 16), speech(1.2, seed=2)
    segs = segment_item("x", ident, audio, DubConfig(max_segment_s=0.4, min_segment_s=0.12), seed=3)
    assert len(segs) == 1
    frames = engine.run(segs)[segs[0].key]
    assert frames.dtype == np.uint8 and frames.shape == (segs[0].n_frames, 16, 16, 3)
    assert dict(engine.stats.batch_sizes) == {1: segs[0].n_frames * 2}     # one slot, every step
    loaded = load_checkpoint(checkpoint)
    sampler = make_sampler(GaussianDiffusion(loaded.diffusion_cfg), SamplerConfig(steps="ddim2"))
    whole = generate(loaded.model, sampler, torch.from_numpy(to_unit(ident))[None],
                     torch.from_numpy(fit_length(audio, segs[0].n_frames * SAMPLES_PER_FRAME))[None],
                     segs[0].n_frames, seed=3)[0]
    assert np.abs(to_uint8(whole).astype(int) - frames.astype(int)).max() <= 2


def test_stitch_crossfades_linearly_at_joints():
    a = np.full((10, 2, 2, 3), 0, np.uint8)
    b = np.full((8, 2, 2, 3), 200, np.uint8)
    out = stitch([(0, a), (7, b)], 15)                                # a overlaps b on frames 7..9
    assert out.shape == (15, 2, 2, 3)
    assert out[6, 0, 0, 0] == 0 and out[10, 0, 0, 0] == 200
    assert list(out[7:10, 0, 0, 0]) == [50, 100, 150]                 # 200 * j / 4


def test_continuous_batching_refills_slots_and_matches_single_runs(checkpoint, speech, face_image):
    engine = build_engine(checkpoint, SamplerConfig(steps="ddim2"), DubConfig(batch_size=2, num_threads=1))
    cfg = DubConfig(max_segment_s=0.4, min_segment_s=0.12, crossfade_frames=1, joints="crossfade")
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


def test_segments_round_trip_through_rows_and_give_back_the_items_audio(speech):
    audio = speech(9.3, seed=4)
    ident = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    segs = segment_item("x", ident, audio, DubConfig(max_segment_s=3.0, min_segment_s=1.0, joints="crossfade"), seed=5)
    assert len(segs) >= 3
    back = [Segment.from_row(s.to_row()) for s in segs]
    for a, b in zip(segs, back):
        assert (a.item_id, a.index, a.count, a.start, a.n_frames, a.item_frames, a.seed) == \
            (b.item_id, b.index, b.count, b.start, b.n_frames, b.item_frames, b.seed)
        assert np.array_equal(a.identity, b.identity) and np.array_equal(a.audio, b.audio)
    # segment i is seeded like clip i of generate(seed=5)
    assert [s.seed for s in segs] == [clip_seed(5, i) for i in range(len(segs))]
    # the output's audio track, rebuilt from the segments, is the input at the video's length
    n = segs[0].item_frames
    assert np.array_equal(item_audio(back), fit_length(audio, n * SAMPLES_PER_FRAME))


def test_assemble_refuses_a_missing_segment():
    segs = [Segment("x", i, 2, 5 * i, 5, np.zeros((2, 2, 3), np.uint8),
                    np.zeros((5 + 16) * SAMPLES_PER_FRAME, np.float32), 10) for i in range(2)]
    frames = {0: np.zeros((5, 2, 2, 3), np.uint8)}
    with pytest.raises(ValueError, match="1 of 2 segments"):
        assemble(segs, frames)
    video, audio = assemble(segs, {**frames, 1: np.full((5, 2, 2, 3), 9, np.uint8)})
    assert video.shape == (10, 2, 2, 3) and video[9, 0, 0, 0] == 9 and audio.shape == (6400,)


def test_manifest_rows_become_items_with_defaults():
    item = DubItem.from_row({"identity": "/in/id.png", "audio": "/in/talk 1.wav",
                             "identity_frame": float("nan")}, "/out")
    assert (item.item_id, item.output, item.identity_frame) == ("talk 1", "/out/talk 1.mp4", None)
    item = DubItem.from_row({"identity": "a.mp4", "audio": "b.wav", "item_id": "z", "output": "/o/z.mp4",
                             "identity_frame": 3})
    assert (item.item_id, item.output, item.identity_frame) == ("z", "/o/z.mp4", 3)
    with pytest.raises(ItemError, match="missing"):
        DubItem.from_row({"identity": "a.png"}, "/out")
    with pytest.raises(ItemError, match="output"):
        DubItem.from_row({"identity": "a.png", "audio": "b.wav"})


def test_an_item_is_decoded_once_and_written_with_its_own_audio(tmp_path, speech, face_image, dub_inputs):
    from PIL import Image

    Image.fromarray(face_image(2)).save(tmp_path / "id.png")
    audio = speech(2.4, seed=6)
    dub_inputs.write_audio(tmp_path / "a.wav", audio)
    item = DubItem(item_id="i", identity=str(tmp_path / "id.png"), audio=str(tmp_path / "a.wav"),
                   output=str(tmp_path / "o" / "i.mp4"))
    prepared = prepare_item(item, DubConfig(max_segment_s=1.0, min_segment_s=0.3, joints="crossfade"), 16)
    assert prepared.n_frames == 60 and len(prepared.segments) >= 2
    frames = {s.index: np.full((s.n_frames, 16, 16, 3), 100, np.uint8) for s in prepared.segments}
    seconds = finish_item(item.output, prepared.segments, frames)
    assert seconds == prepared.n_frames / FPS
    info = probe(tmp_path / "o" / "i.mp4")
    assert info["video"]["frames"] == prepared.n_frames
    # AAC round trip of the original audio (its encoder delay trimmed by the decoder)
    out = fit_length(read_audio(tmp_path / "o" / "i.mp4"), prepared.n_frames * SAMPLES_PER_FRAME)
    ref = fit_length(audio, prepared.n_frames * SAMPLES_PER_FRAME)
    assert np.corrcoef(out, ref)[0, 1] > 0.9


def test_items_of_one_job_draw_their_own_seeds_and_motion(tmp_path, speech, face_image, dub_inputs):
    """Two items of a job with the same inputs get their own noise and their own
    head motion and blinks; the same item and job seed get the same ones again."""
    from PIL import Image

    from dheads.model import motionprior
    from dheads.model.config import MotionPrior

    Image.fromarray(face_image(2)).save(tmp_path / "id.png")
    dub_inputs.write_audio(tmp_path / "a.wav", speech(2.0, seed=6))

    def seeds(item_id: str, job_seed: int) -> list[int]:
        item = DubItem(item_id=item_id, identity=str(tmp_path / "id.png"), audio=str(tmp_path / "a.wav"),
                       output=str(tmp_path / f"{item_id}.mp4"))
        return [seg.seed for seg in prepare_item(item, DubConfig(max_segment_s=1.0, min_segment_s=0.3, joints="crossfade"), 16,
                                                 seed=job_seed).segments]

    a, b = seeds("a", 0), seeds("b", 0)
    assert len(a) >= 2 and not set(a) & set(b)
    assert seeds("a", 0) == a and seeds("a", 1) != a
    prior = MotionPrior(fitted=True, sigma=[0.2, 0.1, 0.1], v_std=[0.2, 0.1, 0.1], blink_rate=0.05,
                        blink_shape=[0.6, 0.5, 0.8, 1.0])
    tracks = [motionprior.sample(prior, 100, s[0])[0] for s in (a, b)]   # motion_seed: segment 0's seed
    assert not np.allclose(tracks[0], tracks[1])


def test_inputs_over_the_size_limits_fail_the_item_before_they_are_read(tmp_path, speech, face_image, dub_inputs):
    from PIL import Image

    Image.fromarray(face_image(2)).save(tmp_path / "id.png")
    dub_inputs.write_audio(tmp_path / "a.wav", speech(2.4, seed=6))  # 77 KB
    item = DubItem(item_id="i", identity=str(tmp_path / "id.png"), audio=str(tmp_path / "a.wav"),
                   output=str(tmp_path / "i.mp4"))
    with pytest.raises(ItemError, match=r"audio .*a.wav: the file is 0.0733 MB, over the limit of 0.05 MB"):
        prepare_item(item, DubConfig(max_media_mb=0.05), 16)
    with pytest.raises(ItemError, match=r"identity .*id.png: the file is .* MB, over the limit of 0.0001 MB"):
        prepare_item(item, DubConfig(max_image_mb=0.0001), 16)
    assert prepare_item(item, DubConfig(max_media_mb=0.2), 16).n_frames == 60


def test_dub_and_serve_configs_take_the_schema_defaults():
    from dheads.platform.config import ServeConfig, compose

    dub, served = compose("dub"), compose("serve")
    assert dub.dub == DubConfig() and served.dub == DubConfig() and served.serve == ServeConfig()
    assert compose("dub", ["dub.batch_size=4"]).dub.batch_size == 4
