"""Model-test helpers: real presets from configs/model/*.yaml."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dheads.model.config import ModelConfig, from_dict

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "model"


def preset(name: str) -> ModelConfig:
    return from_dict(ModelConfig, yaml.safe_load((PRESETS / f"{name}.yaml").read_text()))


def randomise_zero_layers(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Zero-initialised output layers make an untrained UNet ignore its inputs;
    give them random weights so conditioning effects are visible."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, std)
    return model


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread and torch's deterministic algorithms for these
    small models.

    Speed: on 2 cores shared with other jobs, 2 torch threads spin-wait on
    each other (measured 98 s vs 3.6 s for test_video.py under a load of 9).
    Determinism by construction: with one thread no reduction is split across
    threads (the split, and so the summation order, is what changes with the
    machine's core count), and deterministic algorithms rule out kernels with
    racing accumulations. So tests that run the same computation twice in
    this process (same seed) may compare bit for bit on any x86/ARM CPU and
    any core count; values across machines are never compared."""
    old = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(old_det)
    torch.set_num_threads(old)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return preset("tiny")


@pytest.fixture(scope="session")
def load_preset():
    """`load_preset(name) -> ModelConfig` from configs/model/<name>.yaml."""
    return preset


@pytest.fixture(scope="session")
def randomise():
    return randomise_zero_layers
