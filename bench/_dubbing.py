"""What bench/dub.py and bench/quality.py share: the in-process dubbing
driver, and synthetic inputs (a random-init checkpoint, speech-like audio).

`dub_items` is the offline path the benchmarks compare Serve against and
score: every item's segments share one engine's slot pool, in this process,
with no Ray. The product's paths are `dheads dub` (jobs/dub.py) and
`dheads serve` (serve/).
"""
from __future__ import annotations

import socket
import wave
from pathlib import Path

import numpy as np

from dheads.platform.config import DubConfig, StorageConfig
from dheads.platform.dubbing.engine import ContinuousBatcher
from dheads.platform.dubbing.items import DubItem, DubResult, finish_result, prepare_result


def dub_items(engine: ContinuousBatcher, items: list[DubItem], cfg: DubConfig,
              storage_cfg: StorageConfig | None = None, seed: int = 0) -> list[DubResult]:
    """Dub `items` in this process: decode all, sample all their segments in
    one slot pool, write all. One result per item; per-item errors become
    `failed` results."""
    prepared, results = [], {}
    for item in items:
        p = prepare_result(item, cfg, engine.image_size, storage_cfg, seed)
        if isinstance(p, DubResult):
            results[item.item_id] = p
        else:
            prepared.append(p)
    frames = engine.run(s for p in prepared for s in p.segments)
    for p in prepared:
        results[p.item.item_id] = finish_result(p.item.item_id, p.item.output, p.segments,
                                                {s.index: frames[s.key] for s in p.segments}, storage_cfg)
    return [results[i.item_id] for i in items]


# ---------------------------------------------------------- synthetic inputs
def tiny_checkpoint(path: str | Path, image_size: int = 16, channels: int | None = 16,
                    seed: int = 0) -> str:
    """A random-init `tiny`-preset model checkpoint at `image_size`, shrunk to
    `channels` (None: the preset's width). Throughput does not depend on the weights."""
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


def speech(seconds: float, seed: int = 0, sample_rate: int = 16000) -> np.ndarray:
    """Speech-like mono float32 audio with pauses (dheads synth's voice)."""
    from dheads.jobs.synthface import synth_speech

    return synth_speech(np.random.default_rng(seed), int(round(seconds * sample_rate)), sample_rate)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = 16000) -> None:
    """Mono float32 audio -> 16-bit PCM wav."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


def free_port() -> int:
    """A free TCP port of 127.0.0.1 (for the Serve instances the benchmarks start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
