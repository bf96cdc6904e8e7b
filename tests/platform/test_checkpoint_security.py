"""Training checkpoints never unpickle code from storage (issue 12).

A DCP checkpoint's `.metadata` is a pickle and its non-tensor values are
`torch.save` pickles; stock DCP unpickles both in full. Real payloads here
(`__reduce__` -> `os.system("touch MARKER")`) show that hole on stock DCP, and
that training resume (`Checkpointer.load_from`, what `restore` runs) and
`dheads export` refuse them with one clear line and run nothing, while a real
checkpoint still resumes and exports exactly.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dheads.model.checkpoint import CheckpointError
from dheads.platform.checkpointing import JOB_FILE, Checkpointer, Progress, TrainingState, checkpoint_dir_name
from dheads.platform.safedcp import dcp_load, read_checkpoint_metadata

STEP = 5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP: "assuming a single process"


class RunsShell:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@functools.lru_cache(maxsize=1)
def _configs():
    """The tiny preset, shrunk further (a few 10k parameters): the point is
    the checkpoint format, not the network."""
    from dheads.platform.config import compose

    job = compose("train", ["model=tiny", "model.image_size=16", "model.model_channels=8",
                            "model.channel_mult=[1,2]", "model.num_groups=4",
                            "model.num_head_channels=8", "model.audio.embed_dim=16"])
    return job.model, job.diffusion


def _training_state(seed: int) -> TrainingState:
    from dheads.model.unet import DiffusedHeads

    torch.manual_seed(seed)
    model = DiffusedHeads(_configs()[0])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.8, 0.95))
    for p in model.parameters():      # one real optimizer step: Adam moments exist
        p.grad = torch.randn_like(p)
    opt.step()
    ema = {n: p.detach() * 0.5 for n, p in model.named_parameters()}
    return TrainingState(model, opt, ema, Progress(STEP, 1, 3))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[TrainingState, Path]:
    """A training state and a run folder holding its real DCP checkpoint,
    written as `Checkpointer.save` does (made once; tests get copies)."""
    from dheads.model.config import to_dict

    model_cfg, diffusion_cfg = _configs()
    state = _training_state(seed=0)
    run = tmp_path_factory.mktemp("saved") / "run"
    step_dir = run / checkpoint_dir_name(STEP)
    dcp.save({"app": state}, checkpoint_id=str(step_dir))
    (step_dir / JOB_FILE).write_text(json.dumps(
        {"step": STEP, "model": to_dict(model_cfg), "diffusion": to_dict(diffusion_cfg)}))
    return state, run


@pytest.fixture
def run_dir(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved[1], tmp_path / "run"))


def _step_dir(run: Path) -> Path:
    return run / checkpoint_dir_name(STEP)


def _crafted_metadata(step_dir: Path, marker: Path) -> bytes:
    """The real metadata with a payload hidden inside it (a check made only
    after unpickling would come too late)."""
    meta = read_checkpoint_metadata(step_dir)
    meta.version = RunsShell(marker)
    return pickle.dumps(meta)


def _assert_one_clear_line(text: str, *words: str) -> None:
    assert "\n" not in text.strip(), text
    for w in words:
        assert w in text, text


# ------------------------------------------------------------ real checkpoints
def test_real_checkpoint_resumes_exactly(saved, run_dir):
    saved, _ = saved
    fresh = _training_state(seed=1)
    model_cfg, diffusion_cfg = _configs()
    Checkpointer(fresh, model_cfg, diffusion_cfg).load_from(str(_step_dir(run_dir)))
    for (n, a), b in zip(saved.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert all(torch.equal(saved.ema[n], fresh.ema[n]) for n in saved.ema)
    assert vars(fresh.progress) == {"step": STEP, "epoch": 1, "batches_in_epoch": 3}
    group = fresh.optimizer.param_groups[0]           # non-tensor values, weights_only
    assert group["lr"] == 3e-4 and tuple(group["betas"]) == (0.8, 0.95)
    s0 = saved.optimizer.state_dict()["state"][0]
    s1 = fresh.optimizer.state_dict()["state"][0]
    assert torch.equal(s0["exp_avg"], s1["exp_avg"]) and torch.equal(s0["step"], s1["step"])


def test_real_checkpoint_exports(saved, run_dir, tmp_path):
    from dheads.model.checkpoint import load_checkpoint
    from dheads.platform.cli import main

    out = tmp_path / "export"
    assert main(["export", f"run={run_dir}", f"out={out}"]) == 0
    loaded = load_checkpoint(str(out)).model
    ema = saved[0].ema
    for name, p in loaded.named_parameters():
        assert torch.equal(p, ema[name]), name


# ------------------------------------------------------------ crafted metadata
def test_the_crafted_metadata_runs_code_on_stock_dcp(run_dir, tmp_path):
    """The payload is real: stock DCP's reader executes it."""
    marker = tmp_path / "stock-pwned"
    step = _step_dir(run_dir)
    (step / ".metadata").write_bytes(_crafted_metadata(step, marker))
    dcp.FileSystemReader(str(step)).read_metadata()
    assert marker.exists()


def test_resume_refuses_crafted_metadata_and_runs_nothing(run_dir, tmp_path):
    marker = tmp_path / "pwned"
    step = _step_dir(run_dir)
    (step / ".metadata").write_bytes(_crafted_metadata(step, marker))
    model_cfg, diffusion_cfg = _configs()
    with pytest.raises(CheckpointError) as e:
        Checkpointer(_training_state(seed=1), model_cfg, diffusion_cfg).load_from(str(step))
    assert not marker.exists()
    _assert_one_clear_line(str(e.value), "posix.system", "not checkpoint metadata", "refusing")


def test_export_refuses_crafted_metadata_and_runs_nothing(run_dir, tmp_path, capsys):
    from dheads.platform.cli import EXIT_USAGE, main

    marker = tmp_path / "pwned"
    step = _step_dir(run_dir)
    (step / ".metadata").write_bytes(_crafted_metadata(step, marker))
    out = tmp_path / "export"
    assert main(["export", f"run={run_dir}", f"out={out}"]) == EXIT_USAGE
    assert not marker.exists() and not out.exists()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dheads export:")]
    assert len(lines) == 1, lines
    _assert_one_clear_line(lines[0], "posix.system", "refusing")


def test_metadata_pointing_outside_the_checkpoint_is_refused(run_dir):
    step = _step_dir(run_dir)
    meta = read_checkpoint_metadata(step)
    info = next(iter(meta.storage_data.values()))
    info.relative_path = "../../../../etc/passwd"
    (step / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match="not a plain data file slice"):
        read_checkpoint_metadata(step)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_damaged_metadata_is_a_checkpoint_error(run_dir, damage):
    path = _step_dir(run_dir) / ".metadata"
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:100] if damage == "truncated" else b"\x00" * 64)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint_metadata(path.parent)
    _assert_one_clear_line(str(e.value), "checkpoint")


# ------------------------------------------------------------ crafted values
def _checkpoint_with_crafted_value(path: Path, marker: Path) -> None:
    dcp.save({"w": torch.ones(3), "hyper": RunsShell(marker)}, checkpoint_id=str(path))


def test_a_crafted_value_runs_code_on_stock_dcp(tmp_path):
    marker = tmp_path / "stock-pwned"
    _checkpoint_with_crafted_value(tmp_path / "ckpt", marker)
    dcp.load({"w": torch.zeros(3), "hyper": None}, checkpoint_id=str(tmp_path / "ckpt"))
    assert marker.exists()


def test_a_crafted_value_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _checkpoint_with_crafted_value(tmp_path / "ckpt", marker)   # saving runs nothing
    with pytest.raises(CheckpointError) as e:
        dcp_load({"w": torch.zeros(3), "hyper": None}, tmp_path / "ckpt")
    assert not marker.exists()
    _assert_one_clear_line(str(e.value), "hyper", "refusing to unpickle")


def test_latest_checkpoint_is_the_newest_complete_step(run_dir):
    from dheads.platform.checkpointing import COMPLETE_FILE, latest_checkpoint

    old = _step_dir(run_dir)
    assert latest_checkpoint(str(run_dir)) == str(old)  # a run from before markers: its .metadata counts
    (old / COMPLETE_FILE).write_text("{}")
    cut = run_dir / checkpoint_dir_name(STEP + 10)      # newer, but its upload stopped after .metadata
    cut.mkdir()
    shutil.copy(old / ".metadata", cut / ".metadata")
    assert latest_checkpoint(str(run_dir)) == str(old)
    (cut / COMPLETE_FILE).write_text("{}")
    assert latest_checkpoint(str(run_dir)) == str(cut)


def _tuple_nest(depth: int) -> bytes:
    """~5 bytes per level: t_{i+1} = (t_i, t_i) through the memo, the last
    one a dict key, so unpickling hashes a tree of 2^depth tuples."""
    body = bytearray(b"\x80\x04" + pickle.EMPTY_TUPLE + pickle.MEMOIZE)
    for i in range(depth):
        body += pickle.BINGET + bytes([i]) + pickle.BINGET + bytes([i]) + pickle.TUPLE2 + pickle.MEMOIZE
    return bytes(body + pickle.EMPTY_DICT + pickle.BINGET + bytes([depth]) + pickle.NONE
                 + pickle.SETITEM + pickle.STOP)


def test_metadata_built_to_blow_up_is_refused_before_unpickling(run_dir):
    small = pickle.loads(_tuple_nest(3))                 # a valid pickle: {(((), ()), ...): None}
    assert list(small)[0][0][0] == ((), ())
    path = _step_dir(run_dir) / ".metadata"
    path.write_bytes(_tuple_nest(60))                    # 300 bytes, 2^60 tuples to hash
    assert path.stat().st_size < 400
    with pytest.raises(CheckpointError, match="nested to blow up") as e:
        read_checkpoint_metadata(path.parent)
    _assert_one_clear_line(str(e.value), "checkpoint", "refusing to load it")
    from dheads.platform.safedcp import check_pickle_cost

    check_pickle_cost(pickle.dumps(list(range(1000))), "x")   # ordinary pickles pass
