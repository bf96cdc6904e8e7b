"""Variety from one image: one input dubbed with several seeds, side by side
(frames every `--every` seconds) with the head tracks and eye openness the
platform measures on each (`platform/facemotion.py`), over the reference's.

    python scripts/seeds_figure.py --checkpoint runs/motion-cpu/export \
        --clip ../shared/benchmark/val/val_0003.mp4 --seeds 0,1,2 --out docs/seeds.png
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def dub_seeds(checkpoint: str, clip: Path, seeds: list[int], out: Path) -> list[Path]:
    from _dubbing import dub_items

    from dheads.model.config import SamplerConfig
    from dheads.platform.config import DubConfig
    from dheads.platform.dubbing.engine import build_engine
    from dheads.platform.dubbing.items import DubItem

    cfg = DubConfig(batch_size=len(seeds))
    engine = build_engine(checkpoint, SamplerConfig(), cfg)
    paths = []
    for seed in seeds:
        item = DubItem(item_id=f"seed{seed}", identity=str(clip), audio=str(clip),
                       output=str(out / f"seed{seed}.mp4"), identity_frame=0)
        (result,) = dub_items(engine, [item], cfg, seed=seed)
        if result.status.value != "succeeded":
            raise SystemExit(f"seed {seed}: {result.reason}")
        paths.append(Path(item.output))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--clip", required=True, help="a benchmark clip (.mp4 with its .json beside it)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--every", type=float, default=0.8)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dheads.platform import facemotion as fm
    from dheads.platform.media import read_video

    clip = Path(args.clip)
    seeds = [int(s) for s in args.seeds.split(",")]
    truth = json.loads(clip.with_suffix(".json").read_text())["frames"] if clip.with_suffix(".json").exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        videos = dub_seeds(args.checkpoint, clip, seeds, Path(tmp))
        ref = read_video(str(clip), require_audio=False, decode_audio=False).frames
        gens = [read_video(str(v), require_audio=False, decode_audio=False).frames for v in videos]
    size = ref.shape[1]
    boxes = np.asarray(truth["mouth_box"]) if "mouth_box" in truth else None
    rows = [("reference", ref)] + [(f"seed {s}", g) for s, g in zip(seeds, gens)]
    signals = []
    for _, frames in rows:
        f = frames if frames.shape[1] == size else np.stack(
            [cv2.resize(x, (size, size), interpolation=cv2.INTER_CUBIC) for x in frames])
        signals.append(fm.motion_signals(f, boxes))
    n = min(len(f) for _, f in rows)
    picks = np.arange(0, n, max(1, int(round(args.every * 25))))
    width = 1.15 * len(picks)
    fig = plt.figure(figsize=(width, 1.15 * len(rows) + 3.6))
    grid = fig.add_gridspec(len(rows) + 2, len(picks), height_ratios=[1] * len(rows) + [1.8, 1.3],
                            hspace=0.15, wspace=0.05)
    for r, (label, frames) in enumerate(rows):
        for c, k in enumerate(picks):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(cv2.resize(frames[k], (args.size, args.size), interpolation=cv2.INTER_CUBIC))
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
            if r == 0:
                ax.set_title(f"{k / 25:.1f} s", fontsize=8)
    t = np.arange(n) / 25
    colors = ["black"] + [f"C{i}" for i in range(len(seeds))]
    for j, (name, unit) in enumerate((("angle", "°"), ("tx", " px"))):
        ax = fig.add_subplot(grid[len(rows), j * len(picks) // 2:(j + 1) * len(picks) // 2])
        for (label, _), s, col in zip(rows, signals, colors):
            ax.plot(t, s["head_pose"][:n, j], color=col, lw=1.2 if label == "reference" else 1, label=label)
        ax.set_title(f"head {name} ({unit.strip()}), measured", fontsize=9)
        ax.tick_params(labelsize=7)
        if j == 0:
            ax.legend(fontsize=7, ncol=len(rows))
    ax = fig.add_subplot(grid[len(rows) + 1, :])
    for (label, _), s, col in zip(rows, signals, colors):
        ax.plot(t, s["eye_open"][:n], color=col, lw=1, label=label)
        blinks = np.flatnonzero(fm.detect_blinks(s["eye_open"][:n]))
        ax.plot(t[blinks], np.full(len(blinks), 0.45), "|", color=col, ms=8)
    ax.set_title("eye openness (1 = open; ticks: detected blinks)", fontsize=9)
    ax.set_xlabel("s", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.07, right=0.99, top=0.97, bottom=0.05)
    fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
