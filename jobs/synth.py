"""`dheads synth out=DIR n=N seed=S`: procedural talking-face clips.

Writes, per clip, `<clip_id>.mp4` (H.264 + AAC 16 kHz mono, 25 fps,
`image_size`² pixels) and `<clip_id>.json` (ground truth in the benchmark
set's layout: clip-level fields plus `frames: {mouth_open: [T], mouth_box:
[T][4], eyelid, blink, pose, rms}`, coordinates in the clip's pixels), and a
`manifest.jsonl` (one line per clip: clip_id, video, meta, duration_s,
n_frames, identity_id, seed). Rendering is in `dheads.jobs.synthface`.
Clips are made in a process pool of `workers` processes.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from dheads.jobs.synthface import synth_clip
from dheads.platform.config import SynthJob
from dheads.platform.media import write_video


def clip_plan(cfg: SynthJob) -> list[dict]:
    """Per clip: id, seed, identity and length; identities are shared by ~3 clips each."""
    rng = np.random.default_rng(cfg.seed)
    n_ids = max(1, -(-cfg.n // 3))
    plan = []
    for k in range(cfg.n):
        n_frames = int(round(rng.uniform(cfg.min_s, cfg.max_s) * cfg.fps))
        plan.append({"clip_id": f"synth_{cfg.seed}_{k:05d}", "seed": cfg.seed * 100_000 + k,
                     "identity_id": cfg.seed * 100_000 + k % n_ids, "n_frames": n_frames})
    return plan


def make_clip(item: dict, out: str, size: int, fps: int) -> dict:
    frames, audio, meta = synth_clip(item["seed"], item["identity_id"], item["n_frames"], size, fps)
    meta = {"clip_id": item["clip_id"], **meta}
    video = Path(out) / f"{item['clip_id']}.mp4"
    tmp = video.with_name(f"_tmp.{video.name}")
    write_video(tmp, frames, fps=fps, audio=audio, sample_rate=meta["sample_rate"])
    os.replace(tmp, video)
    (Path(out) / f"{item['clip_id']}.json").write_text(json.dumps(meta))
    return {"clip_id": item["clip_id"], "video": video.name, "meta": f"{item['clip_id']}.json",
            "duration_s": meta["duration_s"], "n_frames": item["n_frames"],
            "identity_id": item["identity_id"], "seed": item["seed"]}


def run(cfg: SynthJob) -> int:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.image_size % 2:
        raise ValueError(f"image_size must be even for H.264, got {cfg.image_size}")
    t0 = time.time()
    plan = clip_plan(cfg)
    args = (str(out), cfg.image_size, cfg.fps)
    if cfg.workers > 1 and len(plan) > 1:
        with ProcessPoolExecutor(min(cfg.workers, len(plan))) as pool:
            rows = list(pool.map(make_clip, plan, *[[a] * len(plan) for a in args]))
    else:
        rows = [make_clip(item, *args) for item in plan]
    tmp = out / "_tmp.manifest.jsonl"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / "manifest.jsonl")
    frames = sum(r["n_frames"] for r in rows)
    print(f"synth: {len(rows)} clips, {frames} frames, {frames / cfg.fps:.1f} s of video "
          f"in {time.time() - t0:.1f} s -> {out}")
    return 0
