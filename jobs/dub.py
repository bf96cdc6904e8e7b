"""`dheads dub manifest=URI output=URI checkpoint=URI`: offline batch dubbing on Ray Data.

    manifest (JSONL / CSV / Parquet: identity, audio[, output, item_id, identity_frame])
      -> prepare_segments     tasks: skip items whose output exists, decode, segment
      -> SegmentWorker        actor pool (dub.num_workers, CPU or GPU): continuous batching
      -> stitch_item          per item (groupby): cross-fade, H.264 + AAC, atomic write
      -> results table        <output>/results.parquet + results.jsonl

Per-item errors become `failed` rows with a reason; they never stop the job.
A re-run skips every item whose output exists (outputs are written once,
atomically, so an existing output is a complete one).
"""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from dheads.platform import storage
from dheads.platform.config import DubConfig, DubJob, StorageConfig
from dheads.platform.dubbing import (
    DubItem, ItemError, PreparedItem, Segment, build_engine, finish_item, load_audio,
    n_video_frames, prepare_item, result_row,
)
from dheads.platform.media import MediaError

COLUMNS = ("item", "output", "audio_uri", "kind", "reason", "index", "count", "start",
           "n_frames", "item_frames", "seed", "identity", "audio")


def _row(item: DubItem, kind: str, reason: str = "", seg: Segment | None = None, **extra) -> dict:
    row = {"item": item.item_id, "output": item.output, "audio_uri": item.audio, "kind": kind,
           "reason": reason, "index": 0, "count": 0, "start": 0, "n_frames": 0, "item_frames": 0,
           "seed": 0, "identity": b"", "audio": b""}
    if seg is not None:
        row.update(index=seg.index, count=seg.count, start=seg.start, n_frames=seg.n_frames,
                   item_frames=seg.item_frames, seed=seg.seed, identity=seg.identity.tobytes(),
                   audio=seg.audio.astype(np.float32).tobytes())
    row.update(extra)
    return row


def _columns(rows: list[dict]) -> dict:
    keys = rows[0].keys() if rows else COLUMNS
    return {k: np.array([r[k] for r in rows], dtype=object if k in ("identity", "audio", "frames")
                        else None) for k in keys}


def _absolute(uri: str, base: str | None = None) -> str:
    if storage.is_s3(uri) or os.path.isabs(uri):
        return uri
    return os.path.normpath(os.path.join(base or os.getcwd(), os.path.expanduser(uri)))


def prepare_segments(batch: dict, cfg: DubConfig, output: str, base: str | None, image_size: int,
                     storage_cfg: StorageConfig, seed: int) -> dict:
    """Manifest rows -> one row per segment, or one `skipped` / `failed` row per item.
    Relative local paths in the manifest are relative to the manifest's folder."""
    rows = []
    for i in range(len(next(iter(batch.values())))):
        raw = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
        for k in ("identity", "audio", "output"):
            if isinstance(raw.get(k), str) and raw[k]:
                raw[k] = _absolute(raw[k], base)
        try:
            item = DubItem.from_row(raw, output)
        except ItemError as e:
            rows.append(_row(DubItem(str(raw.get("item_id") or f"row{i}"), "", "", ""), "failed",
                             f"manifest: {e}"))
            continue
        try:
            if storage.exists(item.output, storage_cfg):
                rows.append(_row(item, "skipped", "output exists"))
                continue
            prepared = prepare_item(item, cfg, image_size, storage_cfg, seed)
            rows.extend(_row(item, "segment", seg=s) for s in prepared.segments)
        except (ItemError, storage.StorageError) as e:
            rows.append(_row(item, "failed", str(e)))
    return _columns(rows)


class SegmentWorker:
    """Model worker of the actor pool: all segments of a batch share one slot pool."""

    def __init__(self, checkpoint: str, sampler, cfg: DubConfig, storage_cfg: StorageConfig):
        self.engine = build_engine(checkpoint, sampler, cfg, storage_cfg)
        self.size = self.engine.image_size

    def __call__(self, batch: dict) -> dict:
        n = len(batch["kind"])
        segments = {}
        for i in range(n):
            if batch["kind"][i] == "segment":
                segments[i] = Segment(
                    str(batch["item"][i]), int(batch["index"][i]), int(batch["count"][i]),
                    int(batch["start"][i]), int(batch["n_frames"][i]),
                    np.frombuffer(batch["identity"][i], np.uint8).reshape(self.size, self.size, 3),
                    np.frombuffer(batch["audio"][i], np.float32).copy(), int(batch["item_frames"][i]),
                    seed=int(batch["seed"][i]))
        frames = self.engine.run(segments.values()) if segments else {}
        out = {k: batch[k] for k in ("item", "output", "audio_uri", "kind", "reason", "index",
                                     "count", "start", "item_frames")}
        out["frames"] = np.array([frames[segments[i].key].tobytes() if i in segments else b""
                                  for i in range(n)], dtype=object)
        out["size"] = np.full(n, self.size)
        return out


def stitch_item(group: dict, storage_cfg: StorageConfig) -> dict:
    """All rows of one item -> its result row (the mp4 written atomically)."""
    first = {k: v[0] for k, v in group.items()}
    item = DubItem(str(first["item"]), "", str(first["audio_uri"]), str(first["output"]))
    kinds = set(group["kind"].tolist())
    if kinds != {"segment"}:
        status = "skipped" if "skipped" in kinds else "failed"
        reasons = [r for r in group["reason"].tolist() if r]
        row = result_row(item, status, reason=reasons[0] if reasons else None)
    else:
        try:
            row = result_row(item, "succeeded", seconds=_stitch(group, item, storage_cfg))
        except (ItemError, MediaError, storage.StorageError, ValueError) as e:
            row = result_row(item, "failed", reason=f"output: {e}")
    return {k: [v] for k, v in row.items()}


def _stitch(group: dict, item: DubItem, storage_cfg: StorageConfig) -> float:
    n = int(group["item_frames"][0])
    if len(set(group["index"].tolist())) != int(group["count"][0]):
        raise ItemError(f"{len(group['index'])} of {int(group['count'][0])} segments came back")
    size = int(group["size"][0])
    audio = load_audio(item.audio, storage_cfg)
    if n_video_frames(len(audio)) != n:
        raise ItemError("audio changed since it was segmented")
    results = {int(i): np.frombuffer(f, np.uint8).reshape(-1, size, size, 3)
               for i, f in zip(group["index"], group["frames"])}
    segments = [Segment(item.item_id, int(i), len(results), int(s), 0, None, None, n)
                for i, s in zip(group["index"], group["start"])]
    return finish_item(PreparedItem(item, audio, n, segments), results, storage_cfg)


def read_manifest(uri: str, storage_cfg: StorageConfig, runtime_env: dict):
    import ray.data

    fs, path = storage.resolve(uri, storage_cfg)
    suffix = uri.lower().rsplit(".", 1)[-1]
    readers = {"jsonl": ray.data.read_json, "json": ray.data.read_json, "csv": ray.data.read_csv,
               "parquet": ray.data.read_parquet}
    if suffix not in readers:
        from dheads.platform.errors import UserError

        raise UserError(f"manifest {uri}: expected .jsonl, .csv or .parquet")
    return readers[suffix](path, filesystem=fs, runtime_env=runtime_env)


def write_results(rows: list[dict], output: str, storage_cfg: StorageConfig) -> tuple[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("item", pa.string()), ("status", pa.string()), ("output", pa.string()),
        ("seconds", pa.float64()), ("reason", pa.string())]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    parquet, jsonl = storage.join(output, "results.parquet"), storage.join(output, "results.jsonl")
    storage.write_bytes(parquet, buf.getvalue(), storage_cfg)
    storage.write_bytes(jsonl, "".join(json.dumps(r) + "\n" for r in rows).encode(), storage_cfg)
    return parquet, jsonl


def run(cfg: DubJob) -> int:
    from tqdm import tqdm

    from dheads.model.checkpoint import CONFIG
    from dheads.platform.checkpointing import fetch_model_checkpoint
    from dheads.platform.cluster import connect
    from dheads.platform.errors import UserError

    # workers do not share the driver's working directory
    output, checkpoint = _absolute(cfg.output), _absolute(cfg.checkpoint)
    ckpt = json.loads(Path(fetch_model_checkpoint(checkpoint, cfg.storage), CONFIG).read_text())
    if not storage.exists(cfg.manifest, cfg.storage):
        raise UserError(f"manifest {cfg.manifest}: no such file (a JSONL/CSV/Parquet list of "
                        "identity, audio[, output, item_id])")
    connect(cfg.cluster, cfg.storage)
    base = None if storage.is_s3(cfg.manifest) else os.path.dirname(_absolute(cfg.manifest))
    env = {"runtime_env": {"env_vars": storage.s3_env(cfg.storage)}}
    manifest = read_manifest(cfg.manifest, cfg.storage, env["runtime_env"])
    n_items = manifest.count()
    segments = manifest.map_batches(
        prepare_segments, batch_size=4, concurrency=cfg.dub.prepare_concurrency,
        fn_kwargs=dict(cfg=cfg.dub, output=output, base=base, image_size=int(ckpt["model"]["image_size"]),
                       storage_cfg=cfg.storage, seed=cfg.seed), **env)
    frames = segments.map_batches(
        SegmentWorker, batch_size=4 * cfg.dub.batch_size, concurrency=cfg.dub.num_workers,
        num_cpus=cfg.dub.cpus_per_worker, num_gpus=1 if cfg.dub.use_gpu else 0,
        fn_constructor_kwargs=dict(checkpoint=checkpoint, sampler=cfg.sampler, cfg=cfg.dub, storage_cfg=cfg.storage), **env)
    results = frames.groupby("item").map_groups(
        stitch_item, fn_kwargs=dict(storage_cfg=cfg.storage), batch_format="numpy", **env)
    rows = []
    with tqdm(total=n_items, desc="dub", unit="item", file=sys.stderr) as bar:
        for row in results.iter_rows():
            rows.append({k: (None if v is None or (isinstance(v, float) and np.isnan(v)) else v)
                         for k, v in row.items()})
            bar.update(1)
    rows.sort(key=lambda r: r["item"])
    parquet, _ = write_results(rows, output, cfg.storage)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("succeeded", "skipped", "failed")}
    print(json.dumps({"items": len(rows), **counts, "results": parquet,
                      "seconds_of_video": round(sum(r["seconds"] or 0 for r in rows), 2)}))
    return 0


__all__ = ["run", "prepare_segments", "SegmentWorker", "stitch_item"]
