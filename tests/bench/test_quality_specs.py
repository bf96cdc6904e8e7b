"""bench/quality.py's sampler specs: what each modifier turns into, and the
refusals (a typo must not silently score the default sampler)."""
from __future__ import annotations

import dataclasses

import pytest

from dheads.model.config import SamplerConfig, SamplerKind
from dheads.platform.config import DubConfig


@pytest.fixture(scope="module")
def quality(bench_module):
    return bench_module("quality.py")


def test_modifiers_set_the_sampler_and_the_dubbing_overrides(quality):
    cfg, dub = quality.parse_sampler("trailing5+sigma0.15+stab1+eta0.5+rho0.9+xfade6+lead4")
    assert (cfg.kind, cfg.steps, cfg.eta, cfg.noise_correlation) == (SamplerKind.ddim, "trailing5", 0.5, 0.9)
    assert dub == {"motion_noise": 0.15, "stabilize_every": 1, "crossfade_frames": 6, "lead_in_frames": 4,
                   "joints": "crossfade"}
    made = DubConfig(**dub)                       # every override is a DubConfig field
    assert (made.motion_noise, made.stabilize_every, made.crossfade_frames, made.lead_in_frames) == \
        (0.15, 1, 6, 4)
    assert quality.parse_sampler("default") == (SamplerConfig(), {})
    respaced, _ = quality.parse_sampler("respaced100")
    assert respaced == dataclasses.replace(SamplerConfig(), kind=SamplerKind.respaced, steps="100", eta=1.0)


@pytest.mark.parametrize("spec", ["trailing5+stab", "trailing5+sigmax", "trailing5+blur2",
                                  "respaced100+eta0.5", "ancestral5"])
def test_bad_specs_are_refused(quality, spec):
    with pytest.raises(SystemExit, match="unknown sampler"):
        quality.parse_sampler(spec)
