"""One source of defaults: the dataclasses hold them, and each Hydra group
option (configs/<group>/<option>.yaml) names only what it sets differently.

A key repeated with the dataclass's own value is a second copy of a default
that can drift from the first; these tests find every such key, and check
that each option's values reach the composed job."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dheads.model.config import DiffusionConfig, ModelConfig, SamplerConfig
from dheads.platform.config import (CONFIG_DIR, DataConfig, ServeConfig, TrainerConfig,
                                    compose)

# group -> (its dataclass, a job that composes it, the job's field holding it)
GROUPS = {
    "model": (ModelConfig, "train", "model"),
    "diffusion": (DiffusionConfig, "train", "diffusion"),
    "sampler": (SamplerConfig, "train", "sampler"),
    "data": (DataConfig, "train", "data"),
    "trainer": (TrainerConfig, "train", "trainer"),
    "serve": (ServeConfig, "serve", "serve"),
}
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONFIG_DIR / g).glob("*.yaml"))]


def _named(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path)) or {}


def _leaves(named: dict, obj, prefix: str = ""):
    """(dotted key, value named in the file, the value on `obj`) per leaf."""
    for key, value in named.items():
        assert hasattr(obj, key), f"{prefix}{key} is not a field of {type(obj).__name__}"
        if isinstance(value, dict):
            yield from _leaves(value, getattr(obj, key), f"{prefix}{key}.")
        else:
            yield prefix + key, value, getattr(obj, key)


def test_every_group_directory_is_checked():
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()} - {"experiment"}
    assert groups == set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_a_group_option_names_only_what_differs_from_its_dataclass(group, option):
    cls, _, _ = GROUPS[group]
    named = _named(CONFIG_DIR / group / f"{option}.yaml")
    repeated = [key for key, value, default in _leaves(named, cls()) if value == default]
    assert not repeated, (f"configs/{group}/{option}.yaml repeats {cls.__name__}'s defaults "
                          f"for {repeated}: delete them there (the dataclass holds them)")


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_a_group_option_composes_to_its_dataclass_with_its_values(group, option):
    cls, job, attr = GROUPS[group]
    composed = getattr(compose(job, [f"{group}={option}"]), attr)
    named = _named(CONFIG_DIR / group / f"{option}.yaml")
    for key, value, got in _leaves(named, composed):
        assert got == value, f"{group}={option}: {key} composes to {got!r}, the file says {value!r}"
    # and every key the file does not name keeps the dataclass's value
    expected = OmegaConf.merge(OmegaConf.structured(cls()), named)
    assert OmegaConf.to_object(expected) == composed


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    job = compose("train", [f"experiment={experiment}"])
    assert job.trainer.steps > 0
