"""Quality of a trained checkpoint on the benchmark's val split, per sampler,
beside the ground-truth ceilings and the still-identity-frame floor.

    python bench/quality.py --checkpoint runs/benchmark-cpu/export \
        [--val ../shared/benchmark/val] [--clips 0] [--seconds 0] \
        [--samplers default,ddim20,respaced100] [--out runs/quality] [--smoke]

Every val clip (`--clips 0`: all 40; `--seconds 0`: at full length) is
dubbed from its first frame (mouth shut: the clips start in silence) and its
own audio, which the model never saw (val sentences and identities are
disjoint from train). All clips go through the product's dubbing engine at
once (one slot per segment, one batched UNet call per denoising step), and
are scored by `dheads eval`. Rows of the printed JSON:

- `ceiling`: the reference scored against itself (128 px);
- `ceiling_model_res`: the reference resized to the model's image size and
  back: what a perfect model at that resolution would score;
- `floor`: the identity frame held still, with the real audio;
- one row per sampler (`default` = the sampler the checkpoint's config
  names): the averaged metrics, frames/s and wall seconds.

`--smoke` (the test suite): a random 16-px checkpoint, 2 clips of 0.4 s,
DDIM 2; the same code path, figures meaningless.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = ("sync_r", "sync_r_best", "sync_lag", "psnr_upper", "ssim_upper", "flow_ratio",
            "blink_rate_gen", "blink_rate_ratio", "drift_db", "clips", "frames")
JSON_KEYS = ("bench", "checkpoint", "clips", "seconds_per_clip", "image_size", "smoke",
             *(f"{row}.{k}" for row in ("ceiling", "ceiling_model_res", "floor")
               for k in ("sync_r", "psnr_upper", "ssim_upper", "flow_ratio", "blink_rate_gen")),
             *(f"samplers.0.{k}" for k in ROW_KEYS + ("sampler", "frames_per_s", "wall_s")))


def cut_references(val: Path, out: Path, clips: int, seconds: float) -> list[str]:
    """The first `seconds` (0: all) of the first `clips` (0: all) val clips,
    as mp4 + ground truth JSON under `out`."""
    from dheads.platform.media import read_video, write_video

    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in (val / "manifest.jsonl").read_text().splitlines()]
    rows = rows[:clips] if clips else rows
    stems = []
    for r in rows:
        stem = Path(r["video"]).stem
        stems.append(stem)
        if (out / f"{stem}.mp4").exists() and (out / f"{stem}.json").exists():
            continue
        clip = read_video(val / r["video"])
        n = min(clip.n_frames, int(round(seconds * 25))) if seconds else clip.n_frames
        write_video(out / f"{stem}.mp4", clip.frames[:n], 25, clip.audio[: n * 640])
        meta = json.loads((val / r["meta"]).read_text())
        meta["frames"] = {k: v[:n] for k, v in meta["frames"].items()}
        meta["n_frames"] = n
        (out / f"{stem}.json").write_text(json.dumps(meta))
    return stems


def transformed(ref: Path, out: Path, stems: list[str], fn) -> None:
    """Write `fn(frames [T, H, W, 3]) -> frames` of every reference clip under `out`."""
    from dheads.platform.media import read_video, write_video

    out.mkdir(parents=True, exist_ok=True)
    for s in stems:
        clip = read_video(ref / f"{s}.mp4")
        write_video(out / f"{s}.mp4", fn(clip.frames), 25, clip.audio)


def still(frames: np.ndarray) -> np.ndarray:
    return np.repeat(frames[:1], len(frames), axis=0)


def at_resolution(size: int):
    """Frames resized to `size` and back (area down, bicubic up), as a model
    of that resolution would at best reproduce them."""
    import cv2

    def fn(frames: np.ndarray) -> np.ndarray:
        h, w = frames.shape[1:3]
        return np.stack([cv2.resize(cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA),
                                    (w, h), interpolation=cv2.INTER_CUBIC) for f in frames])
    return fn


def parse_sampler(spec: str, default):
    """`default`, `ddimN` / `ddimN-trailing` (η = 0), `respacedN` (ancestral)."""
    import dataclasses

    from dheads.model.config import SamplerConfig, SamplerKind

    if spec == "default":
        return default
    if spec.startswith("ddim"):
        return SamplerConfig(kind=SamplerKind.ddim, steps=spec, eta=0.0)
    if spec.startswith("respaced"):
        return dataclasses.replace(default, kind=SamplerKind.respaced, steps=spec[len("respaced"):],
                                   eta=1.0)
    raise SystemExit(f"unknown sampler {spec!r} (default, ddimN or respacedN)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--val", default=None, help="default: the benchmark's val/")
    ap.add_argument("--clips", type=int, default=0, help="0: all")
    ap.add_argument("--seconds", type=float, default=0.0, help="0: full length")
    ap.add_argument("--samplers", default="default")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="seconds, tiny inputs (the test suite)")
    args = ap.parse_args()

    from dheads.jobs.evaluation import evaluate
    from dheads.model.checkpoint import load_checkpoint
    from dheads.platform.config import DubConfig, SamplerConfig
    from _dubbing import dub_items

    from dheads.platform.dubbing.engine import build_engine
    from dheads.platform.dubbing.items import DubItem, ItemStatus

    out = Path(args.out).resolve()
    if args.smoke:
        from _dubbing import tiny_checkpoint

        out = Path(tempfile.mkdtemp(prefix="dheads-quality-smoke-"))
        args.checkpoint = tiny_checkpoint(out / "ckpt", image_size=16)
        args.clips, args.seconds, args.samplers = 2, 0.4, "ddim2"
    if args.val is None:
        from _paths import benchmark_dir

        args.val = str(benchmark_dir() / "val")
    if not args.checkpoint:
        raise SystemExit("--checkpoint is required (or --smoke)")
    image_size = load_checkpoint(args.checkpoint).model_cfg.image_size
    ref = out / "reference"
    stems = cut_references(Path(args.val), ref, args.clips, args.seconds)
    quiet = dict(report=False, verbose=False)
    result: dict = {"bench": "quality", "checkpoint": args.checkpoint, "clips": len(stems),
                    "seconds_per_clip": args.seconds or "full", "image_size": image_size,
                    "smoke": args.smoke}
    result["ceiling"] = evaluate(str(ref), str(ref), str(out / "eval_ceiling"), **quiet)
    transformed(ref, out / "model_res", stems, at_resolution(image_size))
    result["ceiling_model_res"] = evaluate(str(out / "model_res"), str(ref),
                                           str(out / "eval_model_res"), **quiet)
    transformed(ref, out / "floor", stems, still)
    result["floor"] = evaluate(str(out / "floor"), str(ref), str(out / "eval_floor"), **quiet)
    result["samplers"] = []
    default = SamplerConfig()
    for spec in args.samplers.split(","):
        # every clip is one slot of the engine: the whole split advances together
        cfg = DubConfig(batch_size=max(1, 2 * len(stems)), num_threads=args.threads)
        engine = build_engine(args.checkpoint, parse_sampler(spec, default), cfg)
        gen = out / spec
        items = [DubItem(item_id=s, identity=str(ref / f"{s}.mp4"), audio=str(ref / f"{s}.mp4"),
                         output=str(gen / f"{s}.mp4"), identity_frame=0) for s in stems]
        t = time.time()
        results = dub_items(engine, items, cfg)
        wall = time.time() - t
        failed = [r for r in results if r.status != ItemStatus.succeeded]
        if failed:
            raise SystemExit(f"{spec}: {failed}")
        frames = sum(round(r.seconds * 25) for r in results)
        metrics = evaluate(str(gen), str(ref), str(out / f"eval_{spec}"), report=not args.smoke,
                           verbose=False)
        row = {"sampler": spec, **{k: metrics.get(k) for k in ROW_KEYS},
               "frames_per_s": round(frames / wall, 2), "wall_s": round(wall, 1),
               "all": metrics}
        result["samplers"].append(row)
        print(f"[quality] {spec}: " + json.dumps({k: v for k, v in row.items() if k != "all"}),
              flush=True)
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
