"""Quality of a trained checkpoint on the benchmark's val split, per sampler,
beside the ground-truth ceiling and the static-identity-frame floor.

    python bench/quality.py --checkpoint runs/tiny-benchmark/export \
        [--val ../shared/benchmark/val] [--clips 8] [--seconds 2] \
        [--samplers ddim20,ddim50,respaced100] [--out runs/quality]

Each val clip (the first `--clips`, cut to `--seconds`) is dubbed from its
first frame (mouth shut: the clips start in silence) and its own audio,
which the model never saw (val sentences and identities are disjoint from
train). Generation goes through the product's dubbing engine
(`platform.dubbing`: segments, continuous batching, stitching), scoring
through `dheads eval`. Prints one JSON line: per sampler the averaged
metrics and frames/s; `ceiling` (reference scored against itself) and
`floor` (the identity frame held still, with the real audio).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def cut_references(val: Path, out: Path, clips: int, seconds: float) -> list[str]:
    """Write the first `seconds` of each clip (mp4 + truncated ground truth)."""
    from dheads.platform.media import read_video, write_video

    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in (val / "manifest.jsonl").read_text().splitlines()][:clips]
    stems = []
    for r in rows:
        clip = read_video(val / r["video"])
        n = min(clip.n_frames, int(round(seconds * 25)))
        stem = Path(r["video"]).stem
        write_video(out / f"{stem}.mp4", clip.frames[:n], 25, clip.audio[: n * 640])
        meta = json.loads((val / r["meta"]).read_text())
        meta["frames"] = {k: v[:n] for k, v in meta["frames"].items()}
        meta["n_frames"] = n
        (out / f"{stem}.json").write_text(json.dumps(meta))
        stems.append(stem)
    return stems


def static_floor(ref: Path, out: Path, stems: list[str]) -> None:
    from dheads.platform.media import read_video, write_video

    out.mkdir(parents=True, exist_ok=True)
    for s in stems:
        clip = read_video(ref / f"{s}.mp4")
        frames = np.repeat(clip.frames[:1], clip.n_frames, axis=0)
        write_video(out / f"{s}.mp4", frames, 25, clip.audio)


def parse_sampler(spec: str):
    from dheads.model.config import SamplerConfig, SamplerKind

    if spec.startswith("ddim"):
        return SamplerConfig(kind=SamplerKind.ddim, steps=spec, eta=0.0)
    if spec.startswith("respaced"):
        return SamplerConfig(kind=SamplerKind.respaced, steps=spec[len("respaced"):], eta=1.0)
    raise SystemExit(f"unknown sampler {spec!r} (ddimN or respacedN)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--val", default=str(Path(__file__).resolve().parents[2] / "shared/benchmark/val"))
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--samplers", default="ddim20,ddim50,respaced100")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    from dheads.jobs.evaluation import evaluate
    from dheads.platform.config import DubConfig
    from dheads.platform.dubbing import DubItem, build_engine, dub_items

    out = Path(args.out).resolve()
    ref = out / "reference"
    stems = cut_references(Path(args.val), ref, args.clips, args.seconds)
    result: dict = {"bench": "quality", "checkpoint": args.checkpoint, "clips": len(stems),
                    "seconds_per_clip": args.seconds}
    result["ceiling"] = evaluate(str(ref), str(ref), str(out / "eval_ceiling"), report=False)
    static_floor(ref, out / "floor", stems)
    result["floor"] = evaluate(str(out / "floor"), str(ref), str(out / "eval_floor"), report=False)
    cfg = DubConfig(batch_size=16, num_threads=args.threads)
    for spec in args.samplers.split(","):
        engine = build_engine(args.checkpoint, parse_sampler(spec), cfg)
        gen = out / spec
        items = [DubItem(item_id=s, identity=str(ref / f"{s}.mp4"), audio=str(ref / f"{s}.mp4"),
                         output=str(gen / f"{s}.mp4"), identity_frame=0) for s in stems]
        t = time.time()
        rows = dub_items(engine, items, cfg)
        wall = time.time() - t
        failed = [r for r in rows if r["status"] != "succeeded"]
        if failed:
            raise SystemExit(f"{spec}: {failed}")
        frames = sum(round(r["seconds"] * 25) for r in rows)
        metrics = evaluate(str(gen), str(ref), str(out / f"eval_{spec}"), report=True)
        result[spec] = {**metrics, "frames_per_s": round(frames / wall, 2), "wall_s": round(wall, 1)}
        print(f"[quality] {spec}: {json.dumps(result[spec])}", flush=True)
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
