"""`dheads preprocess` on real files: the benchmark set, every kind of bad
input, resume, and S3 (moto_server) to S3."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from dheads.jobs import preprocess as pp
from dheads.jobs import shards as shard_format
from dheads.jobs.reader import load_clip_rows
from dheads.model.audio import feature_shape
from dheads.platform import storage
from dheads.platform.config import compose


def _cfg(inp, out, *extra):
    return compose("preprocess", [f"input={inp}", f"output={out}", "data.workers=2",
                                  "data.clips_per_shard=4", *extra])


def _rows(out, storage_cfg=None, columns=None):
    rows = []
    for uri in shard_format.shard_uris(str(out), storage_cfg or compose("preprocess").storage):
        fs, path = storage.resolve(uri, storage_cfg)
        rows += pq.read_table(path, filesystem=fs, columns=columns).to_pylist()
    return rows


def _errors(out, storage_cfg=None):
    fs, path = storage.resolve(storage.join(str(out), "errors.parquet"), storage_cfg)
    return {storage.basename(r["source_uri"]): r for r in pq.read_table(path, filesystem=fs).to_pylist()}


def test_benchmark_val_gives_one_row_per_clip(ray_session, benchmark_dir, copy_clips, tmp_path):
    # 12 of the 40 val clips (the others are made the same way): 2 shards of up to 8
    src, out = tmp_path / "val", tmp_path / "shards"
    manifest = copy_clips(benchmark_dir / "val", src, 12)
    cfg = _cfg(src, out, "data.clips_per_shard=8")
    summary = pp.preprocess(cfg, progress=False)
    assert (summary.clips_in, summary.ok, summary.failed) == (12, 12, 0)
    rows = {r["clip_id"]: r for r in _rows(out)}
    assert len(rows) == 12 and len(shard_format.shard_uris(str(out), cfg.storage)) == 2
    size = cfg.model.image_size
    for m in manifest:
        r = rows[m["clip_id"]]
        assert r["n_frames"] == m["n_frames"] == len(r["frames"]) == len(r["mouth_boxes"])
        assert r["identity"] == str(m["identity_id"]) and r["mouth_box_source"] == "sidecar"
        assert r["audio_features_shape"] == [m["n_frames"], *feature_shape(cfg.model.audio)]
        assert len(r["audio_pcm16"]) == 2 * 640 * m["n_frames"]
    # sidecar boxes are scaled from the 128-px source to the model's image size
    meta = json.loads((benchmark_dir / "val" / "val_0000.json").read_text())
    want = np.asarray(meta["frames"]["mouth_box"]) * size / 128
    np.testing.assert_allclose(np.asarray(rows["val_0000"]["mouth_boxes"]), want, atol=1e-3)
    clip = load_clip_rows(str(out), clip_ids=["val_0001"])[0]
    assert clip["frames"].shape == (99, size, size, 3)
    summ = json.loads((out / "summary.json").read_text())
    assert summ["frames"] == sum(m["n_frames"] for m in manifest) and summ["wall_s"] > 0
    prom = (out / "metrics.prom").read_text()
    assert 'dheads_preprocess_clips_total{status="ok"} 12.0' in prom
    assert 'dheads_preprocess_clips_total{status="failed"} 0.0' in prom


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, video_factory, synth_dir):
    """One file per kind of awkward input, with what preprocess must say about it."""
    d = tmp_path_factory.mktemp("bad")
    mk = video_factory
    (d / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(20_000))
    (d / "empty.mp4").write_bytes(b"")
    mk(d / "no_audio.mp4", audio_rate=None)
    mk(d / "no_video.mp4", video=False)
    mk(d / "speech.mp3", video=False)
    mk(d / "short.mp4", n_frames=5)
    mk(d / "uhd_4k.mp4", n_frames=8, size=(3840, 2160))
    mk(d / "r30.mp4", n_frames=60, fps=30)
    mk(d / "r2997.mov", n_frames=60, fps=30000 / 1001)
    mk(d / "r60.mkv", n_frames=120, fps=60)
    mk(d / "stereo44k.mp4", audio_rate=44100, channels=2)
    mk(d / "stereo48k.mkv", audio_rate=48000, channels=2)
    mk(d / "mpeg4.avi", codec="mpeg4")
    mk(d / "vfr.mp4", n_frames=50, vfr=True)
    mk(d / "vp8.webm", codec="libvpx", audio_rate=None)
    (d / "speaker a").mkdir()
    shutil.copy(synth_dir / "synth_3_00000.mp4", d / "speaker a" / "ünï cødé 名前 take 1.mp4")
    failed = {"corrupt.mp4": ("probe", "not a readable media file"),
              "empty.mp4": ("probe", "0 bytes"),
              "no_audio.mp4": ("audio", "no audio stream"),
              "no_video.mp4": ("video", "no video stream"),
              "speech.mp3": ("video", "audio-only file"),
              "short.mp4": ("validate", "too short: 5 frames"),
              "vp8.webm": ("audio", "no audio stream")}
    ok = {"uhd_4k": 8, "r30": 50, "r2997": 50, "r60": 50, "stereo44k": 30, "stereo48k": 30,
          "mpeg4": None, "vfr": None, "speaker a/ünï cødé 名前 take 1": None}
    return d, failed, ok


def test_bad_inputs_fail_only_their_own_clip(ray_session, bad_inputs, tmp_path):
    src, failed, ok = bad_inputs
    summary = pp.preprocess(_cfg(src, tmp_path), progress=False)
    errors = _errors(tmp_path)
    assert set(errors) == set(failed)
    for name, (stage, words) in failed.items():
        assert errors[name]["stage"] == stage and words in errors[name]["reason"], errors[name]
    rows = {r["clip_id"]: r for r in _rows(tmp_path)}
    assert set(rows) == set(ok)
    for clip_id, n in ok.items():
        r = rows[clip_id]
        if n is not None:
            assert r["n_frames"] == n, clip_id
        assert len(r["frames"]) == r["n_frames"] and r["height"] == r["width"] == 64
        assert len(r["audio_pcm16"]) == 2 * 640 * r["n_frames"]
        assert r["mouth_box_source"] == "geometry"
    assert rows["r30"]["source_fps"] == pytest.approx(30)
    assert rows["r2997"]["source_fps"] == pytest.approx(29.97, abs=0.01)
    assert rows["r60"]["source_fps"] == pytest.approx(60)
    assert 40 <= rows["vfr"]["n_frames"] <= 52
    unicode = rows["speaker a/ünï cødé 名前 take 1"]
    assert unicode["identity"] == "speaker a" and unicode["source_uri"].endswith("名前 take 1.mp4")
    assert rows["r30"]["identity"] == "r30"          # no sidecar, no folder: the stem
    # a 4K frame becomes a 64-px crop of its centre, decoded small
    assert rows["uhd_4k"]["source_fps"] == 25
    assert (summary.ok, summary.failed) == (len(ok), len(failed))


def test_resume_skips_written_clips_and_never_duplicates(ray_session, synth_dir, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(synth_dir, src, ignore=shutil.ignore_patterns("synth_3_0000[45].*"))
    out = tmp_path / "out"
    s1 = pp.preprocess(_cfg(src, out), progress=False)
    assert (s1.ok, s1.skipped) == (4, 0)
    (out / "_tmp.deadbeef.shard-0000.parquet").write_bytes(b"PAR1 half a shard")  # a killed writer
    for f in synth_dir.glob("synth_3_0000[45].*"):
        shutil.copy(f, src / f.name)
    s2 = pp.preprocess(_cfg(src, out), progress=False)
    assert (s2.clips_in, s2.ok, s2.skipped) == (6, 2, 4)
    s3 = pp.preprocess(_cfg(src, out), progress=False)
    assert (s3.ok, s3.skipped, s3.failed) == (0, 6, 0)
    ids = [r["clip_id"] for r in _rows(out, columns=["clip_id"])]
    assert sorted(ids) == sorted(f"synth_3_{k:05d}" for k in range(6))
    assert not list(out.glob("_tmp*"))


def test_s3_to_s3_with_vanished_and_denied_keys(ray_session, s3_bucket, synth_dir):
    import boto3

    bucket, st = s3_bucket
    s3 = boto3.client("s3", endpoint_url=st.endpoint_url, region_name="us-east-1")
    for f in sorted(synth_dir.glob("synth_3_*")):
        s3.upload_file(str(f), bucket, f"raw/{f.name}")
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::{bucket}/raw/synth_3_00001.mp4"}]}))
    cfg = _cfg(f"s3://{bucket}/raw", f"s3://{bucket}/shards", f"storage.endpoint_url={st.endpoint_url}")
    tasks = pp.list_clips(cfg.input, cfg.storage)
    assert len(tasks) == 6
    s3.delete_object(Bucket=bucket, Key="raw/synth_3_00002.mp4")  # vanishes after listing
    summary = pp.preprocess(cfg, progress=False, tasks=tasks)
    assert (summary.ok, summary.failed) == (4, 2)
    errors = _errors(cfg.output, st)
    assert set(errors) == {"synth_3_00001.mp4", "synth_3_00002.mp4"}
    assert all(e["stage"] == "read" for e in errors.values())
    clips = load_clip_rows(cfg.output, st)
    assert sorted(c["clip_id"] for c in clips) == ["synth_3_00000", "synth_3_00003",
                                                   "synth_3_00004", "synth_3_00005"]
    for c in clips:
        assert c["frames"].shape[1:] == (64, 64, 3) and c["source_uri"].startswith(f"s3://{bucket}/raw/")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="shards/")["Contents"]]
    assert {"shards/summary.json", "shards/errors.parquet", "shards/metrics.prom"} <= set(keys)
    assert not [k for k in keys if "_tmp" in k]
