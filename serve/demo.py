"""Synthetic inputs for smoke tests, benchmarks and demos of the dubbing service:
a randomly initialised checkpoint, procedural face images, speech-like audio
in any container. Nothing here is used when serving real requests.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from dheads.platform import storage
from dheads.platform.config import StorageConfig


def tiny_checkpoint(path: str | Path, image_size: int = 16, channels: int | None = 16,
                    seed: int = 0) -> str:
    """A random-init `tiny`-preset checkpoint at `image_size`, shrunk to
    `channels` (None: the preset's width)."""
    import torch

    from dheads.model.checkpoint import save_checkpoint
    from dheads.model.config import DiffusionConfig
    from dheads.model.unet import DiffusedHeads
    from dheads.platform.config import compose

    shrink = [f"model.model_channels={channels}", "model.num_groups=8",
              f"model.num_head_channels={channels}"] if channels else []
    cfg = compose("info", ["model=tiny", f"model.image_size={image_size}", *shrink]).model
    torch.manual_seed(seed)
    save_checkpoint(path, DiffusedHeads(cfg), cfg, DiffusionConfig())
    return str(path)


def face_image(identity_id: int, size: int = 64) -> np.ndarray:
    """A procedural face `[size, size, 3]` uint8 (dheads synth's renderer)."""
    from dheads.jobs.synthface import _background, random_identity, render_frame

    ident = random_identity(identity_id)
    frame, _ = render_frame(ident, _background(ident, size), size, 0.2, 1.0,
                            np.array([0.0, 0.0, 0.0, 1.0]))
    return frame


def speech(seconds: float, seed: int = 0, sample_rate: int = 16000) -> np.ndarray:
    """Speech-like mono float32 audio with pauses (syllables, word groups)."""
    from dheads.jobs.synthface import synth_speech

    return synth_speech(np.random.default_rng(seed), int(round(seconds * sample_rate)), sample_rate)


_CODECS = {".wav": ("wav", "pcm_s16le", "s16"), ".flac": ("flac", "flac", "s16"),
           ".m4a": ("mp4", "aac", "fltp"), ".mp3": ("mp3", "libmp3lame", "fltp")}


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int = 16000) -> None:
    """Encode mono float32 audio by the file's extension (.wav .flac .m4a .mp3)."""
    fmt, codec, sample_fmt = _CODECS[Path(path).suffix.lower()]
    pcm = np.clip(np.asarray(audio, np.float32), -1, 1)
    if sample_fmt == "s16":
        pcm = (pcm * 32767).astype(np.int16)
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=sample_rate)
        stream.layout = "mono"
        step = 1024
        for start in range(0, len(pcm), step):
            frame = av.AudioFrame.from_ndarray(pcm[None, start:start + step], format=sample_fmt,
                                               layout="mono")
            frame.sample_rate, frame.pts = sample_rate, start
            frame.time_base = Fraction(1, sample_rate)
            for pkt in stream.encode(frame):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)


def put(local: str | Path, uri: str, storage_cfg: StorageConfig | None = None) -> str:
    storage.upload_file(local, uri, storage_cfg)
    return uri
