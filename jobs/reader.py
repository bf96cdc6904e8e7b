"""The training reader: a streaming Ray Data dataset of training tuples over
the shards written by `dheads preprocess` (format in `jobs/shards.py`).

    ds = training_dataset(shards_uri, model_cfg, data_cfg, storage_cfg)
    for batch in iter_training_batches(ds, batch_size=8, data=data_cfg): ...
    # Ray Train: pass `ds` as a dataset; each worker calls
    # iter_training_batches(ray.train.get_dataset_shard("train"), ...)
    # or split it yourself: ds.streaming_split(n, equal=True)

Each clip row becomes `data.frames_per_clip_epoch` tuples (distinct target
frames k drawn at random; all of them for shorter clips), one row each:

| column | shape | dtype | meaning |
|---|---|---|---|
| `target` | [3, H, W] | float32 | frame k in [-1, 1] |
| `identity` | [3, H, W] | float32 | the identity frame in [-1, 1]: frame 0, or (`data.identity_frame=random`) a random frame ≠ k |
| `motion` | [2, H, W] | float32 | grayscale frames k−2, k−1 (identity before the start) |
| `audio` | [2 m_y + 1, *feature_shape] | float32 | features of frames k−m_y … k+m_y, edge frames replicated |
| `mouth_box` | [4] | float32 | x0, y0, x1, y1 of frame k, model-image pixels |
| `frame_index` | [] | int64 | k |
| `eye_open` | [] | float32 | frame k's measured eye openness (1 when the model has no `motion.eye_embed`) |

With `motion.pose_warp` the `identity` column is the identity frame warped to
frame k's head pose relative to it (`model/posewarp.py`, from the shard's
`head_pose` track), as the frame loop does at inference with the prior's
track. Shards written before `head_pose`/`eye_open` existed cannot train such
a model: the reader says so (run `dheads preprocess` into a new folder).

The motion and audio-window math is the model's own (`dheads.model.video`:
`motion_frames`, `audio_windows`), shared with the frame loop. Before the
clip starts the motion frames are the identity frame, as at inference.
`data.color_jitter` s > 0 changes the colours of identity, target and
previous frames together (per-channel gain 1 ± s, offset ± s/2, one draw per
tuple), so the model must take colour from the identity frame.
`data.blink_tuples` b > 0 (with `motion.eye_embed`) draws a share b of each
clip's target frames in or beside its blinks (`target_frames`).
`data.stabilize_tuples` p > 0 replaces, in a share p of the tuples, the older
motion frame (k−2) by the identity frame (at frame k−2's pose with
`motion.pose_warp`): the context the frame loop gives with
`motion.stabilize_every` 1, which real frames alone show only at k = 2. The
older frame then says nothing about the eyes, so a blink under way is
carried by the previous frame and the eye embedding alone, as at inference.

Shuffling is two-level: shard files are read in random order
(`read_parquet(shuffle="files")`), and `iter_training_batches` draws from a
local shuffle buffer of `data.shuffle_buffer` tuples (`global_shuffle=True`
adds a full `random_shuffle`, an all-to-all that materialises the epoch).
"""
from __future__ import annotations

import math
import os
import zlib

import numpy as np
import pyarrow.parquet as pq

from dheads.jobs import shards
from dheads.model.images import to_unit
from dheads.platform import storage
from dheads.platform.config import DataConfig, IdentitySource, ModelConfig, StorageConfig

TENSOR_COLUMNS = ("target", "identity", "motion", "audio", "mouth_box", "frame_index", "eye_open")
_READ_COLUMNS = ["clip_id", "n_frames", "frames", "audio_features", "audio_features_shape",
                 "mouth_boxes"]
MOTION_COLUMNS = ["head_pose", "eye_open"]


def read_columns(model_cfg: ModelConfig) -> list[str]:
    """The shard columns the reader needs for this model."""
    return _READ_COLUMNS + (MOTION_COLUMNS if model_cfg.motion.conditioned else [])


def check_motion_columns(shards_uri: str, model_cfg: ModelConfig, storage_cfg: StorageConfig) -> None:
    """A model with explicit motion needs shards with measured tracks."""
    if not model_cfg.motion.conditioned:
        return
    fs, path = storage.resolve(require_shards(shards_uri, storage_cfg)[0], storage_cfg)
    names = set(pq.read_schema(path, filesystem=fs).names)
    missing = [c for c in MOTION_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"the shards under {shards_uri} have no {', '.join(missing)} columns "
                         "(written before dheads measured head pose and eye openness); a model with "
                         "motion.pose_warp / motion.eye_embed needs them: run `dheads preprocess` "
                         "into a new output folder, or train with model.motion.pose_warp=false "
                         "model.motion.eye_embed=false")


def require_shards(shards_uri: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    """The complete shards under `shards_uri`; FileNotFoundError with what to run when there are none."""
    uris = shards.shard_uris(shards_uri, storage_cfg or StorageConfig())
    if not uris:
        raise FileNotFoundError(f"no shard-*.parquet under {shards_uri}; run `dheads preprocess` first")
    return uris


_unit = to_unit  # uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1]


def _features(row: dict) -> np.ndarray:
    shape = [int(s) for s in row["audio_features_shape"]]
    return np.frombuffer(row["audio_features"], "<f2").reshape(shape).astype(np.float32)


def jitter(images: list[np.ndarray], strength: float, rng: np.random.Generator) -> list[np.ndarray]:
    """One colour change for all of `images` (`[3, H, W]` in [-1, 1]):
    per-channel gain in 1 ± s and offset in ± s/2, clipped to [-1, 1]."""
    gain = rng.uniform(1 - strength, 1 + strength, (3, 1, 1)).astype(np.float32)
    offset = rng.uniform(-strength / 2, strength / 2, (3, 1, 1)).astype(np.float32)
    return [np.clip(img * gain + offset, -1, 1) for img in images]


def target_frames(n: int, count: int, rng: np.random.Generator, eyes: np.ndarray | None = None,
                  blink_tuples: float = 0.0) -> np.ndarray:
    """`min(count, n)` distinct target frames of an n-frame clip, sorted: a
    `blink_tuples` share of them (as far as there are) in or beside a blink
    of `eyes`, the rest uniform over the other frames."""
    size = min(count, n)
    if eyes is None or blink_tuples <= 0:
        return np.sort(rng.choice(n, size=size, replace=False))
    from dheads.platform.facemotion import detect_blinks

    near = detect_blinks(eyes)
    near = near | np.r_[near[1:], False] | np.r_[False, near[:-1]]  # the frame before and after too
    blink, other = np.flatnonzero(near), np.flatnonzero(~near)
    n_blink = min(len(blink), int(round(blink_tuples * size)), size)
    n_blink = max(n_blink, size - len(other))
    picked = np.r_[rng.choice(blink, size=n_blink, replace=False),
                   rng.choice(other, size=size - n_blink, replace=False)]
    return np.sort(picked.astype(np.int64))


def clip_tuples(row: dict, context: int, count: int, seed: int, epoch: int = 0,
                identity_frame: IdentitySource | str = IdentitySource.first,
                color_jitter: float = 0.0, pose_warp: bool = False,
                eye_embed: bool = False, blink_tuples: float = 0.0,
                stabilize_tuples: float = 0.0) -> list[dict]:
    """One shard row (a clip) -> `count` training tuples (see the module table)."""
    import torch

    from dheads.model.posewarp import relative_pose, warp_to_pose
    from dheads.model.video import audio_windows, motion_frames

    # Small per-tuple tensor ops: intra-op threads only contend with the
    # other Ray workers on the node (measured 6-25 ms vs 0.03 ms per window).
    torch.set_num_threads(1)
    n = int(row["n_frames"])
    clip_id = str(row["clip_id"])
    rng = np.random.default_rng([seed, epoch, zlib.crc32(clip_id.encode())])
    eyes = np.asarray(row["eye_open"], np.float32) if eye_embed else None
    ks = target_frames(n, count, rng, eyes, blink_tuples)
    random_identity = IdentitySource(identity_frame) == IdentitySource.random and n > 1
    # a random identity frame other than the target (uniform over the others)
    ids = {int(k): (int(j) + (j >= k) if random_identity else 0)
           for k, j in zip(ks, rng.integers(0, max(n - 1, 1), len(ks)))}
    # which tuples see the identity as their older motion frame (frame loop's stabilize)
    # (drawn only when on, so the other draws stay those of earlier runs)
    draws = rng.random(len(ks)) if stabilize_tuples > 0 else np.ones(len(ks))
    stabilized = {int(k): bool(u < stabilize_tuples) for k, u in zip(ks, draws)}
    blobs = row["frames"]
    needed = sorted(set(ids.values()) | {int(j) for k in ks for j in (k - 2, k - 1, k) if j >= 0})
    decoded = {j: _unit(f) for j, f in zip(needed, shards.decode_frames([blobs[j] for j in needed]))}
    feats = torch.from_numpy(_features(row))
    boxes = np.asarray([np.asarray(b, np.float32) for b in row["mouth_boxes"]], np.float32)
    poses = np.asarray(row["head_pose"], np.float64).reshape(-1, 3) if pose_warp else None
    out = []
    for k in ks:
        k = int(k)
        identity = decoded[ids[k]]
        images = [decoded[k], identity] + [decoded[j] if j >= 0 else identity for j in (k - 2, k - 1)]
        if color_jitter > 0:
            images = jitter(images, color_jitter, rng)
        target, identity, prev2, prev1 = images
        if stabilized[k] and k >= 2:
            prev2 = identity
            if poses is not None:
                rel2 = relative_pose(poses[k - 2], poses[ids[k]]).astype(np.float32)
                prev2 = warp_to_pose(torch.from_numpy(identity)[None], torch.from_numpy(rel2)[None])[0].numpy()
        if poses is not None:
            # the identity frame moved to frame k's head pose (the motion frames
            # before the start stay the identity frame itself, as at inference for pose 0)
            rel = relative_pose(poses[k], poses[ids[k]]).astype(np.float32)
            identity = warp_to_pose(torch.from_numpy(identity)[None], torch.from_numpy(rel)[None])[0].numpy()
        out.append({
            "target": target,
            "identity": identity,
            "motion": motion_frames(torch.from_numpy(prev2), torch.from_numpy(prev1)).numpy(),
            "audio": audio_windows(feats, k, context).numpy(),
            "mouth_box": boxes[k],
            "frame_index": np.int64(k),
            "eye_open": np.float32(eyes[k] if eyes is not None else 1.0),
        })
    return out


# Ray Data (2.60) reads Parquet footers on a pool of actors provisioned for
# every read, 32 of them (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS) whatever the
# number of files, and hands each actor batches of 10 footers. 32 new worker
# processes to read the footers of 2 shards were most of a pass's start-up on
# the 2-core machine: a 96-tuple pass over 2 shards took 15.5 s with 32 actors
# and 4.2 s with one. The pool is sized to the files instead.
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTERS_PER_ACTOR = 10       # Ray's footer batch (RAY_DATA_PARQUET_FOOTER_BATCH_SIZE)
MAX_FOOTER_ACTORS = 32       # Ray's default pool


def footer_actors(n_files: int) -> int:
    """Footer-reader actors for `n_files`: one per batch of footers, 1 to 32."""
    return max(1, min(MAX_FOOTER_ACTORS, math.ceil(n_files / FOOTERS_PER_ACTOR)))


def read_parquet(paths, **kwargs):
    """`ray.data.read_parquet` with the footer-reader pool sized to the files
    (`footer_actors`); a pool size set in the environment wins. Ray reads the
    setting when the read is planned, here, not when it runs."""
    import ray.data

    if FOOTER_ACTORS_ENV in os.environ:
        return ray.data.read_parquet(paths, **kwargs)
    n_files = len(paths) if isinstance(paths, (list, tuple)) else 1
    os.environ[FOOTER_ACTORS_ENV] = str(footer_actors(n_files))
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        del os.environ[FOOTER_ACTORS_ENV]


def training_dataset(shards_uri: str, model_cfg: ModelConfig, data_cfg: DataConfig,
                     storage_cfg: StorageConfig | None = None, epoch: int = 0,
                     global_shuffle: bool = False):
    """Streaming `ray.data.Dataset` of training tuples (one row per tuple).

    `epoch` reseeds which target frames each clip contributes. Ready for
    `iter_torch_batches` and `streaming_split(n)`.
    """
    import ray

    storage_cfg = storage_cfg or StorageConfig()
    uris = require_shards(shards_uri, storage_cfg)
    fs, _ = storage.resolve(uris[0], storage_cfg)
    paths = [storage.resolve(u, storage_cfg)[1] for u in uris]
    from ray.data import FileShuffleConfig

    # A seeded file order (the same in every execution): exact resume needs the
    # data order to be a function of (seed, epoch); the per-epoch variation
    # comes from the epoch-seeded local shuffle in `iter_training_batches`.
    check_motion_columns(shards_uri, model_cfg, storage_cfg)
    ds = read_parquet(paths, filesystem=fs, columns=read_columns(model_cfg),
                      shuffle=FileShuffleConfig(seed=data_cfg.seed, reseed_after_execution=False))
    ds = ds.flat_map(clip_tuples, fn_kwargs=dict(context=model_cfg.audio.context,
                                                 count=data_cfg.frames_per_clip_epoch,
                                                 seed=data_cfg.seed, epoch=epoch,
                                                 identity_frame=data_cfg.identity_frame,
                                                 color_jitter=data_cfg.color_jitter,
                                                 pose_warp=model_cfg.motion.pose_warp,
                                                 eye_embed=model_cfg.motion.eye_embed,
                                                 blink_tuples=data_cfg.blink_tuples,
                                                 stabilize_tuples=data_cfg.stabilize_tuples))
    if global_shuffle:
        ds = ds.random_shuffle(seed=data_cfg.seed + epoch)
    return ds


def iter_training_batches(ds, batch_size: int, data: DataConfig, device: str = "cpu",
                          drop_last: bool = True):
    """Torch batches `{target [B,3,H,W], identity, motion [B,2,H,W], audio [B,W,*feat],
    mouth_box [B,4], frame_index [B]}` from a dataset or a `streaming_split` piece,
    through a local shuffle buffer of `data.shuffle_buffer` tuples."""
    buffer = data.shuffle_buffer if data.shuffle_buffer > 0 else None
    kwargs = dict(batch_size=batch_size, drop_last=drop_last, device=device,
                  local_shuffle_buffer_size=buffer,
                  local_shuffle_seed=data.seed if buffer else None)
    yield from ds.iter_torch_batches(**kwargs)


def load_clip_rows(shards_uri: str, storage_cfg: StorageConfig | None = None,
                   clip_ids: list[str] | None = None, limit: int | None = None) -> list[dict]:
    """Whole clips from the shards, without Ray (val sampling, inspection).

    Each: `clip_id`, `identity`, `source_uri`, `frames [T, H, W, 3]` uint8,
    `audio_features [T, *feat]` float32, `audio [T*640]` float32 16 kHz,
    `mouth_boxes [T, 4]` float32, `fps`. Order: shard order, then row order.
    """

    storage_cfg = storage_cfg or StorageConfig()
    wanted = set(clip_ids) if clip_ids is not None else None
    out: list[dict] = []
    for uri in require_shards(shards_uri, storage_cfg):
        fs, path = storage.resolve(uri, storage_cfg)
        table = pq.read_table(path, filesystem=fs)
        for row in table.to_pylist():
            if wanted is not None and row["clip_id"] not in wanted:
                continue
            out.append({
                "clip_id": row["clip_id"], "identity": row["identity"], "source_uri": row["source_uri"],
                "fps": row["fps"], "frames": shards.decode_frames(row["frames"]),
                "audio_features": _features(row),
                "audio": np.frombuffer(row["audio_pcm16"], "<i2").astype(np.float32) / 32767.0,
                "mouth_boxes": np.asarray(row["mouth_boxes"], np.float32),
            })
            if limit is not None and len(out) >= limit:
                return out
    return out
