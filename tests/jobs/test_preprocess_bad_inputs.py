"""`dheads preprocess` (the CLI, on a local Ray) over one folder holding every
awkward kind of input of issue 12: each good-but-odd file becomes a correct
row, each bad one a row of errors.parquet with its stage and reason, and
the job completes. A non-UTF-8 file name is one such file, not the end of
the job; a second run skips everything that was written (resume keys stay
stable for escaped names). Files come from tests/media_kinds.py."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import media_kinds as mk  # noqa: E402

from dheads.jobs import shards as shard_format  # noqa: E402
from dheads.platform.cli import main  # noqa: E402

# name -> (stage, words in the reason)
FAILS = {
    "tiny.mkv": ("video", "frames are 8x8 px, below the minimum of 16 px"),
    "cut_index.mp4": ("probe", "not a readable media file"),
    "ten_minutes.mp4": ("video", "longer than the limit of 600 s"),
    "nan_audio.mkv": ("audio", "NaN/inf"),
    "no_samples.mkv": ("audio", "no samples"),
    "song.mp3": ("video", "audio-only file"),
    "almost_silent.mp4": ("validate", "the audio covers only 0.1"),   # 0.1 s + AAC padding
    "noise.webm": ("probe", "not a readable media file"),
    "empty.opus": ("probe", "empty file (0 bytes)"),
}
# clip_id -> n_frames (None: any)
OKS = {"rotated": 30, "ten_bit": 30, "full_range": 30, "gray": 30, "wide": 30, "odd": 30,
       "tracks": 30, "audio_8k": 30, "audio_96k": 30, "opus": 30, "mp3_audio": 30,
       "short_audio": 25, "late_audio": 30, "cut_tail": None, "caf\\xe9 take": 30}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("kinds")
    # decode fine, look odd
    mk.video(d / "rotated.mp4", size=(64, 32), rotation=90)
    mk.video(d / "ten_bit.mkv", pix_fmt="yuv420p10le")
    mk.video(d / "full_range.mp4", full_range=True, level=8)
    mk.video(d / "gray.mkv", codec="ffv1", pix_fmt="gray")
    mk.video(d / "wide.mp4", size=(96, 48))
    mk.video(d / "odd.mkv", size=(65, 49), codec="ffv1", pix_fmt="yuv444p")
    mk.video(d / "tracks.mkv", audio=None, extra_audio=[("aac", 16000, 1, mk.TONE_HZ, True),
                                                        ("aac", 16000, 1, 880.0, False)])
    mk.video(d / "audio_8k.mp4", audio=("aac", 8000, 1))
    mk.video(d / "audio_96k.mp4", audio=("aac", 96000, 2))
    mk.video(d / "opus.webm", codec="libvpx", audio=("libopus", 48000, 1))
    mk.video(d / "mp3_audio.mp4", audio=("libmp3lame", 44100, 1))
    mk.video(d / "short_audio.mp4", seconds=2.0, audio_seconds=1.0)
    mk.video(d / "late_audio.mkv", audio_start_s=0.4, audio_seconds=0.8)
    mk.truncate(mk.video(d / "cut_tail.mkv", seconds=3.0), keep=0.6)
    mk.video(Path(os.fsdecode(os.fsencode(d) + b"/caf\xe9 take.mp4")))   # Latin-1 name
    # bad, each for its own reason
    mk.video(d / "tiny.mkv", size=(8, 8), codec="ffv1", pix_fmt="yuv444p")
    mk.truncate(mk.video(d / "cut_index.mp4", seconds=2.0), keep=0.6)
    mk.video(d / "ten_minutes.mp4", seconds=610, fps=1, size=(16, 16), audio=None)
    mk.video(d / "nan_audio.mkv", audio=("pcm_f32le", 16000, 1), nan_audio=True)
    mk.video(d / "no_samples.mkv", audio_packets=False)
    mk.audio_file(d / "song.mp3", codec="libmp3lame", rate=44100, cover_picture=True)
    mk.video(d / "almost_silent.mp4", seconds=2.0, audio_seconds=0.1)
    (d / "noise.webm").write_bytes(np.random.default_rng(5).bytes(30_000))
    (d / "empty.opus").write_bytes(b"")
    return d


def _run(src: Path, out: Path) -> int:
    return main(["preprocess", f"input={src}", f"output={out}", "data.workers=2",
                 "data.clips_per_shard=4"])


def _rows(out: Path) -> dict[str, dict]:
    rows = {}
    for f in sorted(out.glob("shard-*.parquet")):
        for r in pq.read_table(f).to_pylist():
            rows[r["clip_id"]] = r
    return rows


def _frame(row: dict, i: int = 5) -> np.ndarray:
    return shard_format.decode_frames([row["frames"][i]])[0].astype(int)


def test_every_kind_is_a_row_or_a_reason_and_the_job_completes(ray_session, inputs, tmp_path, capsys):
    out = tmp_path / "shards"
    assert _run(inputs, out) == 0
    errors = {Path(r["source_uri"]).name: r for r in pq.read_table(out / "errors.parquet").to_pylist()}
    assert set(errors) == set(FAILS), errors
    for name, (stage, words) in FAILS.items():
        assert errors[name]["stage"] == stage and words in errors[name]["reason"], errors[name]
    rows = _rows(out)
    assert set(rows) == set(OKS)
    for clip_id, n in OKS.items():
        r = rows[clip_id]
        if n is not None:
            assert r["n_frames"] == n, (clip_id, r["n_frames"])
        assert r["height"] == r["width"] == 64 and len(r["frames"]) == r["n_frames"]
        assert len(r["audio_pcm16"]) == 2 * 640 * r["n_frames"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["failed"]) == (len(OKS), len(FAILS))
    assert f"{len(OKS)} ok, {len(FAILS)} failed" in capsys.readouterr().out

    # what the rows hold: upright, right levels, the default track, audio-bounded
    assert 10 <= rows["cut_tail"]["n_frames"] < 75
    rot = _frame(rows["rotated"])                     # marker stored top-left, displayed bottom-left
    h = rot.shape[0] // 2
    assert rot[h:, :h, 0].mean() - rot[h:, :h, 1].mean() > 100
    assert rot[:h, :, 0].mean() - rot[:h, :, 1].mean() < 20
    assert abs(_frame(rows["full_range"])[40:60, 40:60].mean() - 8) < 5
    assert abs(_frame(rows["ten_bit"])[40:60, 40:60].mean() - 128) < 6
    g = _frame(rows["gray"])
    assert np.abs(g[..., 0] - g[..., 2]).max() <= 6  # JPEG chroma noise only
    pcm = np.frombuffer(rows["tracks"]["audio_pcm16"], "<i2").astype(np.float32)
    spec = np.abs(np.fft.rfft(pcm[1600:17600]))
    assert np.argmax(spec) * 16000 / 16000 == pytest.approx(mk.TONE_HZ, abs=5)
    latin = rows["caf\\xe9 take"]
    assert latin["source_uri"].endswith("/caf\\xe9 take.mp4")


def test_a_rerun_skips_every_written_clip_including_escaped_names(ray_session, inputs, tmp_path):
    out = tmp_path / "shards"
    assert _run(inputs, out) == 0
    first = json.loads((out / "summary.json").read_text())
    assert _run(inputs, out) == 0
    second = json.loads((out / "summary.json").read_text())
    assert second["skipped"] == first["ok"] == len(OKS)
    assert second["ok"] == 0 and second["failed"] == len(FAILS)   # bad files are retried, fail again
    assert len(_rows(out)) == len(OKS)
