"""bench/gpu.py: its presets are the YAML ones, it runs on a machine with
only torch + numpy + the repo on PYTHONPATH (no Ray, Hydra, PyAV, no
installed dheads), it skips rather than overruns its budget, and its batch
search keeps the largest batch that fits. The --smoke run itself is
tests/bench/test_smoke.py's; the GPU run is the `gpu` test at the end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu.py"
BLOCKED = ("ray", "hydra", "omegaconf", "av")

# Runs the script as the GPU machine would: the editable install's finders are
# removed (only PYTHONPATH=<repo> is left) and the packages that machine lacks
# fail to import, as they would there.
_DRIVER = """
import importlib.abc, importlib.util, json, runpy, sys

BLOCKED = set(sys.argv[1].split(","))


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU machine)", name=name)
        return None


editable = lambda obj: "__editable__" in str(getattr(obj, "__module__", obj))  # noqa: E731
sys.meta_path[:] = [Absent()] + [f for f in sys.meta_path if not editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(h)]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("dheads") is None, "dheads is still installed"
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
print("BLOCKED_LOADED " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)))
"""


@pytest.fixture(scope="module")
def gpu_bench(bench_module):
    return bench_module(SCRIPT.name)


def run_script(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _DRIVER, ",".join(BLOCKED), str(SCRIPT),
                           "--out", str(out), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                               "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert json.loads((out / "gpu.json").read_text()) == printed
    assert (out / "gpu.log").read_text()
    loaded = [line for line in proc.stdout.splitlines() if line.startswith("BLOCKED_LOADED ")][-1]
    assert json.loads(loaded.split(" ", 1)[1]) == []
    return printed, proc.stderr


@pytest.mark.parametrize("name", ["paper", "tiny"])
def test_presets_are_the_yaml_presets(gpu_bench, name):
    from dheads.platform.config import compose

    assert gpu_bench.PRESETS[name] == compose("info", [f"model={name}"]).model


def test_paper_preset_is_the_measured_model(gpu_bench):
    from dheads.model.flops import build_meta, count_params

    assert count_params(build_meta(gpu_bench.PRESETS["paper"])) == 204_441_094


def test_runs_with_only_torch_and_the_repo_on_pythonpath(tmp_path):
    doc, _ = run_script(tmp_path, "--smoke", "--sections", "sample_eager,train_eager")
    assert doc["dheads_from"] == str(REPO / "model")
    assert doc["sections"]["sample_eager"]["status"] == "done"
    assert doc["sections"]["train_eager"]["status"] == "done"
    assert doc["sections"]["train_compile"] == {"status": "skipped", "reason": "not in --sections"}
    for variant in ("plain", "fsdp"):
        cell = doc["training"]["eager"][variant]
        assert cell["status"] == "done" and cell["samples_per_s"] > 0 and 0 < cell["mfu"], cell
    assert "gloo" in doc["training"]["eager"]["fsdp"]["precision"]
    for sampler in ("ddim", "respaced"):
        cell = doc["sampling"]["eager"][sampler]["1"]
        # the 2-step samplers of --smoke finish a frame inside the timed window
        assert cell["status"] == "done" and cell["frames_in_window"] == 1, cell
    assert doc["complete"] is True


def test_every_section_is_skipped_with_its_reason_when_no_time_is_left(tmp_path):
    doc, _ = run_script(tmp_path, "--smoke", "--budget-s", "0")
    for name, section in doc["sections"].items():
        assert section["status"] == "skipped" and section["reason"].startswith("budget"), name
    assert doc["training"]["eager"]["plain"]["status"] == "skipped"
    assert doc["sampling"]["cudagraphs"]["ddim"]["1"]["reason"].startswith("budget")
    assert doc["goals"]["training_mfu"] == {"value": None, "at": None, "target": 0.4, "met": None}
    assert doc["peak_tflops"] > 0 and doc["params"] == 2_890_374   # tiny, with the motion-noise and eye embeddings


def test_batch_search_keeps_the_largest_batch_that_fits(gpu_bench):
    def trial(batch: int) -> dict:
        if batch > 4:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at batch {batch}")
        return {"batch": batch, "step_s": 0.1 * batch}

    always = lambda last: True  # noqa: E731
    best, tried = gpu_bench.search_batches(trial, [1, 2, 4, 8, 16], "oom", always)
    assert best == {"batch": 4, "step_s": 0.4}
    assert [(t["batch"], t["status"]) for t in tried] == [(1, "done"), (2, "done"), (4, "done"), (8, "oom")]
    # halving (the compiled variants): the first that fits
    best, tried = gpu_bench.search_batches(trial, [16, 8, 4, 2, 1], "fit", always)
    assert best["batch"] == 4 and [t["status"] for t in tried] == ["oom", "oom", "done"]
    # out of time before the next trial: recorded, not run
    best, tried = gpu_bench.search_batches(trial, [1, 2, 4], "oom", lambda last: last is None)
    assert best["batch"] == 1 and tried[-1] == {"batch": 2, "status": "skipped", "reason": "time"}


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_preset_on_a_gpu_fills_every_section(tmp_path):
    doc, _ = run_script(tmp_path, "--preset", "tiny", "--clips", "1,4", "--max-train-batch", "8",
                        "--budget-s", "400")
    assert doc["device"]["type"] == "cuda"
    for name, section in doc["sections"].items():
        assert section["status"] == "done", (name, section)
    assert "nccl" in doc["training"]["eager"]["fsdp"]["precision"]
    for mode in ("eager", "compile"):
        for variant in ("plain", "fsdp"):
            cell = doc["training"][mode][variant]
            assert cell["status"] == "done" and cell["peak_mem_gib"] > 0, (mode, variant, cell)
    for mode in ("eager", "compile", "cudagraphs"):
        for sampler in ("ddim", "respaced"):
            for clips in ("1", "4"):
                cell = doc["sampling"][mode][sampler][clips]
                assert cell["status"] == "done" and cell["frames_per_s"] > 0, (mode, sampler, clips, cell)
