import pytest
import torch

from dheads.model.config import DiffusionConfig, SamplerConfig, SamplerKind
from dheads.model.diffusion import GaussianDiffusion
from dheads.model.samplers import make_sampler
from dheads.model.unet import DiffusedHeads
from dheads.model.video import (audio_windows, clip_motion_frames, generate, grayscale,
                                motion_frames)


@pytest.fixture(scope="module")
def setup(load_preset, randomise):
    torch.manual_seed(0)
    model = randomise(DiffusedHeads(load_preset("tiny"))).eval()
    diffusion = GaussianDiffusion(DiffusionConfig())
    sampler = make_sampler(diffusion, SamplerConfig(kind=SamplerKind.ddim, steps="ddim2", eta=0.5))
    g = torch.Generator().manual_seed(1)
    identity = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    audio = torch.randn(2, 7 * 640, generator=g) * 0.1
    return model, diffusion, sampler, identity, audio


def test_generate_shape_range_and_seed(setup):
    model, diffusion, sampler, identity, audio = setup
    a = generate(model, sampler, identity, audio, n_frames=2, seed=7)
    assert a.shape == (2, 2, 3, 64, 64)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.05
    b = generate(model, sampler, identity, audio, n_frames=2, seed=7)
    assert torch.equal(a, b)
    c = generate(model, sampler, identity, audio, n_frames=2, seed=8)
    assert (a - c).abs().max() > 1e-3


def test_audio_around_frame_k_changes_frame_k(setup):
    model, diffusion, sampler, identity, audio = setup
    n, k = 7, 6
    base = generate(model, sampler, identity, audio, n_frames=n, seed=3)
    changed_audio = audio.clone()
    changed_audio[0, 640 * k:640 * (k + 1)] = 0.5 * torch.sin(torch.arange(640) * 0.3)
    changed = generate(model, sampler, identity, changed_audio, n_frames=n, seed=3)
    diff = (base - changed).abs().amax(dim=(2, 3, 4))  # [B, T]
    assert diff[0, k] > 1e-3
    # samples of frame k reach feature windows k−3 … k+3 (0.2 s + the 25 ms FFT),
    # hence frames ≥ k − 3 − m_y only: frame 0 cannot change
    assert torch.equal(base[0, 0], changed[0, 0])
    torch.testing.assert_close(base[1], changed[1])  # the other clip is untouched


def test_motion_frames_are_grayscale_previous_frames():
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    identity = torch.rand(3, 8, 8, generator=g) * 2 - 1
    r, gg, b = frames[2]
    torch.testing.assert_close(grayscale(frames[2])[0], 0.299 * r + 0.587 * gg + 0.114 * b)
    motion = clip_motion_frames(frames, identity)
    assert motion.shape == (4, 2, 8, 8)
    torch.testing.assert_close(motion[0], motion_frames(identity, identity))
    torch.testing.assert_close(motion[1], motion_frames(identity, frames[0]))
    torch.testing.assert_close(motion[3], motion_frames(frames[1], frames[2]))


def test_audio_windows_replicate_the_edges():
    feats = torch.arange(6.0)[:, None]  # [T=6, 1]
    assert audio_windows(feats, 0, 2)[:, 0].tolist() == [0, 0, 0, 1, 2]
    assert audio_windows(feats, 3, 2)[:, 0].tolist() == [1, 2, 3, 4, 5]
    assert audio_windows(feats, 5, 2)[:, 0].tolist() == [3, 4, 5, 5, 5]
    batched = torch.stack([feats, feats + 10])  # [B=2, T, 1]
    out = audio_windows(batched, torch.tensor([0, 5]), 2, dim=1)
    assert out[..., 0].tolist() == [[0, 0, 0, 1, 2], [13, 14, 15, 15, 15]]
