"""The items' failure policy (platform/dubbing/items.py), on real stores: a
bad output or a missing object fails at once with its reason; an S3
endpoint that is away is a transient error, tried again in place until it
answers (here: a TCP relay in front of the session's moto server that
starts listening only after the first try failed) or the tries run out."""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from dheads.platform import storage
from dheads.platform.config import DubConfig, StorageConfig
from dheads.platform.dubbing.items import (
    TRANSIENT_TRIES, DubItem, ItemError, ItemStatus, finish_item, finish_result, prepare_item, retry_transient,
)


class Relay:
    """A TCP relay on 127.0.0.1:`port` to `target`, listening only once `open()`ed."""

    def __init__(self, port: int, target: tuple[str, int]):
        self.port, self.target, self.sock = port, target, None

    def open(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


@pytest.fixture
def item_parts(dub_inputs, tmp_path):
    """One short item's segments with made-up frames, ready to write."""
    from PIL import Image

    Image.fromarray(dub_inputs.face_image(2)).save(tmp_path / "id.png")
    dub_inputs.write_audio(tmp_path / "a.wav", dub_inputs.speech(1.0, seed=2))
    item = DubItem(item_id="x", identity=str(tmp_path / "id.png"), audio=str(tmp_path / "a.wav"),
                   output=str(tmp_path / "x.mp4"))
    prepared = prepare_item(item, DubConfig(), 16)
    frames = {s.index: np.full((s.n_frames, 16, 16, 3), 128, np.uint8) for s in prepared.segments}
    return prepared.segments, frames


def test_errors_are_classified_on_real_stores(s3_server, s3_bucket, free_port, tmp_path):
    s3_bucket, _ = s3_bucket
    (tmp_path / "blocker").write_text("a file where a folder should be")
    local = tmp_path / "f.bin"
    local.write_bytes(b"x" * 100)
    st = StorageConfig(endpoint_url=s3_server)
    permanent = [lambda: storage.upload_file(local, str(tmp_path / "blocker" / "o.bin")),
                 lambda: storage.upload_file(local, "s3://no-such-bucket-here/o.bin", st)]
    for write in permanent:
        with pytest.raises(storage.StorageError) as e:
            write()
        assert not e.value.transient, e.value
    with pytest.raises(storage.StorageError) as e:
        storage.upload_file(local, f"s3://{s3_bucket}/o.bin",
                            StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}"))
    assert e.value.transient and "reachable?" in str(e.value)


def test_a_transient_error_is_tried_again_until_the_store_answers(s3_server, s3_bucket, free_port, tmp_path):
    s3_bucket, _ = s3_bucket
    port = int(s3_server.rsplit(":", 1)[1])
    relay = Relay(free_port(), ("127.0.0.1", port))
    st = StorageConfig(endpoint_url=f"http://127.0.0.1:{relay.port}")
    local = tmp_path / "f.bin"
    local.write_bytes(b"y" * 1000)
    uri, calls = f"s3://{s3_bucket}/relayed/f.bin", []

    def step():
        calls.append(1)
        try:
            return storage.upload_file(local, uri, st)
        except storage.StorageError:
            if len(calls) == 1:
                relay.open()          # the store comes back between the first and second try
            raise

    try:
        retry_transient(step, delay_s=0.05)
    finally:
        relay.close()
    assert len(calls) == 2
    assert storage.exists(uri, StorageConfig(endpoint_url=s3_server))


def test_a_bad_output_fails_at_once_and_an_absent_store_after_its_tries(item_parts, s3_server, s3_bucket,
                                                                        free_port, tmp_path):
    s3_bucket, _ = s3_bucket
    segments, frames = item_parts
    (tmp_path / "blocker").write_text("")
    bad = finish_result("x", str(tmp_path / "blocker" / "x.mp4"), segments, frames)
    assert bad.status == ItemStatus.failed and bad.reason.startswith("output: cannot write"), bad
    assert "gave up" not in bad.reason
    with pytest.raises(ItemError, match="^output: "):
        finish_item("s3://no-such-bucket-here/x.mp4", segments, frames, StorageConfig(endpoint_url=s3_server))
    away = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}")
    gone = finish_result("x", f"s3://{s3_bucket}/x.mp4", segments, frames, away, delay_s=0.01)
    assert gone.status == ItemStatus.failed and f"gave up after {TRANSIENT_TRIES} tries" in gone.reason, gone
    ok = finish_result("x", str(tmp_path / "ok.mp4"), segments, frames)
    assert ok.status == ItemStatus.succeeded and (tmp_path / "ok.mp4").exists()


def test_an_input_on_an_absent_store_is_transient_and_a_missing_one_is_the_items_reason(
        s3_server, s3_bucket, free_port, dub_inputs, tmp_path):
    s3_bucket, _ = s3_bucket
    from PIL import Image

    Image.fromarray(dub_inputs.face_image(2)).save(tmp_path / "id.png")
    missing = DubItem(item_id="m", identity=str(tmp_path / "id.png"), audio=f"s3://{s3_bucket}/none.wav",
                      output=str(tmp_path / "m.mp4"))
    with pytest.raises(ItemError, match="audio s3://"):
        prepare_item(missing, DubConfig(), 16, StorageConfig(endpoint_url=s3_server))
    with pytest.raises(storage.StorageError) as e:
        prepare_item(missing, DubConfig(), 16, StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}"))
    assert e.value.transient
