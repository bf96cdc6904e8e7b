"""Quality vs training minutes of one run: val figures (bench/quality.py's
eval folders, one per exported step) against the run's cumulative step time
(metrics.csv), beside the still-frame floor and the model-resolution ceiling.

    python scripts/quality_curve.py --run runs/benchmark-cpu \
        --point 500=runs/q_s500/eval_default ... --floor runs/q/eval_floor_model_res \
        --ceiling runs/q/eval_model_res --out docs/quality_curve.png
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [("sync_r", "lip-sync r (lag 0)"), ("psnr_upper", "upper-face PSNR (dB)"),
          ("ssim_upper", "upper-face SSIM"), ("flow_ratio", "optical-flow ratio")]


def averages(folder: str) -> dict:
    return json.loads((Path(folder) / "metrics.json").read_text())["averages"]


def minutes_at(run: Path) -> dict[int, float]:
    total, out = 0.0, {}
    for row in csv.DictReader(open(run / "metrics.csv")):
        total += float(row["iter_time_s"])
        out[int(float(row["step"]))] = total / 60
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--point", action="append", required=True, help="STEP=EVAL_FOLDER")
    ap.add_argument("--floor", required=True)
    ap.add_argument("--ceiling", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    mins = minutes_at(Path(args.run))
    pts = sorted((int(s), averages(f)) for s, f in (p.split("=", 1) for p in args.point))
    floor, ceiling = averages(args.floor), averages(args.ceiling)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    rows = []
    for ax, (key, title) in zip(axes, PANELS):
        x = [mins[s] for s, _ in pts]
        ax.plot(x, [a[key] for _, a in pts], "o-", label="dheads recipe")
        ax.axhline(floor[key], color="gray", ls="--", label="still frame (floor)")
        ax.axhline(ceiling[key], color="green", ls=":", label="ground truth at 64 px (ceiling)")
        for (s, a), xi in zip(pts, x):
            ax.annotate(str(s), (xi, a[key]), fontsize=7, textcoords="offset points", xytext=(2, 3))
        ax.set_title(title)
        ax.set_xlabel("training minutes (2 CPU cores)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    for s, a in pts:
        rows.append({"step": s, "minutes": round(mins[s], 1), **{k: round(a[k], 3) for k, _ in PANELS}})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
