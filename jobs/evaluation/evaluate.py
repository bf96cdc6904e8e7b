"""`evaluate(generated, reference, out)`: match clips by file stem, score each
pair, write `metrics.json` and the HTML report under `out`, return the averages.

`generated` and `reference` are folders or S3 prefixes of mp4s. A reference
clip `<stem>.mp4` may have the benchmark's ground truth `<stem>.json` next to
it. `generated_b` (optional) is a second run of the same clips with another
seed, for the variety measures. `out` is a folder or S3 prefix; the report is
built locally and uploaded. Clips on one side only, or that cannot be read,
are named (log, metrics.json, report) and the rest are scored.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dheads.jobs.evaluation.headmotion import AXES
from dheads.jobs.evaluation.report import write_report
from dheads.jobs.evaluation.scoring import ClipScore, GroundTruth, reference_motion, score_clip
from dheads.platform import storage as store
from dheads.platform.config import StorageConfig
from dheads.platform.errors import UserError
from dheads.platform.media import MediaError, read_video

UNAVAILABLE = {
    "FID": "not available offline: needs pretrained Inception-v3 weights",
    "FVD": "not available offline: needs pretrained I3D weights",
    "LPIPS": "not available offline: needs pretrained AlexNet/VGG weights",
    "SyncNet": "not available offline: needs pretrained SyncNet weights (confidence and offset)",
}

# Per-clip metrics averaged over clips (clips where a value is undefined are skipped).
MEAN_KEYS = ("sync_r", "sync_r_best", "sync_lag", "mouth_measure_r", "psnr", "ssim", "psnr_upper",
             "ssim_upper", "flow_gen", "flow_ref", "flow_ratio", "fmse", "fmse_ref",
             "drift_first_db", "drift_last_db", "drift_db", "drift_ref_db",
             *(f"{k}_{axis}" for k in ("head_std_gen", "head_std_ref", "head_motion_ratio",
                                       "head_track_r_gt", "variety_track_r") for axis in AXES),
             "identity_psnr_gen", "identity_psnr_ref", "identity_psnr_first", "identity_psnr_last",
             "identity_psnr_ref_first", "identity_psnr_ref_last", "flicker_gen", "flicker_ref",
             "flicker_ratio", "sharpness_gen", "sharpness_ref", "sharpness_ratio",
             "variety_track_r", "variety_blink_r")
# How many stems a log line names before it says "and N more".
LOG_STEMS = 20


class EvalError(UserError, ValueError):
    """Inputs that cannot be evaluated (nothing to match, unreadable clip)."""


@dataclass
class ClipPair:
    stem: str
    generated: str   # URI
    reference: str   # URI
    truth: str | None  # URI of the ground-truth JSON


def match_clips(generated: str, reference: str, cfg: StorageConfig) -> tuple[list[ClipPair], dict]:
    """Pairs of mp4s with the same stem; also the stems found on one side only."""
    def by_stem(uri):
        files = store.list_files(uri, (".mp4",), cfg)
        out = {}
        for f in files:
            stem = Path(store.basename(f)).stem
            if stem in out:
                raise EvalError(f"two clips named {stem!r} under {uri}: {out[stem]}, {f}")
            out[stem] = f
        return out

    gen, ref = by_stem(generated), by_stem(reference)
    jsons = {Path(store.basename(f)).stem: f for f in store.list_files(reference, (".json",), cfg)}
    pairs = [ClipPair(s, gen[s], ref[s], jsons.get(s)) for s in sorted(gen.keys() & ref.keys())]
    unmatched = {"generated_only": sorted(gen.keys() - ref.keys()),
                 "reference_only": sorted(ref.keys() - gen.keys())}
    if not pairs:
        raise EvalError(f"no clip stems in common between {generated} ({len(gen)} mp4s) "
                        f"and {reference} ({len(ref)} mp4s)")
    return pairs, unmatched


def _read(uri: str, cfg: StorageConfig, fps: float, keep_copy: Path | None) -> np.ndarray:
    with store.local_path(uri, cfg, suffix=".mp4") as path:
        if keep_copy is not None:
            keep_copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, keep_copy)
        return read_video(path, fps=fps, require_audio=False).frames


def average(scores: dict[str, ClipScore]) -> dict:
    """Clip means of MEAN_KEYS; blink rates pooled over all clips (total blinks
    ÷ total seconds), so clips whose reference never blinks still count."""
    ms = [s.metrics for s in scores.values()]
    out: dict = {}
    for k in MEAN_KEYS:
        vals = [m[k] for m in ms if m.get(k) is not None and math.isfinite(m[k])]
        out[k] = float(np.mean(vals)) if vals else None
    seconds = sum(m["duration_s"] for m in ms)
    out["blink_rate_gen"] = sum(m["blinks_gen"] for m in ms) / seconds
    out["blink_rate_ref"] = sum(m["blinks_ref"] for m in ms) / seconds
    out["blink_rate_ratio"] = (out["blink_rate_gen"] / out["blink_rate_ref"]) if out["blink_rate_ref"] > 0 else None
    # the reference measured with the generated clip's detector (ground truth or not)
    out["blink_rate_ref_measured"] = sum(m["blinks_ref_measured"] for m in ms) / seconds
    out["blink_rate_ratio_measured"] = (out["blink_rate_gen"] / out["blink_rate_ref_measured"]
                                        if out["blink_rate_ref_measured"] > 0 else None)
    out["variety_clips"] = sum(m["variety_track_r"] is not None for m in ms)
    reasons = sorted({m["variety_reason"] for m in ms if m.get("variety_reason")})
    out["variety_reason"] = "; ".join(reasons) if out["variety_clips"] == 0 and reasons else None
    out["sync_static_clips"] = sum(bool(m["sync_static"]) for m in ms)
    out["resized_clips"] = sum(bool(m["resized"]) for m in ms)
    out["frames"] = sum(m["frames"] for m in ms)
    out["clips"] = len(ms)
    return out


def _named(stems: list[str]) -> str:
    more = f" and {len(stems) - LOG_STEMS} more" if len(stems) > LOG_STEMS else ""
    return ", ".join(stems[:LOG_STEMS]) + more if stems else "none"


def evaluate(generated_uri: str, reference_uri: str, out_uri: str,
             storage: StorageConfig | None = None, *, fps: float = 25.0, max_lag: int = 5,
             report: bool = True, verbose: bool = True, generated_b_uri: str | None = None) -> dict:
    """Score every generated clip against the reference clip of the same stem
    (and against `generated_b_uri`'s clip of that stem, a second run, for variety).

    Writes `out/metrics.json` ({"averages", "clips", "unavailable", ...}) and,
    with `report`, `out/index.html` + `out/img/*.png` (+ `out/videos/` copies
    of clips that are not local files). Returns the averages.
    """
    cfg = storage or StorageConfig()
    pairs, unmatched = match_clips(generated_uri, reference_uri, cfg)
    log = (lambda msg: print(msg, file=sys.stderr)) if verbose else (lambda msg: None)
    log(f"[eval] {len(pairs)} clips matched; without a partner (skipped, listed in metrics.json): "
        f"{len(unmatched['generated_only'])} generated ({_named(unmatched['generated_only'])}), "
        f"{len(unmatched['reference_only'])} reference ({_named(unmatched['reference_only'])})")
    second = _second_run(generated_b_uri, pairs, cfg)
    out_local = not store.is_s3(out_uri)
    work = Path(out_uri) if out_local else Path(tempfile.mkdtemp(prefix="dheads-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    scores: dict[str, ClipScore] = {}
    floors: dict[str, ClipScore] = {}
    strips: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    videos: dict[str, dict[str, str]] = {}
    failed: dict[str, str] = {}  # stem -> why it could not be scored
    try:
        for i, pair in enumerate(pairs):
            try:
                score, floors[pair.stem], videos[pair.stem], strip = _score_pair(
                    pair, second.get(pair.stem), generated_b_uri, work, out_local, cfg, fps, max_lag, report)
            except MediaError as e:
                failed[pair.stem] = str(e)
                log(f"[eval] {i + 1}/{len(pairs)} {pair.stem}: skipped, {e}")
                continue
            scores[pair.stem], strips[pair.stem] = score, strip
            m = score.metrics
            log(f"[eval] {i + 1}/{len(pairs)} {pair.stem}: sync_r={_fmt(m['sync_r'])} lag={m['sync_lag']} "
                f"psnr_upper={m['psnr_upper']:.2f} ssim_upper={m['ssim_upper']:.3f} "
                f"head_motion_ratio_angle={_fmt(m['head_motion_ratio_angle'])} "
                f"identity_psnr_gen={m['identity_psnr_gen']:.2f}")
        if failed:
            log(f"[eval] not scored: {_named(sorted(failed))}")
        if generated_b_uri:  # scored clips the second run lacks: no variety for them
            missing_b = sorted(stem for stem in scores if stem not in second)
            unmatched["generated_b_missing"] = missing_b
            log(f"[eval] second run {generated_b_uri}: {len(scores) - len(missing_b)} of {len(scores)} "
                f"scored clips (missing: {_named(missing_b)})")
        if not scores:
            raise EvalError(f"no clip could be scored: {failed}")
        averages = average(scores)
        averages["failed_clips"] = len(failed)
        averages["missing_clips"] = len(unmatched["reference_only"])  # references without a generated clip
        doc = {
            "averages": averages,
            # the identity frame held still with the real audio: what a model
            # must beat (face quality it can reach for free, and no motion)
            "floor": average(floors),
            "clips": {k: s.metrics for k, s in scores.items()},
            "unavailable": UNAVAILABLE,
            "unmatched": unmatched,
            "failed": failed,
            "generated": generated_uri, "reference": reference_uri, "generated_b": generated_b_uri,
        }
        (work / "metrics.json").write_text(json.dumps(doc, indent=2))
        if report:
            write_report(work, doc, scores, strips, videos)
        if not out_local:
            for f in sorted(work.rglob("*")):
                if f.is_file():
                    store.upload_file(f, store.join(out_uri, f.relative_to(work).as_posix()), cfg)
    finally:
        if not out_local:
            shutil.rmtree(work, ignore_errors=True)
    return averages


def _second_run(uri: str | None, pairs: list[ClipPair], cfg: StorageConfig) -> dict[str, str]:
    """stem -> URI of the second run's mp4 of that stem (none without `uri`)."""
    if not uri:
        return {}
    files = {Path(store.basename(f)).stem: f for f in store.list_files(uri, (".mp4",), cfg)}
    return {p.stem: files[p.stem] for p in pairs if p.stem in files}


def _score_pair(pair: ClipPair, second: str | None, second_root: str | None, work: Path, out_local: bool,
                cfg: StorageConfig, fps: float, max_lag: int,
                report: bool) -> tuple[ClipScore, ClipScore, dict, tuple | None]:
    """Read and score one pair (with its second run `second`, when there is
    one), and the still-identity floor of its reference; also the report's
    links to its mp4s (relative: local sources are linked in place, others
    copied under `work/videos/`)."""
    links, arrays = {}, []
    for side, uri in (("generated", pair.generated), ("reference", pair.reference)):
        copy = None
        if report and (store.is_s3(uri) or not out_local):
            copy = work / "videos" / side / f"{pair.stem}.mp4"
            links[side] = f"videos/{side}/{pair.stem}.mp4"
        else:
            links[side] = os.path.relpath(os.path.abspath(uri), work.resolve())
        try:
            arrays.append(_read(uri, cfg, fps, copy))
        except MediaError as e:
            raise MediaError(e.stage, f"{side} clip {uri}: {e.reason}") from e
    gen, ref = arrays
    gen_b, missing_b = None, None
    if second is not None:
        try:
            gen_b = _read(second, cfg, fps, None)
        except MediaError as e:  # the pair is still scored, without variety
            missing_b = f"second run clip {second}: {e}"
    else:
        missing_b = (f"no clip {pair.stem}.mp4 in the second run {second_root}" if second_root
                     else "no second run (generated_b not given)")
    truth = GroundTruth.from_json(json.loads(store.read_bytes(pair.truth, cfg))) if pair.truth else None
    ref_motion = reference_motion(ref, truth)
    score = score_clip(gen, ref, fps=fps, truth=truth, max_lag=max_lag, generated_b=gen_b,
                       missing_b=missing_b, ref_motion=ref_motion)
    floor = score_clip(np.repeat(ref[:1], len(ref), axis=0), ref, fps=fps, truth=truth, max_lag=max_lag,
                       missing_b="the floor has no second run", ref_motion=ref_motion)
    # keep only what the report draws, not whole clips
    return score, floor, links, (_report_frames(gen, ref, score) if report else None)


def _report_frames(gen: np.ndarray, ref: np.ndarray, s: ClipScore) -> tuple[np.ndarray, np.ndarray]:
    """The identity frame and a few time points of both clips, for the frame strip."""
    from dheads.jobs.evaluation.metrics import match_frames

    g, r = match_frames(gen, ref)
    idx = np.unique(np.round(np.linspace(0.125, 0.875, 4) * (len(r) - 1)).astype(int))
    s.series["strip_index"] = idx
    return np.concatenate([r[:1], g[idx]]), np.concatenate([r[:1], r[idx]])


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
