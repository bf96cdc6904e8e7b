"""GPU figures of the paper preset as one JSON object: training steps (FSDP2
on one rank and unsharded, eager and torch.compile, each at the largest batch
that fits) and sampling through the frame loop (1-256 clips advancing
together, DDIM 20 and respaced 100, eager / torch.compile / CUDA graphs), with
model FLOPs utilisation against the bf16 matmul peak measured here first.

    PYTHONPATH=<repo> python bench/gpu.py --out DIR [--budget-s 480] [--sections ...]
    python bench/gpu.py --smoke        # CPU, tiny preset, seconds (the test suite)

Needs torch and numpy besides the repo: no Ray, Hydra or PyAV on its import
path, and no installed dheads (the `dheads.*` names are mapped onto the repo
folders as pyproject.toml maps them, when they do not import already).

Precision (bf16 where it is computed, fp32 where it is kept):
- training, unsharded: fp32 parameters, forward and loss under bf16 autocast;
- training, FSDP2 (`dheads.platform.fsdp.shard_model`, world size 1, NCCL;
  gloo on CPU): the project's own policy, bf16 parameters and compute, fp32
  sharded master weights, fp32 gradient reduction (on CPU the policy is fp32,
  so the step runs under bf16 autocast there);
- sampling: bf16 UNet weights, called under the frame loop's own bf16
  autocast (`FrameLoop(autocast=torch.bfloat16)`); its state (x_t, motion
  frames) and the sampler math stay fp32.
A training step is forward + `GaussianDiffusion.training_losses` + backward +
AdamW; its FLOPs are 3x the forward's (`count_flops`). Sampling MFU counts one
forward per clip and denoising step. `unet_frames_per_s` is the UNet alone on
the frame loop's inputs: what a loop without host-side overhead would reach.

Budget: every section, batch trial and sampling cell checks the time left and
is skipped (with the reason) rather than overrun; <out>/gpu.json is rewritten
after every trial and cell, so a kill still leaves figures, and a SIGALRM at
the budget plus `--grace-s` stops whatever runs. The batch that fits is found
by doubling until torch.cuda.OutOfMemoryError; torch.compile variants start
at the eager variant's batch (halving on OOM) instead of recompiling per size.

`--smoke`: the same code on CPU with the tiny preset at 32 px, batches of 1-2,
2 steps, 2-step samplers (a frame finishes), torch.compile with the `eager`
backend (Dynamo only: inductor's C++ build takes minutes on 2 cores) and no
CUDA graphs (CUDA only). Its figures mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import importlib.machinery
import json
import logging
import os
import platform
import signal
import socket
import sys
import time
import types
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def map_dheads_namespace(repo: Path = REPO) -> str:
    """Make `dheads.model` / `dheads.platform` importable from the repo folders
    when no installed dheads provides them (pyproject's package-dir mapping,
    done by hand: the GPU machine has the repo on PYTHONPATH, no install).
    Returns where `dheads.model` comes from."""
    try:
        import dheads.model
        import dheads.platform  # noqa: F401
    except ImportError:
        root = types.ModuleType("dheads")
        root.__path__ = []
        root.__spec__ = importlib.machinery.ModuleSpec("dheads", None, is_package=True)
        root.__spec__.submodule_search_locations = []
        sys.modules["dheads"] = root
        for name in ("model", "platform"):
            full = f"dheads.{name}"
            mod = types.ModuleType(full)
            mod.__path__ = [str(repo / name)]
            mod.__spec__ = importlib.machinery.ModuleSpec(full, None, is_package=True)
            mod.__spec__.submodule_search_locations = mod.__path__
            sys.modules[full] = mod
            setattr(root, name, mod)
    import dheads.model
    return list(dheads.model.__path__)[0]


DHEADS_FROM = map_dheads_namespace()

import torch.distributed as dist  # noqa: E402

from dheads.model.audio import feature_shape  # noqa: E402
from dheads.model.config import (AudioConfig, DiffusionConfig, ModelConfig, MotionConfig,  # noqa: E402
                                 SamplerConfig, SamplerKind)
from dheads.model.diffusion import GaussianDiffusion  # noqa: E402
from dheads.model.flops import build_meta, count_flops, count_params  # noqa: E402
from dheads.model.frameloop import Clip, FrameLoop  # noqa: E402
from dheads.model.samplers import make_sampler  # noqa: E402
from dheads.model.unet import AttentionBlock, DiffusedHeads  # noqa: E402
from dheads.platform.fsdp import mixed_precision, shard_model  # noqa: E402
from dheads.platform.peak import measure_matmul_flops  # noqa: E402

# configs/model/{paper,tiny}.yaml as typed configs (tests/bench/test_gpu.py
# checks they equal the Hydra composition, so the two cannot drift).
PRESETS = {
    "paper": ModelConfig(preset="paper", image_size=128, model_channels=256, channel_mult=[1, 2, 3],
                         num_res_blocks=2, attention_resolutions=[], num_head_channels=64,
                         num_heads=4, dropout=0.1, num_groups=32,
                         audio=AudioConfig(n_mels=80, embed_dim=256)),
    "tiny": ModelConfig(preset="tiny", image_size=64, model_channels=32, channel_mult=[1, 2, 3],
                        num_res_blocks=1, attention_resolutions=[], num_head_channels=32,
                        num_groups=16, audio=AudioConfig(n_mels=40, embed_dim=128),
                        motion=MotionConfig(train_noise_max=0.5, infer_noise=0.15, embed_noise=True,
                                            stabilize_every=1, pose_warp=True, eye_embed=True)),
}
SAMPLERS = {"ddim": SamplerConfig(kind=SamplerKind.ddim, steps="trailing20"),
            "respaced": SamplerConfig(kind=SamplerKind.respaced, steps="100", eta=1.0)}
SMOKE_STEPS = {"ddim": "trailing2", "respaced": "2"}
SECTIONS = ("sample_eager", "train_eager", "sample_compile", "sample_cudagraphs", "train_compile")
# seconds a section needs left to start (cold compiles of the paper UNet take minutes)
MIN_LEFT_S = {"sample_eager": 20, "train_eager": 20, "sample_compile": 90,
              "sample_cudagraphs": 60, "train_compile": 120}
TRAIN_MODES, TRAIN_VARIANTS = ("eager", "compile"), ("plain", "fsdp")
SAMPLE_MODES = ("eager", "compile", "cudagraphs")

# Keys of the printed JSON (dots: nested); the suite checks every one in --smoke.
# Cells exist in every run ("status" says done / skipped / error / oom, "reason" why).
TRAIN_KEYS = ("status", "batch", "step_s", "samples_per_s", "mfu", "peak_mem_gib")
SAMPLE_KEYS = ("status", "frames_per_s", "mfu", "unet_frames_per_s", "loop_overhead", "peak_mem_gib")
JSON_KEYS = (("smoke", "complete", "device.name", "device.type", "torch", "preset", "image_size",
              "params", "gflops_per_forward", "peak_tflops", "budget_s", "elapsed_s",
              "sections.sample_eager.status", "sections.train_compile.status",
              "goals.sampling_mfu_at_16_clips.value", "goals.ddim_frames_per_s.value",
              "goals.training_mfu.value", "diagnostics.fused_attention")
             + tuple(f"training.{m}.{v}.{k}" for m in ("eager", "compile") for v in ("plain", "fsdp")
                     for k in TRAIN_KEYS)
             + tuple(f"sampling.{m}.{s}.1.{k}" for m in ("eager", "compile", "cudagraphs")
                     for s in ("ddim", "respaced") for k in SAMPLE_KEYS))

log = logging.getLogger("bench.gpu")
GIB = 2.0 ** 30


class BudgetExceeded(BaseException):
    """Raised by the SIGALRM handler: the run is past its budget + grace."""


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = float(seconds), time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


class Report:
    """The JSON document, rewritten to <out>/gpu.json after every change."""

    def __init__(self, out: Path, doc: dict, budget: Budget):
        self.out, self.doc, self.budget = out, doc, budget

    def save(self) -> None:
        self.doc["elapsed_s"] = round(self.budget.elapsed(), 1)
        tmp = self.out / ".gpu.json.tmp"
        tmp.write_text(json.dumps(self.doc, indent=1))
        os.replace(tmp, self.out / "gpu.json")


# ---------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device):
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def dynamo_stats(since: dict | None = None) -> dict:
    """Dynamo's graph and graph-break counts (since an earlier reading)."""
    try:
        from torch._dynamo.utils import counters
        now = {"unique_graphs": int(counters["stats"]["unique_graphs"]),
               "graph_breaks": int(sum(counters["graph_break"].values()))}
    except Exception:  # private API: figures only, never a failure
        return {}
    return {k: v - (since or {}).get(k, 0) for k, v in now.items()}


def host_syncs(fn, device: torch.device) -> dict | None:
    """Where `fn()` makes the host wait for the GPU: {"file:line": count},
    from torch.cuda.set_sync_debug_mode's warnings (None off CUDA)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)

    def site(w) -> str:
        path = Path(w.filename)
        return f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{w.lineno}"
    return dict(Counter(site(w) for w in caught if "synchroniz" in str(w.message)))


def fused_attention_check(cfg: ModelConfig, device: torch.device) -> str:
    """Whether the middle block's attention runs on a fused SDPA kernel (flash /
    memory-efficient / cuDNN) with the math fallback disabled: "ok" or why not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ch = cfg.model_channels * cfg.channel_mult[-1]
    heads = ch // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads
    side = cfg.image_size // 2 ** (len(cfg.channel_mult) - 1)
    block = AttentionBlock(ch, heads, cfg.num_groups).to(device, torch.bfloat16)
    x = torch.randn(2, ch, side, side, device=device, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                              SDPBackend.CUDNN_ATTENTION]):
                block(x)
            return "ok"
        except RuntimeError as e:
            why = [str(w.message).split(" (Triggered")[0] for w in caught if "stride" in str(w.message)]
            return "; ".join(why[:1] or [describe(e)])


def free_port() -> int:
    """bench/_dubbing.py's helper, written again: this file runs alone on the
    device machine, which has no Ray, Hydra or PyAV to import `_dubbing` with."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(device: torch.device) -> str:
    """World size 1 over env:// on 127.0.0.1: NCCL on a GPU, gloo on CPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                          RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(backend, init_method="env://", rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
    return backend


def bf16_autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, torch.bfloat16, enabled=enabled)


def compile_units(model: DiffusedHeads) -> list[nn.Module]:
    """The modules `shard_model` makes FSDP units (children of ModuleList blocks)."""
    units = []
    for block in model.blocks():
        units.extend(block if isinstance(block, nn.ModuleList) else [block])
    return units


# -------------------------------------------------------------- training
def fake_batch(cfg: ModelConfig, batch: int, device: torch.device) -> dict:
    s = cfg.image_size
    img = lambda c: torch.rand(batch, c, s, s, device=device) * 2 - 1  # noqa: E731
    box = torch.tensor([s * 0.3, s * 0.6, s * 0.7, s * 0.85], device=device).expand(batch, 4)
    return {"target": img(3), "identity": img(3), "motion": img(2),
            "audio": torch.randn(batch, cfg.audio.window_frames, *feature_shape(cfg.audio),
                                 device=device), "mouth_box": box.contiguous()}


def train_trial(model, optimizer, diffusion, cfg, batch, device, autocast, args) -> dict:
    """Warm-up steps, then `args.train_steps` timed steps (fewer past
    `args.trial_s`) of forward + loss + backward + AdamW at `batch`."""
    data = fake_batch(cfg, batch, device)
    cond = {k: data[k] for k in ("identity", "motion", "audio")}

    def step() -> None:
        with bf16_autocast(device, autocast):
            loss = diffusion.training_losses(model, data["target"], cond, data["mouth_box"])["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(args.train_warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while n < args.train_steps and (n == 0 or time.perf_counter() - t0 < args.trial_s):
        step()
        n += 1
    sync(device)
    step_s = (time.perf_counter() - t0) / n
    return {"batch": batch, "step_s": round(step_s, 5), "samples_per_s": round(batch / step_s, 3),
            "warmup_s": round(warmup_s, 2), "timed_steps": n, "peak_mem_gib": peak_gib(device),
            "host_syncs_per_step": host_syncs(step, device)}


def search_batches(trial, sizes: list[int], stop_at: str, may_start) -> tuple[dict | None, list]:
    """Run `trial(batch)` over `sizes` in order. `stop_at="oom"`: keep going
    while it fits (doubling), the result is the last that fitted;
    `stop_at="fit"`: stop at the first that fits (halving). `may_start(last)`
    says whether time is left for the next trial. Returns (result, tried)."""
    best, tried = None, []
    for b in sizes:
        if not may_start(best):
            tried.append({"batch": b, "status": "skipped", "reason": "time"})
            break
        failed = None
        try:
            result = trial(b)
        except torch.cuda.OutOfMemoryError as e:
            failed = ("oom", describe(e))
        except Exception as e:  # keep what the earlier trials measured
            log.exception("batch %d", b)
            failed = ("error", describe(e))
        if failed is not None:  # outside the except block: its frames (and tensors) are gone
            tried.append({"batch": b, "status": failed[0], "reason": failed[1]})
            if stop_at == "oom" or failed[0] == "error":
                break
            continue
        tried.append({**result, "status": "done"})
        best = result
        if stop_at == "fit":
            break
    return best, tried


def train_variant(ctx, mode: str, variant: str) -> dict:
    args, cfg, device = ctx["args"], ctx["cfg"], ctx["device"]
    diffusion = GaussianDiffusion(DiffusionConfig())
    torch.manual_seed(0)
    model = DiffusedHeads(cfg).to(device).train()
    autocast = True
    if mode == "compile":
        torch._dynamo.reset()
        dynamo0 = dynamo_stats()
        for unit in (compile_units(model) if variant == "fsdp" else [model]):
            unit.compile(backend=args.compile_backend)
    if variant == "fsdp":
        backend = ensure_process_group(device)
        shard_model(model, device)
        autocast = mixed_precision(device).param_dtype is None  # fp32 policy (CPU): autocast
        precision = f"FSDP2 {backend} world 1, " + (
            "bf16 autocast over fp32 params" if autocast else "bf16 params, fp32 master + reduce")
    else:
        precision = "fp32 params, bf16 autocast"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    start = time.monotonic()

    def trial(b: int) -> dict:
        try:
            return train_trial(model, optimizer, diffusion, cfg, b, device, autocast, args)
        finally:
            optimizer.zero_grad(set_to_none=True)

    def may_start(last) -> bool:
        guess = 2 * (args.train_warmup + args.train_steps) * (last["step_s"] if last else 1.0)
        spent = time.monotonic() - start
        return ctx["budget"].left() > guess + 10 and (last is None or spent + guess < args.variant_s)

    # compiled: from the eager variant's batch down (each new size is a recompile)
    top = 0 if mode == "eager" else (args.compile_train_batch
                                     or ctx["doc"]["training"]["eager"][variant].get("batch") or 0)
    if top:
        source = "--compile-train-batch" if args.compile_train_batch else "eager variant's batch"
        sizes = [top >> i for i in range(top.bit_length())]
        best, tried = search_batches(trial, sizes, "fit", lambda last: ctx["budget"].left() > 30)
    else:
        source = "doubling until out of memory"
        sizes = [args.train_batch_start * 2 ** i for i in range(32)
                 if args.train_batch_start * 2 ** i <= args.max_train_batch]
        best, tried = search_batches(trial, sizes, "oom", may_start)
    out = {"precision": precision, "batch_source": source, "tried": tried,
           "compile_backend": args.compile_backend if mode == "compile" else None,
           **({"dynamo": dynamo_stats(dynamo0)} if mode == "compile" else {})}
    del model, optimizer
    if mode == "compile":
        torch._dynamo.reset()
    if best is None:
        return {**out, "status": tried[-1]["status"] if tried else "skipped",
                "reason": tried[-1].get("reason") if tried else "no batch tried"}
    ended = {"oom": "oom", "skipped": "time", "error": "error"}.get(tried[-1]["status"], "max_train_batch")
    flops = 3 * ctx["flops_per_forward"] * best["samples_per_s"]
    return {**out, **best, "status": "done", "mfu": round(flops / ctx["peak_flops"], 4),
            "batch_limit": source if top else ended}


# -------------------------------------------------------------- sampling
def sample_cell(ctx, model: DiffusedHeads, sampler, clips: int, mode: str) -> dict:
    """`clips` clips admitted together into one FrameLoop; warm-up steps,
    then up to one whole frame (DDIM) or `sample_cell_s` of steps, timed."""
    args, cfg, device = ctx["args"], ctx["cfg"], ctx["device"]
    mark = torch.compiler.cudagraph_mark_step_begin if mode == "cudagraphs" else (lambda: None)
    warmup = args.sample_warmup + (2 if mode != "eager" else 0)  # compile; cudagraph warm-up + record
    timed_max = sampler.num_steps  # one whole frame: its finishing step is inside the window
    n_frames = (warmup + timed_max) // sampler.num_steps + 2
    g = torch.Generator().manual_seed(clips)
    s = cfg.image_size
    identity = torch.rand(clips, 3, s, s, generator=g) * 2 - 1
    feats = torch.randn(clips, n_frames, *feature_shape(cfg.audio), generator=g)
    reset_peak(device)
    # bf16 weights; the loop's own autocast option (its state stays fp32: a bf16
    # UNet called without autocast on fp32 inputs fails, see docs/benchmarks.md)
    loop = FrameLoop(model, sampler, capacity=clips, device=device, autocast=torch.bfloat16)
    for i in range(clips):
        loop.admit(Clip(i, identity[i], feats[i], n_frames, seed=i))
    t0 = time.perf_counter()
    for _ in range(warmup):
        mark()
        loop.step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    done0, n, t0 = loop.frames_done, 0, time.perf_counter()
    while n < timed_max and (n == 0 or time.perf_counter() - t0 < args.sample_cell_s):
        mark()
        loop.step()
        n += 1
    sync(device)
    loop_s = (time.perf_counter() - t0) / n
    frames_in_window = loop.frames_done - done0
    # the UNet alone on the loop's own inputs, as many calls (or half the time)
    # (built as FrameLoop.step builds them, every slot busy: views of its state
    # and an inference tensor `t`; Dynamo guards on both, anything else recompiles)
    with torch.inference_mode(), bf16_autocast(device):
        every = slice(None)
        inputs = (loop.x_t[every], sampler.model_timesteps(loop.step_idx[every].clone()),
                  loop.identity[every], loop.motion_in[every], loop.audio[every])
        mark()
        model(*inputs)
        sync(device)
        m, t0 = 0, time.perf_counter()
        while m < n and (m == 0 or time.perf_counter() - t0 < args.sample_cell_s / 2):
            mark()
            model(*inputs)
            m += 1
        sync(device)
    unet_s = (time.perf_counter() - t0) / m
    syncs = host_syncs(lambda: (mark(), loop.step()), device)
    fps = clips / sampler.num_steps / loop_s
    return {"status": "done", "frames_per_s": round(fps, 4),
            "mfu": round(fps * sampler.num_steps * ctx["flops_per_forward"] / ctx["peak_flops"], 4),
            "unet_frames_per_s": round(clips / sampler.num_steps / unet_s, 4),
            "loop_overhead": round(1 - unet_s / loop_s, 4), "step_s": round(loop_s, 6),
            "unet_s": round(unet_s, 6), "timed_steps": n, "frames_in_window": frames_in_window,
            "warmup_s": round(warmup_s, 2), "peak_mem_gib": peak_gib(device),
            "host_syncs_per_step": syncs}


def sample_section(ctx, mode: str) -> None:
    args, cfg, device, doc = ctx["args"], ctx["cfg"], ctx["device"], ctx["doc"]
    if mode == "cudagraphs" and device.type != "cuda":
        raise SkipSection("CUDA graphs need a CUDA device")
    torch.manual_seed(0)
    unet = DiffusedHeads(cfg).to(device, torch.bfloat16).eval()
    if mode != "eager":
        torch._dynamo.reset()
        dynamo0 = dynamo_stats()
        kw = {"mode": "reduce-overhead"} if mode == "cudagraphs" else {}
        unet.compile(backend=args.compile_backend if mode == "compile" else "inductor", **kw)
    diffusion = GaussianDiffusion(DiffusionConfig())
    for name, scfg in SAMPLERS.items():
        if args.smoke:
            scfg = replace(scfg, steps=SMOKE_STEPS[name])
        sampler = make_sampler(diffusion, scfg)
        cells = doc["sampling"][mode][name]
        cells["sampler"] = {"kind": scfg.kind.value, "steps": scfg.steps, "eta": scfg.eta,
                            "num_steps": sampler.num_steps}
        for clips in args.clips:
            key = str(clips)
            if ctx["budget"].left() < 10 + args.sample_cell_s * 2:
                cells[key] = {"status": "skipped", "reason": f"budget: {ctx['budget'].left():.0f} s left"}
                continue
            log.info("sampling %s %s %d clips", mode, name, clips)
            try:
                cells[key] = sample_cell(ctx, unet, sampler, clips, mode)
            except torch.cuda.OutOfMemoryError as e:
                cells[key] = {"status": "oom", "reason": describe(e)}
            except Exception as e:  # a variant that breaks must not take the others with it
                log.exception("sampling %s %s %d clips", mode, name, clips)
                cells[key] = {"status": "error", "reason": describe(e)}
            free_memory(device)
            log.info("  %s", json.dumps(cells[key]))
            ctx["report"].save()
    if mode != "eager":
        doc["sampling"][mode]["dynamo"] = dynamo_stats(dynamo0)
        del unet
        torch._dynamo.reset()  # frees CUDA-graph pools before the next section


def train_section(ctx, mode: str) -> None:
    doc = ctx["doc"]
    for variant in TRAIN_VARIANTS:
        if ctx["budget"].left() < (MIN_LEFT_S[f"train_{mode}"] if not ctx["args"].smoke else 0):
            doc["training"][mode][variant] = {"status": "skipped",
                                              "reason": f"budget: {ctx['budget'].left():.0f} s left"}
            continue
        log.info("training %s %s", mode, variant)
        try:
            doc["training"][mode][variant] = train_variant(ctx, mode, variant)
        except Exception as e:
            log.exception("training %s %s", mode, variant)
            doc["training"][mode][variant] = {"status": "error", "reason": describe(e)}
        free_memory(ctx["device"])
        log.info("  %s", json.dumps(doc["training"][mode][variant]))
        ctx["report"].save()


class SkipSection(Exception):
    pass


def section_cells(doc: dict, name: str) -> list[dict]:
    kind, mode = name.split("_", 1)
    if kind == "train":
        return list(doc["training"][mode].values())
    return [c for by in doc["sampling"][mode].values() for key, c in by.items() if key.isdigit()]


def skip_section(doc: dict, name: str, reason: str) -> None:
    doc["sections"][name] = {"status": "skipped", "reason": reason}
    for cell in section_cells(doc, name):
        if cell.get("status") == "not run":
            cell.update(status="skipped", reason=reason)


def run_section(ctx, name: str) -> None:
    doc, budget, args = ctx["doc"], ctx["budget"], ctx["args"]
    need = 0 if args.smoke else MIN_LEFT_S[name]
    if name not in args.sections:
        return skip_section(doc, name, "not in --sections")
    if budget.left() < need:
        return skip_section(doc, name, f"budget: {budget.left():.0f} s left, needs ~{need} s")
    t0 = time.monotonic()
    doc["sections"][name] = {"status": "running"}
    ctx["report"].save()
    try:
        kind, mode = name.split("_", 1)
        (train_section if kind == "train" else sample_section)(ctx, mode)
        doc["sections"][name] = {"status": "done"}
    except SkipSection as e:
        skip_section(doc, name, str(e))
    except Exception as e:
        log.exception(name)
        doc["sections"][name] = {"status": "error", "reason": describe(e)}
    doc["sections"][name]["seconds"] = round(time.monotonic() - t0, 1)
    free_memory(ctx["device"])
    ctx["report"].save()


# ------------------------------------------------------------------ report
def empty_doc(args, cfg, device) -> dict:
    train_cell = {k: None for k in TRAIN_KEYS} | {"status": "not run"}
    sample_cell_ = {k: None for k in SAMPLE_KEYS} | {"status": "not run"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = {"type": "cuda", "name": props.name, "memory_gib": round(props.total_memory / GIB, 1),
               "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    else:
        dev = {"type": "cpu", "name": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    return {
        "smoke": bool(args.smoke), "complete": False, "device": dev, "torch": torch.__version__,
        "python": platform.python_version(), "dheads_from": DHEADS_FROM, "preset": cfg.preset,
        "image_size": cfg.image_size, "params": None, "gflops_per_forward": None,
        "peak_tflops": None, "peak": "bf16 square matmuls, measured here (dheads.platform.peak)",
        "budget_s": args.budget_s, "elapsed_s": 0.0, "cudnn_benchmark": bool(args.cudnn_benchmark),
        "compile_backend": args.compile_backend, "clips": args.clips,
        "sections": {name: {"status": "not run"} for name in SECTIONS},
        "training": {m: {v: dict(train_cell) for v in TRAIN_VARIANTS} for m in TRAIN_MODES},
        "sampling": {m: {s: {str(c): dict(sample_cell_) for c in ("1", *map(str, args.clips))}
                         for s in SAMPLERS} for m in SAMPLE_MODES},
        "goals": {},
        # evidence for the GPU-path problems of model/ (see docs/benchmarks.md); the
        # per-step host syncs are in every timed cell as "host_syncs_per_step"
        "diagnostics": {"fused_attention": None},
    }


def goals(doc: dict) -> dict:
    """How far the figures are from the issue's goals (sampling MFU >= 50 % at
    >= 16 clips, i.e. >= 20 frames/s at DDIM 20; training MFU >= 40 %)."""
    def best(cells):
        cells = [(v, where) for v, where in cells if isinstance(v, (int, float))]
        return max(cells) if cells else (None, None)

    sample = [(c.get(key), f"{m}/{s}/{n}") for key in ("mfu",) for m, by in doc["sampling"].items()
              for s in ("ddim", "respaced") for n, c in by[s].items()
              if n.isdigit() and int(n) >= 16]
    ddim = [(c.get("frames_per_s"), f"{m}/ddim/{n}") for m, by in doc["sampling"].items()
            for n, c in by["ddim"].items() if n.isdigit()]
    train = [(c.get("mfu"), f"{m}/{v}") for m, by in doc["training"].items() for v, c in by.items()]
    out = {}
    for name, cells, target in (("sampling_mfu_at_16_clips", sample, 0.5),
                                ("ddim_frames_per_s", ddim, 20.0), ("training_mfu", train, 0.4)):
        value, where = best(cells)
        out[name] = {"value": value, "at": where, "target": target,
                     "met": None if value is None else value >= target}
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_gpu"), help="folder for gpu.json, gpu.log")
    ap.add_argument("--budget-s", type=float, default=480.0, help="total time budget (s)")
    ap.add_argument("--grace-s", type=float, default=30.0, help="SIGALRM this long past the budget")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, run in this order")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default paper (smoke: tiny)")
    ap.add_argument("--image-size", type=int, default=0, help="override the preset's (smoke: 32)")
    ap.add_argument("--device", default=None, help="default cuda when available (smoke: cpu)")
    ap.add_argument("--clips", default=None, help="clip counts, default 1,16,64,256 (smoke: 1)")
    ap.add_argument("--train-batch-start", type=int, default=1)
    ap.add_argument("--max-train-batch", type=int, default=1024)
    ap.add_argument("--compile-train-batch", type=int, default=0,
                    help="torch.compile training batch (0: the eager variant's, else doubling)")
    ap.add_argument("--train-warmup", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=5, help="timed steps per batch trial")
    ap.add_argument("--trial-s", type=float, default=10.0, help="cap on the timed steps of a trial")
    ap.add_argument("--variant-s", type=float, default=60.0, help="no new trial past this (s)")
    ap.add_argument("--sample-warmup", type=int, default=2)
    ap.add_argument("--sample-cell-s", type=float, default=5.0, help="cap on a cell's timed steps")
    ap.add_argument("--compile-backend", default=None, help="default inductor (smoke: eager)")
    ap.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false")
    ap.add_argument("--threads", type=int, default=0, help="CPU torch threads (smoke: 1)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, seconds (the test suite)")
    args = ap.parse_args(argv)
    smoke = args.smoke
    args.preset = args.preset or ("tiny" if smoke else "paper")
    args.image_size = args.image_size or (32 if smoke else 0)
    args.device = args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    args.clips = [int(c) for c in (args.clips or ("1" if smoke else "1,16,64,256")).split(",")]
    args.compile_backend = args.compile_backend or ("eager" if smoke else "inductor")
    args.threads = args.threads or (1 if smoke else 0)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {','.join(SECTIONS)}")
    if smoke:
        args.max_train_batch, args.train_warmup, args.train_steps = 2, 1, 1
        args.sample_warmup, args.sample_cell_s = 1, 2.0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr),
                                  logging.FileHandler(args.out / "gpu.log", mode="w")])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", 0 if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch._dynamo.config.recompile_limit = 64  # per-unit compiles share Module._call_impl's cache
    cfg = PRESETS[args.preset]
    if args.image_size:
        cfg = replace(cfg, image_size=args.image_size)
    budget = Budget(args.budget_s)
    doc = empty_doc(args, cfg, device)
    report = Report(args.out, doc, budget)
    ctx = {"args": args, "cfg": cfg, "device": device, "doc": doc, "budget": budget, "report": report}

    def on_alarm(*_):
        raise BudgetExceeded(f"past the budget of {args.budget_s:.0f} s + {args.grace_s:.0f} s grace")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.budget_s + args.grace_s)))
    try:
        doc["params"] = count_params(build_meta(cfg))
        ctx["flops_per_forward"] = count_flops(cfg, batch=1)
        doc["gflops_per_forward"] = round(ctx["flops_per_forward"] / 1e9, 3)
        doc["train_gflops_per_sample"] = round(3 * ctx["flops_per_forward"] / 1e9, 3)
        # bf16 where the device computes it natively; a CPU without AVX512-BF16/AMX
        # emulates bf16 matmuls at a few GFLOP/s (minutes for one 1024^2 product)
        from dheads.model.precision import cpu_bf16_supported

        peak_dtype = torch.bfloat16 if device.type == "cuda" or cpu_bf16_supported() else torch.float32
        ctx["peak_flops"] = measure_matmul_flops(device, peak_dtype, seconds=0.3 if args.smoke else 2.0)
        doc["peak_tflops"] = round(ctx["peak_flops"] / 1e12, 3)
        doc["peak"] = f"{str(peak_dtype).removeprefix('torch.')} square matmuls, measured here (dheads.platform.peak)"
        doc["diagnostics"]["fused_attention"] = fused_attention_check(cfg, device)
        log.info("%s: %s params, %.1f GFLOPs/forward, peak %.1f TFLOP/s %s", cfg.preset,
                 doc["params"], doc["gflops_per_forward"], doc["peak_tflops"], peak_dtype)
        report.save()
        for name in [s for s in args.sections] + [s for s in SECTIONS if s not in args.sections]:
            run_section(ctx, name)
        doc["complete"] = True
    except BudgetExceeded as e:
        log.error("%s", e)
        doc["stopped"] = str(e)
        for name, sec in doc["sections"].items():
            if sec.get("status") == "running":
                sec.update(status="killed", reason=str(e))
    finally:
        signal.alarm(0)
        if dist.is_initialized():
            dist.destroy_process_group()
    doc["goals"] = goals(doc)
    report.save()
    print(json.dumps(doc), flush=True)
    return doc


if __name__ == "__main__":
    main()
