"""Model figures as one JSON line: params and GFLOPs per preset, CPU seconds
of one forward (batch 1) for tiny and paper, generate() frames/s for tiny.

    python bench/model.py [--paper-repeats 1] [--frames 8] [--sampler ddim10] [--threads N] [--smoke]

`--smoke` (the test suite): the same code on tiny inputs in seconds (the
paper preset's forward timed at 32 px, 2 frames of DDIM 2); its figures are
not the benchmark's.

On a shared 2-core machine pass --threads 1: two torch threads spin-wait on
each other when the cores are oversubscribed and the figures become noise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from dheads.model.config import DiffusionConfig, SamplerConfig, SamplerKind
from dheads.model.diffusion import GaussianDiffusion
from dheads.model.flops import build_meta, count_flops, count_params, example_inputs
from dheads.model.samplers import make_sampler
from dheads.model.unet import DiffusedHeads
from dheads.model.video import generate
from dheads.platform.config import compose

PRESETS = ["tiny", "small", "paper"]
# Keys of the printed JSON (dots: nested); the suite checks every one in --smoke.
JSON_KEYS = ("machine.cpu", "machine.cores", "machine.torch_threads", "machine.torch",
             "presets.tiny.params", "presets.paper.params", "presets.paper.gflops_per_forward",
             "cpu_forward_s_batch1.tiny", "cpu_forward_s_batch1.paper",
             "generate_tiny.frames_per_s", "smoke")


def model_cfg(preset: str):
    return compose("info", [f"model={preset}"]).model


@torch.no_grad()
def forward_seconds(cfg, repeats: int) -> float:
    model = DiffusedHeads(cfg).eval()
    inputs = example_inputs(cfg, batch=1)
    x = torch.randn_like(inputs[0])
    model(x, *inputs[1:])  # warm-up (allocator, oneDNN kernels)
    start = time.perf_counter()
    for _ in range(repeats):
        model(x, *inputs[1:])
    return (time.perf_counter() - start) / repeats


def generate_fps(cfg, steps: str, n_frames: int) -> float:
    torch.manual_seed(0)
    model = DiffusedHeads(cfg).eval()
    diffusion = GaussianDiffusion(DiffusionConfig())
    sampler = make_sampler(diffusion, SamplerConfig(kind=SamplerKind.ddim, steps=steps, eta=0.0))
    identity = torch.rand(1, 3, cfg.image_size, cfg.image_size) * 2 - 1
    audio = torch.randn(1, n_frames * cfg.audio.samples_per_frame) * 0.1
    generate(model, sampler, identity, audio, n_frames=1)  # warm-up
    start = time.perf_counter()
    generate(model, sampler, identity, audio, n_frames=n_frames)
    return n_frames / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiny-repeats", type=int, default=5)
    ap.add_argument("--paper-repeats", type=int, default=1)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--sampler", default="ddim10")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    ap.add_argument("--smoke", action="store_true", help="seconds, tiny inputs (the test suite)")
    args = ap.parse_args()
    if args.smoke:
        args.tiny_repeats, args.paper_repeats, args.frames, args.sampler = 1, 1, 2, "ddim2"
    if args.threads:
        torch.set_num_threads(args.threads)
    cfgs = {p: model_cfg(p) for p in PRESETS}
    timed = dict(cfgs)
    if args.smoke:
        import dataclasses

        timed["paper"] = dataclasses.replace(cfgs["paper"], image_size=32)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "presets": {p: {"params": count_params(build_meta(c)),
                        "gflops_per_forward": round(count_flops(c) / 1e9, 3),
                        "image_size": c.image_size} for p, c in cfgs.items()},
        "cpu_forward_s_batch1": {
            "tiny": round(forward_seconds(timed["tiny"], args.tiny_repeats), 4),
            "paper": round(forward_seconds(timed["paper"], args.paper_repeats), 3)},
        "generate_tiny": {"sampler": args.sampler, "frames": args.frames,
                          "frames_per_s": round(generate_fps(cfgs["tiny"], args.sampler,
                                                             args.frames), 3)},
        "smoke": args.smoke,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
