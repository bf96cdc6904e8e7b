"""Side-by-side frames: for a few clips, generated frames over the reference
at the same times (a PNG a person can look at).

    python scripts/side_by_side.py --generated runs/q/default --reference runs/q/reference \
        --clips val_0000,val_0007 --times 0.5,1.5,2.5,3.5 --out docs/samples.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dheads.platform.media import read_video


def frames_at(path: Path, times: list[float], size: int) -> list[np.ndarray]:
    clip = read_video(str(path), require_audio=False, decode_audio=False)
    picks = [min(int(t * clip.fps), len(clip.frames) - 1) for t in times]
    return [np.asarray(Image.fromarray(clip.frames[i]).resize((size, size), Image.BICUBIC)) for i in picks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generated", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--clips", required=True)
    ap.add_argument("--times", default="0.5,1.5,2.5,3.5")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    times = [float(t) for t in args.times.split(",")]
    rows, labels = [], []
    for name in args.clips.split(","):
        for kind, folder in (("generated", args.generated), ("reference", args.reference)):
            rows.append(np.concatenate(frames_at(Path(folder) / f"{name}.mp4", times, args.size), axis=1))
            labels.append(f"{name} {kind}")
    pad = 110
    grid = np.concatenate(rows, axis=0)
    canvas = Image.new("RGB", (grid.shape[1] + pad, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (pad, 0))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        draw.text((4, i * args.size + args.size // 2 - 12), label.replace(" ", "\n"), fill="black")
    canvas.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
