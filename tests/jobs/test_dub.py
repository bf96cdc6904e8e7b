"""`dheads dub` on Ray Data: 20 items from S3 (moto on 127.0.0.1), real mp4s out,
a results table, and a re-run that skips every finished item."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from dheads.platform import storage
from dheads.platform.config import compose
from dheads.platform.media import probe


@pytest.fixture
def manifest(s3_bucket, tmp_path, dub_inputs):
    from PIL import Image

    bucket, st = s3_bucket
    ckpt = dub_inputs.tiny_checkpoint(tmp_path / "ckpt")
    for name in ("config.json", "model.safetensors"):
        storage.upload_file(f"{ckpt}/{name}", f"s3://{bucket}/ckpt/{name}", st)
    rows = []
    for i in range(20):
        Image.fromarray(dub_inputs.face_image(i)).save(tmp_path / f"id{i}.png")
        ext = (".wav", ".flac", ".m4a")[i % 3]
        dub_inputs.write_audio(tmp_path / f"a{i}{ext}", dub_inputs.speech(0.6 + 0.05 * i, seed=i))
        for local in (f"id{i}.png", f"a{i}{ext}"):
            storage.upload_file(tmp_path / local, f"s3://{bucket}/in/{local}", st)
        rows.append({"item_id": f"clip{i:02d}", "identity": f"s3://{bucket}/in/id{i}.png",
                     "audio": f"s3://{bucket}/in/a{i}{ext}"})
    storage.write_bytes(f"s3://{bucket}/manifest.jsonl",
                        "".join(json.dumps(r) + "\n" for r in rows).encode(), st)
    return bucket, st


def test_offline_job_dubs_20_items_from_s3_and_rerun_skips_them(ray_session, manifest, capsys):
    from dheads.jobs import dub

    bucket, st = manifest
    cfg = compose("dub", [f"manifest=s3://{bucket}/manifest.jsonl", f"output=s3://{bucket}/out",
                          f"checkpoint=s3://{bucket}/ckpt", "sampler.steps=ddim2",
                          f"storage.endpoint_url={st.endpoint_url}", "dub.batch_size=16",
                          "dub.num_threads=1", "dub.max_segment_s=0.6", "dub.min_segment_s=0.2"])
    assert dub.run(cfg) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["succeeded"] == 20 and first["failed"] == 0
    table = pq.read_table(storage.resolve(f"s3://{bucket}/out/results.parquet", st)[1],
                          filesystem=storage.resolve(f"s3://{bucket}/out", st)[0]).to_pylist()
    assert sorted(r["item"] for r in table) == [f"clip{i:02d}" for i in range(20)]
    assert set(table[0]) == {"item", "status", "output", "seconds", "reason"}
    for r in table:
        with storage.local_path(r["output"], st) as path:
            info = probe(path)
        assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
        assert abs(info["video"]["frames"] / 25 - r["seconds"]) < 1e-6
    mtimes = {r["output"]: storage.resolve(r["output"], st)[0].get_file_info(
        storage.resolve(r["output"], st)[1]).mtime for r in table}

    assert dub.run(cfg) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["skipped"] == 20 and second["succeeded"] == 0
    lines = storage.read_bytes(f"s3://{bucket}/out/results.jsonl", st).decode().splitlines()
    assert {json.loads(x)["status"] for x in lines} == {"skipped"}
    for uri, mtime in mtimes.items():                               # outputs written once
        fs, path = storage.resolve(uri, st)
        assert fs.get_file_info(path).mtime == mtime
