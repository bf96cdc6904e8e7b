"""Media I/O: PyAV decodes video to RGB at a fixed fps and audio to 16 kHz mono
float, and encodes H.264 + AAC mp4 files; Pillow reads identity images.

Every input is untrusted, and every bad one is a `MediaError` with a `stage`
(probe, video, audio, image, encode) and a reason a user can act on, never a
crash of the job around it. What a file may cost is bounded while decoding,
not after:

- `max_seconds` (default `MAX_SECONDS`): video and audio decoding stop with an
  error as soon as the decoded media passes it (a FLAC without a duration
  header included); jobs pass their own, smaller limit;
- `max_frames`: `read_video` stops decoding once it has that many output
  frames; `read_frame` decodes a video only up to the frame it needs;
- `max_pixels` (default `MAX_IMAGE_PIXELS`): an image whose header declares
  more is refused before any pixel is decoded;
- `min_side` / `min_source_side` (default `MIN_SIDE`): frames and images
  smaller than this on a side are refused, not silently upscaled;
- the demuxer: FFmpeg guesses a file's format from its bytes, whatever its
  name. Only the containers in `DEMUXERS` may open (no HLS/DASH playlists or
  concat lists that would read other files, no image sequences), through
  plain file I/O only; a video stream over `MAX_IMAGE_PIXELS` (a PNG bomb
  renamed `.mkv` that some demuxer admits) is refused from its stream header
  before a frame is decoded.

What is normalised: the display rotation of a video (display matrix) and the
EXIF orientation of an image are applied; any pixel format PyAV decodes
(8/10-bit, limited or full range, grayscale) becomes 8-bit RGB; 16-bit and
float images are scaled, not clipped; transparent images are composited onto
white; of several audio tracks the default one (else the first) is used;
cover pictures in audio files are not video.
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

MIN_SIDE = 16                    # px: below this nothing holds a face
MAX_IMAGE_PIXELS = 40_000_000    # 40 MP (8K x 5K); checked from the header
MAX_SECONDS = 3600.0             # default decode bound; jobs pass their own
# The only demuxers `open_container` lets FFmpeg pick (its own names): MP4/MOV,
# Matroska/WebM, AVI and the audio formats of AUDIO_EXTS.
DEMUXERS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi",
            "wav", "mp3", "flac", "aac", "ogg")
_OPEN_OPTIONS = {"format_whitelist": ",".join(DEMUXERS), "protocol_whitelist": "file"}


class MediaError(ValueError):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass
class Clip:
    frames: np.ndarray          # [T, H, W, 3] uint8 RGB at `fps`, display orientation
    fps: float
    audio: np.ndarray | None    # [T * sample_rate / fps] float32 mono, or None
    sample_rate: int
    source_fps: float
    source_size: tuple[int, int] | None = None   # (width, height) of the source frames, as displayed
    audio_s: float | None = None   # seconds of audio the file holds (before fitting to the video)
    decoded_frames: int = 0        # source frames the decoder produced

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.fps


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _open(path: str | Path):
    p = Path(path)
    if not p.exists():
        raise MediaError("probe", f"no such file: {path}")
    if p.stat().st_size == 0:
        raise MediaError("probe", "empty file (0 bytes)")
    try:
        return open_container(str(p))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError("probe", _open_reason(e)) from e


def open_container(source):
    """`av.open` for reading (a path or a binary file object), restricted to
    `DEMUXERS` and plain file I/O."""
    return av.open(source, options=dict(_OPEN_OPTIONS))


def _open_reason(e: BaseException) -> str:
    if isinstance(e, av.error.ArgumentError):  # what FFmpeg says when the whitelist refuses
        return ("not an allowed container format (allowed: MP4/MOV, MKV/WebM, AVI, WAV, MP3, FLAC, "
                "AAC, Ogg; playlists, concat lists and image files posing as video are refused)")
    return f"not a readable media file ({type(e).__name__}: {_one_line(e)})"


def _video_stream(container):
    """The first real video stream (a cover picture in an audio file is not
    one); refused when its header declares more than MAX_IMAGE_PIXELS."""
    pictures = 0
    for s in container.streams.video:
        if s.disposition & av.stream.Disposition.attached_pic:
            pictures += 1
            continue
        w, h = s.codec_context.width or 0, s.codec_context.height or 0
        if w * h > MAX_IMAGE_PIXELS:
            raise MediaError("video", f"video frames are {w}x{h} ({w * h / 1e6:.0f} MP), over the limit of "
                                      f"{MAX_IMAGE_PIXELS / 1e6:g} MP (from the stream header, nothing decoded)")
        return s
    raise MediaError("video", "no video stream" + (" (only a cover picture)" if pictures else ""))


def _audio_stream(container):
    """The default audio track, else the first; None without audio."""
    streams = list(container.streams.audio)
    for s in streams:
        if s.disposition & av.stream.Disposition.default:
            return s
    return streams[0] if streams else None


def _scaled_size(w: int, h: int, max_side: int | None, min_side: int | None = None) -> tuple[int, int]:
    """Output size: the shorter side scaled down to `min_side` if given, else the
    longer side to `max_side`; never scaled up; even sizes (yuv420 downstream)."""
    if min_side and min(w, h) > min_side:
        s = min_side / min(w, h)
    elif max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
    else:
        return w, h
    return max(2, int(round(w * s / 2)) * 2), max(2, int(round(h * s / 2)) * 2)


# AVColorSpace values decoded with BT.601 coefficients: unspecified, BT470BG, SMPTE170M
_BT601 = (2, 5, 6)


def to_rgb(frame: "av.VideoFrame", width: int, height: int) -> np.ndarray:
    """A decoded frame -> `[height, width, 3]` uint8 RGB (stored orientation).

    For limited-range BT.601 yuv420p (almost all H.264 at SD sizes) the planes
    go through OpenCV's I420->RGB and INTER_AREA resize (mean abs difference
    to swscale: 1 grey level). Measured on 30 benchmark clips (128 px -> 64 px),
    one pinned core: 11,100 frames/s against 9,600 for swscale's
    `to_ndarray("rgb24", width, height)`; unpinned on the loaded shared
    machine swscale's slice threads fell to 1,300-2,000 frames/s while this
    path kept 11,800. Everything else (10-bit, full range, grayscale, 4:2:2,
    4:4:4, odd sizes) uses swscale, which reads the frame's format and range.
    """
    if (frame.format.name == "yuv420p" and frame.colorspace in _BT601 and frame.color_range != 2
            and frame.width % 2 == 0 and frame.height % 2 == 0):
        import cv2

        out = cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_YUV2RGB_I420)
        if (width, height) != (frame.width, frame.height):
            out = cv2.resize(out, (width, height), interpolation=cv2.INTER_AREA)
        return out
    return frame.to_ndarray(format="rgb24", width=width, height=height)


def _upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a display-matrix rotation (degrees counter-clockwise, as
    `VideoFrame.rotation` and FFmpeg's autorotate read it)."""
    k = int(round(rotation / 90)) % 4
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


class _FrameSampler:
    """Source frames in decode order -> RGB frames at `fps`, by timestamp: the
    latest source frame at or before each output instant (handles VFR). A
    source frame is converted only when it is emitted."""

    def __init__(self, fps: float, src_rate: float, size, max_seconds, max_frames, min_source_side):
        self.step = 1.0 / fps
        self.src_rate = src_rate
        self.size = size                    # (w, h) -> output (w, h)
        self.max_seconds, self.max_frames = max_seconds, max_frames
        self.min_source_side = min_source_side
        self.out: list[np.ndarray] = []
        self.next_t = self.first_t = self.last_t = None
        self.last = self.last_rgb = None
        self.n_decoded = 0
        self.source_size = None

    @property
    def full(self) -> bool:
        return self.max_frames is not None and len(self.out) >= self.max_frames

    def _rgb(self, frame) -> np.ndarray:
        w, h = self.size(frame.width, frame.height)
        return _upright(to_rgb(frame, w, h), frame.rotation)

    def _emit(self) -> None:
        if self.last_rgb is None:
            self.last_rgb = self._rgb(self.last)
        self.out.append(self.last_rgb)
        self.next_t += self.step

    def add(self, frame) -> None:
        t = frame.time if frame.time is not None else (self.n_decoded / self.src_rate)
        self.n_decoded += 1
        if self.source_size is None:
            w, h = frame.width, frame.height
            if min(w, h) < self.min_source_side:
                raise MediaError("video", f"frames are {w}x{h} px, below the minimum of "
                                          f"{self.min_source_side} px per side")
            self.source_size = (h, w) if int(round(frame.rotation / 90)) % 2 else (w, h)
        if self.last_t is not None and t <= self.last_t:
            return   # out-of-order or duplicate timestamp
        if self.next_t is None:
            self.next_t = self.first_t = t
        if self.max_seconds is not None and t - self.first_t > self.max_seconds:
            raise MediaError("video", f"longer than the limit of {self.max_seconds:g} s "
                                      "(decoding stopped there)")
        # emit every output instant strictly before this frame's time
        while self.last is not None and self.next_t < t - 1e-6 and not self.full:
            self._emit()
        self.last, self.last_rgb, self.last_t = frame, None, t

    def finish(self) -> np.ndarray:
        end_t = self.last_t + 1.0 / self.src_rate
        while self.next_t < end_t - 1e-6 - 0.5 * self.step and not self.full:
            self._emit()
        if not self.out:
            self._emit()
        return np.stack(self.out)


class _AudioDecoder:
    """Audio frames -> float32 mono at `rate`; `over` once past `max_seconds`."""

    def __init__(self, rate: int, max_seconds: float | None):
        self.rate = rate
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        self.limit = None if max_seconds is None else int(max_seconds * rate)
        self.max_seconds = max_seconds
        self.chunks: list[np.ndarray] = []
        self.n = 0
        self.first_t = None

    @property
    def over(self) -> bool:
        return self.limit is not None and self.n > self.limit

    def over_error(self) -> MediaError:
        return MediaError("audio", f"longer than the limit of {self.max_seconds:g} s "
                                   "(decoding stopped there)")

    def add(self, frame) -> None:
        if self.first_t is None and frame.time is not None:
            self.first_t = frame.time
        self._take(self.resampler.resample(frame))

    def _take(self, frames) -> None:
        for out in frames:
            a = out.to_ndarray().reshape(-1)
            self.chunks.append(a)
            self.n += a.size

    def finish(self) -> np.ndarray | None:
        self._take(self.resampler.resample(None))
        if not self.chunks:
            return None
        audio = np.concatenate(self.chunks).astype(np.float32)
        if not np.isfinite(audio).all():
            raise MediaError("audio", "audio holds NaN/inf samples")
        return audio


def read_video(path: str | Path, fps: float = 25.0, sample_rate: int = 16000,
               max_side: int | None = 1024, require_audio: bool = True,
               min_side: int | None = None, *, max_seconds: float | None = MAX_SECONDS,
               max_frames: int | None = None, decode_audio: bool = True,
               min_source_side: int = MIN_SIDE) -> Clip:
    """Decode a video file (see the module docstring for the limits).

    Frames are resampled to `fps` by timestamp and turned upright (display
    rotation). Frames larger than `max_side` (or, when given, with a shorter
    side above `min_side`) are scaled down inside the decoder (swscale in
    `frame.to_ndarray`) so a 4K input never holds full-size RGB arrays. The
    audio track is resampled to `sample_rate` mono float32, aligned to the
    video's start (a late audio start is padded, an early one cut) and
    trimmed or zero-padded to exactly the video duration; `Clip.audio_s` says
    how much audio there really was.
    """
    with _open(path) as container:
        vstream = _video_stream(container)
        vstream.thread_count = 1   # jobs parallelise over clips; frame threads only contend
        src_rate = float(vstream.average_rate or vstream.guessed_rate or fps)
        video = _FrameSampler(fps, src_rate, lambda w, h: _scaled_size(w, h, max_side, min_side),
                              max_seconds, max_frames, min_source_side)
        astream = _audio_stream(container) if decode_audio else None
        audio_dec = _AudioDecoder(sample_rate, max_seconds) if astream is not None else None
        audio_error: Exception | None = None
        # One demux pass feeds both decoders (a second open costs ~3 ms per clip).
        try:
            for packet in container.demux(*[st for st in (vstream, astream) if st is not None]):
                if packet.stream.type == "video":
                    for frame in packet.decode():
                        video.add(frame)
                    if video.full:
                        break
                elif audio_error is None and not audio_dec.over:
                    # past the limit the audio already covers any video within it
                    try:
                        for frame in packet.decode():
                            audio_dec.add(frame)
                    except av.error.FFmpegError as e:
                        audio_error = e
        except av.error.FFmpegError as e:
            if video.last is None:
                raise MediaError("video", f"cannot decode video ({_one_line(e)})") from e
            # a truncated tail: keep what decoded
        if video.last is None:
            raise MediaError("video", "video stream has no decodable frames")
        frames = video.finish()
        raw = None
        if audio_dec is not None and (audio_dec.chunks or audio_error is None):
            try:
                raw = audio_dec.finish()
            except MediaError as e:   # NaN/inf samples
                audio_error = e
    n = frames.shape[0]
    audio = audio_s = None
    if astream is None:
        reason = "no audio stream"
    elif raw is None:
        reason = (audio_error.reason if isinstance(audio_error, MediaError)
                  else f"cannot decode audio ({_one_line(audio_error)})" if audio_error
                  else "audio stream has no samples")
    else:
        if audio_dec.first_t is not None:   # both tracks start at the video's first frame
            lead = int(round((audio_dec.first_t - video.first_t) * sample_rate))
            raw = np.pad(raw, (lead, 0)) if lead > 0 else raw[-lead:]
        audio_s = raw.shape[0] / sample_rate
        audio = fit_length(raw, int(round(n * sample_rate / fps)))
    if audio is None and require_audio and decode_audio:
        raise MediaError("audio", reason)
    return Clip(frames=frames, fps=fps, audio=audio, sample_rate=sample_rate, source_fps=src_rate,
                source_size=video.source_size, audio_s=audio_s, decoded_frames=video.n_decoded)


def read_frame(path: str | Path, index: int, fps: float = 25.0, max_side: int | None = 1024,
               *, min_source_side: int = MIN_SIDE, max_seconds: float | None = MAX_SECONDS) -> np.ndarray:
    """Frame `index` (at `fps`, upright) of a video as `[H, W, 3]` uint8 RGB,
    decoding only up to it (and no audio); past the end: the last frame."""
    clip = read_video(path, fps=fps, max_side=max_side, require_audio=False, decode_audio=False,
                      max_frames=max(0, int(index)) + 1, max_seconds=max_seconds,
                      min_source_side=min_source_side)
    return clip.frames[min(max(0, int(index)), clip.n_frames - 1)]


def read_audio(path: str | Path, sample_rate: int = 16000, *,
               max_seconds: float | None = MAX_SECONDS) -> np.ndarray:
    """Decode the default (else first) audio stream of any file to mono float32
    at `sample_rate`; decoding stops with an error past `max_seconds`."""
    with _open(path) as container:
        astream = _audio_stream(container)
        if astream is None:
            video_only = any(not s.disposition & av.stream.Disposition.attached_pic
                             for s in container.streams.video)
            raise MediaError("audio", "no audio stream" + (" (the file holds video only)" if video_only else ""))
        dec = _AudioDecoder(sample_rate, max_seconds)
        try:
            for frame in container.decode(astream):
                dec.add(frame)
                if dec.over:   # a missing or lying duration header cannot get past this
                    raise dec.over_error()
        except av.error.FFmpegError as e:
            if not dec.chunks:
                raise MediaError("audio", f"cannot decode audio ({_one_line(e)})") from e
            # a truncated or damaged tail: keep what decoded
        audio = dec.finish()
    if audio is None:
        raise MediaError("audio", "audio stream has no samples")
    return audio


def fit_length(audio: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad to exactly n samples (AAC adds encoder padding)."""
    if audio.shape[0] >= n:
        return audio[:n]
    return np.pad(audio, (0, n - audio.shape[0]))


def read_image(path: str | Path, *, min_side: int = MIN_SIDE,
               max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file -> `[H, W, 3]` uint8 RGB, upright (EXIF orientation).

    The size comes from the header (`Image.open` decodes nothing): more than
    `max_pixels` or a side under `min_side` is refused before decoding.
    """
    import warnings

    from PIL import ExifTags, Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # the size check below replaces Pillow's decompression-bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise MediaError("image", f"image too large ({_one_line(e)}; checked from the header, "
                                  "nothing decoded)") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise MediaError("image", f"not a readable image ({_one_line(e)})") from e
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise MediaError("image", f"image is {w}x{h} = {w * h / 1e6:.0f} MP, over the limit of "
                                      f"{max_pixels / 1e6:g} MP (checked from the header, nothing decoded)")
        if min(w, h) < min_side:
            raise MediaError("image", f"image is {w}x{h} px, below the minimum of {min_side} px per "
                                      "side (it would be upscaled into a blur); use a larger image")
        try:
            orientation = int(im.getexif().get(ExifTags.Base.Orientation, 1))
        except Exception:  # a damaged EXIF block: the pixels are still fine
            orientation = 1
        try:
            rgb = _to_rgb8(im)
        except (OSError, ValueError, SyntaxError) as e:
            raise MediaError("image", f"truncated or damaged image ({_one_line(e)})") from e
    transpose = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                 8: Image.Transpose.ROTATE_90}.get(orientation)
    if transpose is not None:
        rgb = np.asarray(Image.fromarray(rgb).transpose(transpose))
    return np.ascontiguousarray(rgb)


def _to_rgb8(im) -> np.ndarray:
    """Any Pillow mode -> `[H, W, 3]` uint8 RGB. High-bit-depth and float
    images are scaled to 8 bits (Pillow's convert("RGB") clips a 16-bit PNG
    to near-white); transparency is composited onto white."""
    from PIL import Image

    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        top = float(a.max()) if a.size else 0.0
        if mode.startswith("I;16") or (mode == "I" and 255 < top <= 65535):
            a = a / 257.0
        elif mode == "F" and top <= 1.0:
            a = a * 255.0
        elif top > 255:
            a = a * (255.0 / top)
        gray = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return np.asarray(canvas.convert("RGB"))
    return np.asarray(im.convert("RGB"))


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
    """Stream summary: {'video': {...} | None, 'audio': {...} | None, 'duration_s'}.

    Durations come from headers and may be missing or wrong (a FLAC without
    STREAMINFO length, a crafted file): decoders enforce the limits, not this."""
    with _open(path) as c:
        info: dict = {"video": None, "audio": None,
                      "duration_s": (c.duration / 1e6) if c.duration else None}
        v = next((s for s in c.streams.video
                  if not s.disposition & av.stream.Disposition.attached_pic), None)
        if v is not None:
            n = v.frames or 0
            info["video"] = {"codec": v.codec_context.name, "width": v.width, "height": v.height,
                             "fps": float(v.average_rate or 0), "frames": n,
                             "duration_s": float(v.duration * v.time_base) if v.duration else None}
        a = _audio_stream(c)
        if a is not None:
            info["audio"] = {"codec": a.codec_context.name, "sample_rate": a.rate,
                             "channels": a.channels if hasattr(a, "channels") else a.codec_context.channels,
                             "duration_s": float(a.duration * a.time_base) if a.duration else None}
    return info
