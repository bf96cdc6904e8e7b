"""The HTML report of `dheads eval`: one self-contained `index.html` (inline
CSS, no scripts, nothing fetched from the network) plus `img/*.png`, all
referenced by relative paths so the folder can be copied or served anywhere.
"""
from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

import numpy as np

from dheads.jobs.evaluation.metrics import FARNEBACK, SSIM_SIGMA, SSIM_WINDOW

METHODS = [
    ("Alignment", "The generated clip is resized to the reference's size (OpenCV INTER_AREA when "
                  "shrinking, INTER_CUBIC when growing); both are cut to their common prefix of frames."),
    ("Regions", "Mouth box: union over the clip of the ground-truth mouth boxes when the reference has "
                "a <code>.json</code>, else the mouth's place in a face crop. Upper face: all rows above "
                "the mouth box's top. Eye band: ±0.95 w around the mouth centre, 0.95 w to 0.1 w above "
                "its top (w = mouth box width). One fixed box per clip."),
    ("Mouth opening", "Soft vertical extent of the dark mouth interior inside the mouth box: per pixel "
                      "d = clip((0.715 m − Y)/(0.33 m), 0, 1) with Y the luma and m the clip's median luma "
                      "in the box; opening = Σ over rows of the row's max d (pixel rows). Plots normalise it "
                      "by the reference's 1st–99th percentile range."),
    ("Sync", "Pearson r between the reference mouth opening (ground-truth <code>mouth_open</code> when "
             "present, else measured on the reference) and the generated one; r(lag) correlates "
             "reference[t] with generated[t + lag] over lags −5…+5. <b>sync_r</b> is r at lag 0, "
             "<b>sync_r_best</b> the peak, <b>sync_lag</b> its lag: positive = the generated mouth moves "
             "later than the reference (audio delayed by 5 frames → +5). A generated mouth whose opening "
             "has std &lt; 0.1 px is static: r = 0, lag undefined (n/a)."),
    ("Head motion", "Head track: the rigid pose (angle °, tx, ty in 128-px pixels) of every frame relative to "
                    "the identity frame (the reference's first frame), from "
                    "<code>platform.facemotion.head_track([identity] + frames)</code> (ECC alignment of the face "
                    "without the mouth and chin), on the generated and on the reference clip alike. "
                    "<b>head_motion_ratio_angle / _tx / _ty</b> = std over time of the generated track ÷ that of "
                    "the reference (n/a when the reference's std is below 0.01). <b>head_track_r_gt_*</b>: "
                    "Pearson r of the reference's measured track with its ground-truth <code>pose</code> "
                    "(relative to frame 0), when the <code>.json</code> has one: how far to trust the tracker."),
    ("Blinks", "Every frame is warped back onto the identity frame's pose (<code>facemotion.align</code>), then "
               "the eye band's gradient energy (mean |∂Y/∂x| + |∂Y/∂y|) over its clip median "
               "(<code>facemotion.eye_openness</code>); a frame is a blink frame when it drops below 0.85 × its "
               "15-frame running median; a run of blink frames is one blink. The same detector runs on the "
               "generated and the reference clip (<b>blink_rate_ref_measured</b>, "
               "<b>blink_rate_ratio_measured</b> = generated ÷ that); <b>blink_rate_ref</b> / "
               "<b>blink_rate_ratio</b> use the ground-truth <code>blink</code> flags when present. Rates are "
               "blinks per second; the averaged rates pool all clips (total blinks ÷ total seconds)."),
    ("Identity", "The upper face (rows above the mouth box) of every frame warped onto the identity frame's "
                 "pose, against the identity frame's upper face: <b>identity_psnr_gen</b> / <b>_ref</b> = "
                 "10 log10(255² / MSE) of the MSE averaged over all frames (RGB); <b>identity_psnr_first</b> / "
                 "<b>_last</b> (and <b>identity_psnr_ref_first</b> / <b>_last</b>) over the first / last 10 s "
                 "(half the clip when shorter): the drift of a long clip, whatever the pose."),
    ("Flicker / sharpness", "On the pose-aligned upper face: <b>flicker</b> = mean |frame k+1 − frame k| "
                            "(RGB, 0–255), <b>flicker_ratio</b> = generated ÷ reference; <b>sharpness</b> = "
                            "variance of the luma's 3×3 Laplacian (taken before the warp, its square warped, "
                            "so the warp's interpolation does not blur it), averaged over frames, "
                            "<b>sharpness_ratio</b> = generated ÷ reference."),
    ("Variety", "With a second generated run of the same clips (another seed, <code>generated_b=</code>): "
                "<b>variety_track_r_*</b> = Pearson r of the two runs' head tracks per axis, "
                "<b>variety_track_r</b> their mean; <b>variety_blink_r</b> = Pearson r of their blink flags "
                "smoothed by a Gaussian of σ = 2 frames. 1: the same motion twice. n/a, with "
                "<b>variety_reason</b>, when there is no second run or a run holds still / never blinks."),
    ("PSNR / SSIM", f"PSNR over RGB per frame, 10 log10(255²/MSE), capped at 100 dB, averaged over "
                    f"frames. SSIM (Wang et al. 2004): Gaussian window σ = {SSIM_SIGMA}, "
                    f"{SSIM_WINDOW}×{SSIM_WINDOW}, K1 = 0.01, K2 = 0.03, L = 255, per RGB channel "
                    f"then averaged, map averaged without its 5-px border. Both over the full frame "
                    f"and over the upper face."),
    ("Motion", "Mean optical-flow magnitude (px/frame) from cv2.calcOpticalFlowFarneback "
               f"({', '.join(f'{k}={v}' for k, v in FARNEBACK.items())}) on grayscale frame pairs; "
               "<b>flow_ratio</b> = generated ÷ reference. <b>fmse</b>: mean squared difference of "
               "consecutive generated frames (RGB, 0–255)."),
    ("Drift", "Upper-face PSNR of every generated frame against the identity frame (the reference's "
              "first frame); <b>drift_first_db</b> / <b>drift_last_db</b>: PSNR of the mean MSE over the "
              "first / last 3 s (windows shrink to half the clip for clips under 6 s), <b>drift_db</b> = "
              "last − first (negative: the face moves away from the identity frame). <b>drift_ref_db</b> is the same for the "
              "reference (its natural head motion)."),
]

TABLE_COLUMNS = [
    ("sync_r", "sync r", 3), ("sync_r_best", "best r", 3), ("sync_lag", "lag", 1),
    ("blink_rate_gen", "blinks/s gen", 2), ("blink_rate_ref", "blinks/s ref", 2),
    ("blink_rate_ratio", "blink ratio", 2), ("psnr", "PSNR", 2), ("ssim", "SSIM", 3),
    ("psnr_upper", "PSNR upper", 2), ("ssim_upper", "SSIM upper", 3), ("flow_ratio", "flow ratio", 2),
    ("fmse", "fMSE", 2), ("drift_db", "drift dB", 2),
]

MOTION_COLUMNS = [
    ("head_motion_ratio_angle", "motion ratio angle", 2), ("head_motion_ratio_tx", "motion ratio tx", 2),
    ("head_motion_ratio_ty", "motion ratio ty", 2), ("blink_rate_ref_measured", "blinks/s ref measured", 2),
    ("blink_rate_ratio_measured", "blink ratio measured", 2), ("identity_psnr_gen", "identity PSNR gen", 2),
    ("identity_psnr_ref", "identity PSNR ref", 2), ("identity_psnr_first", "identity gen first", 2),
    ("identity_psnr_last", "identity gen last", 2), ("flicker_ratio", "flicker ratio", 2),
    ("sharpness_ratio", "sharpness ratio", 2), ("variety_track_r", "variety track r", 3),
    ("variety_blink_r", "variety blink r", 3),
]
AXIS_LABELS = ("angle (°)", "tx (px)", "ty (px)")

CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:0.5em 0;font-size:0.85em}
th,td{border:1px solid #bbb;padding:3px 6px;text-align:right}
th:first-child,td:first-child{text-align:left}
tr.avg td{font-weight:bold;background:#eef}
tr.floor td{font-style:italic;background:#f6f6f6}
.clip{border-top:2px solid #ccc;margin-top:1.5em;padding-top:0.5em}
img{max-width:100%;image-rendering:pixelated}
dt{font-weight:bold;margin-top:0.4em}
"""


def _cell(v, digits: int) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    text = f"{v:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text  # no "-0.00"


def _frame_strip(path: Path, stem: str, score, strip) -> None:
    import matplotlib.pyplot as plt

    gen, ref = strip
    idx = score.series["strip_index"]
    fps = score.metrics["frames"] / score.metrics["duration_s"]
    k = len(idx)
    fig, axes = plt.subplots(2, k + 1, figsize=(1.6 * (k + 1), 3.5), dpi=100, squeeze=False)
    x0, y0, x1, y1 = score.regions.mouth
    ex0, ey0, ex1, ey1 = score.regions.eyes
    for row, (frames, label) in enumerate(((gen, "generated"), (ref, "reference"))):
        for col in range(k + 1):
            ax = axes[row, col]
            ax.imshow(frames[col])
            ax.set_xticks([]), ax.set_yticks([])
            if col == 0:
                ax.set_title("identity", fontsize=8)
                ax.set_ylabel(label, fontsize=8)
                if row == 0:  # show the regions the metrics use
                    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red", lw=1))
                    ax.add_patch(plt.Rectangle((ex0, ey0), ex1 - ex0, ey1 - ey0, fill=False, ec="cyan", lw=1))
            else:
                ax.set_title(f"t = {idx[col - 1] / fps:.2f} s", fontsize=8)
    fig.suptitle(f"{stem}: identity (red: mouth box, cyan: eye band) | generated / reference", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _curves(path: Path, stem: str, score) -> None:
    import matplotlib.pyplot as plt

    s, m = score.series, score.metrics
    fps = m["frames"] / m["duration_s"]
    t = np.arange(m["frames"]) / fps
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 4.6), dpi=100, sharex=True)
    if s["mouth_gt"] is not None:
        a1.plot(t, s["mouth_gt"], color="k", lw=1.2, label="reference (ground truth)")
    a1.plot(t, s["mouth_ref"], color="tab:blue", lw=1, alpha=0.7, label="reference (measured)")
    a1.plot(t, s["mouth_gen"], color="tab:red", lw=1.2, label="generated (measured)")
    for flags, y, c in ((s["blink_ref"], -0.08, "tab:blue"), (s["blink_gen"], -0.14, "tab:red")):
        on = np.flatnonzero(flags)
        a1.plot(t[on], np.full(len(on), y), "|", color=c, ms=6)
    lag = "n/a" if m["sync_lag"] is None else f"{m['sync_lag']:+d}"
    a1.set_title(f"{stem}: mouth opening (sync r = {_cell(m['sync_r'], 3)}, lag {lag}); "
                 "ticks below 0: blink frames", fontsize=9)
    a1.set_ylabel("opening (normalised)")
    a1.legend(fontsize=7, loc="upper right")
    a2.plot(t, s["drift_gen"], color="tab:red", lw=1.2, label="generated")
    a2.plot(t, s["drift_ref"], color="tab:blue", lw=1, alpha=0.7, label="reference")
    win = m["drift_window_frames"] / fps
    a2.axvspan(0, win, color="tab:green", alpha=0.08)
    a2.axvspan(t[-1] - win, t[-1], color="tab:orange", alpha=0.08)
    finite = np.concatenate([s["drift_gen"], s["drift_ref"]])
    finite = finite[finite < 99.0]  # identical frames sit at the 100 dB cap
    if finite.size:
        a2.set_ylim(finite.min() - 2, finite.max() + 2)
    a2.set_title(f"upper-face PSNR vs identity frame (drift {m['drift_db']:+.2f} dB; shaded: first / last window)",
                 fontsize=9)
    a2.set_ylabel("dB")
    a2.set_xlabel("time (s)")
    a2.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _motion(path: Path, stem: str, score) -> None:
    """The head track of both clips per axis (and the second run's, and the
    ground truth's) over time, and their aligned eye openness with blink marks."""
    import matplotlib.pyplot as plt

    s, m = score.series, score.metrics
    fps = m["frames"] / m["duration_s"]
    t = np.arange(m["frames"]) / fps
    fig, axes = plt.subplots(4, 1, figsize=(8, 6.4), dpi=100, sharex=True)
    for i, (ax, axis, label) in enumerate(zip(axes, ("angle", "tx", "ty"), AXIS_LABELS)):
        if s.get("track_gt") is not None:
            ax.plot(t, s["track_gt"][:, i], color="k", lw=0.8, alpha=0.6, label="reference (ground truth)")
        ax.plot(t, s["track_ref"][:, i], color="tab:blue", lw=1, label="reference")
        ax.plot(t, s["track_gen"][:, i], color="tab:red", lw=1.2, label="generated")
        if s.get("track_gen_b") is not None:
            ax.plot(t[:len(s["track_gen_b"])], s["track_gen_b"][:, i], color="tab:orange", lw=1, ls="--",
                    label="generated, 2nd run")
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"{axis}: std gen {m[f'head_std_gen_{axis}']:.2f} / ref {m[f'head_std_ref_{axis}']:.2f} "
                     f"(ratio {_cell(m[f'head_motion_ratio_{axis}'], 2)})", fontsize=8)
        if i == 0:
            ax.legend(fontsize=6, loc="best")
    a4 = axes[3]
    a4.plot(t, s["eye_ref"], color="tab:blue", lw=1, label="reference")
    a4.plot(t, s["eye_gen"], color="tab:red", lw=1.2, label="generated")
    lo = min(float(np.min(s["eye_ref"])), float(np.min(s["eye_gen"])), 0.5)
    marks = [(s["blink_ref"], "tab:blue", f"reference ({m['reference_blinks']})"),
             (s["blink_ref_measured"], "tab:cyan", "reference (measured)"),
             (s["blink_gen"], "tab:red", "generated")]
    for j, (flags, c, label) in enumerate(marks):
        on = np.flatnonzero(flags)
        a4.plot(t[on], np.full(len(on), lo - 0.06 * (j + 1)), "|", color=c, ms=6, label=f"blinks {label}")
    a4.set_title(f"eye openness, pose-aligned (blinks gen {m['blinks_gen']}, ref {m['blinks_ref']}, "
                 f"ref measured {m['blinks_ref_measured']})", fontsize=8)
    a4.set_ylabel("openness", fontsize=8)
    a4.set_xlabel("time (s)")
    a4.legend(fontsize=6, loc="best", ncol=2)
    fig.suptitle(f"{stem}: head track relative to the identity frame", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _table(table_id: str, columns: list, doc: dict, scores: dict) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(label)}</th>" for _, label, _ in columns)

    def row(name, values, cls=""):
        cells = "".join(f"<td>{_cell(values.get(k), d)}</td>" for k, _, d in columns)
        return f'<tr class="{cls}"><td>{name}</td>{cells}</tr>'

    rows = [row("average", doc["averages"], "avg")]
    if doc.get("floor"):
        rows.append(row("floor: identity frame held still", doc["floor"], "floor"))
    rows += [row(f'<a href="#{quote(stem)}">{esc(stem)}</a>', score.metrics) for stem, score in scores.items()]
    return (f'<table id="{table_id}"><thead><tr><th>clip</th>{head}</tr></thead><tbody>\n'
            f"{''.join(rows)}\n</tbody></table>")


def _not_scored(doc: dict) -> str:
    """Clips that could not be read (one line each, with why), then the stems
    found on one side only (one line per kind)."""
    esc = html.escape
    items = [f"<li>{esc(k)}: {esc(v)}</li>" for k, v in doc.get("failed", {}).items()]
    unmatched = doc.get("unmatched", {})
    for key, why in (("reference_only", "no generated clip"), ("generated_only", "no reference clip"),
                     ("generated_b_missing", "scored, but not in the second run (no variety)")):
        if unmatched.get(key):
            stems = unmatched[key]
            items.append(f"<li>{why} ({len(stems)}): {esc(', '.join(stems))}</li>")
    return f'<h2>Not scored</h2><ul id="not-scored">{"".join(items)}</ul>' if items else ""


def write_report(folder: Path, doc: dict, scores: dict, strips: dict, videos: dict) -> Path:
    """Write `folder/index.html` and `folder/img/<stem>_{frames,curves,motion}.png`."""
    import matplotlib

    matplotlib.use("Agg")
    img = folder / "img"
    img.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    sections = []
    for stem, score in scores.items():
        frames_png, curves_png = f"img/{stem}_frames.png", f"img/{stem}_curves.png"
        motion_png = f"img/{stem}_motion.png"
        _frame_strip(folder / frames_png, stem, score, strips[stem])
        _curves(folder / curves_png, stem, score)
        _motion(folder / motion_png, stem, score)
        anchor = quote(stem)
        m = score.metrics
        notes = (f"{m['frames']} frames compared (generated {m['frames_generated']}, reference "
                 f"{m['frames_reference']}); generated {m['generated_size'][0]}×{m['generated_size'][1]}"
                 f"{' resized to ' if m['resized'] else ' = '}{m['reference_size'][0]}×{m['reference_size'][1]}; "
                 f"regions from {m['regions_from']}; reference mouth {m['reference_mouth']}, "
                 f"blinks {m['reference_blinks']} ({m['blinks_gen']} generated vs {m['blinks_ref']} reference)")
        if m.get("mouth_measure_r") is not None:
            notes += f"; mouth measure on the reference vs ground truth r = {m['mouth_measure_r']:.3f}"
        if m.get("head_track_r_gt_angle") is not None:
            notes += ("; reference head track vs ground-truth pose r = "
                      + " / ".join(_cell(m[f"head_track_r_gt_{a}"], 3) for a in ("angle", "tx", "ty"))
                      + " (angle / tx / ty)")
        if m.get("variety_reason"):
            notes += f"; variety: {m['variety_reason']}"
        links = " | ".join(f'<a href="{quote(videos[stem][side])}">{side} mp4</a>'
                           for side in ("generated", "reference"))
        sections.append(
            f'<div class="clip" id="{esc(anchor)}"><h3>{esc(stem)}</h3><p>{links}</p>'
            f"<p>{esc(notes)}.</p>"
            f'<img src="{quote(frames_png)}" alt="frames {esc(stem)}"><br>'
            f'<img src="{quote(curves_png)}" alt="mouth opening {esc(stem)}"><br>'
            f'<img src="{quote(motion_png)}" alt="head track and blinks {esc(stem)}"></div>')
    avg = doc["averages"]
    unavailable = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in doc["unavailable"].items())
    failed = _not_scored(doc)
    second = (f"second run (variety): <code>{esc(doc['generated_b'])}</code><br>\n"
              if doc.get("generated_b") else "")
    methods = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in METHODS)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dheads eval report</title>
<style>{CSS}</style></head><body>
<h1>dheads eval</h1>
<p>generated: <code>{esc(doc['generated'])}</code><br>reference: <code>{esc(doc['reference'])}</code><br>
{second}{avg['clips']} clips, {avg['frames']} frames; {avg['sync_static_clips']} with a static generated mouth;
{avg['resized_clips']} resized. Raw numbers: <a href="metrics.json">metrics.json</a>; how each figure
is measured: <a href="#definitions">definitions</a> (after the clips).</p>
<h2>Metrics</h2>
{_table("metrics", TABLE_COLUMNS, doc, scores)}
<h2>Head motion, blinks, identity, flicker, variety</h2>
{_table("motion", MOTION_COLUMNS, doc, scores)}
{failed}
<h2>Not available offline</h2><ul id="unavailable">{unavailable}</ul>
<p>These need pretrained networks whose weights cannot be downloaded here; they are not approximated.</p>
<h2>Clips</h2>
{''.join(sections)}
<h2 id="definitions">Definitions</h2><dl>{methods}</dl>
</body></html>
"""
    out = folder / "index.html"
    out.write_text(page, encoding="utf-8")
    return out
