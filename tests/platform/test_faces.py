"""The Haar detector follows a real face (matplotlib's bundled grace_hopper.jpg)
panned and zoomed through an H.264 video; `none` takes the central square."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dheads.platform import faces
from dheads.platform.config import FaceDetector
from dheads.platform.media import read_video, write_video


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def hopper():
    cbook = pytest.importorskip("matplotlib.cbook")
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def test_haar_tracks_a_panned_zoomed_face(tmp_path, hopper):
    ref = faces.haar_face(hopper)
    assert ref is not None, "the cascade must find Grace Hopper in the still image"
    H, W, T = 240, 320, 30
    frames, truth = [], []
    for t in range(T):
        s = 0.35 + 0.15 * t / (T - 1)                  # zoom in
        img = Image.fromarray(hopper).resize((int(hopper.shape[1] * s), int(hopper.shape[0] * s)))
        ox, oy = int(-10 + 60 * t / (T - 1)), int(-15 - 10 * t / (T - 1))  # pan right, up
        canvas = Image.new("RGB", (W, H), (40, 60, 80))
        canvas.paste(img, (ox, oy))
        frames.append(np.asarray(canvas))
        truth.append(ref * s + [ox, oy, ox, oy])
    write_video(tmp_path / "hopper.mp4", np.stack(frames))
    clip = read_video(tmp_path / "hopper.mp4", require_audio=False)

    track = faces.face_track(clip.frames, FaceDetector.haar, every=3)
    ious = [_iou(track[t], truth[t]) for t in range(T)]
    assert min(ious) > 0.5, ious

    crops = faces.crop_boxes(track, 0.35, FaceDetector.haar)
    out = faces.crop_resize(clip.frames, crops, 64)
    assert out.shape == (T, 64, 64, 3)
    # the face is centred in every crop: its box maps to the middle of the image
    face_in_crop = faces.boxes_to_crop(np.stack(truth), crops, 64)
    centre = (face_in_crop[:, :2] + face_in_crop[:, 2:]) / 2
    assert np.abs(centre - 32).max() < 10


def test_no_face_is_an_error():
    blank = np.full((10, 120, 160, 3), 128, np.uint8)
    with pytest.raises(faces.FaceError):
        faces.face_track(blank, FaceDetector.haar)


def test_none_detector_takes_the_central_square():
    frames = np.zeros((3, 90, 160, 3), np.uint8)
    frames[:, :, 35:125] = 255                          # the central 90x90 square
    track = faces.face_track(frames, FaceDetector.none)
    np.testing.assert_allclose(track[0], [35, 0, 125, 90])
    out = faces.crop_resize(frames, faces.crop_boxes(track, 0.35, FaceDetector.none), 32)
    assert out.shape == (3, 32, 32, 3) and out.min() == 255
