"""Every awkward input the media layer meets (issue 12), as real files made
here (tests/media_kinds.py): each either decodes to what a user would see
(upright, right colours, 16 kHz mono at the right pitch) or is a MediaError
whose stage and reason say what is wrong. Dubbing and serving read through
these same functions; `dheads preprocess` is covered in
tests/jobs/test_preprocess_bad_inputs.py. The table of kinds is
docs/data.md."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import media_kinds as mk  # noqa: E402

from dheads.platform import storage  # noqa: E402
from dheads.platform.media import (  # noqa: E402
    MediaError, probe, read_audio, read_frame, read_image, read_video)


def peak_hz(x: np.ndarray, rate: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


def fails(fn, *args, stage: str, words: str, **kw) -> MediaError:
    with pytest.raises(MediaError) as e:
        fn(*args, **kw)
    assert e.value.stage == stage and words in e.value.reason, e.value
    assert "\n" not in str(e.value)
    return e.value


def quadrant_means(frame: np.ndarray) -> dict[str, float]:
    """Mean red-minus-green of each quadrant (the marker is red)."""
    h, w = frame.shape[:2]
    q = {"tl": frame[: h // 2, : w // 2], "tr": frame[: h // 2, w // 2:],
         "bl": frame[h // 2:, : w // 2], "br": frame[h // 2:, w // 2:]}
    return {k: float(v[..., 0].astype(int).mean() - v[..., 1].astype(int).mean()) for k, v in q.items()}


def red_quadrant(frame: np.ndarray) -> str:
    q = quadrant_means(frame)
    return max(q, key=q.get)


# ====================================================================== audio
@pytest.mark.parametrize("codec,rate,channels,ext,container", [
    ("pcm_s16le", 8000, 1, "wav", None),          # 8 kHz telephone audio
    ("pcm_s24le", 96000, 2, "wav", None),         # 96 kHz / 24-bit stereo studio audio
    ("pcm_s16le", 48000, 2, "wav", None),         # 48 kHz stereo
    ("libmp3lame", 44100, 2, "mp3", None),        # mp3
    ("libopus", 48000, 1, "opus", "ogg"),         # opus in ogg
    ("flac", 16000, 1, "flac", None),             # flac
    ("aac", 22050, 1, "m4a", "mp4"),              # aac in m4a
])
def test_audio_formats_become_16k_mono_at_the_right_pitch(tmp_path, codec, rate, channels, ext, container):
    path = mk.audio_file(tmp_path / f"a.{ext}", codec=codec, rate=rate, channels=channels,
                         seconds=1.0, container=container)
    audio = read_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1 and np.isfinite(audio).all()
    assert abs(len(audio) - 16000) <= 1600      # codec padding (mp3, opus) at most 0.1 s
    assert peak_hz(audio[1000:15000]) == pytest.approx(mk.TONE_HZ, abs=5)


def test_flac_without_a_duration_header_stops_decoding_at_the_limit(tmp_path):
    path = mk.flac_without_duration(tmp_path / "long.flac", seconds=6.0)
    assert probe(path)["audio"]["duration_s"] is None      # nothing to pre-check against
    fails(read_audio, path, max_seconds=2.0, stage="audio", words="longer than the limit of 2 s")
    assert len(read_audio(path, max_seconds=10.0)) == pytest.approx(6 * 16000, abs=4096)


def test_zero_length_audio(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    fails(read_audio, tmp_path / "empty.wav", stage="probe", words="empty file (0 bytes)")


def test_corrupt_audio(tmp_path):
    (tmp_path / "noise.mp3").write_bytes(np.random.default_rng(3).bytes(30_000))
    fails(read_audio, tmp_path / "noise.mp3", stage="probe", words="not a readable media file")


def test_audio_with_no_samples(tmp_path):
    path = mk.video(tmp_path / "v.mkv", audio_packets=False)   # an audio track, never written to
    fails(read_audio, path, stage="audio", words="no samples")
    fails(read_video, path, stage="audio", words="no samples")


def test_a_video_without_audio_used_as_audio(tmp_path):
    path = mk.video(tmp_path / "silent.mp4", audio=None)
    fails(read_audio, path, stage="audio", words="no audio stream (the file holds video only)")


def test_truncated_audio_keeps_what_decodes(tmp_path):
    path = mk.truncate(mk.audio_file(tmp_path / "cut.mp3", codec="libmp3lame", rate=44100,
                                     seconds=2.0), keep=0.5)
    audio = read_audio(path)
    assert 0.6 * 16000 < len(audio) < 1.4 * 16000
    assert peak_hz(audio[:8000]) == pytest.approx(mk.TONE_HZ, abs=5)


def test_nan_audio_is_refused(tmp_path):
    path = mk.audio_file(tmp_path / "nan.wav", codec="pcm_f32le", rate=16000, nan=True)
    fails(read_audio, path, stage="audio", words="NaN/inf")


@pytest.mark.parametrize("second_default,hz", [(False, mk.TONE_HZ), (True, 880.0)])
def test_several_audio_tracks_use_the_default_one(tmp_path, second_default, hz):
    path = mk.video(tmp_path / "tracks.mkv", seconds=1.0,
                    audio=None, extra_audio=[("aac", 16000, 1, mk.TONE_HZ, not second_default),
                                             ("aac", 16000, 1, 880.0, second_default)])
    assert peak_hz(read_audio(path)[1000:15000]) == pytest.approx(hz, abs=5)
    assert peak_hz(read_video(path).audio[1000:15000]) == pytest.approx(hz, abs=5)


def test_an_mp3_with_cover_art_is_audio_not_video(tmp_path):
    path = mk.audio_file(tmp_path / "song.mp3", codec="libmp3lame", rate=44100, cover_picture=True)
    assert peak_hz(read_audio(path)[1000:15000]) == pytest.approx(mk.TONE_HZ, abs=5)
    fails(read_video, path, stage="video", words="no video stream (only a cover picture)")
    assert probe(path)["video"] is None


# ====================================================================== video
@pytest.mark.parametrize("rotation,red", [(90, "bl"), (-90, "tr"), (180, "br")])
def test_rotated_video_comes_out_upright(tmp_path, rotation, red):
    """Display matrix rotation (phones): applied as FFmpeg's autorotate does."""
    path = mk.video(tmp_path / "rot.mp4", size=(64, 32), rotation=rotation)
    clip = read_video(path)
    quarter = rotation % 180 != 0
    assert clip.frames.shape[1:3] == ((64, 32) if quarter else (32, 64))
    assert clip.source_size == ((32, 64) if quarter else (64, 32))
    assert red_quadrant(clip.frames[3]) == red
    assert red_quadrant(read_frame(path, 3)) == red


@pytest.mark.parametrize("codec,pix_fmt", [("libx264", "yuv420p10le"), ("libx265", "yuv420p10le")])
def test_ten_bit_video(tmp_path, codec, pix_fmt):
    clip = read_video(mk.video(tmp_path / "v.mkv", codec=codec, pix_fmt=pix_fmt))
    f = clip.frames[5].astype(int)
    assert np.abs(f[4:12, 4:12] - (220, 20, 20)).max() <= 16     # the marker
    assert np.abs(f[40:60, 40:60] - 128).max() <= 8              # the grey


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuvj420p"])
def test_full_range_video_keeps_its_levels(tmp_path, pix_fmt):
    """Near-black in full range must not be clipped or stretched as if limited."""
    clip = read_video(mk.video(tmp_path / "full.mp4", pix_fmt=pix_fmt, full_range=True, level=8))
    grey = clip.frames[5, 40:60, 40:60].astype(int)
    assert np.abs(grey - 8).max() <= 4
    assert np.abs(clip.frames[5, 4:12, 4:12].astype(int) - (220, 20, 20)).max() <= 16


def test_grayscale_video(tmp_path):
    clip = read_video(mk.video(tmp_path / "gray.mkv", codec="ffv1", pix_fmt="gray"))
    f = clip.frames[5].astype(int)
    assert (f[..., 0] == f[..., 1]).all() and (f[..., 1] == f[..., 2]).all()
    assert abs(f[40:60, 40:60].mean() - 128) <= 3
    assert abs(f[4:12, 4:12].mean() - (0.299 * 220 + 0.587 * 20 + 0.114 * 20)) <= 6


@pytest.mark.parametrize("size", [(96, 48), (65, 49)])     # wide; odd sides
def test_non_square_and_odd_frames(tmp_path, size):
    codec, pix = ("libx264", "yuv420p") if size[0] % 2 == 0 else ("ffv1", "yuv444p")
    clip = read_video(mk.video(tmp_path / "v.mkv", size=size, codec=codec, pix_fmt=pix))
    assert clip.frames.shape == (30, size[1], size[0], 3)
    assert red_quadrant(clip.frames[0]) == "tl"


def test_tiny_frames_are_refused_not_upscaled(tmp_path):
    path = mk.video(tmp_path / "tiny.mkv", size=(8, 8), codec="ffv1", pix_fmt="yuv444p")
    fails(read_video, path, stage="video", words="frames are 8x8 px, below the minimum of 16 px")
    fails(read_frame, path, 0, stage="video", words="below the minimum")


def test_truncated_tail_keeps_what_decodes(tmp_path):
    full = read_video(mk.video(tmp_path / "full.mkv", seconds=2.0))
    cut = read_video(mk.truncate(mk.video(tmp_path / "cut.mkv", seconds=2.0), keep=0.6))
    assert 10 <= cut.n_frames < full.n_frames
    assert cut.audio.shape == (cut.n_frames * 640,)


def test_truncated_mp4_without_its_index_is_a_clear_error(tmp_path):
    path = mk.truncate(mk.video(tmp_path / "cut.mp4", seconds=2.0), keep=0.6)   # moov at the end
    fails(read_video, path, stage="probe", words="not a readable media file")


def test_audio_shorter_than_the_video(tmp_path):
    clip = read_video(mk.video(tmp_path / "v.mp4", seconds=2.0, audio_seconds=1.0))
    assert clip.n_frames == 50 and clip.audio.shape == (50 * 640,)
    assert clip.audio_s == pytest.approx(1.0, abs=0.1)
    assert np.abs(clip.audio[int(1.2 * 16000):]).max() == 0      # padded, and said so


def test_audio_that_starts_late_stays_in_sync(tmp_path):
    clip = read_video(mk.video(tmp_path / "late.mkv", seconds=1.2, audio_start_s=0.4,
                               audio_seconds=0.8))
    a = np.abs(clip.audio)
    assert a[: int(0.35 * 16000)].max() < 0.01 and a[int(0.45 * 16000):int(1.1 * 16000)].max() > 0.2


@pytest.mark.parametrize("acodec,rate,ext", [("aac", 8000, "mp4"), ("aac", 96000, "mp4"),
                                             ("libopus", 48000, "webm"), ("libmp3lame", 44100, "mp4")])
def test_video_audio_tracks_of_every_rate_and_codec(tmp_path, acodec, rate, ext):
    vcodec = "libvpx" if ext == "webm" else "libx264"
    clip = read_video(mk.video(tmp_path / f"v.{ext}", seconds=1.2, codec=vcodec,
                               audio=(acodec, rate, 2 if rate == 96000 else 1)))
    assert clip.audio.shape == (30 * 640,)
    assert peak_hz(clip.audio[1600:17600]) == pytest.approx(mk.TONE_HZ, abs=5)


def test_nan_audio_in_a_video(tmp_path):
    path = mk.video(tmp_path / "nan.mkv", audio=("pcm_f32le", 16000, 1), nan_audio=True)
    fails(read_video, path, stage="audio", words="NaN/inf")
    clip = read_video(path, require_audio=False)       # identity use: frames only
    assert clip.audio is None and clip.n_frames == 30


def test_decoding_stops_at_the_video_limit(tmp_path):
    path = mk.video(tmp_path / "long.mp4", seconds=4.0, audio=None)
    e = fails(read_video, path, max_seconds=1.0, require_audio=False,
              stage="video", words="longer than the limit of 1 s")
    assert "decoding stopped there" in e.reason


def test_identity_frame_decodes_only_up_to_the_frame_needed(tmp_path):
    path = mk.many_frames(tmp_path / "long.mp4", 3000)
    head = read_video(path, require_audio=False, decode_audio=False, max_frames=11)
    assert head.n_frames == 11 and head.decoded_frames <= 20     # not 3,000
    full = read_video(path, require_audio=False)
    assert full.decoded_frames == 3000
    assert np.array_equal(read_frame(path, 10), full.frames[10])
    assert np.array_equal(read_frame(path, 99999), full.frames[-1])   # past the end: the last


# ===================================================================== images
def _save(img, path: Path, **kw) -> Path:
    from PIL import Image

    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(path, **kw)
    return path


def test_grayscale_image(tmp_path):
    gray = (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint8)
    rgb = read_image(_save(gray, tmp_path / "g.png"))
    assert rgb.shape == (48, 64, 3) and all(np.array_equal(rgb[..., c], gray) for c in range(3))


def test_rgba_image_is_composited_on_white(tmp_path):
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[10:30, 10:30] = (200, 30, 30, 255)                   # opaque face, transparent rest
    rgb = read_image(_save(rgba, tmp_path / "a.png"))
    assert (rgb[0, 0] == 255).all() and np.array_equal(rgb[20, 20], [200, 30, 30])


def test_cmyk_jpeg(tmp_path):
    from PIL import Image

    src = mk.face_like()
    path = _save(Image.fromarray(src).convert("CMYK"), tmp_path / "c.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    assert np.abs(read_image(path).astype(int) - src).mean() < 12


def test_palette_image_with_transparency(tmp_path):
    from PIL import Image

    im = Image.fromarray(mk.face_like()).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    idx = np.asarray(im)
    im.info["transparency"] = int(idx[-1, -1])                # the blue half is see-through
    rgb = read_image(_save(im, tmp_path / "p.png", transparency=int(idx[-1, -1])))
    assert np.abs(rgb[5, 5].astype(int) - (220, 20, 20)).max() <= 8
    assert (rgb[-1, -1] == 255).all()


def test_sixteen_bit_grayscale_png_is_not_near_white(tmp_path):
    import cv2

    g16 = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), g16)
    rgb = read_image(tmp_path / "g16.png")
    assert abs(rgb.mean() - 127.5) < 2                         # convert("RGB") gives ~254
    assert np.abs(rgb[..., 0].astype(int) - np.round(g16 / 257)).max() <= 1


def test_sixteen_bit_rgb_png(tmp_path):
    import cv2

    src = mk.face_like()
    cv2.imwrite(str(tmp_path / "c16.png"), (src[..., ::-1].astype(np.uint16) * 257))
    assert np.abs(read_image(tmp_path / "c16.png").astype(int) - src).max() <= 1


@pytest.mark.parametrize("orientation,shape,red", [(1, (48, 64), "tl"), (3, (48, 64), "br"),
                                                   (6, (64, 48), "tr"), (8, (64, 48), "bl")])
def test_exif_orientation_is_honoured(tmp_path, orientation, shape, red):
    from PIL import Image

    im = Image.fromarray(mk.face_like())
    exif = im.getexif()
    exif[0x0112] = orientation
    rgb = read_image(_save(im, tmp_path / "e.jpg", exif=exif, quality=95))
    assert rgb.shape[:2] == shape and red_quadrant(rgb) == red


def test_a_one_pixel_identity_is_refused(tmp_path):
    path = _save(np.zeros((1, 1, 3), np.uint8), tmp_path / "dot.png")
    fails(read_image, path, stage="image", words="image is 1x1 px, below the minimum of 16 px")


def test_a_huge_image_is_refused_from_its_header(tmp_path):
    path = mk.huge_png(tmp_path / "huge.png", 12000, 12000)
    assert path.stat().st_size < 1_000_000                      # small file, 144 MP inside
    e = fails(read_image, path, stage="image", words="12000x12000 = 144 MP, over the limit of 40 MP")
    assert "nothing decoded" in e.reason
    # The same header over garbage: still the size refusal, so no pixel was decoded.
    data = bytearray(path.read_bytes())
    data[60:4000] = np.random.default_rng(0).bytes(3940)
    (tmp_path / "huge_garbage.png").write_bytes(bytes(data))
    fails(read_image, tmp_path / "huge_garbage.png", stage="image", words="over the limit")


def test_truncated_and_foreign_images(tmp_path):
    path = _save(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8),
                 tmp_path / "t.jpg", quality=95)
    mk.truncate(path, keep=0.5)
    fails(read_image, path, stage="image", words="truncated or damaged image")
    (tmp_path / "text.png").write_text("not an image at all")
    fails(read_image, tmp_path / "text.png", stage="image", words="not a readable image")


@pytest.mark.parametrize("mode", ["1", "F", "LA", "I"])
def test_other_image_modes(tmp_path, mode):
    from PIL import Image

    base = Image.fromarray(np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1)))
    if mode == "F":
        im = Image.fromarray(np.asarray(base, np.float32) / 255.0, mode="F")
        path = tmp_path / "f.tiff"
    elif mode == "I":
        im = Image.fromarray(np.asarray(base, np.int32) * 257, mode="I")
        path = tmp_path / "i.tiff"
    else:
        im, path = base.convert(mode), tmp_path / f"{mode}.png"
    rgb = read_image(_save(im, path))
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert rgb[:, 0].max() <= 10 and rgb[:, -1].min() >= 245     # dark left, bright right


# ====================================================================== names
def test_non_utf8_file_names(tmp_path):
    d = os.fsencode(tmp_path)
    video = os.fsdecode(d + b"/caf\xe9 take.mp4")
    image = os.fsdecode(d + b"/portr\xe4t.png")
    mk.video(Path(video))
    _save(mk.face_like(), Path(image))
    listed = storage.list_files(str(tmp_path), (".mp4", ".png"))
    assert listed == sorted([video, image])                    # pyarrow's listing raised
    assert read_video(video).n_frames == 30 and read_audio(video).shape[0] > 0
    assert read_image(image).shape == (48, 64, 3)
    text = storage.display_name(video)
    assert text.endswith("caf\\xe9 take.mp4") and text.encode("utf-8")


def _ts_clip(path: Path) -> Path:
    """A real 1 s MPEG-TS video (an HLS segment)."""
    import av

    with av.open(str(path), mode="w", format="mpegts") as out:
        s = out.add_stream("mpeg2video", rate=25)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for i in range(25):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 10 * i, np.uint8), format="rgb24")
            out.mux(s.encode(frame))
        out.mux(s.encode())
    return path


def test_a_playlist_never_reads_the_files_it_names(tmp_path):
    # an HLS playlist (or an ffconcat list) pointing at a local file the
    # allow-list never saw: stock FFmpeg opens and decodes that file
    secret = _ts_clip(tmp_path / "secret.ts")
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{secret}\n#EXT-X-ENDLIST\n")
    for fn in (read_video, read_frame):
        args = (playlist, 0) if fn is read_frame else (playlist,)
        fails(fn, *args, stage="probe", words="not an allowed container format", **(
            {"require_audio": False} if fn is read_video else {}))
    fails(probe, playlist, stage="probe", words="not an allowed container format")
    ffconcat = tmp_path / "list.mkv"
    ffconcat.write_text(f"ffconcat version 1.0\nfile '{secret}'\n")
    fails(read_video, ffconcat, stage="probe", words="not an allowed container format", require_audio=False)


def test_an_image_bomb_posing_as_video_is_refused_in_bounded_memory(tmp_path):
    import json
    import subprocess

    bomb = mk.huge_png(tmp_path / "huge.mkv", 12000, 12000)   # 144 MP, named as a video
    small = mk.huge_png(tmp_path / "small.mkv", 64, 64)
    code = ("import json, resource, sys\nfrom dheads.platform.media import MediaError, read_video\n"
            "try:\n    read_video(sys.argv[1], require_audio=False)\n    r = 'decoded'\n"
            "except MediaError as e:\n    r = e.reason\n"
            "print(json.dumps([r, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))")
    run = lambda p: json.loads(subprocess.run([sys.executable, "-c", code, str(p)], check=True,  # noqa: E731
                                              capture_output=True, text=True).stdout)
    (reason, rss), (_, base) = run(bomb), run(small)
    assert "not an allowed container format" in reason, reason
    assert rss - base < 100, (rss, base)                      # MB: nothing was decoded


def test_video_frames_over_the_pixel_limit_are_refused_from_the_stream_header(tmp_path, monkeypatch):
    from dheads.platform import media

    path = tmp_path / "v.mp4"
    media.write_video(path, np.zeros((5, 64, 64, 3), np.uint8))
    assert read_video(path, require_audio=False).frames.shape == (5, 64, 64, 3)
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    fails(read_video, path, stage="video", words="64x64 (0 MP), over the limit", require_audio=False)
