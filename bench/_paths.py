"""Where the benchmark set is: DHEADS_BENCHMARK, else ../shared/benchmark
beside the work tree, else the workplace's /work/shared/benchmark."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def benchmark_dir() -> Path:
    candidates = [Path(p) for p in (os.environ.get("DHEADS_BENCHMARK"),) if p]
    candidates += [REPO.parent / "shared" / "benchmark", Path("/work/shared/benchmark")]
    for c in candidates:
        if (c / "val" / "manifest.jsonl").exists():
            return c.resolve()
    raise SystemExit(f"benchmark set not found (tried {', '.join(map(str, candidates))}); "
                     "set DHEADS_BENCHMARK")
