"""Explicit head pose: the identity frame moved to a frame's head pose.

With `motion.pose_warp` the UNet does not see the identity frame as it is
but warped by the rigid transform from the identity's head pose to the
target frame's (and with the identity residual the process diffuses
x₀ − the warped identity). The pose comes from `platform/facemotion.py`'s
tracker in training and from the motion prior (`model/motionprior.py`) at
inference, so the head moves as the sampled track says, and two seeds move
it differently.

Pose `(angle°, tx, ty)`, the convention of `platform/facemotion.py` and the
benchmark's `pose`: a point x of the reference frame is at
R(−angle)(x − c) + c + (tx, ty) · size/128 in the posed frame (c the image
centre, y down; tx, ty in pixels of a 128-px frame).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

POSE_UNIT_PX = 128  # tx, ty are pixels of a 128-px frame whatever the image size


def _rotation(angle_deg: torch.Tensor) -> torch.Tensor:
    """`[B]` degrees -> `[B, 2, 2]` R(−angle) (counter-clockwise on screen, y down)."""
    a = -angle_deg * (math.pi / 180.0)
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def warp_to_pose(images: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """Move `images [B, C, H, W]` (square) to `pose [B, 3]`: out(M x) = in(x),
    bilinear, edges replicated (as cv2 BORDER_REPLICATE). Zero pose is the
    identity map (returned as is)."""
    if not bool(pose.abs().gt(0).any()):
        return images
    b, _, h, w = images.shape
    pose = pose.to(torch.float32)
    r = _rotation(pose[:, 0])
    # in normalised coordinates (align_corners=False) a pixel offset d from
    # the centre is 2d/W, so M is u ↦ R u + 2t/W and the sampling grid is
    # its inverse u ↦ Rᵀ(u − 2t/W)
    t = pose[:, 1:] * (2.0 / POSE_UNIT_PX)
    rt = r.transpose(1, 2)
    theta = torch.cat([rt, -(rt @ t.unsqueeze(-1))], dim=2).to(images.device)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    out = F.grid_sample(images.to(torch.float32), grid.to(torch.float32), mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out.to(images.dtype)


def relative_pose(pose: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The pose of `pose` as seen from `reference` (both relative to one
    frame 0): M_rel = M_pose · M_reference⁻¹, `[..., 3]` -> `[..., 3]`."""
    pose, reference = np.asarray(pose, np.float64), np.asarray(reference, np.float64)
    angle = pose[..., 0] - reference[..., 0]
    a = np.radians(-angle)
    c, s = np.cos(a), np.sin(a)
    rx, ry = reference[..., 1], reference[..., 2]
    tx = pose[..., 1] - (c * rx - s * ry)
    ty = pose[..., 2] - (s * rx + c * ry)
    return np.stack([angle, tx, ty], axis=-1)


__all__ = ["warp_to_pose", "relative_pose", "POSE_UNIT_PX"]
