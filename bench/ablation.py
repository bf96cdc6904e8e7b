"""The quality ablation: each option of the recipe alone on top of the
paper's setup, and the recipe, at the same training budget, scored on the
benchmark's val split by bench/quality.py (all clips, full length).

    python bench/ablation.py [--steps 600] [--arms paper,x0,...] [--out runs/ablation] [--smoke]

Every arm is a real `dheads train` (Ray Train, FSDP2, 2 CPU workers, bf16
autocast) from the benchmark's 64-px shards with the same steps, batch,
learning rate, seed and data order; only the arm's overrides differ. Its
EMA export is then sampled with the product's default sampler (and the
paper's ancestral 100 steps for the `paper` arm too, `--paper-sampler`) through the dubbing
engine. Prints one JSON line: per arm the overrides, the training wall
seconds and the quality row; plus the floor and ceiling rows. Resumable:
an arm whose quality.json exists is not run again (delete it to redo).

`--smoke` (the test suite): the paper arm, 2 steps, 2 clips of 0.4 s.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each change alone on top of the paper's setup (the `paper` arm: the paper's
# diffusion, clean motion frames), then all of the recipe's changes together
# (`recipe`: experiment=benchmark_cpu's).
PAPER = ["diffusion=paper", "model.motion.train_noise_max=0.0", "model.motion.infer_noise=0.0",
         "model.motion.embed_noise=false"]
MOTION_NOISE = ["model.motion.train_noise_max=0.5", "model.motion.infer_noise=0.1",
                "model.motion.embed_noise=true"]
ARMS = {
    "paper": [],
    "x0": ["diffusion.prediction=x0"],
    "v": ["diffusion.prediction=v"],
    "min_snr5": ["diffusion.min_snr_gamma=5"],
    "residual": ["diffusion.identity_residual=true"],
    "motion_noise": MOTION_NOISE,
    "random_identity": ["data.identity_frame=random"],
    "mouth_margin": ["diffusion.mouth_margin=0.04"],
    "color_jitter": ["data.color_jitter=0.1"],
    "lr_floor": ["trainer.min_lr_ratio=0.1"],
    "recipe": ["experiment=benchmark_cpu"],
}
JSON_KEYS = ("bench", "steps", "smoke", "floor.psnr_upper", "ceiling.sync_r",
             "ceiling_model_res.sync_r", "arms.paper.overrides", "arms.paper.train_s",
             "arms.paper.quality.sync_r", "arms.paper.quality.psnr_upper",
             "arms.paper.quality.ssim_upper", "arms.paper.quality.flow_ratio",
             "arms.paper.quality.blink_rate_gen")


def train_arm(name: str, overrides: list[str], args, root: Path) -> float:
    """`dheads train` for one arm (a fresh run folder) + its export; wall seconds."""
    run = root / "runs"
    common = [
        "model=tiny", f"data.shards={args.shards}", f"data.source={args.source}",
        "val=null", "trainer=cpu", "trainer.num_workers=2", f"trainer.batch_size={args.batch}",
        f"trainer.steps={args.steps}", f"trainer.lr={args.lr}", f"trainer.warmup_steps={args.warmup}",
        "trainer.cpu_bf16=null", "trainer.ema_rate=0.998", f"trainer.checkpoint_every={args.steps}",
        "trainer.sample_every=0", f"trainer.storage_path={run}", f"trainer.name={name}",
        "trainer.log_every=25"]
    if overrides[:1] == ["experiment=benchmark_cpu"]:
        # command-line keys win over the experiment file: the common budget applies
        cmd = [sys.executable, "-m", "dheads.platform.cli", "train", "experiment=benchmark_cpu", *common]
    else:
        # the paper's setup, then the arm's change on top of it
        cmd = [sys.executable, "-m", "dheads.platform.cli", "train", *common, *PAPER, *overrides]
    t = time.time()
    with open(root / f"{name}.train.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return round(time.time() - t, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8, help="per worker (2 workers)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--shards", default=str(REPO / "runs" / "shards-64"))
    ap.add_argument("--source", default=None, help="default: the benchmark's train/")
    ap.add_argument("--val", default=None, help="default: the benchmark's val/")
    ap.add_argument("--paper-sampler", default="respaced100",
                    help="also score the paper arm with this sampler (the paper's); '' to skip")
    ap.add_argument("--clips", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--out", default=str(REPO / "runs" / "ablation"))
    ap.add_argument("--smoke", action="store_true", help="seconds, tiny inputs (the test suite)")
    args = ap.parse_args()
    from _paths import benchmark_dir, copy_clips

    bench = benchmark_dir()
    args.source = args.source or str(bench / "train")
    args.val = args.val or str(bench / "val")
    out = Path(args.out).resolve()
    arms = args.arms.split(",")
    if args.smoke:
        out = Path(tempfile.mkdtemp(prefix="dheads-ablation-smoke-"))
        src = out / "source"
        copy_clips(bench / "train", src, 2)
        args.source, args.shards = str(src), str(out / "shards")
        args.steps, args.batch, args.warmup, args.clips, args.seconds = 2, 2, 0, 2, 0.4
        arms = ["paper"]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; arms: {', '.join(ARMS)}")
    import quality

    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"bench": "ablation", "steps": args.steps, "global_batch": 2 * args.batch,
                    "lr": args.lr, "smoke": args.smoke, "arms": {}}
    for name in arms:
        done = out / name / "quality.json"
        if done.exists():
            result["arms"][name] = json.loads(done.read_text())
            continue
        train_s = train_arm(name, ARMS[name], args, out)
        samplers = ["default"] + ([args.paper_sampler] if name == "paper" and args.paper_sampler
                                  and not args.smoke else [])
        q = quality.evaluate_checkpoint(str(out / "runs" / name / "export"), args.val, out / name,
                                        samplers, args.clips, args.seconds, smoke=args.smoke)
        row = {"overrides": ARMS[name], "train_s": train_s,
               "quality": {k: v for k, v in q["samplers"][0].items() if k != "all"},
               "other_samplers": [{k: v for k, v in r.items() if k != "all"} for r in q["samplers"][1:]]}
        for k in ("floor", "ceiling", "ceiling_model_res"):
            result[k] = q[k]
        done.write_text(json.dumps(row, indent=1))
        result["arms"][name] = row
        print(f"[ablation] {name}: " + json.dumps(row), flush=True)
    if "floor" not in result:  # every arm was done before: the references' rows from the last one
        q = json.loads((out / arms[-1] / "quality_full.json").read_text())
        for k in ("floor", "ceiling", "ceiling_model_res"):
            result[k] = q[k]
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
