"""The math of each quality option: prediction types, min-SNR weights, the
identity residual, motion-frame noise, trailing timestep spacing."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dheads.model.config import (DiffusionConfig, MotionConfig, Prediction, SamplerConfig,
                                 SamplerKind, VarianceType)
from dheads.model.diffusion import GaussianDiffusion
from dheads.model.frameloop import Clip, FrameLoop
from dheads.model.samplers import make_sampler, space_timesteps
from dheads.model.unet import DiffusedHeads
from dheads.model.video import generate

T = 1000


def _batch(seed=0, b=6, size=8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    noise = torch.randn(b, 3, size, size, generator=g)
    t = torch.tensor([0, 1, 10, 500, 990, 999])[:b]
    return x0, noise, t


@pytest.mark.parametrize("kind", list(Prediction))
def test_every_prediction_type_converts_back_to_x0_and_eps(kind):
    d = GaussianDiffusion(DiffusionConfig(prediction=kind))
    x0, noise, t = _batch()
    x_t = d.q_sample(x0, t, noise)
    target = d.prediction_target(x0, noise, t)
    # the exact prediction gives back x0 (ε at t = 999 amplifies rounding by 1/√ᾱ ≈ 1e4)
    tol = {Prediction.eps: 5e-3, Prediction.x0: 0.0, Prediction.v: 1e-5}[kind]
    torch.testing.assert_close(d.predict_xstart(target, x_t, t), x0, atol=tol, rtol=0)
    out = d.p_mean_variance(torch.cat([target, torch.zeros_like(target)], 1), x_t, t,
                            clip_denoised=False)
    if kind != Prediction.eps:  # ε from x0 (or v) is exact except where √(1−ᾱ) → 0
        torch.testing.assert_close(out["eps"][2:], noise[2:], atol=1e-4, rtol=0)
    # the posterior mean from the exact prediction is q's own
    mean, _, _ = d.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(out["mean"][1:], mean[1:], atol=1e-3, rtol=0)


def test_v_target_is_the_closed_form():
    d = GaussianDiffusion(DiffusionConfig(prediction=Prediction.v))
    x0, noise, t = _batch()
    ac = d.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(d.prediction_target(x0, noise, t),
                               ac.sqrt() * noise - (1 - ac).sqrt() * x0)


def test_vlb_is_the_same_for_every_parameterisation_of_the_same_prediction():
    """L_vlb trains Σ only: for one x̂₀ it must not depend on how the mean is parameterised."""
    x0, noise, t = _batch(seed=1)
    t = t.clamp(min=1)
    v_sigma = torch.rand(x0.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x0_hat = (x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    vals = []
    for kind in Prediction:
        d = GaussianDiffusion(DiffusionConfig(prediction=kind))
        x_t = d.q_sample(x0, t, noise)
        eps_hat = d.predict_eps_from_xstart(x_t, t, x0_hat)
        pred = {Prediction.eps: eps_hat, Prediction.x0: x0_hat,
                Prediction.v: d.prediction_target(x0_hat, eps_hat, t)}[kind]
        vals.append(d.vlb_terms(torch.cat([pred, v_sigma], 1), x0, x_t, t))
    torch.testing.assert_close(vals[0][:5], vals[1][:5], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(vals[1], vals[2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", list(Prediction))
def test_min_snr_weights(kind):
    d = GaussianDiffusion(DiffusionConfig(prediction=kind, min_snr_gamma=5.0))
    t = torch.tensor([0, 200, 600, 999])
    snr = (d.alphas_cumprod / (1 - d.alphas_cumprod))[t]
    clipped = snr.clamp(max=5.0)
    expected = {Prediction.eps: clipped / snr, Prediction.x0: clipped,
                Prediction.v: clipped / (snr + 1)}[kind]
    torch.testing.assert_close(d.loss_weight(t), expected.float())
    assert torch.equal(GaussianDiffusion(DiffusionConfig(prediction=kind)).loss_weight(t),
                       torch.ones(4))


def _tiny_model(load_preset, **motion):
    cfg = dataclasses.replace(load_preset("tiny"), image_size=16, model_channels=16,
                              num_head_channels=16, motion=MotionConfig(**motion))
    torch.manual_seed(0)
    return DiffusedHeads(cfg).eval()


@pytest.mark.parametrize("sampler", [SamplerConfig(kind=SamplerKind.ddim, steps="trailing4"),
                                     SamplerConfig(kind=SamplerKind.respaced, steps="5", eta=1.0)])
def test_identity_residual_at_zero_init_samples_the_identity_exactly(load_preset, sampler):
    model = _tiny_model(load_preset)  # the output conv is zero-initialised: the UNet outputs 0
    d = GaussianDiffusion(DiffusionConfig(prediction=Prediction.x0, identity_residual=True))
    g = torch.Generator().manual_seed(0)
    identity = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    video = generate(model, make_sampler(d, sampler), identity, torch.randn(2, 3 * 640, generator=g),
                     n_frames=3, seed=4)
    assert torch.equal(video, identity[:, None].expand_as(video))
    # without the residual the same model samples something else entirely
    plain = generate(model, make_sampler(GaussianDiffusion(DiffusionConfig(prediction=Prediction.x0)),
                                         sampler), identity, torch.zeros(2, 3 * 640), n_frames=1)
    assert (plain[:, 0] - identity).abs().mean() > 0.3


class _Recorder(torch.nn.Module):
    """A UNet stand-in that records its inputs and predicts zeros."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x_t, t, identity, motion, audio, motion_sigma=None):
        self.calls.append(dict(x_t=x_t.clone(), identity=identity.clone(), motion=motion.clone(),
                               motion_sigma=None if motion_sigma is None else motion_sigma.clone()))
        return torch.zeros(x_t.shape[0], 6, *x_t.shape[2:]) + 0 * self.w


def test_motion_noise_touches_only_the_motion_channels_and_only_in_training(load_preset):
    from dheads.jobs.training.loop import step_generator, train_step

    cfg = _tiny_model(load_preset).cfg
    d = GaussianDiffusion(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    batch = {"target": torch.rand(3, 3, 16, 16, generator=g), "identity": torch.rand(3, 3, 16, 16, generator=g),
             "motion": torch.rand(3, 2, 16, 16, generator=g), "audio": torch.zeros(3, 5, 40, 20),
             "mouth_box": torch.tensor([[4.0, 8, 12, 12]] * 3)}
    seen = {}
    for name, motion in (("clean", MotionConfig()),
                         ("noisy", MotionConfig(train_noise_max=0.2, embed_noise=True))):
        rec = _Recorder(cfg)
        train_step(rec, d, torch.optim.SGD(rec.parameters(), lr=0.0), batch, 0.0, 0.0,
                   step_generator(0, 3, 0, torch.device("cpu")), motion)
        seen[name] = rec.calls[0]
    clean, noisy = seen["clean"], seen["noisy"]
    assert torch.equal(clean["motion"], batch["motion"])
    assert torch.equal(noisy["identity"], clean["identity"]) and torch.equal(noisy["x_t"], clean["x_t"])
    diff = noisy["motion"] - batch["motion"]
    sigma = noisy["motion_sigma"]
    assert sigma.shape == (3,) and (sigma > 0).all() and (sigma <= 0.2).all()
    assert diff.abs().max() > 1e-3
    # per sample, the added noise has the recorded σ
    torch.testing.assert_close(diff.flatten(1).std(1), sigma, rtol=0.3, atol=0)

    # inference: a model trained with noise samples with clean motion frames unless infer_noise > 0
    for infer, expect_clean in ((0.0, True), (0.05, False)):
        rec = _Recorder(dataclasses.replace(cfg, motion=MotionConfig(train_noise_max=0.2, infer_noise=infer)))
        loop = FrameLoop(rec, make_sampler(d, SamplerConfig(steps="trailing2")), 1, device="cpu")
        ident = torch.rand(3, 16, 16, generator=g) * 2 - 1
        loop.admit(Clip("a", ident, torch.zeros(2, 40, 20), n_frames=1))
        loop.run()
        gray = 0.299 * ident[0] + 0.587 * ident[1] + 0.114 * ident[2]
        first = rec.calls[0]["motion"][0]
        assert torch.allclose(first, gray.expand_as(first)) is expect_clean
        assert all(torch.equal(c["motion"], first[None]) for c in rec.calls)  # fixed within a frame


def test_stabilize_resets_the_older_motion_frame_to_the_identity(load_preset):
    cfg = _tiny_model(load_preset).cfg
    rec = _Recorder(dataclasses.replace(cfg, motion=MotionConfig(stabilize_every=2)))
    d = GaussianDiffusion(DiffusionConfig())  # ε = 0 predicted: frames are not the identity
    loop = FrameLoop(rec, make_sampler(d, SamplerConfig(steps="trailing1")), 1, device="cpu")
    ident = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loop.admit(Clip("a", ident, torch.zeros(4, 40, 20), n_frames=4))
    frames = loop.run()["a"]
    gray = lambda x: 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]  # noqa: E731
    motion = [c["motion"][0] for c in rec.calls]  # one call per frame
    torch.testing.assert_close(motion[1][0], gray(ident))        # frame 1: k-2 is before the start
    torch.testing.assert_close(motion[2][0], gray(ident))        # frame 2: reset (2 % 2 == 0)
    torch.testing.assert_close(motion[3][0], gray(frames[1]))    # frame 3: no reset
    torch.testing.assert_close(motion[2][1], gray(frames[1]))


def test_trailing_spacing_starts_at_the_last_training_step():
    for n in (1, 4, 10, 20, 50, 100):
        steps = space_timesteps(T, f"trailing{n}")
        assert len(steps) == n and steps[-1] == T - 1 and steps == sorted(steps)
    assert space_timesteps(T, "trailing4") == [249, 499, 749, 999]
    assert space_timesteps(T, "ddim20")[-1] == 950  # the guided-diffusion spec, kept for comparison
    assert space_timesteps(T, "100")[-1] == T - 1 and space_timesteps(T, "10,10,10")[-1] == T - 1
    assert space_timesteps(T, SamplerConfig().steps)[-1] == T - 1  # the default includes T−1


def test_fixed_variances(load_preset):
    x0, noise, t = _batch()
    for kind, name in ((VarianceType.fixed_small, "posterior_log_variance_clipped"),
                       (VarianceType.fixed_large, "log_betas_large")):
        d = GaussianDiffusion(DiffusionConfig(variance=kind))
        out = d.p_mean_variance(torch.zeros(6, 6, 8, 8), d.q_sample(x0, t, noise), t)
        torch.testing.assert_close(out["log_variance"][:, 0, 0, 0], getattr(d, name)[t].float())


def test_correlated_noise_keeps_unit_variance_and_rho_one_reuses_x_T(load_preset):
    cfg = _tiny_model(load_preset).cfg
    d = GaussianDiffusion(DiffusionConfig())
    firsts = {}
    for rho in (0.0, 0.8, 1.0):
        rec = _Recorder(dataclasses.replace(cfg, motion=MotionConfig(infer_noise=0.1)))
        loop = FrameLoop(rec, make_sampler(d, SamplerConfig(steps="trailing2")), 1, device="cpu",
                         noise_correlation=rho)
        loop.admit(Clip("a", torch.zeros(3, 16, 16), torch.zeros(3, 40, 20), n_frames=3, seed=5))
        loop.run()
        firsts[rho] = [c for i, c in enumerate(rec.calls) if i % 2 == 0]  # each frame's first step
    fresh, shared = firsts[0.0], firsts[1.0]
    mid = [c["x_t"] for c in firsts[0.8]]
    r = torch.corrcoef(torch.stack([mid[0].flatten(), mid[1].flatten()]))[0, 1]
    assert 0.7 < r < 0.9 and 0.9 < mid[2].std() < 1.1  # ρ between frames, unit variance
    assert torch.equal(fresh[0]["x_t"], shared[0]["x_t"])  # same seed, same first draw
    assert not torch.equal(fresh[0]["x_t"], fresh[1]["x_t"])
    assert torch.equal(shared[0]["x_t"], shared[1]["x_t"]) and torch.equal(shared[1]["x_t"], shared[2]["x_t"])
    # the motion-frame noise is shared too: frame 1's and 2's inputs differ only by the frames themselves
    noise = [c["motion"] - c["motion"].mean() for c in shared]
    assert noise[0].std() > 0.05
