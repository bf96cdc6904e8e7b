"""`dheads synth`: real mp4 + sidecar per clip; the mouth follows the sound."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from dheads.platform.media import probe, read_video


def test_synth_clips_are_real_talking_faces(synth_dir):
    manifest = [json.loads(line) for line in (synth_dir / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 6
    assert len({m["identity_id"] for m in manifest}) == 2           # ~3 clips per identity
    corrs = []
    for m in manifest:
        info = probe(synth_dir / m["video"])
        assert info["video"]["codec"] == "h264" and info["video"]["fps"] == 25
        assert (info["video"]["width"], info["video"]["height"]) == (64, 64)
        assert info["audio"]["codec"] == "aac" and info["audio"]["sample_rate"] == 16000
        assert info["audio"]["channels"] == 1
        meta = json.loads((synth_dir / m["meta"]).read_text())
        clip = read_video(synth_dir / m["video"])
        assert clip.n_frames == m["n_frames"] == meta["n_frames"]
        fr = meta["frames"]
        assert len(fr["mouth_open"]) == len(fr["mouth_box"]) == len(fr["blink"]) == clip.n_frames
        boxes = np.asarray(fr["mouth_box"])
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes >= 0).all() and (boxes <= 64).all()
        # opening follows the decoded audio's loudness and is shut in silence
        rms = np.sqrt((clip.audio.reshape(clip.n_frames, 640) ** 2).mean(1))
        opening = np.asarray(fr["mouth_open"])
        corrs.append(np.corrcoef(opening, rms)[0, 1])
        assert opening[rms < 0.005].max(initial=0) < 0.05
        assert opening.max() > 0.5
        # a wider-open mouth is a taller box
        height = boxes[:, 3] - boxes[:, 1]
        assert np.corrcoef(opening, height)[0, 1] > 0.9
        # the mouth region changes with the opening (the picture, not just the JSON)
        assert clip.frames.std(0).max() > 20
    assert min(corrs) > 0.8, corrs
    assert sum(sum(json.loads((synth_dir / m["meta"]).read_text())["frames"]["blink"]) > 0
               for m in manifest) >= 2


def test_synth_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dheads.platform.cli", "synth", f"out={tmp_path}",
                          "n=2", "seed=7", "image_size=32", "min_s=1", "max_s=1.5", "workers=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "synth: 2 clips" in out.stdout
    assert len(list(tmp_path.glob("*.mp4"))) == 2 and (tmp_path / "manifest.jsonl").exists()
