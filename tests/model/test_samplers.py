import numpy as np
import pytest
import torch

from dheads.model.config import DiffusionConfig, SamplerConfig, SamplerKind
from dheads.model.diffusion import GaussianDiffusion
from dheads.model.samplers import (AncestralSampler, DDIMSampler, make_sampler,
                                   space_timesteps)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(DiffusionConfig())


def test_ddim50_of_1000_is_every_20th_step():
    steps = space_timesteps(1000, "ddim50")
    assert steps == list(range(0, 1000, 20))
    assert steps[:3] == [0, 20, 40] and steps[-1] == 980 and len(steps) == 50
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))


def test_section_spacing_matches_guided_diffusion():
    # 1000 steps in 3 sections of 334, 333, 333; 10 steps each, stride 333/9 = 37
    steps = space_timesteps(1000, "10,10,10")
    assert steps[:10] == [0, 37, 74, 111, 148, 185, 222, 259, 296, 333]
    assert steps[10:12] == [334, 371] and steps[-1] == 999 and len(steps) == 30
    assert space_timesteps(1000, "4") == [0, 333, 666, 999]
    assert space_timesteps(10, "") == list(range(10))
    with pytest.raises(ValueError):
        space_timesteps(10, "ddim20")  # more steps than the process has


def test_respacing_keeps_alpha_bar(diffusion):
    before = diffusion.alphas_cumprod.clone()
    for spec in ["ddim50", "100", "10,10,10"]:
        s = make_sampler(diffusion, SamplerConfig(kind=SamplerKind.respaced, steps=spec))
        keep = torch.tensor(space_timesteps(1000, spec))
        assert s.process.alphas_cumprod.dtype == torch.float64
        torch.testing.assert_close(s.process.alphas_cumprod, diffusion.alphas_cumprod[keep],
                                   rtol=1e-10, atol=0)  # float64 rounding of cumprod
        assert torch.equal(s.model_timesteps(torch.arange(s.num_steps)), keep)
    assert torch.equal(diffusion.alphas_cumprod, before)  # never changed in place
    assert diffusion.num_timesteps == 1000


def test_make_sampler_kinds(diffusion):
    ddpm = make_sampler(diffusion, SamplerConfig(kind=SamplerKind.ddpm, steps="", eta=1.0))
    assert isinstance(ddpm, AncestralSampler) and ddpm.num_steps == 1000
    assert ddpm.process is diffusion
    ddim = make_sampler(diffusion, SamplerConfig(kind=SamplerKind.ddim, steps="ddim20", eta=0.0))
    assert isinstance(ddim, DDIMSampler) and ddim.num_steps == 20 and not ddim.needs_noise
    assert not isinstance(ddim, torch.nn.Module)


def _perfect_eps(sampler, x0, x_t, idx):
    """Model output whose ε is the true noise of x_t w.r.t. x0 and v = 0."""
    eps = sampler.process.predict_eps_from_xstart(x_t, idx, x0)
    return torch.cat([eps, torch.zeros_like(eps)], dim=1)


def test_ddim_eta0_with_perfect_eps_walks_the_deterministic_path(diffusion):
    s = make_sampler(diffusion, SamplerConfig(kind=SamplerKind.ddim, steps="ddim10", eta=0.0))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    noise = (x - s.process.sqrt_alphas_cumprod[-1] * x0) / s.process.sqrt_one_minus_alphas_cumprod[-1]
    for i in reversed(range(s.num_steps)):
        idx = torch.full((2,), i)
        x = s.step(_perfect_eps(s, x0.double(), x, idx), x, idx)
        # DDIM keeps the same ε: x_{s_k} = √ᾱ x0 + √(1−ᾱ) ε with ᾱ of the previous kept step
        ab_prev = s.process.alphas_cumprod_prev[i]
        expected = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * noise
        torch.testing.assert_close(x, expected.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.float(), x0, rtol=0, atol=1e-5)


def test_step_is_vectorised_per_sample(diffusion):
    """Samples at different step indices in one call equal one-at-a-time calls."""
    for sampler in [make_sampler(diffusion, SamplerConfig(kind=SamplerKind.respaced, steps="50")),
                    make_sampler(diffusion, SamplerConfig(kind=SamplerKind.ddim, steps="ddim50", eta=0.5))]:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(3, 3, 8, 8, generator=g)
        out = torch.randn(3, 6, 8, 8, generator=g).clamp(-1, 1)
        noise = torch.randn(3, 3, 8, 8, generator=g)
        idx = torch.tensor([49, 17, 0])
        batched = sampler.step(out, x, idx, noise)
        for b in range(3):
            single = sampler.step(out[b:b + 1], x[b:b + 1], idx[b:b + 1], noise[b:b + 1])
            torch.testing.assert_close(batched[b:b + 1], single)
        # the last step adds no noise
        no_noise = sampler.step(out, x, idx, torch.zeros_like(noise))
        torch.testing.assert_close(batched[2], no_noise[2])
        assert not torch.allclose(batched[0], no_noise[0])


def test_ancestral_step_matches_closed_form(diffusion):
    s = make_sampler(diffusion, SamplerConfig(kind=SamplerKind.respaced, steps="100"))
    p = s.process
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64) * 0.1
    v = torch.full_like(eps, 0.5)
    z = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    i = 60
    out = s.step(torch.cat([eps, v], 1), x, torch.tensor([i]), z)
    ab, ab_prev, beta = p.alphas_cumprod[i], p.alphas_cumprod_prev[i], p.betas[i]
    x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
    mean = (beta * ab_prev.sqrt() / (1 - ab)) * x0 + ((1 - ab_prev) * (1 - beta).sqrt() / (1 - ab)) * x
    post_var = beta * (1 - ab_prev) / (1 - ab)
    log_var = 0.75 * np.log(beta.item()) + 0.25 * np.log(post_var.item())  # frac = (v+1)/2
    torch.testing.assert_close(out, mean + np.exp(0.5 * log_var) * z)


@pytest.mark.parametrize("steps", ["trailing5", "trailing20", "ddim10"])
def test_ddim_eta1_is_finite_and_is_the_posterior_step(steps):
    """η = 1 from T−1 (ᾱ ≈ 2e-9) once gave NaN frames: 1 − ᾱ' − σ² rounded
    below 0 in float32. In float64 it is ≥ 0, and DDIM η = 1 is exactly the
    ancestral step of the respaced process with variance β̃ (DDIM paper §4.1):
    mean = q(x_{t'} | x_t, x̂₀)'s mean, σ² = β̃."""
    diffusion = GaussianDiffusion(DiffusionConfig(prediction="x0", identity_residual=True,
                                                  variance="fixed_small"))
    s = make_sampler(diffusion, SamplerConfig(kind=SamplerKind.ddim, steps=steps, eta=1.0))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    x0 = torch.rand(4, 3, 8, 8, generator=gen) * 1.6 - 0.8
    out = torch.cat([x0, torch.zeros_like(x0)], dim=1)
    p = s.process
    for k in reversed(range(s.num_steps)):
        idx = torch.full((4,), k)
        z = torch.randn(x.shape, generator=gen)
        nxt = s.step(out, x, idx, z, offset=torch.zeros_like(x))
        assert torch.isfinite(nxt).all(), (steps, k)
        mean, var, _ = p.q_posterior_mean_variance(x0.double(), x.double(), idx)
        expected = mean + (k > 0) * var.sqrt() * z.double()
        torch.testing.assert_close(nxt.double(), expected, atol=2e-5, rtol=1e-4)
        x = nxt
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=0)  # the last step lands on x̂₀
