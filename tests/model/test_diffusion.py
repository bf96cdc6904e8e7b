import math

import numpy as np
import pytest
import torch

from dheads.model.config import BetaSchedule, DiffusionConfig
from dheads.model.diffusion import GaussianDiffusion, make_betas, mouth_mask

T = 1000


def _cosine_alpha_bar_np(steps: int) -> np.ndarray:
    """ᾱ_t of Nichol & Dhariwal eq. 17, t = 1..T, written out independently."""
    f = lambda t: np.cos((t / steps + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(steps + 1, dtype=np.float64)
    betas = np.minimum(1 - f(t[1:]) / f(t[:-1]), 0.999)
    return np.cumprod(1 - betas), betas


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(DiffusionConfig())


def test_schedules_are_float64_closed_forms(diffusion):
    ac, betas = _cosine_alpha_bar_np(T)
    assert diffusion.betas.dtype == torch.float64
    np.testing.assert_allclose(diffusion.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), ac, rtol=1e-12)
    lin = make_betas(BetaSchedule.linear, 1000)
    assert lin.dtype == np.float64 and lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    assert make_betas(BetaSchedule.linear, 250)[-1] == pytest.approx(0.08)  # scaled to steps


def test_q_sample_closed_form(diffusion):
    ac, _ = _cosine_alpha_bar_np(T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    out = diffusion.q_sample(x0, t, noise)
    a = torch.from_numpy(ac)[t].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out, a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_posterior_closed_form(diffusion):
    ac, betas = _cosine_alpha_bar_np(T)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 300, 999])
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        a, a_prev, b = ac[ti], ac[ti - 1], betas[ti]
        expected_mean = (math.sqrt(a_prev) * b / (1 - a)) * x0[i] \
            + (math.sqrt(1 - b) * (1 - a_prev) / (1 - a)) * x_t[i]
        torch.testing.assert_close(mean[i], expected_mean, rtol=1e-12, atol=1e-12)
        expected_var = b * (1 - a_prev) / (1 - a)
        assert var[i].unique().item() == pytest.approx(expected_var, rel=1e-12)
        assert log_var[i].unique().item() == pytest.approx(math.log(expected_var), rel=1e-12)
    # t = 0: β̃_0 = 0, its log is clipped to log β̃_1 (guided-diffusion)
    _, var0, log_var0 = diffusion.q_posterior_mean_variance(x0[:1], x_t[:1], torch.tensor([0]))
    assert var0.max().item() == 0.0
    assert log_var0.unique().item() == pytest.approx(math.log(betas[1] * (1 - ac[0]) / (1 - ac[1])))


def _exact_out(diffusion, x0, x_t, t, v):
    """Model output with the exact ε of x_t and variance interpolation v."""
    eps = diffusion.predict_eps_from_xstart(x_t, t, x0)
    return torch.cat([eps, torch.full_like(eps, v)], dim=1)


def test_vlb_between_identical_gaussians_is_zero(diffusion):
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64) * 1.8 - 0.9
    t = torch.tensor([1, 200, 900])
    x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    # v = −1 selects log β̃_t: the model's Gaussian equals the true posterior
    vlb = diffusion.vlb_terms(_exact_out(diffusion, x0, x_t, t, -1.0), x0, x_t, t)
    torch.testing.assert_close(vlb, torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)


def test_vlb_matches_hand_computed_kl(diffusion):
    ac, betas = _cosine_alpha_bar_np(T)
    x0 = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    x_t = torch.full_like(x0, 0.3)
    t = torch.tensor([400])
    delta = 0.05
    out = _exact_out(diffusion, x0, x_t, t, 1.0)  # v = +1 selects log β_t
    out[:, :3] += delta  # ε off by δ everywhere
    vlb = diffusion.vlb_terms(out, x0, x_t, t).item()
    a, a_prev, b = ac[400], ac[399], betas[400]
    post_var = b * (1 - a_prev) / (1 - a)
    coef1 = math.sqrt(a_prev) * b / (1 - a)
    mean_err = coef1 * math.sqrt(1 / a - 1) * delta  # x0 error √(1/ᾱ−1)·δ through coef1
    kl_nats = 0.5 * (-1 + math.log(b) - math.log(post_var) + post_var / b + mean_err ** 2 / b)
    assert vlb == pytest.approx(kl_nats / math.log(2), rel=1e-9)
    assert vlb > 0


def test_vlb_only_trains_the_variance_and_weights_add_up():
    diffusion = GaussianDiffusion(DiffusionConfig(lambda_vlb=0.3, lambda_ls=0.2))
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    out = torch.randn(2, 6, 8, 8, generator=g).clamp(-1, 1).requires_grad_()
    model = lambda *args: out  # noqa: E731
    cond = dict(identity=None, motion=None, audio=None)
    box = torch.tensor([[2.0, 2.0, 6.0, 5.0], [0.0, 0.0, 8.0, 8.0]])
    t = torch.tensor([5, 700])
    noise = torch.randn(2, 3, 8, 8, generator=g)
    losses = diffusion.training_losses(model, x0, cond, box, t=t, noise=noise)
    torch.testing.assert_close(losses["loss"], 0.5 * losses["mse"] + 0.3 * losses["vlb"]
                               + 0.2 * losses["ls"])
    (grad,) = torch.autograd.grad(losses["vlb"].sum(), out)
    assert grad[:, :3].abs().max() == 0  # stop-gradient on the mean
    assert grad[:, 3:].abs().max() > 0
    torch.testing.assert_close(losses["mse"], ((noise - out[:, :3]) ** 2).mean(dim=(1, 2, 3)))


def test_lip_sync_loss_is_mse_inside_the_mouth_box(diffusion):
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 16, 16, generator=g)
    box = torch.tensor([[4.0, 8.0, 12.0, 12.0], [4.0, 8.0, 12.0, 12.0]])
    inside = mouth_mask(box, 16, 16)
    err = torch.zeros(2, 3, 16, 16)
    err[0] = 0.5 * inside[0]  # sample 0 wrong only inside its mouth box
    err[1] = 0.5 * (1 - inside[1])  # sample 1 wrong only outside
    out = torch.cat([noise + err, torch.zeros_like(noise)], dim=1)
    losses = diffusion.training_losses(lambda *a: out, x0, dict(identity=None, motion=None, audio=None),
                                       box, t=torch.tensor([100, 100]), noise=noise)
    torch.testing.assert_close(losses["ls"], torch.tensor([0.25, 0.0]))
    area = 8 * 4 / 256
    torch.testing.assert_close(losses["mse"], torch.tensor([0.25 * area, 0.25 * (1 - area)]))


def test_mouth_mask_covers_the_pixels_a_box_overlaps():
    mask = mouth_mask(torch.tensor([[1.5, 2.0, 4.0, 3.0]]), 6, 6)
    assert mask.shape == (1, 1, 6, 6)
    expected = torch.zeros(6, 6)
    expected[2, 1:4] = 1
    assert torch.equal(mask[0, 0], expected)


def test_eye_loss_is_mse_inside_the_eye_band_of_facemotion():
    from dheads.model.diffusion import eye_mask
    from dheads.platform.facemotion import eye_band

    # the band is the one the eval's eye-openness measure reads
    boxes = torch.tensor([[20.0, 40.0, 44.0, 50.0], [18.5, 37.2, 40.1, 47.0]])
    masks = eye_mask(boxes, 64, 64)
    for m, b in zip(masks, boxes.tolist()):
        x0, y0, x1, y1 = eye_band(64, tuple(b))
        rows, cols = m[0].nonzero(as_tuple=True)
        assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (y0, y1, x0, x1)
        assert m.sum() == (y1 - y0) * (x1 - x0)
    diffusion = GaussianDiffusion(DiffusionConfig(lambda_ls=0.2, lambda_eye=0.1))
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 64, 64, generator=g)
    err = torch.zeros(2, 3, 64, 64)
    err[0] = 0.5 * masks[0]  # wrong only inside the eye band
    err[1] = 0.5 * (1 - masks[1])  # wrong only outside it
    out = torch.cat([noise + err, torch.zeros_like(noise)], dim=1)
    cond = dict(identity=None, motion=None, audio=None)
    losses = diffusion.training_losses(lambda *a: out, x0, cond, boxes, t=torch.tensor([100, 100]), noise=noise)
    torch.testing.assert_close(losses["eye"], torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(losses["loss"], (1 - 1e-4 - 0.2 - 0.1) * losses["mse"] + 1e-4 * losses["vlb"]
                               + 0.2 * losses["ls"] + 0.1 * losses["eye"])
    off = GaussianDiffusion(DiffusionConfig()).training_losses(lambda *a: out, x0, cond, boxes,
                                                             t=torch.tensor([100, 100]), noise=noise)
    assert torch.equal(off["eye"], torch.zeros(2))
