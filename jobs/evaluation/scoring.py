"""Score one generated clip against its reference: every offline metric of
`dheads eval` for one pair of frame arrays (and, for variety, a second run of
the same clip). No I/O here."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dheads.jobs.evaluation import headmotion, mouth
from dheads.jobs.evaluation import metrics as M

# A generated mouth whose opening varies by less than this (std, in pixel rows
# of the reference frame) does not move: its sync r is 0 and its lag undefined.
STATIC_MOUTH_STD_ROWS = 0.1


@dataclass
class GroundTruth:
    """The benchmark's per-frame ground truth of a reference clip (any field may be None)."""
    mouth_open: np.ndarray | None = None   # [T] in [0, 1]
    mouth_box: np.ndarray | None = None    # [T, 4] pixels of the reference frame
    blink: np.ndarray | None = None        # [T] bool
    pose: np.ndarray | None = None         # [T, 4] angle°, tx, ty (128-px pixels), scale

    @classmethod
    def from_json(cls, meta: dict) -> "GroundTruth":
        frames = meta.get("frames") or {}
        if isinstance(frames, list):  # one dict per frame -> columns
            frames = {k: [f[k] for f in frames] for k in (frames[0] if frames else {})}

        def col(name, dtype):
            return np.asarray(frames[name], dtype) if name in frames else None

        blink = col("blink", np.float64)
        return cls(mouth_open=col("mouth_open", np.float64), mouth_box=col("mouth_box", np.float64),
                   blink=None if blink is None else blink > 0.5, pose=col("pose", np.float64))


@dataclass
class ClipScore:
    metrics: dict                               # JSON-ready scalars
    series: dict = field(default_factory=dict)  # per-frame curves for the report
    regions: mouth.FaceRegions | None = None


def _sync(ref_open: np.ndarray, gen_open: np.ndarray, max_lag: int) -> dict:
    if gen_open.std() < STATIC_MOUTH_STD_ROWS:
        return dict(sync_r=0.0, sync_r_best=0.0, sync_lag=None, sync_static=True)
    rs = M.lagged_pearson(ref_open, gen_open, max_lag)
    defined = {k: v for k, v in rs.items() if v is not None}
    if not defined:  # the reference mouth never moves
        return dict(sync_r=None, sync_r_best=None, sync_lag=None, sync_static=False)
    best = max(defined, key=lambda k: (defined[k], -abs(k)))
    return dict(sync_r=rs[0], sync_r_best=defined[best], sync_lag=best, sync_static=False)


def _blinks(flags: np.ndarray, fps: float) -> tuple[int, float]:
    n = mouth.blink_events(flags)
    return n, n / max(len(flags) / fps, 1e-9)


def reference_motion(reference: np.ndarray, truth: GroundTruth | None = None) -> headmotion.FaceMotion:
    """The reference's head track and aligned frames (tracked against its own
    first frame, the identity frame): computed once per reference, shared by
    the generated clip's and the floor's `score_clip`."""
    truth = truth or GroundTruth()
    return headmotion.measure(reference, reference[0], truth.mouth_box)


def score_clip(generated: np.ndarray, reference: np.ndarray, fps: float = 25.0,
               truth: GroundTruth | None = None, max_lag: int = 5, *,
               generated_b: np.ndarray | None = None, missing_b: str | None = None,
               ref_motion: headmotion.FaceMotion | None = None) -> ClipScore:
    """All metrics of `generated` `[Tg, h, w, 3]` vs `reference` `[Tr, H, W, 3]` (uint8 RGB).

    The generated clip is resized to H×W; both are cut to min(Tg, Tr) frames.
    Ground truth (when given) supplies the mouth box, the reference mouth
    opening and the reference blink flags (blinks are also measured on the
    reference, with the generated clip's detector); otherwise they are
    measured. `generated_b`: a second run of the same clip (another seed) for
    the variety measures; `missing_b` says why there is none. `ref_motion`:
    `reference_motion(reference, truth)`, when already computed.
    """
    truth = truth or GroundTruth()
    n_gen, n_ref = len(generated), len(reference)
    resized = tuple(generated.shape[1:3]) != tuple(reference.shape[1:3])
    gen, ref = M.match_frames(generated, reference)
    t = len(gen)
    h, w = ref.shape[1:3]
    box_gt = truth.mouth_box[:t] if truth.mouth_box is not None else None
    reg = mouth.face_regions(h, w, box_gt)
    upper = reg.upper_rows

    # --- sync
    ref_measured = mouth.mouth_opening(ref, reg.mouth)
    gen_open = mouth.mouth_opening(gen, reg.mouth)
    use_gt = truth.mouth_open is not None and len(truth.mouth_open) >= t
    ref_open = truth.mouth_open[:t] if use_gt else ref_measured
    sync = _sync(ref_open, gen_open, max_lag)

    # --- head motion and the pose-aligned face (tracked against the identity frame)
    identity = ref[0]
    ref_m = (ref_motion or reference_motion(reference, truth)).cut(t)
    gen_m = headmotion.measure(gen, identity, truth.mouth_box)
    gen_b_m = None
    if generated_b is not None:
        gb, _ = M.match_frames(generated_b, ref)
        gen_b_m = headmotion.measure(gb[:t], identity, truth.mouth_box)

    # --- blinks: the same detector on both aligned eye bands; ground truth kept beside
    gen_flags, ref_measured_flags = gen_m.blinks, ref_m.blinks
    use_gt_blink = truth.blink is not None and len(truth.blink) >= t
    ref_flags = truth.blink[:t] if use_gt_blink else ref_measured_flags
    gen_blinks, gen_rate = _blinks(gen_flags, fps)
    ref_blinks, ref_rate = _blinks(ref_flags, fps)
    ref_blinks_measured, ref_rate_measured = _blinks(ref_measured_flags, fps)

    # --- image quality
    psnr_full = M.psnr(gen, ref)
    psnr_up = M.psnr(gen[:, :upper], ref[:, :upper])
    ssim_full, ssim_up = M.ssim(gen, ref, upper)

    # --- motion
    flow_gen, flow_ref = M.flow_magnitude(gen), M.flow_magnitude(ref)
    fmse_gen, fmse_ref = M.frame_mse(gen), M.frame_mse(ref)

    # --- drift: upper face vs the identity frame (the reference's first frame)
    still = np.broadcast_to(ref[:1, :upper], ref[:, :upper].shape)
    mse_gen, mse_ref = M.mse(gen[:, :upper], still), M.mse(ref[:, :upper], still)
    first, last, win = M.window_psnr(mse_gen, fps)
    ref_first, ref_last, _ = M.window_psnr(mse_ref, fps)

    metrics = dict(
        frames=t, duration_s=t / fps, frames_generated=n_gen, frames_reference=n_ref,
        generated_size=[int(generated.shape[2]), int(generated.shape[1])], reference_size=[w, h],
        resized=bool(resized), regions_from=reg.source,
        mouth_box=list(reg.mouth), eye_box=list(reg.eyes), upper_face_rows=upper,
        reference_mouth="ground truth" if use_gt else "measured",
        **sync,
        mouth_measure_r=M.pearson(ref_measured, truth.mouth_open[:t]) if use_gt else None,
        reference_blinks="ground truth" if use_gt_blink else "measured",
        blinks_gen=gen_blinks, blinks_ref=ref_blinks,
        blink_rate_gen=gen_rate, blink_rate_ref=ref_rate,
        blink_rate_ratio=gen_rate / ref_rate if ref_rate > 0 else None,
        blinks_ref_measured=ref_blinks_measured, blink_rate_ref_measured=ref_rate_measured,
        blink_rate_ratio_measured=gen_rate / ref_rate_measured if ref_rate_measured > 0 else None,
        psnr=float(psnr_full.mean()), ssim=float(ssim_full.mean()),
        psnr_upper=float(psnr_up.mean()), ssim_upper=float(ssim_up.mean()),
        flow_gen=flow_gen, flow_ref=flow_ref, flow_ratio=flow_gen / flow_ref if flow_ref > 0 else None,
        fmse=fmse_gen, fmse_ref=fmse_ref,
        drift_first_db=first, drift_last_db=last, drift_db=last - first,
        drift_ref_db=ref_last - ref_first, drift_window_frames=win,
        **headmotion.head_motion(gen_m, ref_m),
        **headmotion.track_vs_truth(ref_m, truth.pose),
        **headmotion.face_quality(gen_m, ref_m, identity, upper, fps),
        **headmotion.variety(gen_m, gen_b_m, missing_b),
    )
    scale_lo, scale_hi = np.percentile(ref_measured, [1, 99])
    span = max(scale_hi - scale_lo, 1.0)
    series = dict(
        mouth_gt=truth.mouth_open[:t] if use_gt else None,
        mouth_ref=(ref_measured - scale_lo) / span, mouth_gen=(gen_open - scale_lo) / span,
        blink_gen=gen_flags, blink_ref=ref_flags, blink_ref_measured=ref_measured_flags,
        eye_gen=gen_m.eye_open, eye_ref=ref_m.eye_open,
        track_gen=gen_m.track, track_ref=ref_m.track,
        track_gen_b=None if gen_b_m is None else gen_b_m.track,
        track_gt=None if truth.pose is None or len(truth.pose) < t else truth.pose[:t, :3] - truth.pose[:1, :3],
        drift_gen=M.db(mse_gen), drift_ref=M.db(mse_ref),
    )
    return ClipScore(metrics=metrics, series=series, regions=reg)
