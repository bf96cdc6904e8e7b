"""`dheads eval` end to end: a static-identity 'generated' set against
benchmark val clips (local and S3), and the HTML report opened in headless
Chromium. Chromium comes from scripts/install_chromium.sh; without it the
report test fails (CI installs it), it does not skip."""
from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from dheads.platform.cli import main
from dheads.platform.media import read_video, write_video

STEMS = ("val_0004", "val_0020", "val_0024")  # the shortest val clips (63-73 frames)
REQUIRED = {"sync_r", "sync_lag", "blink_rate_ratio", "psnr_upper", "ssim_upper", "flow_ratio", "fmse", "clips",
            "head_motion_ratio_angle", "head_motion_ratio_tx", "head_motion_ratio_ty", "head_track_r_gt_angle",
            "blink_rate_ref_measured", "blink_rate_ratio_measured", "identity_psnr_gen", "identity_psnr_ref",
            "identity_psnr_first", "identity_psnr_last", "flicker_ratio", "sharpness_ratio",
            "variety_track_r", "variety_blink_r", "variety_reason", "missing_clips"}
PLOTS = ("frames", "curves", "motion")  # the report's images per clip


def _static_identity(src: Path, dst: Path, size: int | None = 64) -> None:
    """The floor of any method: the first frame repeated, with the clip's audio,
    at `size` px and one frame short (eval must resize and cut to the common prefix)."""
    import cv2

    clip = read_video(src)
    first = clip.frames[0] if size is None else cv2.resize(clip.frames[0], (size, size), interpolation=cv2.INTER_AREA)
    write_video(dst, np.repeat(first[None], clip.n_frames - 1, axis=0), audio=clip.audio)


def _run_cli(capsys, *args: str) -> dict:
    assert main(["eval", *args]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1, lines  # exactly one JSON line on stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def local_eval(benchmark_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    gen = root / "generated"
    gen.mkdir()
    for stem in STEMS:
        _static_identity(benchmark_dir / "val" / f"{stem}.mp4", gen / f"{stem}.mp4")
    return gen, benchmark_dir / "val", root / "report"


def test_eval_cli_writes_averages_and_per_clip_json(local_eval, capsys):
    gen, ref, out = local_eval
    avg = _run_cli(capsys, f"generated={gen}", f"reference={ref}", f"out={out}")
    assert REQUIRED <= avg.keys()
    assert avg["clips"] == len(STEMS) and avg["resized_clips"] == len(STEMS)
    assert avg["sync_r"] == 0.0 and avg["sync_static_clips"] == len(STEMS) and avg["sync_lag"] is None
    assert avg["flow_ratio"] < 0.05 and avg["fmse"] < 1.0
    # the still frame: no head motion, no blinks, no flicker; the tracker is trusted on the references
    assert max(avg[f"head_motion_ratio_{a}"] for a in ("angle", "tx", "ty")) < 0.05
    assert avg["blink_rate_gen"] == 0 and avg["flicker_ratio"] < 0.15
    assert min(avg[f"head_track_r_gt_{a}"] for a in ("angle", "tx", "ty")) > 0.9
    assert avg["variety_track_r"] is None and "generated_b not given" in avg["variety_reason"]
    assert avg["missing_clips"] == 40 - len(STEMS)
    assert 10 < avg["psnr_upper"] < 40 and 0 < avg["ssim_upper"] < 1
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["averages"] == avg
    assert sorted(doc["clips"]) == sorted(STEMS)
    assert set(doc["unavailable"]) == {"FID", "FVD", "LPIPS", "SyncNet"}
    assert all(v.startswith("not available offline") for v in doc["unavailable"].values())
    clip = doc["clips"]["val_0004"]
    assert clip["frames"] == 62 and clip["frames_reference"] == 63 and clip["reference_mouth"] == "ground truth"
    assert "val_0000" in doc["unmatched"]["reference_only"]
    # the still-identity floor of the references, scored beside: at full
    # resolution it beats the 64-px generated copy of the same still frame
    floor = doc["floor"]
    assert floor["clips"] == len(STEMS) and floor["sync_static_clips"] == len(STEMS)
    assert floor["flow_ratio"] < 0.05 and floor["psnr_upper"] > avg["psnr_upper"]


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.refs.append(("img", a["src"]))
        elif tag == "a" and not a.get("href", "#").startswith("#"):
            self.refs.append(("a", a["href"]))


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    assert exe, "chromium not found: run scripts/install_chromium.sh"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={cwd / 'chromium-profile'}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_report_renders_in_headless_chromium(local_eval, capsys, tmp_path):
    gen, ref, out = local_eval
    index = out / "index.html"
    if not index.exists():
        _run_cli(capsys, f"generated={gen}", f"reference={ref}", f"out={out}")
    # every image and link is relative, exists, and images decode
    refs = _Refs()
    refs.feed(index.read_text())
    imgs = [src for kind, src in refs.refs if kind == "img"]
    assert len(imgs) == len(PLOTS) * len(STEMS)
    assert {f"img/{stem}_{plot}.png" for stem in STEMS for plot in PLOTS} == set(imgs)
    for kind, target in refs.refs:
        assert "://" not in target and not target.startswith("/"), target
        assert (out / unquote(target)).is_file(), target
    for src in imgs:
        with Image.open(out / unquote(src)) as im:
            im.load()
            assert im.width > 200 and im.height > 200
    assert any(t.endswith(".mp4") for _, t in refs.refs)

    dom = _chromium("--dump-dom", index.as_uri(), cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<table id="metrics">' in dom.stdout and '<table id="motion">' in dom.stdout
    for stem in STEMS:
        assert f">{stem}</a></td>" in dom.stdout
    assert "not available offline" in dom.stdout and dom.stdout.count("<img") == len(PLOTS) * len(STEMS)
    assert f"no generated clip ({40 - len(STEMS)}): val_0000, val_0001" in dom.stdout  # named

    shot = tmp_path / "shot.png"
    res = _chromium("--window-size=1200,2000", f"--screenshot={shot}", index.as_uri(), cwd=tmp_path)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert rgb.std() > 20  # not blank
    # The faces' saturated backgrounds only appear if the frame-strip PNGs loaded.
    saturated = (rgb.max(-1) - rgb.min(-1)) > 100
    assert saturated.mean() > 0.02, saturated.mean()


def test_eval_reads_and_writes_s3(benchmark_dir, s3_bucket, tmp_path, capsys):
    import boto3

    bucket, storage = s3_bucket
    s3 = boto3.client("s3", endpoint_url=storage.endpoint_url, region_name="us-east-1")
    for stem in STEMS[:2]:
        src = benchmark_dir / "val" / stem
        s3.upload_file(str(src.with_suffix(".mp4")), bucket, f"ref/{stem}.mp4")
        s3.upload_file(str(src.with_suffix(".json")), bucket, f"ref/{stem}.json")
        _static_identity(src.with_suffix(".mp4"), tmp_path / f"{stem}.mp4", size=None)
        s3.upload_file(str(tmp_path / f"{stem}.mp4"), bucket, f"gen/{stem}.mp4")
    avg = _run_cli(capsys, f"generated=s3://{bucket}/gen", f"reference=s3://{bucket}/ref",
                   f"out=s3://{bucket}/eval", f"storage.endpoint_url={storage.endpoint_url}")
    assert REQUIRED <= avg.keys() and avg["clips"] == 2 and avg["resized_clips"] == 0
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="eval/")["Contents"]}
    want = {"eval/metrics.json", "eval/index.html"}
    for stem in STEMS[:2]:
        want |= {f"eval/img/{stem}_{plot}.png" for plot in PLOTS}
        want |= {f"eval/videos/generated/{stem}.mp4", f"eval/videos/reference/{stem}.mp4"}
    assert want <= keys, want - keys
    doc = json.loads(s3.get_object(Bucket=bucket, Key="eval/metrics.json")["Body"].read())
    assert doc["clips"][STEMS[0]]["reference_mouth"] == "ground truth"  # the .json came from S3
    page = s3.get_object(Bucket=bucket, Key="eval/index.html")["Body"].read().decode()
    assert f'href="videos/reference/{STEMS[0]}.mp4"' in page
