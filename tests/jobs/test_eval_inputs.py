"""`dheads eval` with incomplete inputs: a generated folder missing a clip and
holding an unreadable one, and a second run (`generated_b=`) missing a clip:
the missing and unreadable clips are named (log, metrics.json, report), the
rest are scored, and variety is filled where the second run has the clip."""
from __future__ import annotations

import json
import shutil

import numpy as np

from dheads.platform.cli import main
from dheads.platform.media import read_video, write_video

STEMS = ("val_0004", "val_0020", "val_0024")  # the shortest val clips (63-73 frames)


def test_missing_and_unreadable_clips_are_named_and_the_rest_scored(benchmark_dir, tmp_path, capsys):
    ref, gen, gen_b, out = (tmp_path / d for d in ("ref", "gen", "gen_b", "out"))
    for d in (ref, gen, gen_b):
        d.mkdir()
    for stem in STEMS:
        for ext in (".mp4", ".json"):
            shutil.copy(benchmark_dir / "val" / f"{stem}{ext}", ref / f"{stem}{ext}")
    # generated: val_0004 and val_0020 (the references themselves), val_0024 missing,
    # plus a clip without a reference and an unreadable one
    for stem in STEMS[:2]:
        shutil.copy(ref / f"{stem}.mp4", gen / f"{stem}.mp4")
    shutil.copy(ref / "val_0024.mp4", gen / "extra_0001.mp4")
    (ref / "broken_0002.mp4").write_bytes((ref / "val_0024.mp4").read_bytes())
    (gen / "broken_0002.mp4").write_bytes(b"not an mp4 at all" * 100)
    # the second run: val_0004 time-reversed (another motion), nothing for val_0020
    clip = read_video(ref / "val_0004.mp4")
    write_video(gen_b / "val_0004.mp4", clip.frames[::-1].copy(), audio=clip.audio)

    assert main(["eval", f"generated={gen}", f"reference={ref}", f"out={out}", f"generated_b={gen_b}"]) == 0
    captured = capsys.readouterr()
    avg = json.loads([ln for ln in captured.out.splitlines() if ln.strip()][-1])
    log = captured.err
    assert "1 reference (val_0024)" in log and "1 generated (extra_0001)" in log
    assert "not scored: broken_0002" in log and "missing: val_0020" in log

    doc = json.loads((out / "metrics.json").read_text())
    assert sorted(doc["clips"]) == ["val_0004", "val_0020"] and avg["clips"] == 2
    assert doc["unmatched"] == {"generated_only": ["extra_0001"], "reference_only": ["val_0024"],
                                "generated_b_missing": ["val_0020"]}
    assert list(doc["failed"]) == ["broken_0002"] and "broken_0002.mp4" in doc["failed"]["broken_0002"]
    assert avg["missing_clips"] == 1 and avg["failed_clips"] == 1

    # the reference scored against itself: motion as the reference's, blinks the same
    for stem in ("val_0004", "val_0020"):
        m = doc["clips"][stem]
        assert all(m[f"head_motion_ratio_{a}"] == 1.0 for a in ("angle", "tx", "ty"))
        assert m["identity_psnr_gen"] == m["identity_psnr_ref"] and np.isfinite(m["identity_psnr_ref"])
    # variety where the second run has the clip, null with the reason where not
    assert doc["clips"]["val_0004"]["variety_track_r"] < 0.5 and doc["clips"]["val_0004"]["variety_reason"] is None
    assert doc["clips"]["val_0020"]["variety_track_r"] is None
    assert f"no clip val_0020.mp4 in the second run {gen_b}" == doc["clips"]["val_0020"]["variety_reason"]
    assert avg["variety_clips"] == 1 and avg["variety_track_r"] == doc["clips"]["val_0004"]["variety_track_r"]

    page = (out / "index.html").read_text()
    assert "no generated clip (1): val_0024" in page and "no reference clip (1): extra_0001" in page
    assert "broken_0002:" in page and "not in the second run (no variety) (1): val_0020" in page
