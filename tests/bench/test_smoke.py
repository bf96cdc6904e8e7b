"""Benchmarks cannot rot: every bench/*.py runs in its --smoke mode (same
code path, tiny inputs) and prints its JSON with every documented key
(`JSON_KEYS` in the script; dots reach into nested objects). Figures from a
smoke run mean nothing and are not checked; full runs stay out of the suite."""
from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def documented_keys(script: Path) -> tuple[str, ...]:
    tree = ast.parse(script.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "JSON_KEYS" for t in node.targets):
            env = {}
            # JSON_KEYS may be built from other module-level tuples (e.g. ROW_KEYS)
            keys = [n for n in tree.body if isinstance(n, ast.Assign)
                    and all(getattr(t, "id", "").endswith("_KEYS") for t in n.targets)]
            exec(compile(ast.Module(keys, []), str(script), "exec"), env)
            return tuple(env["JSON_KEYS"])
    raise AssertionError(f"{script.name} documents no JSON_KEYS")


def lookup(doc, dotted: str):
    for part in dotted.split("."):
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def test_every_benchmark_has_a_smoke_mode():
    assert SCRIPTS, BENCH
    for name in SCRIPTS:
        assert "--smoke" in (BENCH / name).read_text(), name


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_smoke_prints_every_documented_key(name, benchmark_dir, tmp_path):
    keys = documented_keys(BENCH / name)
    proc = subprocess.run([sys.executable, str(BENCH / name), "--smoke"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DHEADS_BENCHMARK": str(benchmark_dir),
                               "RAY_DEDUP_LOGS": "0"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    doc = json.loads(last)
    assert doc.get("smoke") is True
    for key in keys:
        value = lookup(doc, key)  # KeyError / IndexError: an undocumented change
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)
