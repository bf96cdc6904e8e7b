"""Explicit motion: the identity frame warped to a head pose, the motion
prior's tracks, and the frame loop drawing one track per item."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from dheads.model import motionprior
from dheads.model.audio import feature_shape
from dheads.model.config import DiffusionConfig, MotionConfig, MotionPrior, Prediction, SamplerConfig
from dheads.model.diffusion import GaussianDiffusion
from dheads.model.frameloop import Clip, FrameLoop
from dheads.model.posewarp import relative_pose, warp_to_pose
from dheads.model.samplers import make_sampler
from dheads.model.unet import DiffusedHeads
from dheads.platform.facemotion import pose_matrix

PRIOR = MotionPrior(fitted=True, phi=[0.9, 0.85, 0.8], kappa=[0.02, 0.03, 0.02], sigma=[0.12, 0.1, 0.08],
                    mu_std=[1.5, 1.0, 0.8], v_std=[0.25, 0.2, 0.15], blink_rate=0.015, blink_gap=12,
                    blink_shape=[0.7, 0.45, 0.4, 0.5, 0.8, 0.95, 1.0], clips=1, frames=1)


def test_warp_matches_opencv_and_zero_pose_is_identity():
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.random((64, 64, 3)).astype(np.float32), (0, 0), 2.0)
    pose = np.array([4.0, 3.0, -2.0])
    want = cv2.warpAffine(img, pose_matrix(pose, 64), (64, 64), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
    got = warp_to_pose(torch.from_numpy(img).permute(2, 0, 1)[None], torch.from_numpy(pose[None]))[0]
    inner = (slice(8, 56), slice(8, 56))
    assert np.abs(got.permute(1, 2, 0).numpy()[inner] - want[inner]).max() < 0.02
    same = torch.rand(2, 3, 8, 8)
    assert warp_to_pose(same, torch.zeros(2, 3)) is same


def test_relative_pose_composes_the_transforms():
    a, b = np.array([3.0, 2.0, -1.0]), np.array([-1.5, 0.5, 2.5])
    m = lambda p: np.vstack([pose_matrix(p, 128), [0, 0, 1]])  # noqa: E731
    want = m(a) @ np.linalg.inv(m(b))
    assert np.allclose(np.vstack([pose_matrix(relative_pose(a, b), 128), [0, 0, 1]]), want, atol=1e-9)
    assert np.allclose(relative_pose(a, np.zeros(3)), a)


def test_prior_fitted_on_its_own_samples_reproduces_their_motion_and_blinks():
    tracks = [motionprior.sample(PRIOR, n, seed) for seed, n in enumerate(np.tile([60, 100, 150], 100))]
    poses = [p for p, _ in tracks]
    eyes = [e for _, e in tracks]
    fitted = motionprior.fit(poses, eyes, [e < 0.9 for e in eyes])
    runs = sum(int(np.diff(np.concatenate([[0], (e < 0.9).astype(int)])).clip(0).sum()) for e in eyes)
    assert fitted.blinks == runs > 0  # the blinks it saw (what `dheads train` logs per second)
    again = [motionprior.sample(fitted, len(p), 10_000 + i)[0] for i, p in enumerate(poses)]
    std = lambda ps: np.mean([p.std(0) for p in ps], axis=0)  # noqa: E731
    assert np.allclose(std(again), std(poses), rtol=0.2), (std(again), std(poses))
    assert fitted.blink_rate == pytest.approx(PRIOR.blink_rate, rel=0.15)
    # and it draws as many blinks per second as the tracks it was fitted on had
    rate = lambda es: sum(int(((e[1:] < 1) & (e[:-1] >= 1)).sum()) for e in es) / sum(map(len, es))  # noqa: E731
    redrawn = [motionprior.sample(fitted, len(e), 20_000 + i)[1] for i, e in enumerate(eyes)]
    assert rate(redrawn) == pytest.approx(rate(eyes), rel=0.15)
    assert min(fitted.blink_shape) < 0.6 and fitted.blink_shape[-1] > 0.9


def test_seeds_give_other_tracks_and_an_unfitted_prior_a_still_head():
    p1, e1 = motionprior.sample(PRIOR, 200, 1)
    p2, _ = motionprior.sample(PRIOR, 200, 2)
    assert (p1[0] == 0).all() and p1.std(0).min() > 0.1
    assert abs(np.corrcoef(p1[:, 0], p2[:, 0])[0, 1]) < 0.9
    assert (e1 < 0.6).any() and (e1 <= 1.0).all()
    still, open_ = motionprior.sample(MotionPrior(), 50, 1)
    assert not still.any() and (open_ == 1).all()


@pytest.fixture(scope="module")
def conditioned(load_preset, randomise):
    cfg = dataclasses.replace(load_preset("tiny"), image_size=16, model_channels=16, num_head_channels=16,
                              motion=MotionConfig(pose_warp=True, eye_embed=True, prior=PRIOR))
    torch.manual_seed(0)
    model = randomise(DiffusedHeads(cfg)).eval()
    d = GaussianDiffusion(DiffusionConfig(prediction=Prediction.x0, identity_residual=True))
    return model, make_sampler(d, SamplerConfig(steps="trailing2"))


def test_segments_of_one_item_share_its_track(conditioned):
    model, sampler = conditioned
    loop = FrameLoop(model, sampler, capacity=3)
    ident = torch.rand(3, 16, 16) * 2 - 1
    feats = torch.zeros(60, *feature_shape(model.cfg.audio))
    whole, _ = loop._tracks(Clip("w", ident, feats, 60, seed=5), 59)
    part, eyes = loop._tracks(Clip("s", ident, feats, 20, seed=99, frame_lo=-30, frame_hi=29,
                                   motion_seed=5), 29)
    assert torch.equal(part, whole[30:50]) and eyes.shape == (20,)
    # the UNet sees the warped identity and the eye value of each frame
    loop.admit(Clip("a", ident, feats, 3, seed=5))
    slot = loop.slots[0]
    assert torch.allclose(loop.identity_in[0], warp_to_pose(ident[None], slot.pose[:1])[0])
    frames = loop.run()["a"]
    assert frames.shape == (3, 3, 16, 16) and torch.isfinite(frames).all()


def test_a_checkpoint_config_without_motion_fields_loads_unconditioned():
    from dheads.model.config import ModelConfig, from_dict, to_dict
    data = to_dict(ModelConfig())
    for k in ("pose_warp", "eye_embed", "prior"):
        data["motion"].pop(k)
    cfg = from_dict(ModelConfig, data)
    assert not cfg.motion.conditioned and "no explicit motion" in cfg.motion.describe()
