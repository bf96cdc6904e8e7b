"""`dheads dub manifest=URI output=URI checkpoint=URI`: offline batch dubbing on Ray Data.

    manifest (JSONL / CSV / Parquet: identity, audio[, output, item_id, identity_frame])
      -> prepare_segments     tasks: skip items whose output exists, decode once, segment
      -> SegmentWorker        actor pool (dub.num_workers, CPU or GPU): continuous batching
      -> stitch_item          per item (groupby): cross-fade, H.264 + AAC, atomic write
      -> results table        <output>/results.parquet + results.jsonl

A row between the stages is an item's `kind` ("segment", "skipped",
"failed"), its `output` and `reason`, and the columns of `Segment.to_row()`
(empty for an item that is not a segment); the model stage adds `frames`.
Per-item errors become `failed` rows with a reason; they never stop the job.
A re-run skips every item whose output exists (outputs are written once,
atomically, so an existing output is a complete one); `dub.overwrite=true`
regenerates them instead. A manifest whose rows share an item id or an
output, or name an input as an output, is refused before anything runs
(one line, exit 2).
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
from dheads.platform.dubbing.engine import build_engine
from dheads.platform.dubbing.items import (
    DubItem, DubResult, ItemError, ItemStatus, check_job_items, finish_result, prepare_result,
    retry_transient,
)
from dheads.platform.dubbing.segments import EMPTY_SEGMENT_ROW, Segment

SEGMENT, SKIPPED, FAILED = "segment", ItemStatus.skipped.value, ItemStatus.failed.value


def _item_row(item_id: str, output: str, kind: str, reason: str = "",
              segment: Segment | None = None) -> dict:
    seg = segment.to_row() if segment is not None else {**EMPTY_SEGMENT_ROW, "item_id": item_id}
    return {**seg, "output": output, "kind": kind, "reason": reason}


def _rows(batch: dict) -> list[dict]:
    n = len(next(iter(batch.values())))
    return [{k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()}
            for i in range(n)]


def _columns(rows: list[dict]) -> dict:
    return {k: np.array([r[k] for r in rows], dtype=object if isinstance(rows[0][k], bytes) else None)
            for k in rows[0]}


def _absolute(uri: str, base: str | None = None) -> str:
    if storage.is_s3(uri) or os.path.isabs(uri):
        return uri
    return os.path.normpath(os.path.join(base or os.getcwd(), os.path.expanduser(uri)))


def prepare_segments(batch: dict, cfg: DubConfig, output: str, base: str | None, image_size: int,
                     storage_cfg: StorageConfig, seed: int) -> dict:
    """Manifest rows -> one row per segment, or one `skipped` / `failed` row per item.
    Relative local paths in the manifest are relative to the manifest's folder."""
    rows = []
    for i, raw in enumerate(_rows(batch)):
        for k in ("identity", "audio", "output"):
            if isinstance(raw.get(k), str) and raw[k]:
                raw[k] = _absolute(raw[k], base)
        try:
            item = DubItem.from_row(raw, output)
        except ItemError as e:
            rows.append(_item_row(str(raw.get("item_id") or f"row{i}"), "", FAILED, f"manifest: {e}"))
            continue
        try:
            if not cfg.overwrite and retry_transient(lambda: storage.exists(item.output, storage_cfg)):
                rows.append(_item_row(item.item_id, item.output, SKIPPED, "output exists"))
                continue
        except storage.StorageError as e:
            rows.append(_item_row(item.item_id, item.output, FAILED, str(e)))
            continue
        prepared = prepare_result(item, cfg, image_size, storage_cfg, seed)
        if isinstance(prepared, DubResult):
            rows.append(_item_row(item.item_id, item.output, FAILED, prepared.reason))
        else:
            rows.extend(_item_row(item.item_id, item.output, SEGMENT, segment=s)
                        for s in prepared.segments)
    return _columns(rows)


class SegmentWorker:
    """Model worker of the actor pool: all segments of a batch share one slot pool."""

    def __init__(self, checkpoint: str, sampler, cfg: DubConfig, storage_cfg: StorageConfig):
        self.engine = build_engine(checkpoint, sampler, cfg, storage_cfg)

    def __call__(self, batch: dict) -> dict:
        rows = _rows(batch)
        segments = {i: Segment.from_row(r) for i, r in enumerate(rows) if r["kind"] == SEGMENT}
        frames = self.engine.run(segments.values()) if segments else {}
        for i, r in enumerate(rows):
            r["frames"] = frames[segments[i].key].tobytes() if i in segments else b""
        return _columns(rows)


def stitch_item(group: dict, storage_cfg: StorageConfig) -> dict:
    """All rows of one item -> its result row (the mp4 written atomically)."""
    rows = _rows(group)
    item_id, output = str(rows[0]["item_id"]), str(rows[0]["output"])
    kinds = {r["kind"] for r in rows}
    if kinds != {SEGMENT}:
        reasons = [r["reason"] for r in rows if r["reason"]]
        result = DubResult(item_id=item_id, output=output,
                           status=ItemStatus.skipped if SKIPPED in kinds else ItemStatus.failed,
                           reason=reasons[0] if reasons else None)
    else:
        segments = [Segment.from_row(r) for r in rows]
        frames = {s.index: np.frombuffer(r["frames"], np.uint8).reshape(-1, *s.identity.shape)
                  for s, r in zip(segments, rows)}
        result = finish_result(item_id, output, segments, frames, storage_cfg)
    return {k: [v] for k, v in result.to_row().items()}


def check_manifest(manifest, output: str, base: str | None) -> None:
    """Refuse (UserError, one line) a manifest whose rows share an item id or
    an output, or write an output onto an input: run as asked, two rows would
    be merged into one mp4, or an input overwritten. Rows missing a field are
    left to fail alone."""
    from dheads.platform.errors import UserError

    items = []
    for i, raw in enumerate(manifest.iter_rows()):
        raw = dict(raw)
        for k in ("identity", "audio", "output"):
            if isinstance(raw.get(k), str) and raw[k]:
                raw[k] = _absolute(raw[k], base)
        try:
            items.append(DubItem.from_row(raw, output))
        except ItemError:
            continue
    try:
        check_job_items(items)
    except ItemError as e:
        raise UserError(f"manifest: {e} (item numbers count the manifest's valid rows)") from e


def read_manifest(uri: str, storage_cfg: StorageConfig, runtime_env: dict):
    import ray.data

    from dheads.jobs import reader

    fs, path = storage.resolve(uri, storage_cfg)
    suffix = uri.lower().rsplit(".", 1)[-1]
    readers = {"jsonl": ray.data.read_json, "json": ray.data.read_json, "csv": ray.data.read_csv,
               "parquet": reader.read_parquet}
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
    from dheads.platform.modelfetch import fetch_model_checkpoint
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
    check_manifest(manifest, output, base)
    from dheads.model.config import MotionConfig, from_dict

    # said once the manifest is accepted, so that a refusal is the only line a user sees
    print(f"[dub] {checkpoint}: {from_dict(MotionConfig, ckpt['model'].get('motion', {})).describe()}",
          file=sys.stderr, flush=True)
    n_items = manifest.count()
    segments = manifest.map_batches(
        prepare_segments, batch_size=4, concurrency=cfg.dub.prepare_concurrency,
        fn_kwargs=dict(cfg=cfg.dub, output=output, base=base, image_size=int(ckpt["model"]["image_size"]),
                       storage_cfg=cfg.storage, seed=cfg.seed), **env)
    frames = segments.map_batches(
        SegmentWorker, batch_size=4 * cfg.dub.batch_size, concurrency=cfg.dub.num_workers,
        num_cpus=cfg.dub.cpus_per_worker, num_gpus=1 if cfg.dub.use_gpu else 0,
        fn_constructor_kwargs=dict(checkpoint=checkpoint, sampler=cfg.sampler, cfg=cfg.dub,
                                   storage_cfg=cfg.storage), **env)
    results = frames.groupby("item_id").map_groups(
        stitch_item, fn_kwargs=dict(storage_cfg=cfg.storage), batch_format="numpy", **env)
    rows = []
    with tqdm(total=n_items, desc="dub", unit="item", file=sys.stderr) as bar:
        for row in results.iter_rows():
            rows.append({k: (None if v is None or (isinstance(v, float) and np.isnan(v)) else v)
                         for k, v in row.items()})
            bar.update(1)
    rows.sort(key=lambda r: r["item"])
    parquet, _ = write_results(rows, output, cfg.storage)
    counts = {s.value: sum(r["status"] == s.value for r in rows)
              for s in (ItemStatus.succeeded, ItemStatus.skipped, ItemStatus.failed)}
    print(json.dumps({"items": len(rows), **counts, "results": parquet,
                      "seconds_of_video": round(sum(r["seconds"] or 0 for r in rows), 2)}))
    return 0


__all__ = ["run", "prepare_segments", "SegmentWorker", "stitch_item"]
