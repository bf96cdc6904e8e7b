"""Where the benchmark set is: DHEADS_BENCHMARK, else ../shared/benchmark
beside the work tree, else the workplace's /work/shared/benchmark."""
from __future__ import annotations

import os
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
