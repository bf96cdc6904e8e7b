"""`dheads bench <name> [args]`: run `bench/<name>.py` of a repo checkout.

Benchmarks are scripts beside the package, not part of it; this job finds
them relative to the checkout the package was installed from.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

from dheads.platform.errors import UserError

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
RAW_ARGV = True  # the CLI passes the arguments through instead of composing a config


def run(args: list[str]) -> int:
    names = sorted(p.stem for p in BENCH_DIR.glob("*.py"))
    if not args or args[0] not in names:
        raise UserError(f"usage: dheads bench <name> [args]; benchmarks in {BENCH_DIR}: "
                        f"{', '.join(names) or 'none (not a repo checkout)'}")
    script = BENCH_DIR / f"{args[0]}.py"
    sys.argv = [str(script), *args[1:]]
    sys.path.insert(0, str(BENCH_DIR))  # as `python bench/<name>.py` would: its helpers (_*.py) import
    runpy.run_path(str(script), run_name="__main__")
    return 0
