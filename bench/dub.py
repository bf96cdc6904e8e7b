"""Dubbing throughput: continuous batching, sampler overhead, serve vs offline.

    python bench/dub.py [--image-size 32] [--threads 1] [--frames 2] [--items 4] [--smoke]

`--smoke` (the test suite): 16 px, 1 frame per segment, 2 items of 0.4 s, one repeat.

Prints one JSON line:
- fps_batch_{1,4,16}: frames/s of the `ContinuousBatcher` with that many
  concurrent segments (DDIM 10 steps); batching_gain_16 = fps_batch_16 / fps_batch_1;
- fps_per_cpu_s_batch_k, batching_gain_16_cpu: the same per CPU-second of the
  stepping thread (exact with --threads 1), which time-sharing with other
  processes on the host does not distort;
- sampler_overhead: sampling wall / Σ UNet forward time (batch 16 run);
- fps_ddim{10,20,50}: frames/s at that many DDIM steps (batch 4);
- serve_over_offline: wall per item through the HTTP job API (Ray Serve,
  one `DubbingModel` replica, decode/encode in Ray tasks) / the same items
  through `dub_items` (bench/_dubbing.py) in this process, same checkpoint,
  sampler, slot count and threads, same run; the engines' wall and CPU
  seconds per item and UNet calls per frame are reported beside it, every
  repeat's ratio, and the 1-minute load average at the start and the end
  (the machine may be shared).
The model is the `tiny` preset (random init: throughput does not depend on
the weights) at `--image-size`. CPU threads are pinned (`--threads`) so both
sides of each ratio run alike on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

JSON_KEYS = ("bench", "model", "image_size", "params", "threads", "device",
             "fps_batch_1", "fps_batch_4", "fps_batch_16", "fps_per_cpu_s_batch_16",
             "batching_gain_16", "batching_gain_16_cpu", "sampler_overhead",
             "fps_ddim10", "fps_ddim20", "fps_ddim50", "offline_s_per_item", "serve_s_per_item",
             "serve_over_offline", "engine_wall_s_per_item_offline", "engine_wall_s_per_item_serve",
             "unet_calls_per_frame_offline", "unet_calls_per_frame_serve",
             "load_avg_1m", "load_avg_1m_end", "smoke")

def _engine(ckpt: str, steps: int, batch: int, threads: int):
    from dheads.model.config import SamplerConfig
    from dheads.platform.config import DubConfig
    from dheads.platform.dubbing.engine import build_engine

    return build_engine(ckpt, SamplerConfig(steps=f"ddim{steps}"),
                        DubConfig(batch_size=batch, num_threads=threads))


def _segments(n: int, frames: int, size: int, seed: int = 0):
    from _dubbing import speech

    from dheads.jobs.synthface import still_face
    from dheads.platform.dubbing.segments import PAD_FRAMES, SAMPLES_PER_FRAME, Segment

    audio = speech((frames + 2 * PAD_FRAMES) / 25 + 0.1, seed=seed)
    need = (frames + 2 * PAD_FRAMES) * SAMPLES_PER_FRAME
    return [Segment(f"s{i}", 0, 1, 0, frames, still_face(i, size), audio[:need].copy(), frames, seed=i)
            for i in range(n)]


def sampling_fps(ckpt: str, size: int, batch: int, steps: int, frames: int, threads: int,
                 repeats: int) -> tuple[float, object]:
    """Best of `repeats` runs: frames/s of `batch` concurrent segments, and that run's stats."""
    from dheads.platform.dubbing.engine import EngineStats

    engine = _engine(ckpt, steps, batch, threads)
    engine.run(_segments(batch, 1, size))                    # warm-up (allocator, kernels)
    best = (0.0, None)
    for r in range(repeats):
        engine.stats = EngineStats()
        t0 = time.perf_counter()
        engine.run(_segments(batch, frames, size, seed=1 + r))
        best = max(best, (batch * frames / (time.perf_counter() - t0), engine.stats),
                   key=lambda x: x[0])
    return best


def _items(tmp: Path, n: int, seconds: float, out: str):
    from _dubbing import speech, write_wav
    from PIL import Image

    from dheads.jobs.synthface import still_face
    from dheads.platform.dubbing.items import DubItem

    items = []
    for i in range(n):
        Image.fromarray(still_face(i)).save(tmp / f"id{i}.png")
        write_wav(tmp / f"a{i}.wav", speech(seconds, seed=i))
        items.append(DubItem(item_id=f"item{i}", identity=str(tmp / f"id{i}.png"),
                             audio=str(tmp / f"a{i}.wav"), output=str(tmp / out / f"item{i}.mp4")))
    return items


def serve_vs_offline(ckpt: str, tmp: Path, n: int, seconds: float, batch: int, steps: int,
                     threads: int, repeats: int) -> dict:
    import ray
    import requests
    from ray import serve

    from _dubbing import dub_items, free_port

    from dheads.platform.config import DubConfig, compose
    from dheads.platform.dubbing.items import ItemStatus
    from dheads.serve import app

    items = _items(tmp, n, seconds, "offline")
    cfg = DubConfig(batch_size=batch, num_threads=threads)
    engine = _engine(ckpt, steps, batch, threads)
    dub_items(engine, items, cfg)                            # warm-up

    def offline_run() -> float:
        t = time.perf_counter()
        results = dub_items(engine, items, cfg)
        assert all(r.status == ItemStatus.succeeded for r in results), results
        return time.perf_counter() - t

    port = free_port()
    token = "bench-" + os.urandom(16).hex()   # the service refuses tokens under 32 characters
    scfg = compose("serve", [
        f"checkpoint={ckpt}", f"sampler.steps=ddim{steps}", f"serve.port={port}",
        f"serve.token={token}", "blocking=false", f'serve.allowed_uris=["{tmp}"]',
        f"serve.job_store={tmp}/jobstore", f"serve.output_dir={tmp}/served",
        f"dub.batch_size={batch}", f"dub.num_threads={threads}", f"serve.max_batch_size={batch}",
        "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1"])
    for attempt in range(3):  # a loaded host can miss Ray's fixed 30 s raylet start deadline
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for it
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        app.run(scfg)
        url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}

        def job(its):
            body = {"items": [{"identity": i.identity, "audio": i.audio, "item_id": i.item_id}
                              for i in its]}
            t = time.perf_counter()
            job_id = requests.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=60).json()["job_id"]
            while True:
                state = requests.get(f"{url}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
                if state["status"] in ("succeeded", "failed", "cancelled"):
                    assert state["status"] == "succeeded", state
                    return time.perf_counter() - t
                time.sleep(0.2)  # a client polling 5x a second

        model = serve.get_deployment_handle("DubbingModel", app_name=app.APP_NAME)

        def engine_times() -> tuple[float, float, int, int]:
            info = model.info.remote().result()
            return info["wall_s"], info["cpu_s"], info["steps"], info["frames"]

        job(items)  # warm-up with the same items: replica, routes, one media worker per parallel task
        # alternate the two on the shared machine; the best of each is the least disturbed
        offline, served, off_engine, srv_engine = [], [], [], []
        for _ in range(repeats):
            st = engine.stats
            w, c, k, f = st.wall_s, st.cpu_s, st.steps, st.frames
            offline.append(offline_run() / n)
            off_engine.append(((st.wall_s - w) / n, (st.cpu_s - c) / n, (st.steps - k) / (st.frames - f)))
            w, c, k, f = engine_times()
            served.append(job(items) / n)
            w2, c2, k2, f2 = engine_times()
            srv_engine.append(((w2 - w) / n, (c2 - c) / n, (k2 - k) / (f2 - f)))
    finally:
        serve.shutdown()
        ray.shutdown()
    best = min(range(repeats), key=lambda i: served[i] / offline[i])
    return {"offline_s_per_item": round(min(offline), 3), "serve_s_per_item": round(min(served), 3),
            "serve_over_offline": round(min(served) / min(offline), 3),
            "serve_over_offline_runs": [round(s / o, 3) for s, o in zip(served, offline)],
            # sampling wall and CPU time inside the engines: separates the engine's own
            # work from orchestration and from CPU contention on a shared machine
            "engine_wall_s_per_item_offline": round(off_engine[best][0], 3),
            "engine_wall_s_per_item_serve": round(srv_engine[best][0], 3),
            "engine_cpu_s_per_item_offline": round(off_engine[best][1], 3),
            "engine_cpu_s_per_item_serve": round(srv_engine[best][1], 3),
            # UNet calls per frame: how well each side filled the slot pool
            "unet_calls_per_frame_offline": round(off_engine[best][2], 3),
            "unet_calls_per_frame_serve": round(srv_engine[best][2], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frames", type=int, default=2, help="frames per segment in the fps runs")
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--item-seconds", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=2, help="runs per figure (best is kept)")
    ap.add_argument("--smoke", action="store_true", help="seconds, tiny inputs (the test suite)")
    args = ap.parse_args()
    if args.smoke:
        args.image_size, args.frames, args.items, args.item_seconds, args.repeats = 16, 1, 2, 0.4, 1

    import torch

    from _dubbing import tiny_checkpoint

    from dheads.model.flops import count_params

    tmp = Path(tempfile.mkdtemp(prefix="dheads-bench-dub-"))
    ckpt = tiny_checkpoint(tmp / "ckpt", image_size=args.image_size, channels=None)
    from dheads.model.checkpoint import load_checkpoint

    out: dict = {"bench": "dub", "model": "tiny", "image_size": args.image_size,
                 "params": count_params(load_checkpoint(ckpt).model), "threads": args.threads,
                 "device": "cuda" if torch.cuda.is_available() else "cpu",
                 "load_avg_1m": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(),
                 "smoke": args.smoke}
    for batch in (1, 4, 16):
        fps, stats = sampling_fps(ckpt, args.image_size, batch, 10, args.frames, args.threads,
                                  args.repeats)
        out[f"fps_batch_{batch}"] = round(fps, 2)
        # frames per CPU-second of the stepping thread: immune to time-sharing on a shared host
        out[f"fps_per_cpu_s_batch_{batch}"] = round(stats.frames / stats.cpu_s, 2)
        out[f"unet_calls_per_frame_batch_{batch}"] = round(stats.steps / stats.frames, 3)
        if batch == 16:
            out["sampler_overhead"] = round(stats.sampler_overhead, 4)
    out["batching_gain_16"] = round(out["fps_batch_16"] / out["fps_batch_1"], 2)
    out["batching_gain_16_cpu"] = round(out["fps_per_cpu_s_batch_16"] / out["fps_per_cpu_s_batch_1"], 2)
    for steps in (10, 20, 50):
        fps, _ = sampling_fps(ckpt, args.image_size, 4, steps, args.frames, args.threads, args.repeats)
        out[f"fps_ddim{steps}"] = round(fps, 2)
    out.update(serve_vs_offline(ckpt, tmp, args.items, args.item_seconds, 16, 10, args.threads,
                                args.repeats))
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
