"""The one frame loop: clips admitted at different times into a shared slot
pool get the frames `generate()` gives each of them alone."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dheads.model.audio import AudioFeatures
from dheads.model.config import DiffusionConfig, MotionConfig, Prediction, SamplerConfig, SamplerKind
from dheads.model.diffusion import GaussianDiffusion
from dheads.model.frameloop import Clip, FrameLoop
from dheads.model.samplers import make_sampler
from dheads.model.unet import DiffusedHeads
from dheads.model.video import clip_seed, generate

# Batched arithmetic: a clip's UNet input is the same whatever shares its
# batch, but convolutions over batches of 1 vs 3 may use other kernels and
# summation orders; measured max |Δ| 4e-6..1.2e-5 over 3-5 frames, growing through the
# autoregression; 1e-4 of the [-1, 1] range (0.013 of an 8-bit level) bounds it.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def setup(load_preset, randomise):
    cfg = dataclasses.replace(load_preset("tiny"), image_size=16, model_channels=16, num_head_channels=16,
                              motion=MotionConfig(infer_noise=0.05, stabilize_every=3))
    torch.manual_seed(0)
    model = randomise(DiffusedHeads(cfg)).eval()
    d = GaussianDiffusion(DiffusionConfig(prediction=Prediction.x0, identity_residual=True))
    g = torch.Generator().manual_seed(1)
    clips = [(torch.rand(3, 16, 16, generator=g) * 2 - 1, torch.randn(n * 640, generator=g) * 0.1, n)
             for n in (5, 3, 4)]
    return model, d, clips


@pytest.mark.parametrize("sampler", [SamplerConfig(kind=SamplerKind.respaced, steps="3", eta=1.0),
                                     SamplerConfig(kind=SamplerKind.ddim, steps="trailing3", eta=0.5)])
def test_staggered_admission_gives_the_frames_of_generate(setup, sampler):
    model, d, clips = setup
    s = make_sampler(d, sampler)
    alone = [generate(model, s, ident[None], audio[None], n, seed=7)[0] for ident, audio, n in clips]
    loop = FrameLoop(model, s, capacity=2)
    feats = AudioFeatures(model.cfg.audio)
    pending = [Clip(i, ident, feats(audio, n), n, seed=clip_seed(7, 0)) for i, (ident, audio, n) in enumerate(clips)]
    out, steps = {}, 0
    loop.admit(pending.pop(0))
    while loop.active or pending:
        # clip 1 joins two denoising steps in (mid-frame of clip 0); clip 2 when a slot frees
        if pending and loop.free and (steps >= 2 or pending[0].key == 2):
            loop.admit(pending.pop(0))
        out.update(loop.step())
        steps += 1
    for i, ref in enumerate(alone):
        assert out[i].shape == ref.shape
        assert (out[i] - ref).abs().max() <= TOLERANCE, i
    # not vacuous: another seed gives other frames
    other = generate(model, s, clips[0][0][None], clips[0][1][None], clips[0][2], seed=8)[0]
    assert (other - alone[0]).abs().max() > 1e-2


def test_cancel_frees_the_slot_at_once(setup):
    model, d, clips = setup
    loop = FrameLoop(model, make_sampler(d, SamplerConfig(steps="trailing3")), capacity=1)
    ident, audio, n = clips[0]
    loop.admit(Clip("a", ident, AudioFeatures(model.cfg.audio)(audio, n), n))
    loop.step()
    assert loop.cancel("a") and loop.free == 1 and loop.step() == []
    assert not loop.cancel("a")
