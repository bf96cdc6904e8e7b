"""bench/_dubbing.py's in-process driver, the offline side of the benchmarks:
real mp4s with the original audio, per-item errors as results."""
from __future__ import annotations

import pytest

from dheads.model.config import SamplerConfig
from dheads.platform.config import DubConfig
from dheads.platform.dubbing.engine import build_engine
from dheads.platform.dubbing.items import DubItem, ItemStatus
from dheads.platform.dubbing.segments import FPS
from dheads.platform.media import probe


@pytest.fixture(scope="module")
def driver(bench_module):
    return bench_module("_dubbing.py")


def test_dub_items_writes_mp4_with_original_audio_and_reports_errors(driver, dub_inputs, tmp_path):
    from PIL import Image

    checkpoint = driver.tiny_checkpoint(tmp_path / "ckpt")
    Image.fromarray(dub_inputs.face_image(3)).save(tmp_path / "id.png")
    dub_inputs.write_audio(tmp_path / "a.flac", dub_inputs.speech(2.5, seed=3))
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wav")
    engine = build_engine(checkpoint, SamplerConfig(steps="ddim2"), DubConfig(batch_size=4, num_threads=1))
    cfg = DubConfig(max_segment_s=1.0, min_segment_s=0.3)
    items = [DubItem(item_id="ok", identity=str(tmp_path / "id.png"), audio=str(tmp_path / "a.flac"),
                     output=str(tmp_path / "o/ok.mp4")),
             DubItem(item_id="bad", identity=str(tmp_path / "id.png"), audio=str(tmp_path / "bad.wav"),
                     output=str(tmp_path / "o/bad.mp4")),
             DubItem(item_id="unwritable", identity=str(tmp_path / "id.png"), audio=str(tmp_path / "a.flac"),
                     output=str(tmp_path / "blocker/x.mp4"))]
    (tmp_path / "blocker").write_text("a file where the output's folder should be")
    results = driver.dub_items(engine, items, cfg)
    assert [r.status for r in results] == [ItemStatus.succeeded, ItemStatus.failed, ItemStatus.failed]
    assert "audio" in results[1].reason and not (tmp_path / "o/bad.mp4").exists()
    assert results[2].reason.startswith("output: cannot write") and "gave up" not in results[2].reason
    info = probe(tmp_path / "o/ok.mp4")
    assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
    assert abs(info["video"]["frames"] - 2.5 * FPS) <= 1
    assert abs(info["audio"]["duration_s"] - 2.5) <= 1 / FPS + 1e-6
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith("_tmp")]
