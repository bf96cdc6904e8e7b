"""The training shard format: what `dheads preprocess` writes and the
training reader (`jobs/reader.py`) reads.

Shard schema (one row = one clip):

| column | type | meaning |
|---|---|---|
| `clip_id` | string | path of the video relative to `input`, without extension |
| `source_uri` | string | the video's URI (the resume key) |
| `identity` | string | sidecar `identity.id` / `identity_id`; else the parent folder relative to `input`; else `clip_id` |
| `fps` | float32 | 25 |
| `sample_rate` | int32 | 16000 |
| `n_frames` | int32 | T |
| `height`, `width` | int32 | `model.image_size` |
| `frame_codec` | string | `jpeg` |
| `frames` | list<binary> [T] | one JPEG (quality `data.jpeg_quality`, RGB) per frame |
| `audio_features` | binary | float16 little-endian `[T, *feature_shape]`, C order |
| `audio_features_shape` | list<int32> | `[T, *feature_shape]` |
| `audio_pcm16` | binary | the clip's audio, int16 little-endian, 16 kHz mono, `T * 640` samples (val sampling, other encoders) |
| `mouth_boxes` | list<fixed_size_list<float32, 4>> [T] | x0, y0, x1, y1 in model-image pixels |
| `mouth_box_source` | string | `sidecar` or `geometry` |
| `source_fps` | float32 | frame rate of the source (VFR: its average) |
| `duration_s` | float32 | T / fps |
| `head_pose` | list<fixed_size_list<float32, 3>> [T] | angle°, tx, ty of frame k's head relative to frame 0 (`platform/facemotion.py`; tx, ty in 128-px pixels) |
| `eye_open` | list<float32> [T] | eye openness, 1 = the clip's median (a blink dips towards 0.5) |

Frame codec, measured on 10 benchmark clips (1,071 frames, this machine,
OpenCV 4.14 / PyAV x264 veryfast, per frame):

| codec | 64 px bytes | enc µs | dec µs | PSNR dB | 128 px bytes | enc µs | dec µs | PSNR dB |
|---|---|---|---|---|---|---|---|---|
| raw RGB | 12,288 | – | – | ∞ | 49,152 | – | – | ∞ |
| PNG (level 3) | 5,441 | 264 | 107 | lossless | 14,935 | 842 | 299 | lossless |
| JPEG q95 | 2,345 | 21 | 37 | 35.0 | 5,010 | 55 | 113 | 39.0 |
| JPEG q90 | 1,826 | 19 | 34 | 33.4 | 3,652 | 50 | 108 | 37.5 |
| H.264 CRF 18 clip | 119 | 199 | 332 | 32.7 | 261 | 532 | 367 | 38.8 |

Choice: per-frame JPEG q95. The reader needs random access (a training
tuple touches frames 0, k−2, k−1, k: 4 decodes ≈ 0.15 ms at 64 px), while a
video re-encode must be decoded from its start (≈ 2 ms per tuple at 16
tuples per ~100-frame clip) and costs 10× the encode time in this job (it
would cap preprocessing below raw-decode speed). JPEG is 20× bigger than
H.264, still 5× smaller than raw, and its error (35–39 dB) is below what the
model reproduces. PNG is 2.3× bigger and 12× slower to encode for no gain
the model can use.

Resume: the done-set is the `source_uri` column of every `shard-*.parquet`
in `output`. Shards are written to a `_tmp.*` name and renamed (S3: a temp
key copied onto the final key), so a killed driver or worker leaves at most
`_tmp.*` objects, which every reader ignores and the next run deletes. Two
runs writing the same output at once are not supported.
"""
from __future__ import annotations

import io
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dheads.platform import storage
from dheads.platform.config import StorageConfig

SHARD_PREFIX = "shard-"
FRAME_CODEC = "jpeg"

SHARD_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("source_uri", pa.string()), ("identity", pa.string()),
    ("fps", pa.float32()), ("sample_rate", pa.int32()), ("n_frames", pa.int32()),
    ("height", pa.int32()), ("width", pa.int32()), ("frame_codec", pa.string()),
    ("frames", pa.list_(pa.binary())), ("audio_features", pa.binary()),
    ("audio_features_shape", pa.list_(pa.int32())), ("audio_pcm16", pa.binary()),
    ("mouth_boxes", pa.list_(pa.list_(pa.float32(), 4))), ("mouth_box_source", pa.string()),
    ("source_fps", pa.float32()), ("duration_s", pa.float32()),
    ("head_pose", pa.list_(pa.list_(pa.float32(), 3))), ("eye_open", pa.list_(pa.float32())),
])


def write_shard(rows: list[dict], output_uri: str, storage_cfg: StorageConfig) -> str:
    """Write rows as one Parquet shard, atomically; returns its URI."""
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    buf = io.BytesIO()
    # Dictionary encoding of the big binary columns costs ~6x the write for nothing.
    pq.write_table(table, buf, compression="zstd", row_group_size=max(1, len(rows)),
                   use_dictionary=["identity", "frame_codec", "mouth_box_source"])
    uri = storage.join(output_uri, f"{SHARD_PREFIX}{uuid.uuid4().hex[:16]}.parquet")
    storage.write_bytes(uri, buf.getvalue(), storage_cfg)
    return uri


def encode_frames(frames: np.ndarray, quality: int) -> list[bytes]:
    """`[T, H, W, 3]` uint8 RGB -> JPEG bytes per frame."""
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    out = []
    for f in frames:
        ok, buf = cv2.imencode(".jpg", f[..., ::-1], params)
        if not ok:
            raise ValueError("JPEG encoding failed")
        out.append(buf.tobytes())
    return out


def decode_frames(blobs) -> np.ndarray:
    """JPEG bytes per frame -> `[T, H, W, 3]` uint8 RGB (the inverse of encode_frames)."""
    import cv2

    return np.stack([cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
                     for b in blobs])


def shard_uris(output_uri: str, storage_cfg: StorageConfig) -> list[str]:
    """The complete shards directly under `output_uri` (`_tmp.*` names of a
    running or killed job never match); maybe none."""
    return [u for u in storage.list_files(output_uri, (".parquet",), storage_cfg, recursive=False)
            if storage.basename(u).startswith(SHARD_PREFIX)]


def done_set(output_uri: str, storage_cfg: StorageConfig) -> set[str]:
    """Source URIs already in a complete shard under `output_uri`."""
    done: set[str] = set()
    for uri in shard_uris(output_uri, storage_cfg):
        fs, path = storage.resolve(uri, storage_cfg)
        done.update(pq.read_table(path, columns=["source_uri"], filesystem=fs)
                    .column("source_uri").to_pylist())
    return done


def remove_stale_temps(output_uri: str, storage_cfg: StorageConfig) -> int:
    """Delete `_tmp.*` leftovers of a killed run (list_files hides them, so list raw)."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(output_uri, storage_cfg)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    stale = [i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith("_tmp.")]
    for p in stale:
        fs.delete_file(p)
    return len(stale)
