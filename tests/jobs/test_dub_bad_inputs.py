"""`dheads dub` (the CLI, Ray Data on a local Ray) over a manifest of every
awkward identity and audio kind of issue 12 (tests/media_kinds.py
`dubbing_kinds`): each good-but-odd item becomes a real mp4, each bad one a
`failed` row with its reason, and the job completes (exit 0). A manifest
whose rows share an item id or an output, or write onto an input, is refused
with one line and exit 2 before anything runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import media_kinds as mk  # noqa: E402

from dheads.platform.cli import main  # noqa: E402
from dheads.platform.media import probe  # noqa: E402


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, dub_inputs):
    d = tmp_path_factory.mktemp("dubkinds")
    good, bad = mk.dubbing_kinds(d / "media")
    ckpt = dub_inputs.tiny_checkpoint(d / "ckpt")
    return d, good, bad, ckpt


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(manifest, out, ckpt) -> list[str]:
    return ["dub", f"manifest={manifest}", f"output={out}", f"checkpoint={ckpt}", "sampler.steps=ddim2",
            "dub.num_threads=1", "dub.batch_size=16", "dub.max_audio_s=30"]


def test_every_kind_is_an_mp4_or_a_reason_and_the_job_completes(ray_session, kinds, tmp_path, capsys):
    d, good, bad, ckpt = kinds
    rows = [{"item_id": k, "identity": str(i), "audio": str(a)} for k, (i, a) in good.items()]
    rows += [{"item_id": k, "identity": str(i), "audio": str(a)} for k, (i, a, _) in bad.items()]
    rows.append({"item_id": "frame_past_the_end", "identity": str(good["gray_video"][0]),
                 "audio": str(good["gray_video"][1]), "identity_frame": 1_000})
    # past the clip's end but under dub.max_identity_frame (1500): the last frame is taken
    rows.append({"item_id": "frame_over_the_limit", "identity": str(good["gray_video"][0]),
                 "audio": str(good["gray_video"][1]), "identity_frame": 10_000})
    rows.append({"item_id": "no_audio_field", "identity": str(good["gray_image"][0])})
    # a bad output fails its item with the reason (the failure policy: at once, no retries)
    (tmp_path / "blocker").write_text("a file where the output's folder should be")
    rows.append({"item_id": "unwritable_output", "identity": str(good["gray_image"][0]),
                 "audio": str(good["gray_image"][1]), "output": str(tmp_path / "blocker" / "o.mp4")})
    out = tmp_path / "out"
    assert main(_args(_write(tmp_path / "m.jsonl", rows), out, ckpt)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = {r["item"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert len(results) == len(rows)
    for k in [*good, "frame_past_the_end"]:
        r = results[k]
        assert r["status"] == "succeeded", r
        info = probe(r["output"])
        assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
    for k, (_, _, words) in bad.items():
        assert results[k]["status"] == "failed" and words in results[k]["reason"], results[k]
        assert not (out / f"{k}.mp4").exists()
    assert results["frame_over_the_limit"]["status"] == "failed"
    assert "over the limit of 1500" in results["frame_over_the_limit"]["reason"], results["frame_over_the_limit"]
    assert results["no_audio_field"]["status"] == "failed"
    assert "missing field" in results["no_audio_field"]["reason"]
    unwritable = results["unwritable_output"]
    assert unwritable["status"] == "failed" and unwritable["reason"].startswith("output: cannot write"), unwritable
    assert "gave up" not in unwritable["reason"]
    assert (summary["succeeded"], summary["failed"]) == (len(good) + 1, len(bad) + 3)


def test_a_manifest_that_would_merge_or_clobber_is_refused(ray_session, kinds, tmp_path, capsys):
    d, good, _, ckpt = kinds
    (i, a) = good["gray_image"]
    out = tmp_path / "out"
    cases = {
        "duplicate item_id 'same'": [{"item_id": "same", "identity": str(i), "audio": str(a)},
                                     {"item_id": "same", "identity": str(i), "audio": str(a)}],
        "duplicate output": [{"item_id": "x", "identity": str(i), "audio": str(a), "output": str(out / "o.mp4")},
                             {"item_id": "y", "identity": str(i), "audio": str(a), "output": str(out / "o.mp4")}],
        "is an input of item 0": [{"item_id": "x", "identity": str(i), "audio": str(a), "output": str(a)}],
    }
    for words, rows in cases.items():
        assert main(_args(_write(tmp_path / "m.jsonl", rows), out, ckpt)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
        assert not (out / "results.jsonl").exists()
