"""Preprocess throughput vs plain PyAV decoding, for 1 and 2 CPUs.

    python bench/preprocess.py [--input ../shared/benchmark/train] [--cpus 1,2] [--limit N] [--smoke]

`--smoke` (the test suite): 4 clips, 1 CPU, one repeat.

Prints one JSON line: per CPU count, `clips_per_s` and `frames_per_s` of the
whole `dheads preprocess` job on a fresh local Ray with that many CPUs (Ray
start excluded, actor start included), `raw_decode_frames_per_s` (plain PyAV
decode + `to_ndarray("rgb24")` of the same files in that many processes,
measured in the same run, interleaved), `ratio_vs_raw_decode`,
`shard_bytes_per_clip` and `source_bytes_per_clip`. The process is pinned
to that many cores (`sched_setaffinity`, inherited by Ray and the pool); each
figure is the best of `--repeat` runs because the machine is shared.

Why the ratio can exceed 1: the job converts yuv420p to RGB with OpenCV
(`media.to_rgb`, ~6x faster than swscale's `to_ndarray("rgb24")`, which the
plain-decode baseline uses as the issue defines it) and converts only the
frames it keeps.

Measured 2026-11-25 on the shared 2-core machine (load average 5-17 from
other jobs), 400 clips / 47,154 frames, best of 2:

| CPUs | clips/s | frames/s | raw decode frames/s | ratio | shard B/clip | source B/clip |
|---|---|---|---|---|---|---|
| 1 | 22.4 | 2,642 | 12,216 | 0.22 | 316,868 | 55,436 |
| 2 | 42.3 | 4,989 | 4,233 | 1.18 | 316,868 | 55,436 |

With one pinned core, plain PyAV runs single-threaded and reaches ~12-13k
frames/s at 128 px; the job there pays per frame for the JPEG encode
(~38 µs) on top of the decode (~57 µs), plus audio, features and ~4 s of
actor start-up (torch import) on the same core: in-process on a quiet core
`process_clip` runs at 5.0-5.4k frames/s (0.40 of raw). With two cores the
plain decoder's frame/slice threads contend with everything else on the
machine and fall to ~4k frames/s, while the job (one single-threaded actor
per core) does not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JSON_KEYS = ("bench", "input", "clips_in", "runs.0.cpus", "runs.0.clips_per_s", "runs.0.frames_per_s",
             "runs.0.raw_decode_frames_per_s", "runs.0.ratio_vs_raw_decode",
             "runs.0.shard_bytes_per_clip", "runs.0.source_bytes_per_clip", "smoke")


def raw_decode(path: str) -> int:
    import av

    n = 0
    with av.open(path) as c:
        for frame in c.decode(video=0):
            frame.to_ndarray(format="rgb24")
            n += 1
    return n


def raw_decode_fps(files: list[str], cpus: int) -> float:
    t0 = time.perf_counter()
    if cpus == 1:
        frames = sum(raw_decode(f) for f in files)
    else:
        with ProcessPoolExecutor(cpus) as pool:
            frames = sum(pool.map(raw_decode, files, chunksize=8))
    return frames / (time.perf_counter() - t0)


def pipeline(input_dir: str, files: list[str], cpus: int) -> dict:
    import ray

    from dheads.jobs import preprocess as pp
    from dheads.platform.config import compose

    with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as out:
        if len(files) < len(list(Path(input_dir).glob("*.mp4"))):   # --limit: link a subset
            for f in files:
                for g in (Path(f), Path(f).with_suffix(".json")):
                    if g.exists():
                        (Path(src) / g.name).symlink_to(g)
            input_dir = src
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            cfg = compose("preprocess", [f"input={input_dir}", f"output={out}", f"data.workers={cpus}"])
            t0 = time.perf_counter()
            s = pp.preprocess(cfg, progress=False)
            wall = time.perf_counter() - t0
        finally:
            ray.shutdown()
        shard_bytes = sum(p.stat().st_size for p in Path(out).glob("shard-*.parquet"))
    return {"clips": s.ok, "failed": s.failed, "frames": s.frames, "wall_s": round(wall, 2),
            "clips_per_s": round(s.ok / wall, 2), "frames_per_s": round(s.frames / wall, 1),
            "shard_bytes_per_clip": round(shard_bytes / max(s.ok, 1))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default=None, help="default: the benchmark's train/")
    ap.add_argument("--cpus", default="1,2")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="best of N (the machine is shared)")
    ap.add_argument("--smoke", action="store_true", help="seconds, tiny inputs (the test suite)")
    args = ap.parse_args()
    if args.smoke:
        args.limit, args.cpus, args.repeat = 4, "1", 1
    if args.input is None:
        from _paths import benchmark_dir

        args.input = str(benchmark_dir() / "train")
    files = sorted(str(p) for p in Path(args.input).glob("*.mp4"))
    if args.limit:
        files = files[: args.limit]
    if not files:
        sys.exit(f"no mp4 under {args.input}")
    source_bytes = sum(Path(f).stat().st_size for f in files) / len(files)
    result = {"bench": "preprocess", "input": args.input, "clips_in": len(files), "runs": [],
              "smoke": args.smoke}
    all_cpus = sorted(os.sched_getaffinity(0))
    for cpus in (int(c) for c in args.cpus.split(",")):
        # Pin the driver; the raw-decode pool and every Ray process inherit it.
        os.sched_setaffinity(0, all_cpus[:cpus])
        raw, run = 0.0, None
        for _ in range(args.repeat):   # interleaved, so both see the same machine load
            raw = max(raw, raw_decode_fps(files, cpus))
            r = pipeline(args.input, files, cpus)
            run = r if run is None or r["frames_per_s"] > run["frames_per_s"] else run
        os.sched_setaffinity(0, all_cpus)
        result["runs"].append({"cpus": cpus, **run, "raw_decode_frames_per_s": round(raw, 1),
                               "ratio_vs_raw_decode": round(run["frames_per_s"] / raw, 3),
                               "source_bytes_per_clip": round(source_bytes)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
