"""Quality of a trained checkpoint on the benchmark's val split, per sampler,
beside the ground-truth ceilings and the still-identity-frame floor; and the
long-clip test (drift over 30 s, seams between dubbing segments).

    python bench/quality.py --checkpoint runs/benchmark-cpu/export \
        [--val ../shared/benchmark/val] [--clips 0] [--seconds 0] \
        [--samplers default,trailing20,ddim20,respaced100+rho0.9] [--long-clip 30] \
        [--long-clip-samplers default,default+lead4+xfade6] \
        [--seeds 2] [--out runs/quality] [--smoke]

Every val clip (`--clips 0`: all 40; `--seconds 0`: at full length) is
dubbed from its first frame (mouth shut: the clips start in silence) and its
own audio, which the model never saw (val sentences and identities are
disjoint from train). All clips go through the product's dubbing engine at
once (one slot per segment, one batched UNet call per denoising step, the
UNet under bf16 autocast on CPUs that have it), and are scored by
`dheads eval`. Rows of the printed JSON:

- `ceiling`: the reference scored against itself (128 px);
- `ceiling_model_res`: the reference resized to the model's image size and
  back: what a perfect model at that resolution would score;
- `floor`: the identity frame held still, with the real audio;
- `floor_model_res`: the same at the model's resolution (the identity
  frame resized to the model's size and back, held still);
- `samplers`: one row per sampler spec — `default` (SamplerConfig's
  defaults), `trailingN` / `ddimN` (DDIM η = 0 over trailing or
  guided-diffusion spacing), `respacedN` (ancestral, the paper's), each
  optionally `+rhoX` (frame-to-frame noise correlation), `+sigmaY`
  (inference motion-frame noise instead of the checkpoint's), `+etaZ`
  (DDIM stochasticity) and `+stabN` (reset the older motion frame to the
  identity every N frames, the official `stabilize`; `+stab0`: never),
  `+xfadeN` / `+leadN` (cross-faded segments instead of one carried unit per
  item, `dub.joints=crossfade`, with N cross-fade / lead-in frames);
- every row carries `dheads eval`'s head motion, blink, identity, flicker
  and sharpness averages (`MOTION_KEYS`; the full averages under `all`);
  with `--seeds 2` each sampler also dubs every clip a second time with
  another seed (`<out>/<spec>_seed1/`) and the row gains the variety
  measures (`variety_track_r`, `variety_blink_r`: how alike the two runs'
  head tracks and blinks are; null with `variety_reason` otherwise);
- `long_clip` (`--long-clip`, default 60 s): a clip of an unseen identity
  made with `dheads synth`, dubbed as one carried unit (or, with `+xfadeN`,
  in cross-faded segments of ≤ 8 s): the pose-aligned
  upper face against the identity frame over the first and the last 10 s
  (`identity_drop_db`) beside the reference's own change
  (`ref_identity_drop_db`); head-motion ratios over the whole clip; the seam
  ratio — the largest frame-to-frame change at a segment joint ÷ the median
  frame-to-frame change — beside the same statistic over every other window
  of the clip (p50, p90) and how many joints exceed that p90
  (`joints_over_p90`; a carried item has none: `segments` 1); and upper-face PSNR against the reference over the
  first and the last 5 s (a sanity figure).

`--smoke` (the test suite): a random 16-px checkpoint, 2 clips of 0.4 s,
DDIM 2, two seeds, a 2 s long clip; the same code path, figures meaningless.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# dheads eval's averages of what the paper claims beyond lip sync (jobs/evaluation/headmotion.py)
MOTION_KEYS = ("head_motion_ratio_angle", "head_motion_ratio_tx", "head_motion_ratio_ty",
               "blink_rate_ref_measured", "blink_rate_ratio_measured", "identity_psnr_gen",
               "identity_psnr_ref", "identity_psnr_first", "identity_psnr_last", "flicker_ratio",
               "sharpness_ratio", "variety_track_r", "variety_blink_r", "variety_reason")
ROW_KEYS = ("sync_r", "sync_r_best", "sync_lag", "psnr_upper", "ssim_upper", "flow_ratio",
            "blink_rate_gen", "blink_rate_ref", "blink_rate_ratio", "drift_db", "clips", "frames",
            *MOTION_KEYS)
JSON_KEYS = ("bench", "checkpoint", "clips", "seconds_per_clip", "image_size", "smoke", "seeds",
             *(f"{row}.{k}" for row in ("ceiling", "ceiling_model_res", "floor", "floor_model_res")
               for k in ("sync_r", "psnr_upper", "ssim_upper", "flow_ratio", "blink_rate_gen", *MOTION_KEYS)),
             *(f"samplers.0.{k}" for k in ROW_KEYS + ("sampler", "frames_per_s", "wall_s")),
             "long_clip.seconds", "long_clip.segments", "long_clip.psnr_upper_first5s",
             "long_clip.psnr_upper_last5s", "long_clip.ref_drift_db", "long_clip.gen_drop_db",
             "long_clip.seam_ratio", "long_clip.identity_drop_db", "long_clip.ref_identity_drop_db",
             "long_clip.joints_over_p90")


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
        if (out / f"{s}.mp4").exists():
            continue
        clip = read_video(ref / f"{s}.mp4")
        write_video(out / f"{s}.mp4", fn(clip.frames), 25, clip.audio)


def at_resolution(size: int):
    """Frames resized to `size` and back (area down, bicubic up), as a model
    of that resolution would at best reproduce them."""
    import cv2

    def fn(frames: np.ndarray) -> np.ndarray:
        h, w = frames.shape[1:3]
        return np.stack([cv2.resize(cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA),
                                    (w, h), interpolation=cv2.INTER_CUBIC) for f in frames])
    return fn


def parse_sampler(spec: str):
    """A sampler spec (see the module docstring) -> (SamplerConfig, the
    `DubConfig` overrides it names: motion σ, stabilize)."""
    from dheads.model.config import SamplerConfig, SamplerKind

    name, *mods = spec.split("+")
    default = SamplerConfig()
    if name == "default":
        cfg = default
    elif name.startswith("trailing") or name.startswith("ddim"):
        cfg = dataclasses.replace(default, kind=SamplerKind.ddim, steps=name, eta=0.0)
    elif name.startswith("respaced"):
        steps = name[len("respaced"):].lstrip("-")
        cfg = dataclasses.replace(default, kind=SamplerKind.respaced, steps=steps, eta=1.0)
    else:
        raise SystemExit(f"unknown sampler {spec!r} "
                         "(default, trailingN, ddimN, respacedN[+rhoX][+sigmaY][+etaZ][+stabN][+xfadeN][+leadN])")
    dub: dict = {}
    for m in mods:
        try:
            if m.startswith("rho"):
                cfg = dataclasses.replace(cfg, noise_correlation=float(m[3:]))
            elif m.startswith("sigma"):
                dub["motion_noise"] = float(m[5:])
            elif m.startswith("eta") and cfg.kind == SamplerKind.ddim:
                cfg = dataclasses.replace(cfg, eta=float(m[3:]))
            elif m.startswith("stab"):
                dub["stabilize_every"] = int(m[4:])
            elif m.startswith("xfade"):  # cross-faded segments instead of one carried unit
                dub["crossfade_frames"], dub["joints"] = int(m[5:]), "crossfade"
            elif m.startswith("lead"):
                dub["lead_in_frames"], dub["joints"] = int(m[4:]), "crossfade"
            else:
                raise ValueError
        except ValueError:
            raise SystemExit(f"unknown sampler modifier {m!r} in {spec!r}") from None
    return cfg, dub


def dub_all(checkpoint: str, spec: str, items, n_slots: int, threads: int = 0,
            seed: int = 0) -> tuple[list, float]:
    """Dub `items` through one engine of `n_slots` slots, sampling noise from
    `seed`; (results, wall seconds)."""
    from _dubbing import dub_items

    from dheads.platform.config import DubConfig
    from dheads.platform.dubbing.engine import build_engine
    from dheads.platform.dubbing.items import ItemStatus

    sampler, overrides = parse_sampler(spec)
    cfg = DubConfig(batch_size=max(1, n_slots), num_threads=threads, **overrides)
    engine = build_engine(checkpoint, sampler, cfg)
    t = time.time()
    results = dub_items(engine, items, cfg, seed=seed)
    wall = time.time() - t
    failed = [r for r in results if r.status != ItemStatus.succeeded]
    if failed:
        raise SystemExit(f"{spec}: {failed}")
    return results, wall


def long_clip(checkpoint: str, spec: str, out: Path, seconds: float, threads: int = 0) -> dict:
    """Drift over a long unseen clip and the seams between its dubbing
    segments, dubbed with sampler `spec`."""
    from dheads.jobs.evaluation import metrics as M
    from dheads.jobs.evaluation.mouth import face_regions
    from dheads.jobs.synth import run as synth
    from dheads.platform.config import DubConfig, Joints, SynthJob
    from dheads.platform.dubbing.items import DubItem
    from dheads.platform.dubbing.segments import FPS, crossfade, segment_bounds
    from dheads.platform.media import read_video

    src = out / "long_clip"
    if not (src / "manifest.jsonl").exists():
        synth(SynthJob(out=str(src), n=1, seed=4242, min_s=seconds, max_s=seconds, workers=1))
    row = json.loads((src / "manifest.jsonl").read_text().splitlines()[0])
    video = src / row["video"]
    item = DubItem(item_id="long", identity=str(video), audio=str(video),
                   output=str(out / f"long_clip_{spec}" / "long.mp4"), identity_frame=0)
    _, wall = dub_all(checkpoint, spec, [item], n_slots=8, threads=threads)
    ref, gen = read_video(video), read_video(item.output)
    g, r = M.match_frames(gen.frames, ref.frames)
    truth = json.loads((src / row["meta"]).read_text())
    upper = face_regions(*r.shape[1:3], np.asarray(truth["frames"]["mouth_box"])).upper_rows
    n5 = max(1, min(int(round(5 * FPS)), len(g) // 2))  # 5 s windows (half the clip if shorter)
    psnr = M.psnr(g[:, :upper], r[:, :upper])
    still = np.broadcast_to(r[:1, :upper], r[:, :upper].shape)
    drift_ref = M.psnr(r[:, :upper], still)
    # where the engine cut the audio (the segment plan is a pure function of it)
    cfg = DubConfig(**parse_sampler(spec)[1])
    seams = [s for s, _ in segment_bounds(ref.audio, cfg)[1:]]
    change = np.abs(np.diff(g.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))  # change[i]: i -> i+1
    # a joint is cross-faded over crossfade_frames: look at every change inside it
    # (a carried item has no joints: every window is "elsewhere")
    width = crossfade(cfg) + 1
    window = np.array([change[i: i + width].max() for i in range(len(change) - width + 1)])
    at_seams = [window[max(0, s - 1)] for s in seams]
    median = float(np.median(change)) or 1e-9
    # the same window away from the joints: how far a seam stands out of the clip's own flicker
    away = np.ones(len(window), bool)
    for s in seams:
        away[max(0, s - 1 - width): s + width] = False
    elsewhere = window[away] / median if away.any() else np.array([np.nan])
    # identity whatever the pose: the pose-aligned upper face against the
    # identity frame over the first and the last 10 s, beside the reference's own change
    from dheads.jobs.evaluation import headmotion

    boxes = np.asarray(truth["frames"]["mouth_box"])
    face_g, face_r = headmotion.measure(g, r[0], boxes), headmotion.measure(r, r[0], boxes)
    q = headmotion.face_quality(face_g, face_r, r[0], upper, FPS)
    motion = headmotion.head_motion(face_g, face_r)
    p90 = float(np.percentile(elsewhere, 90))
    return {"seconds": round(len(g) / FPS, 2), "segments": len(seams) + 1, "sampler": spec,
            "joints": Joints(cfg.joints).value,
            "identity_psnr_first10s": round(q["identity_psnr_first"], 2),
            "identity_psnr_last10s": round(q["identity_psnr_last"], 2),
            "identity_drop_db": round(q["identity_psnr_first"] - q["identity_psnr_last"], 2),
            "ref_identity_psnr_first10s": round(q["identity_psnr_ref_first"], 2),
            "ref_identity_psnr_last10s": round(q["identity_psnr_ref_last"], 2),
            "ref_identity_drop_db": round(q["identity_psnr_ref_first"] - q["identity_psnr_ref_last"], 2),
            "head_motion_ratio": {k[len("head_motion_ratio_"):]: (None if v is None else round(v, 2))
                                  for k, v in motion.items() if k.startswith("head_motion_ratio_")},
            # each joint's change against the same window elsewhere in the clip, p90
            "joints_over_p90": int(sum(c / median > p90 for c in at_seams)),
            "wall_s": round(wall, 1),
            "psnr_upper_first5s": round(float(psnr[:n5].mean()), 2),
            "psnr_upper_last5s": round(float(psnr[-n5:].mean()), 2),
            "gen_drop_db": round(float(psnr[:n5].mean() - psnr[-n5:].mean()), 2),
            # the reference's own drift away from its first frame, first 5 s minus last 5 s
            "ref_drift_db": round(float(M.db(np.mean(M.mse(r[:n5, :upper], still[:n5])))
                                        - M.db(np.mean(M.mse(r[-n5:, :upper], still[-n5:])))), 2),
            "ref_psnr_vs_identity_first5s": round(float(drift_ref[:n5].mean()), 2),
            "ref_psnr_vs_identity_last5s": round(float(drift_ref[-n5:].mean()), 2),
            "seam_ratio": round(float(max(at_seams) / median), 2) if at_seams else None,
            # the seam ratio's statistic over every other window of the same width
            "window_ratio_elsewhere_p50": round(float(np.percentile(elsewhere, 50)), 2),
            "window_ratio_elsewhere_p90": round(float(np.percentile(elsewhere, 90)), 2),
            "seam_changes": [round(float(c), 3) for c in at_seams],
            "median_change": round(median, 3)}


def evaluate_checkpoint(checkpoint: str, val: str, out: Path, samplers: list[str], clips: int = 0,
                        seconds: float = 0.0, threads: int = 0, smoke: bool = False,
                        long_seconds: float = 0.0, long_samplers: list[str] | None = None,
                        seeds: int = 1) -> dict:
    """The quality document of `checkpoint` (see the module docstring); also
    written to `out/quality_full.json`."""
    from dheads.jobs.evaluation import evaluate
    from dheads.model.checkpoint import load_checkpoint
    from dheads.platform.dubbing.items import DubItem

    out = Path(out).resolve()
    image_size = load_checkpoint(checkpoint).model_cfg.image_size
    ref = out / "reference"
    stems = cut_references(Path(val), ref, clips, seconds)
    quiet = dict(report=False, verbose=False)
    result: dict = {"bench": "quality", "checkpoint": checkpoint, "clips": len(stems),
                    "seconds_per_clip": seconds or "full", "image_size": image_size, "smoke": smoke,
                    "seeds": seeds}
    result["ceiling"] = evaluate(str(ref), str(ref), str(out / "eval_ceiling"), **quiet)
    transformed(ref, out / "model_res", stems, at_resolution(image_size))
    result["ceiling_model_res"] = evaluate(str(out / "model_res"), str(ref),
                                           str(out / "eval_model_res"), **quiet)
    res = at_resolution(image_size)
    transformed(ref, out / "floor_model_res", stems, lambda f: res(f[:1]).repeat(len(f), axis=0))
    result["floor_model_res"] = evaluate(str(out / "floor_model_res"), str(ref),
                                         str(out / "eval_floor_model_res"), **quiet)
    result["samplers"] = []
    for spec in samplers:
        gen = out / spec
        items = [DubItem(item_id=s, identity=str(ref / f"{s}.mp4"), audio=str(ref / f"{s}.mp4"),
                         output=str(gen / f"{s}.mp4"), identity_frame=0) for s in stems]
        # every clip is a slot of one engine (a clip over 8 s is 2 segments): the split advances together
        results, wall = dub_all(checkpoint, spec, items, n_slots=2 * len(stems), threads=threads)
        frames = sum(round(r.seconds * 25) for r in results)
        gen_b = None
        if seeds > 1:  # the same clips again from another seed: how alike two runs move (variety)
            gen_b = out / f"{spec}_seed1"
            items_b = [it.model_copy(update={"output": str(gen_b / f"{it.item_id}.mp4")}) for it in items]
            dub_all(checkpoint, spec, items_b, n_slots=2 * len(stems), threads=threads, seed=1)
        evaluate(str(gen), str(ref), str(out / f"eval_{spec}"), report=not smoke, verbose=False,
                 generated_b_uri=None if gen_b is None else str(gen_b))
        doc = json.loads((out / f"eval_{spec}" / "metrics.json").read_text())
        metrics = doc["averages"]
        result.setdefault("floor", doc["floor"])  # the still identity frame, scored by eval itself
        row = {"sampler": spec, **{k: metrics.get(k) for k in ROW_KEYS},
               "frames_per_s": round(frames / wall, 2), "wall_s": round(wall, 1), "all": metrics}
        result["samplers"].append(row)
        print(f"[quality] {spec}: " + json.dumps({k: v for k, v in row.items() if k != "all"}),
              flush=True)
    long_samplers = long_samplers or samplers[:1]
    if long_seconds and long_samplers:
        result["long_clips"] = []
        for spec in long_samplers:
            result["long_clips"].append(long_clip(checkpoint, spec, out, long_seconds, threads))
            print(f"[quality] long clip: {json.dumps(result['long_clips'][-1])}", flush=True)
        result["long_clip"] = result["long_clips"][0]
    (out / "quality_full.json").write_text(json.dumps(result, indent=1))
    return result


def split_specs(specs: str) -> list[str]:
    return [s for s in specs.split(",") if s]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--val", default=None, help="default: the benchmark's val/")
    ap.add_argument("--clips", type=int, default=0, help="0: all")
    ap.add_argument("--seconds", type=float, default=0.0, help="0: full length")
    ap.add_argument("--samplers", default="default", help="'': val clips not dubbed")
    ap.add_argument("--long-clip", type=float, default=60.0, help="seconds of the long clip; 0: skip")
    ap.add_argument("--long-clip-samplers", default="",
                    help="sampler specs for the long clip (default: the first of --samplers)")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, choices=(1, 2),
                    help="2: dub every clip again with another seed and score the variety between the runs")
    ap.add_argument("--smoke", action="store_true", help="seconds, tiny inputs (the test suite)")
    args = ap.parse_args()

    out = Path(args.out).resolve()
    if args.smoke:
        from _dubbing import tiny_checkpoint

        out = Path(tempfile.mkdtemp(prefix="dheads-quality-smoke-"))
        args.checkpoint = tiny_checkpoint(out / "ckpt", image_size=16)
        args.clips, args.seconds, args.samplers, args.long_clip, args.seeds = 2, 0.4, "ddim2", 2.0, 2
    if args.val is None:
        from _paths import benchmark_dir

        args.val = str(benchmark_dir() / "val")
    if not args.checkpoint:
        raise SystemExit("--checkpoint is required (or --smoke)")
    result = evaluate_checkpoint(args.checkpoint, args.val, out, split_specs(args.samplers),
                                 args.clips, args.seconds, args.threads, args.smoke, args.long_clip,
                                 split_specs(args.long_clip_samplers), args.seeds)
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
