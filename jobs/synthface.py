"""Procedural talking face: speech-like audio, and a 2D face whose mouth follows it.

Pure numpy + PIL, no outside data. Used by `dheads synth` so tests and demos
never need downloaded clips.

Audio (`synth_speech`): a sequence of syllables separated by pauses. Each
syllable is a voiced sound made by additive synthesis of the harmonics of a
glottal pulse train (spectral tilt −12 dB/octave) whose pitch follows a
falling/rising contour, shaped by two or three formant resonances that glide
from a consonant-like to a vowel-like position, under an attack/decay
amplitude envelope; a short noise burst (a fricative/plosive release) may
precede it. Silence between phrases is exact zero plus a little room noise.

Mouth: the per-frame RMS of the audio, smoothed (≈1 frame), normalised per
clip, gated to 0 in silence. So `mouth_open` is ≈0 exactly where the audio is
silent and follows its loudness elsewhere (correlation ≈ 0.9 by
construction, see tests/jobs/test_synth.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SAMPLE_RATE = 16000


# ------------------------------------------------------------------- identity
@dataclass
class Identity:
    id: int
    skin: tuple
    hair: tuple
    hair_style: str
    bg1: tuple
    bg2: tuple
    iris: tuple
    lips: tuple
    face_w: float      # half-width of the face ellipse, fraction of the image
    face_h: float      # half-height
    eye_dx: float
    eye_y: float
    eye_r: float
    mouth_w: float     # half-width of the mouth
    mouth_y: float     # below the face centre
    nose_len: float

    def to_dict(self) -> dict:
        return asdict(self)


def random_identity(identity_id: int) -> Identity:
    rng = np.random.default_rng(10_000_019 + identity_id)
    tone = rng.uniform(0, 1)
    skin = tuple(int(v) for v in np.array([250, 215, 185]) * (1 - tone) + np.array([110, 70, 45]) * tone)
    hair = tuple(int(v) for v in rng.choice([[20, 15, 10], [90, 55, 25], [200, 160, 90],
                                              [120, 30, 20], [60, 60, 60], [230, 230, 225]]))
    return Identity(
        id=int(identity_id), skin=skin, hair=hair,
        hair_style=str(rng.choice(["short", "long", "bald", "bun"])),
        bg1=tuple(int(v) for v in rng.integers(0, 256, 3)),
        bg2=tuple(int(v) for v in rng.integers(0, 256, 3)),
        iris=tuple(int(v) for v in rng.integers(20, 200, 3)),
        lips=tuple(int(v) for v in np.clip(np.array(skin) * [0.75, 0.45, 0.45] + [30, 0, 10], 0, 255)),
        face_w=float(rng.uniform(0.26, 0.33)), face_h=float(rng.uniform(0.33, 0.40)),
        eye_dx=float(rng.uniform(0.09, 0.12)), eye_y=float(rng.uniform(-0.08, -0.03)),
        eye_r=float(rng.uniform(0.035, 0.05)), mouth_w=float(rng.uniform(0.07, 0.10)),
        mouth_y=float(rng.uniform(0.17, 0.21)), nose_len=float(rng.uniform(0.05, 0.08)),
    )


# ---------------------------------------------------------------------- audio
def synth_speech(rng: np.random.Generator, n_samples: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Speech-like mono float32 `[n_samples]` in [-1, 1]; starts and ends in silence."""
    out = np.zeros(n_samples, np.float32)
    base_f0 = rng.uniform(95, 230)
    t = int(rng.uniform(0.15, 0.4) * sr)                     # leading silence
    tail = int(0.15 * sr)
    while t < n_samples - tail - int(0.12 * sr):
        n_syll = int(rng.integers(2, 7))                     # one "word group"
        for _ in range(n_syll):
            dur = int(rng.uniform(0.10, 0.26) * sr)
            if t + dur > n_samples - tail:
                break
            out[t:t + dur] += _syllable(rng, dur, base_f0, sr)
            t += dur + int(rng.uniform(0.0, 0.04) * sr)
        t += int(rng.uniform(0.18, 0.5) * sr)                # pause
    out += rng.normal(0, 2e-4, n_samples).astype(np.float32)  # room noise
    peak = float(np.abs(out).max()) or 1.0
    return (0.8 * out / peak).astype(np.float32)


def _syllable(rng: np.random.Generator, n: int, base_f0: float, sr: int) -> np.ndarray:
    x = np.linspace(0.0, 1.0, n)
    f0 = base_f0 * (1.0 + rng.uniform(-0.15, 0.15) + rng.uniform(-0.2, 0.1) * x)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    # Formants glide from a consonant-ish onset to a vowel target.
    vowel = np.array([rng.uniform(300, 850), rng.uniform(900, 2300), rng.uniform(2400, 3000)])
    onset = vowel * rng.uniform(0.6, 1.0, 3)
    glide = np.minimum(x / 0.3, 1.0)[:, None]
    formants = onset + (vowel - onset) * glide                # [n, 3]
    bw = np.array([90.0, 120.0, 180.0])
    wave = np.zeros(n)
    for k in range(1, int(3800 / base_f0)):
        fk = k * f0                                           # [n]
        gain = sum(1.0 / (1.0 + ((fk - formants[:, j]) / bw[j]) ** 2) for j in range(3))
        wave += gain / k * np.sin(k * phase)                 # −6 dB/oct source * radiation
    env = np.minimum(x / 0.15, 1.0) * np.minimum((1 - x) / 0.35, 1.0) ** 1.5
    wave *= env * rng.uniform(0.5, 1.0)
    if rng.random() < 0.5:                                    # consonant burst
        m = min(n, int(rng.uniform(0.02, 0.05) * sr))
        burst = rng.normal(0, 0.15, m) * np.hanning(2 * m)[:m]
        wave[:m] += burst
    return wave.astype(np.float32)


def mouth_opening(audio: np.ndarray, n_frames: int, spf: int, rng: np.random.Generator) -> np.ndarray:
    """Per-frame opening in [0, 1] from the audio's loudness, 0 in silence."""
    frames = audio[: n_frames * spf].reshape(n_frames, spf)
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(1))
    ref = np.percentile(rms[rms > 0.01], 90) if (rms > 0.01).any() else 1.0
    level = np.clip(rms / ref, 0, 1)
    smooth = np.convolve(np.pad(level, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")
    opening = np.where(rms > 0.01, smooth, 0.0) ** 0.8
    opening *= rng.uniform(0.8, 1.0)
    return np.clip(opening, 0.0, 1.0)


def blinks(rng: np.random.Generator, n_frames: int, fps: float) -> np.ndarray:
    """Eyelid openness per frame: 1 open, 0 shut; Poisson blinks of 3-5 frames."""
    lid = np.ones(n_frames)
    t = rng.exponential(1 / 0.35) * fps
    while t < n_frames:
        length = int(rng.integers(3, 6))
        shape = np.sin(np.linspace(0, np.pi, length + 2)[1:-1])
        i = int(t)
        seg = lid[i:i + length]
        seg[:] = np.minimum(seg, 1 - shape[: seg.shape[0]])
        t += length + rng.exponential(1 / 0.35) * fps
    return lid


def head_motion(rng: np.random.Generator, n_frames: int) -> np.ndarray:
    """[T, 4] = angle_deg, tx, ty (fraction of the image), scale: smooth mean-reverting walk."""
    lim = np.array([5.0, 0.025, 0.02, 0.025])
    pose = np.zeros((n_frames, 4))
    v = np.zeros(4)
    cur = rng.uniform(-0.5, 0.5, 4) * lim
    for i in range(n_frames):
        v = 0.85 * v - 0.03 * cur + rng.normal(0, 0.04, 4) * lim
        cur = np.clip(cur + v, -lim, lim)
        pose[i] = cur
    pose[:, 3] += 1.0
    return pose


# ------------------------------------------------------------------- drawing
def _background(ident: Identity, size: int) -> Image.Image:
    y = np.linspace(0, 1, size)[:, None, None]
    x = np.linspace(0, 1, size)[None, :, None]
    a = 0.5 * x + 0.5 * y
    img = np.array(ident.bg1) * (1 - a) + np.array(ident.bg2) * a
    return Image.fromarray(img.astype(np.uint8), "RGB")


def _box(cx, cy, rx, ry):
    return [cx - rx, cy - ry, cx + rx, cy + ry]


def draw_face(ident: Identity, size: int, opening: float, eyelid: float) -> tuple[Image.Image, list]:
    """The face upright and centred on a transparent `size` layer; also the mouth box (outer lips)."""
    S = size
    layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    cx, cy = S / 2, S * 0.52
    fw, fh = ident.face_w * S, ident.face_h * S
    hair = ident.hair + (255,)
    if ident.hair_style == "long":
        d.rectangle([cx - fw * 1.15, cy - fh * 0.6, cx + fw * 1.15, cy + fh * 0.9], fill=hair)
    if ident.hair_style == "bun":
        d.ellipse(_box(cx, cy - fh * 1.1, fw * 0.45, fh * 0.3), fill=hair)
    d.ellipse(_box(cx, cy, fw, fh), fill=ident.skin + (255,))
    if ident.hair_style != "bald":
        d.chord(_box(cx, cy - fh * 0.3, fw * 1.05, fh * 0.8), 180, 360, fill=hair)
    # ears
    for sgn in (-1, 1):
        d.ellipse(_box(cx + sgn * fw * 0.98, cy, fw * 0.12, fh * 0.16), fill=ident.skin + (255,))
    # eyes
    ey = cy + ident.eye_y * S
    er = ident.eye_r * S
    for sgn in (-1, 1):
        ex = cx + sgn * ident.eye_dx * S
        h = max(er * 0.6 * eyelid, 0.6)
        d.ellipse(_box(ex, ey, er, h), fill=(250, 250, 250, 255))
        if eyelid > 0.3:
            d.ellipse(_box(ex, ey, er * 0.5, min(er * 0.5, h)), fill=ident.iris + (255,))
            d.ellipse(_box(ex, ey, er * 0.22, min(er * 0.22, h)), fill=(10, 10, 10, 255))
        d.line([ex - er * 1.1, ey - er * 1.3, ex + er * 1.1, ey - er * 1.4], fill=hair, width=max(1, S // 64))
    # nose
    ny = cy + ident.nose_len * S
    d.line([cx, ey + er, cx - S * 0.012, ny], fill=tuple(int(c * 0.8) for c in ident.skin) + (255,),
           width=max(1, S // 96))
    # mouth: outer lips grow with opening, dark interior + teeth when open
    my = cy + ident.mouth_y * S
    mw = ident.mouth_w * S * (1.0 - 0.15 * opening)
    inner = opening * S * 0.055
    lip = S * 0.012
    outer = [cx - mw, my - lip - inner / 2, cx + mw, my + lip + inner / 2]
    d.ellipse(outer, fill=ident.lips + (255,))
    if inner > 0.5:
        d.ellipse([cx - mw * 0.8, my - inner / 2, cx + mw * 0.8, my + inner / 2], fill=(60, 15, 20, 255))
        d.rectangle([cx - mw * 0.5, my - inner / 2, cx + mw * 0.5, my - inner / 2 + inner * 0.2],
                    fill=(240, 240, 235, 255))
    else:
        d.line([cx - mw * 0.85, my, cx + mw * 0.85, my], fill=(90, 30, 35, 255), width=max(1, S // 128))
    return layer, outer


def render_frame(ident: Identity, bg: Image.Image, out_size: int, opening: float, eyelid: float,
                 pose: np.ndarray) -> tuple[np.ndarray, list]:
    """One RGB frame `[out_size, out_size, 3]` uint8 and its mouth box in its pixels."""
    S = bg.size[0]
    layer, box = draw_face(ident, S, opening, eyelid)
    angle, tx, ty, scale = pose
    # PIL affine maps output -> input; build the forward map and invert it.
    c = S / 2
    th = np.deg2rad(angle)
    fwd = np.array([[scale * np.cos(th), scale * np.sin(th), 0],
                    [-scale * np.sin(th), scale * np.cos(th), 0], [0, 0, 1.0]])
    T = np.array([[1, 0, c + tx * S], [0, 1, c + ty * S], [0, 0, 1.0]]) @ fwd @ \
        np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1.0]])
    inv = np.linalg.inv(T)
    layer = layer.transform((S, S), Image.AFFINE, tuple(inv[:2].reshape(-1)), resample=Image.BILINEAR)
    frame = bg.copy()
    frame.paste(layer, (0, 0), layer)
    corners = np.array([[box[0], box[1], 1], [box[2], box[1], 1], [box[0], box[3], 1], [box[2], box[3], 1]])
    pts = corners @ T.T
    k = out_size / S
    mbox = [float(pts[:, 0].min() * k), float(pts[:, 1].min() * k),
            float(pts[:, 0].max() * k), float(pts[:, 1].max() * k)]
    if S != out_size:
        frame = frame.resize((out_size, out_size), Image.LANCZOS)
    return np.asarray(frame), mbox


def still_face(identity_id: int, size: int = 64) -> np.ndarray:
    """Identity `identity_id`'s face at rest (mouth slightly open, eyes open,
    upright): one RGB frame `[size, size, 3]` uint8, e.g. an identity image."""
    ident = random_identity(identity_id)
    frame, _ = render_frame(ident, _background(ident, size), size, 0.2, 1.0,
                            np.array([0.0, 0.0, 0.0, 1.0]))
    return frame


def synth_clip(seed: int, identity_id: int, n_frames: int, size: int = 128, fps: int = 25,
               sr: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray, dict]:
    """One clip: frames `[T, size, size, 3]` uint8, audio `[T*sr/fps]` float32, and its sidecar."""
    rng = np.random.default_rng(seed)
    ident = random_identity(identity_id)
    spf = sr // fps
    audio = synth_speech(rng, n_frames * spf, sr)
    opening = mouth_opening(audio, n_frames, spf, rng)
    lid = blinks(rng, n_frames, fps)
    pose = head_motion(rng, n_frames)
    render = 2 * size                                       # draw at 2x, downsample: smooth edges
    bg = _background(ident, render).filter(ImageFilter.GaussianBlur(2))
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    boxes = []
    for i in range(n_frames):
        frames[i], mb = render_frame(ident, bg, size, float(opening[i]), float(lid[i]), pose[i])
        boxes.append([round(v, 2) for v in mb])
    rms = np.sqrt((audio[: n_frames * spf].reshape(n_frames, spf) ** 2).mean(1))
    meta = {
        "seed": int(seed), "fps": fps, "sample_rate": sr, "n_frames": int(n_frames),
        "duration_s": n_frames / fps, "identity": ident.to_dict(),
        "frames": {
            "mouth_open": [round(float(v), 4) for v in opening],
            "mouth_box": boxes,
            "eyelid": [round(float(v), 3) for v in lid],
            "blink": [int(v < 0.35) for v in lid],
            "pose": [[round(float(pose[i, 0]), 3), round(float(pose[i, 1] * size), 3),
                      round(float(pose[i, 2] * size), 3), round(float(pose[i, 3]), 4)]
                     for i in range(n_frames)],
            "rms": [round(float(v), 5) for v in rms],
        },
    }
    return frames, audio, meta
