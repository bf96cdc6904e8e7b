"""Media I/O through PyAV: decode video to RGB at a fixed fps, audio to 16 kHz
mono float, and encode H.264 + AAC mp4 files.

Errors are `MediaError` with a `stage` (probe, video, audio, encode) and a
reason a user can act on.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

AUDIO_EXTS = (".wav", ".mp3", ".m4a", ".flac", ".aac", ".ogg", ".opus")
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class MediaError(ValueError):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass
class Clip:
    frames: np.ndarray          # [T, H, W, 3] uint8 RGB at `fps`
    fps: float
    audio: np.ndarray | None    # [T * sample_rate / fps] float32 mono, or None
    sample_rate: int
    source_fps: float

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.fps


def _open(path: str | Path):
    p = Path(path)
    if not p.exists():
        raise MediaError("probe", f"no such file: {path}")
    if p.stat().st_size == 0:
        raise MediaError("probe", "empty file (0 bytes)")
    try:
        return av.open(str(p))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError("probe", f"not a readable media file ({type(e).__name__}: {e})") from e


def _scaled_size(w: int, h: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    # even sizes keep yuv420 happy downstream
    return max(2, int(round(w * s / 2)) * 2), max(2, int(round(h * s / 2)) * 2)


def read_video(path: str | Path, fps: float = 25.0, sample_rate: int = 16000,
               max_side: int | None = 1024, require_audio: bool = True) -> Clip:
    """Decode a video file.

    Frames are resampled to `fps` by timestamp (the latest source frame at or
    before each output instant), which also handles variable frame rate.
    Frames larger than `max_side` are scaled down inside the decoder
    (`frame.reformat`) so a 4K input never holds full-size RGB arrays.
    The audio track is resampled to `sample_rate` mono float32 and trimmed or
    zero-padded to exactly the video duration.
    """
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError("video", "no video stream")
        vstream = container.streams.video[0]
        vstream.thread_type = "AUTO"
        src_rate = float(vstream.average_rate or vstream.guessed_rate or fps)
        times: list[float] = []
        frames: list[np.ndarray] = []
        out_frames: list[np.ndarray] = []
        step = 1.0 / fps
        next_t = None
        last = None
        try:
            for frame in container.decode(vstream):
                t = frame.time if frame.time is not None else (len(times) / src_rate)
                w, h = _scaled_size(frame.width, frame.height, max_side)
                rgb = frame.to_ndarray(format="rgb24", width=w, height=h)
                if next_t is None:
                    next_t = t
                    t0 = t
                # emit every output instant strictly before this frame's time
                while last is not None and next_t < t - 1e-6:
                    out_frames.append(last)
                    next_t += step
                last = rgb
                times.append(t)
        except av.error.FFmpegError as e:
            if not times:
                raise MediaError("video", f"cannot decode video ({e})") from e
            # a truncated tail: keep what decoded
        if last is None:
            raise MediaError("video", "video stream has no decodable frames")
        end_t = times[-1] + 1.0 / src_rate
        while next_t < end_t - 1e-6 - 0.5 * step:
            out_frames.append(last)
            next_t += step
        video = np.stack(out_frames)
    n = video.shape[0]
    audio = None
    try:
        audio = read_audio(path, sample_rate)
    except MediaError:
        if require_audio:
            raise
    if audio is not None:
        audio = fit_length(audio, int(round(n * sample_rate / fps)))
    return Clip(frames=video, fps=fps, audio=audio, sample_rate=sample_rate, source_fps=src_rate)


def read_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Decode the first audio stream of any file to mono float32 at `sample_rate`."""
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError("audio", "no audio stream")
        astream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        try:
            for frame in container.decode(astream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as e:
            if not chunks:
                raise MediaError("audio", f"cannot decode audio ({e})") from e
    if not chunks:
        raise MediaError("audio", "audio stream has no samples")
    return np.concatenate(chunks).astype(np.float32)


def fit_length(audio: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad to exactly n samples (AAC adds encoder padding)."""
    if audio.shape[0] >= n:
        return audio[:n]
    return np.pad(audio, (0, n - audio.shape[0]))


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> [H, W, 3] uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError("image", f"not a readable image ({e})") from e


def write_video(path: str | Path, frames: np.ndarray, fps: float = 25.0,
                audio: np.ndarray | None = None, sample_rate: int = 16000, crf: int = 18) -> None:
    """Encode [T, H, W, 3] uint8 RGB (+ mono float32 audio) as H.264 + AAC mp4.

    The audio is trimmed/padded to the video's duration so both tracks end
    together.
    """
    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise MediaError("encode", f"frames must be [T,H,W,3] uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise MediaError("encode", f"H.264 yuv420p needs even sizes, got {w}x{h}")
    rate = Fraction(fps).limit_denominator(1001)
    try:
        with av.open(str(path), mode="w", format="mp4") as out:
            vs = out.add_stream("libx264", rate=rate)
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            vs.options = {"crf": str(crf), "preset": "veryfast"}
            a_s = None
            if audio is not None:
                a_s = out.add_stream("aac", rate=sample_rate)
                a_s.layout = "mono"
                a_s.bit_rate = 64000
            for i in range(t):
                vf = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
                vf.pts = i
                vf.time_base = Fraction(1) / rate
                for pkt in vs.encode(vf):
                    out.mux(pkt)
            for pkt in vs.encode():
                out.mux(pkt)
            if a_s is not None:
                pcm = fit_length(np.asarray(audio, np.float32).reshape(-1), int(round(t * sample_rate / fps)))
                pcm = np.clip(pcm, -1.0, 1.0)
                fs = 1024
                for start in range(0, pcm.shape[0], fs):
                    chunk = pcm[start:start + fs]
                    af = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
                    af.sample_rate = sample_rate
                    af.pts = start
                    af.time_base = Fraction(1, sample_rate)
                    for pkt in a_s.encode(af):
                        out.mux(pkt)
                for pkt in a_s.encode():
                    out.mux(pkt)
    except av.error.FFmpegError as e:
        raise MediaError("encode", str(e)) from e


def probe(path: str | Path) -> dict:
    """Stream summary: {'video': {...} | None, 'audio': {...} | None, 'duration_s'}."""
    with _open(path) as c:
        info: dict = {"video": None, "audio": None,
                      "duration_s": (c.duration / 1e6) if c.duration else None}
        if c.streams.video:
            v = c.streams.video[0]
            n = v.frames or 0
            info["video"] = {"codec": v.codec_context.name, "width": v.width, "height": v.height,
                             "fps": float(v.average_rate or 0), "frames": n,
                             "duration_s": float(v.duration * v.time_base) if v.duration else None}
        if c.streams.audio:
            a = c.streams.audio[0]
            info["audio"] = {"codec": a.codec_context.name, "sample_rate": a.rate,
                             "channels": a.channels if hasattr(a, "channels") else a.codec_context.channels,
                             "duration_s": float(a.duration * a.time_base) if a.duration else None}
    return info
