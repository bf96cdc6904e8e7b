"""Where the benchmark set is: DHEADS_BENCHMARK, else ../shared/benchmark
beside the work tree, else the workplace's /work/shared/benchmark."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def candidates() -> list[Path]:
    """Where the benchmark set may be, in order (the tests look here too)."""
    found = [Path(p) for p in (os.environ.get("DHEADS_BENCHMARK"),) if p]
    return found + [REPO.parent / "shared" / "benchmark", Path("/work/shared/benchmark")]


def find_benchmark() -> Path | None:
    """The first candidate holding `val/manifest.jsonl`, or None."""
    return next((c.resolve() for c in candidates() if (c / "val" / "manifest.jsonl").exists()), None)


def benchmark_dir() -> Path:
    found = find_benchmark()
    if found is None:
        raise SystemExit(f"benchmark set not found (tried {', '.join(map(str, candidates()))}); "
                         "set DHEADS_BENCHMARK")
    return found


def copy_clips(split: Path, dest: Path, n: int) -> list[dict]:
    """The first `n` clips of a benchmark split (its manifest's order), their
    mp4 and ground-truth JSON copied into `dest`; returns their manifest rows."""
    rows = [json.loads(x) for x in (split / "manifest.jsonl").read_text().splitlines()][:n]
    dest.mkdir(parents=True, exist_ok=True)
    for row in rows:
        for name in (row["video"], row["meta"]):
            shutil.copy(split / name, dest / name)
    return rows
