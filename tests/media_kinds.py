"""Real media files of every awkward kind, made with PyAV, Pillow and numpy
(no mocks): shared by tests/platform/test_bad_inputs.py (the media layer)
and tests/jobs/test_preprocess_bad_inputs.py (`dheads preprocess`).

Video frames show a red square in the top-left quadrant of the stored frame
(so orientation is checkable) on a grey whose level encodes nothing else;
audio is a sine of a known frequency (so resampling is checkable)."""
from __future__ import annotations

import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

TONE_HZ = 300.0


def tone(seconds: float, rate: int, hz: float = TONE_HZ, channels: int = 1) -> np.ndarray:
    """`[channels, n]` float32 sine."""
    t = np.arange(int(round(seconds * rate))) / rate
    return np.repeat((0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)[None], channels, 0)


def marker_frame(w: int, h: int, level: int = 128) -> np.ndarray:
    img = np.full((h, w, 3), level, np.uint8)
    img[: h // 2, : w // 2] = (220, 20, 20)
    return img


def _encode_audio(out, stream, pcm: np.ndarray, rate: int, start_s: float = 0.0) -> None:
    """Encode `[C, n]` float32 through `stream` in its own sample format."""
    ctx = stream.codec_context
    fmt = ctx.format.name
    layout = "mono" if pcm.shape[0] == 1 else "stereo"
    fs = ctx.frame_size or 1024
    start = int(round(start_s * rate))
    for i in range(0, pcm.shape[1], fs):
        chunk = pcm[:, i:i + fs]
        if ctx.frame_size and chunk.shape[1] < fs and ctx.name not in ("flac",):
            chunk = np.pad(chunk, ((0, 0), (0, fs - chunk.shape[1])))
        data = chunk if fmt.endswith("p") else chunk.T.reshape(1, -1)
        if fmt.startswith("s16"):
            data = (np.clip(data, -1, 1) * 32767).astype(np.int16)
        elif fmt.startswith("s32"):
            data = (np.clip(data, -1, 1) * (2 ** 31 - 1)).astype(np.int32)
        elif fmt.startswith("dbl"):
            data = data.astype(np.float64)
        else:
            data = data.astype(np.float32)
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
        af.sample_rate, af.pts, af.time_base = rate, start + i, Fraction(1, rate)
        for p in stream.encode(af):
            out.mux(p)
    for p in stream.encode():
        out.mux(p)


def video(path: Path, *, seconds: float = 1.2, fps: float = 25, size=(64, 64), codec="libx264",
          pix_fmt="yuv420p", full_range=False, rotation=None, audio=("aac", 16000, 1),
          audio_seconds=None, audio_start_s=0.0, extra_audio=(), container=None,
          nan_audio=False, audio_packets=True, level: int = 128) -> Path:
    """A real video. `audio`: (codec, rate, channels) or None; `extra_audio`:
    more tracks as (codec, rate, channels, hz, default)."""
    w, h = size
    n = int(round(seconds * fps))
    with av.open(str(path), "w", format=container) as out:
        vs = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        vs.width, vs.height, vs.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            vs.options = {"preset": "ultrafast"}
        if full_range:
            vs.codec_context.color_range = 2
        if rotation is not None:
            vs.set_display_rotation(rotation)
        tracks = []
        if audio:
            acodec, rate, ch = audio
            tracks.append((acodec, rate, ch, TONE_HZ, True))
        tracks += list(extra_audio)
        astreams = []
        for acodec, rate, ch, hz, default in tracks:
            a = out.add_stream(acodec, rate=rate)
            a.layout = "mono" if ch == 1 else "stereo"
            a.disposition = av.stream.Disposition.default if default else av.stream.Disposition(0)
            astreams.append((a, rate, ch, hz))
        for i in range(n):
            vf = av.VideoFrame.from_ndarray(marker_frame(w, h, level), format="rgb24")
            if pix_fmt != "rgb24":
                vf = vf.reformat(format=pix_fmt, dst_color_range=2 if full_range else 1)
                if full_range:
                    vf.color_range = 2
            vf.pts, vf.time_base = i, 1 / Fraction(fps).limit_denominator(1001)
            for p in vs.encode(vf):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
        for a, rate, ch, hz in astreams:
            if not audio_packets:
                continue
            pcm = tone(audio_seconds if audio_seconds is not None else seconds, rate, hz, ch)
            if nan_audio:
                pcm[:, 100:200] = np.nan
            _encode_audio(out, a, pcm, rate, start_s=audio_start_s)
    return path


def audio_file(path: Path, *, codec: str, rate: int, channels: int = 1, seconds: float = 1.0,
               hz: float = TONE_HZ, container=None, nan=False, cover_picture=False) -> Path:
    with av.open(str(path), "w", format=container) as out:
        a = out.add_stream(codec, rate=rate)
        a.layout = "mono" if channels == 1 else "stereo"
        if cover_picture:   # an mp3 with album art: a one-picture "video" stream
            v = out.add_stream("mjpeg", rate=1)
            v.width = v.height = 32
            v.pix_fmt = "yuvj420p"
            v.disposition = av.stream.Disposition.attached_pic
            pic = av.VideoFrame.from_ndarray(marker_frame(32, 32), format="rgb24").reformat(format="yuvj420p")
            pic.pts, pic.time_base = 0, Fraction(1, 1)
            for p in [*v.encode(pic), *v.encode()]:
                out.mux(p)
        pcm = tone(seconds, rate, hz, channels)
        if nan:
            pcm[:, 100:200] = np.nan
        _encode_audio(out, a, pcm, rate)
    return path


def flac_without_duration(path: Path, seconds: float, rate: int = 16000) -> Path:
    """A FLAC whose STREAMINFO says "total samples: unknown" (0), as a
    streamed encoder writes it: the header promises no length."""
    audio_file(path, codec="flac", rate=rate, seconds=seconds)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0     # STREAMINFO first
    si = 8                                                   # its 34 data bytes
    data[si + 13] &= 0xF0                                    # total samples: 36 bits, all 0
    data[si + 14:si + 18] = b"\x00\x00\x00\x00"
    path.write_bytes(bytes(data))
    return path


def many_frames(path: Path, n: int, size=(32, 32)) -> Path:
    """A long, cheap H.264 video (no audio), frame i with red = i mod 256."""
    w, h = size
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "ultrafast", "tune": "zerolatency"}
        img = np.zeros((h, w, 3), np.uint8)
        for i in range(n):
            img[..., 0] = (i * 5) % 256
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, 25)
            for p in vs.encode(vf):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
    return path


def truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# ------------------------------------------------------------------ images
def huge_png(path: Path, w: int, h: int) -> Path:
    """A complete, valid `w`x`h` grayscale PNG of zeros, written row by row
    (a 12000x12000 one is ~140 KB and costs no memory to make)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(9)
    row = b"\x00" * (w + 1)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def face_like(w: int = 64, h: int = 48) -> np.ndarray:
    """An RGB test card: red top-left quadrant, green top-right, blue bottom."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (220, 20, 20)
    img[: h // 2, w // 2:] = (20, 200, 20)
    img[h // 2:] = (20, 20, 220)
    return img


# ----------------------------------------------------------- dubbing items
def _image(path: Path, im, **save) -> Path:
    from PIL import Image

    (im if isinstance(im, Image.Image) else Image.fromarray(im)).save(path, **save)
    return path


def dubbing_kinds(d: Path) -> tuple[dict, dict]:
    """Every awkward identity and audio kind, as dubbing items: returns
    (good, bad), each `{item_id: (identity path, audio path)}`, and for bad
    ones a third element, words of the reason. Good items use a plain
    identity or a plain audio beside the odd one, so each item tests one kind."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    face = np.repeat(np.repeat(face_like(64, 48), 1, 0), 1, 1)
    plain_id = _image(d / "plain.png", face)
    plain_audio = audio_file(d / "plain.wav", codec="pcm_s16le", rate=16000, seconds=1.0)
    good_audio = {
        "audio_8k": audio_file(d / "a8k.wav", codec="pcm_s16le", rate=8000),
        "audio_96k_stereo": audio_file(d / "a96k.wav", codec="pcm_s24le", rate=96000, channels=2),
        "audio_48k_stereo": audio_file(d / "a48k.wav", codec="pcm_s16le", rate=48000, channels=2),
        "mp3": audio_file(d / "a.mp3", codec="libmp3lame", rate=44100, channels=2),
        "opus": audio_file(d / "a.opus", codec="libopus", rate=48000, container="ogg"),
        "truncated_mp3": truncate(audio_file(d / "cut.mp3", codec="libmp3lame", rate=44100, seconds=2.0), 0.6),
        "tracks_as_audio": video(d / "tracks.mkv", audio=None, extra_audio=[
            ("aac", 16000, 1, TONE_HZ, True), ("aac", 16000, 1, 880.0, False)]),
        "video_as_audio": video(d / "talk.mp4", seconds=1.0),
    }
    u16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    good_identity = {
        "rotated_video": video(d / "rot.mp4", size=(64, 32), rotation=90),
        "ten_bit_video": video(d / "ten.mkv", pix_fmt="yuv420p10le"),
        "full_range_video": video(d / "full.mp4", full_range=True, level=8),
        "gray_video": video(d / "gray.mkv", codec="ffv1", pix_fmt="gray"),
        "non_square_video": video(d / "wide.mp4", size=(96, 48)),
        "cut_tail_video": truncate(video(d / "cuttail.mkv", seconds=3.0), 0.6),
        "gray_image": _image(d / "g.png", face[..., 0]),
        "rgba_image": _image(d / "rgba.png", np.dstack([face, np.full(face.shape[:2], 128, np.uint8)])),
        "cmyk_jpeg": _image(d / "c.jpg", Image.fromarray(face).convert("CMYK"), quality=95),
        "palette_png": _image(d / "p.png", Image.fromarray(face).convert("P", palette=Image.Palette.ADAPTIVE,
                                                                          colors=4)),
        "png_16bit": _image(d / "g16.png", Image.fromarray(u16)),
        "exif_rotated_jpeg": _image(d / "e.jpg", face, exif=_exif(6), quality=95),
        "non_square_image": _image(d / "tall.png", np.ascontiguousarray(face[:, :30])),
    }
    good = {k: (plain_id, a) for k, a in good_audio.items()}
    good.update({k: (i, plain_audio) for k, i in good_identity.items()})
    empty = d / "empty.wav"
    empty.write_bytes(b"")
    corrupt = d / "noise.wav"
    corrupt.write_bytes(np.random.default_rng(5).bytes(20_000))
    broken_jpeg = _image(d / "broken.jpg", face, quality=95)
    truncate(broken_jpeg, 0.5)
    bad = {
        "zero_length_audio": (plain_id, empty, "empty file"),
        "corrupt_audio": (plain_id, corrupt, "not a readable media file"),
        "video_without_audio": (plain_id, video(d / "mute.mp4", audio=None), "no audio stream"),
        "nan_audio": (plain_id, audio_file(d / "nan.wav", codec="pcm_f32le", rate=16000, nan=True), "NaN"),
        "no_samples": (plain_id, video(d / "nosamples.mkv", audio_packets=False), "no samples"),
        "flac_no_duration_too_long": (plain_id, flac_without_duration(d / "long.flac", seconds=40.0),
                                      "longer than the limit"),
        "tiny_frames_video": (video(d / "tiny.mkv", size=(8, 8), codec="ffv1", pix_fmt="yuv444p"),
                              plain_audio, "below the minimum of 16 px"),
        "one_pixel_image": (_image(d / "dot.png", np.zeros((1, 1, 3), np.uint8)), plain_audio,
                            "1x1 px, below the minimum"),
        "huge_png_header": (huge_png(d / "huge.png", 12000, 12000), plain_audio, "over the limit of 40 MP"),
        "truncated_jpeg": (broken_jpeg, plain_audio, "image"),
        "text_as_image": (_text(d / "notes.png"), plain_audio, "not a readable image"),
    }
    return good, bad


def _exif(orientation: int):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _text(path: Path) -> Path:
    path.write_text("not an image at all\n")
    return path
