"""Loading a bench/ script as a module (bench/ is not a package)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="session")
def bench_module():
    """`bench_module("quality.py")`: that script imported under `bench_quality`, once a session."""
    loaded = {}

    def load(filename: str):
        if filename not in loaded:
            name = "bench_" + Path(filename).stem.lstrip("_")
            spec = importlib.util.spec_from_file_location(name, BENCH / filename)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded[filename] = module
        return loaded[filename]

    return load
