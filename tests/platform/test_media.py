"""Real files through PyAV: frame-rate resampling, VFR, audio resampling,
4K downscaling in the decoder, and the errors a user sees."""
from __future__ import annotations

import numpy as np
import pytest

from dheads.platform.media import MediaError, probe, read_video, write_video


def _source_index(clip) -> np.ndarray:
    """make_video draws frame i with red ≈ 7 i at x = 0 (mod 256)."""
    return clip.frames[:, 0, 0, 0].astype(int)


@pytest.mark.parametrize("fps", [30.0, 30000 / 1001, 60.0])
def test_frame_rates_resampled_to_25(tmp_path, video_factory, fps):
    n = int(round(2.0 * fps))
    video_factory(tmp_path / "v.mp4", n_frames=n, fps=fps)
    clip = read_video(tmp_path / "v.mp4")
    assert clip.n_frames == 50 and clip.fps == 25.0
    assert clip.source_fps == pytest.approx(fps, rel=1e-3)
    # frame j shows the latest source frame at or before t = j / 25
    want = (np.floor(np.arange(50) * fps / 25 + 1e-6).astype(int) * 7) % 256
    d = np.abs(_source_index(clip) - want)
    assert (np.minimum(d, 256 - d) <= 6).mean() >= 0.9  # H.264 blurs the wrap-around at 255
    assert clip.audio.shape == (50 * 640,)


def test_variable_frame_rate(tmp_path, video_factory):
    video_factory(tmp_path / "vfr.mp4", n_frames=50, vfr=True)
    info = probe(tmp_path / "vfr.mp4")
    clip = read_video(tmp_path / "vfr.mp4")
    assert clip.n_frames == pytest.approx(info["video"]["duration_s"] * 25, abs=2)
    assert clip.audio.shape == (clip.n_frames * 640,)
    steps = np.diff(_source_index(clip)[:30])
    assert (steps >= -6).mean() >= 0.9  # time only moves forward


@pytest.mark.parametrize("rate,ext", [(44100, "mp4"), (48000, "mkv")])
def test_stereo_audio_to_16k_mono(tmp_path, video_factory, rate, ext):
    video_factory(tmp_path / f"a.{ext}", n_frames=25, audio_rate=rate, channels=2)
    clip = read_video(tmp_path / f"a.{ext}")
    assert clip.audio.dtype == np.float32 and clip.audio.shape == (25 * 640,)
    spectrum = np.abs(np.fft.rfft(clip.audio[2000:14000]))
    assert np.argmax(spectrum) * 16000 / 12000 == pytest.approx(220, abs=3)


def test_4k_is_scaled_down_inside_the_decoder(tmp_path, video_factory):
    video_factory(tmp_path / "4k.mp4", n_frames=8, size=(3840, 2160), audio_rate=None)
    clip = read_video(tmp_path / "4k.mp4", max_side=512, require_audio=False)
    assert clip.frames.shape == (8, 288, 512, 3)
    assert clip.source_size == (3840, 2160)
    small = read_video(tmp_path / "4k.mp4", min_side=64, require_audio=False)
    assert small.frames.shape == (8, 64, 114, 3)


def test_errors_say_what_is_wrong(tmp_path, video_factory):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    video_factory(tmp_path / "silent.mp4", audio_rate=None)
    video_factory(tmp_path / "voice.mp3", video=False)
    cases = {"empty.mp4": ("probe", "0 bytes"), "junk.mp4": ("probe", "not a readable"),
             "silent.mp4": ("audio", "no audio stream"), "voice.mp3": ("video", "no video stream")}
    for name, (stage, words) in cases.items():
        with pytest.raises(MediaError) as e:
            read_video(tmp_path / name)
        assert e.value.stage == stage and words in e.value.reason, name


def test_write_then_read_roundtrip(tmp_path, video_factory):
    frames = np.random.default_rng(0).integers(0, 255, (20, 32, 48, 3), dtype=np.uint8)
    frames = np.repeat(np.repeat(frames[:, ::8, ::8], 8, 1), 8, 2)  # blocky: survives H.264
    audio = 0.2 * np.sin(np.arange(20 * 640) / 16000 * 2 * np.pi * 300).astype(np.float32)
    write_video(tmp_path / "o.mp4", frames, audio=audio)
    clip = read_video(tmp_path / "o.mp4")
    assert clip.frames.shape == frames.shape
    assert np.abs(clip.frames.astype(int) - frames).mean() < 8
    assert clip.audio.shape == audio.shape
