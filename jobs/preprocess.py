"""`dheads preprocess input=URI output=URI`: videos -> training shards (Ray Data).

Lists every video (mp4, mov, mkv, webm, avi; plus audio-only files without a
video of the same stem, which fail with a reason) under `input` (a folder or
`s3://bucket/prefix`), skips those already in the output's shards (resume),
and runs one Ray Data pipeline:

    from_items(clip URIs) -> map_batches(ShardBuilder, batch_size=clips_per_shard)

`ShardBuilder` is a callable class (one actor per CPU): for each clip of its
batch it downloads (S3) and decodes with PyAV (`media.read_video`: 25 fps,
16 kHz mono; decoded straight to the crop size for detector `none`, bounded to
`data.max_side` otherwise, so 4K never holds full-size frames), finds the face
(`platform.faces`), crops and resizes to `model.image_size`, takes mouth boxes
from the sidecar `<stem>.json` (benchmark / `dheads synth` layout) or from the
face geometry, computes the audio features with the model's own
`AudioFeatures`, compresses the frames, and writes one Parquet shard for the
batch. It returns one small status row per clip to the driver, which drives a
tqdm bar and writes the errors table, the summary and the metrics. A failure
of a clip is a status row (source_uri, stage, reason); it never stops the job.
Every input is untrusted: decoding stops at `MAX_CLIP_S`, frames smaller than
a quarter of the image size are refused, frames past the end of the audio
are dropped, and a local name that is not valid UTF-8 is processed under an
escaped text form (`storage.display_name`). The kinds covered and their
tests: docs/data.md.

Output layout (`output` URI):

    shard-<uuid>.parquet   one row per clip (`jobs/shards.py`)
    errors.parquet         this run's failures: source_uri, stage, reason
    summary.json           clips_in, ok, failed, skipped, frames, seconds_of_video, wall_s
    metrics.prom           Prometheus text format (see "Metrics")

The shard format (schema, frame codec, atomic writes, resume set):
`jobs/shards.py`.

Metrics: counters `dheads_preprocess_clips_total{status="ok|failed|skipped"}`
and `dheads_preprocess_frames_total` are written in Prometheus text format to
`metrics.prom` at the end of the run (a batch job has no endpoint to scrape:
point node_exporter's textfile collector at it, or push it with
`prometheus_client.push_to_gateway` where a Pushgateway exists; set
`DHEADS_PUSHGATEWAY=host:port` to push).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dheads.jobs.shards import FRAME_CODEC, done_set, encode_frames, remove_stale_temps, write_shard
from dheads.platform import faces, facemotion, storage
from dheads.platform.config import DataConfig, FaceDetector, ModelConfig, PreprocessJob, StorageConfig
from dheads.platform.media import AUDIO_EXTS, MIN_SIDE, VIDEO_EXTS, Clip, MediaError, read_video

# Longest clip decoded (s): training clips are seconds long; a longer file
# fails with this reason (a DataConfig field would be its proper home).
MAX_CLIP_S = 600.0


class ClipError(Exception):
    """A clip that cannot be turned into a shard row; `stage` says where."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


# ------------------------------------------------------------------ listing
def _stem(uri: str) -> str:
    return uri.rsplit(".", 1)[0]


def _relative(uri: str, root: str) -> str:
    root = root.rstrip("/")
    if storage.is_s3(uri):
        return uri[len(root):].lstrip("/") if uri.startswith(root) else storage.basename(uri)
    return os.path.relpath(uri, root)


def list_clips(input_uri: str, storage_cfg: StorageConfig) -> list[dict]:
    """Clip tasks `{source_uri, clip_id, folder, source_path}` for every video
    (and orphan audio file).

    `source_uri`, `clip_id` and `folder` are text (the shard columns, the
    resume key); a local name that is not valid UTF-8 appears there escaped
    (`storage.display_name`) and `source_path` holds its real bytes
    (`os.fsencode`), empty when the text is the path.
    """
    uris = storage.list_files(input_uri, VIDEO_EXTS + AUDIO_EXTS, storage_cfg)
    videos = [u for u in uris if u.lower().endswith(VIDEO_EXTS)]
    video_stems = {_stem(u) for u in videos}
    orphans = [u for u in uris if u.lower().endswith(AUDIO_EXTS) and _stem(u) not in video_stems]
    root = input_uri if storage.is_s3(input_uri) else str(Path(input_uri).expanduser().resolve())
    tasks = []
    for uri in videos + orphans:
        rel = storage.display_name(_relative(uri, root))
        folder = str(PurePosixPath(rel).parent)
        text = storage.display_name(uri)
        tasks.append({"source_uri": text, "clip_id": _stem(rel),
                      "folder": "" if folder == "." else folder,
                      "source_path": b"" if text == uri else os.fsencode(uri)})
    return tasks


def _source(task: dict) -> str:
    """The URI to open for a task (the real name when its text is escaped)."""
    raw = task.get("source_path") or b""
    return os.fsdecode(bytes(raw)) if raw else task["source_uri"]


# ------------------------------------------------------------ one clip (no Ray)
def read_sidecar(source_uri: str, storage_cfg: StorageConfig) -> dict | None:
    uri = _stem(source_uri) + ".json"
    try:
        if not storage.exists(uri, storage_cfg):
            return None
        return json.loads(storage.read_bytes(uri, storage_cfg))
    except (storage.StorageError, ValueError):
        return None


def sidecar_mouth_boxes(meta: dict, n_frames: int, fps: float) -> np.ndarray | None:
    """Per-frame mouth boxes `[T, 4]` in the source's pixels, resampled to `fps` by time."""
    frames = meta.get("frames")
    if isinstance(frames, dict):
        boxes = frames.get("mouth_box")
    elif isinstance(frames, list):
        boxes = [f.get("mouth_box") for f in frames]
    else:
        return None
    if not boxes or any(b is None for b in boxes):
        return None
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    src_fps = float(meta.get("fps", fps))
    idx = np.minimum((np.arange(n_frames) * src_fps / fps + 1e-6).astype(int), len(boxes) - 1)
    return boxes[idx]


def identity_key(meta: dict | None, task: dict) -> str:
    ident = (meta or {}).get("identity")
    if isinstance(ident, dict) and "id" in ident:
        return str(ident["id"])
    if meta and "identity_id" in meta:
        return str(meta["identity_id"])
    return task["folder"] or task["clip_id"]


def _encode(frames: np.ndarray, quality: int) -> list[bytes]:
    try:
        return encode_frames(frames, quality)
    except ValueError as e:
        raise ClipError("encode", str(e)) from e


def min_clip_frames(model: ModelConfig, data: DataConfig) -> int:
    """Shortest usable clip: two motion frames + the audio window around one target."""
    return max(data.min_frames, 2 + 2 * model.audio.context + 1)


def process_clip(task: dict, model: ModelConfig, data: DataConfig, storage_cfg: StorageConfig,
                 features, max_seconds: float | None = None) -> dict:
    """One clip task -> one shard row (see the schema). Raises ClipError.

    Decoding stops at `max_seconds` (default `MAX_CLIP_S`): a longer file fails
    with that reason instead of filling the worker's memory. Frames smaller
    than a quarter of the model's image size are refused (not upscaled). When
    the audio ends before the video, the frames past the audio are dropped
    (training pairs must have both)."""
    uri, path_uri = task["source_uri"], _source(task)
    size = model.image_size
    none = FaceDetector(data.face_detector) == FaceDetector.none
    try:
        with storage.local_path(path_uri, storage_cfg) as path:
            clip = read_video(path, fps=model.audio.fps, sample_rate=model.audio.sample_rate,
                              max_side=data.max_side, min_side=size if none else None,
                              max_seconds=MAX_CLIP_S if max_seconds is None else max_seconds,
                              min_source_side=max(MIN_SIDE, size // 4))
    except storage.StorageError as e:
        raise ClipError("read", storage.display_name(str(e))) from e
    except MediaError as e:
        reason = e.reason
        if e.reason.startswith("no video stream") and uri.lower().endswith(AUDIO_EXTS):
            reason = "audio-only file (no video stream)"
        raise ClipError(e.stage, storage.display_name(reason)) from e
    need = min_clip_frames(model, data)
    clip, dropped = _trim_to_audio(clip)
    n = clip.n_frames
    if n < need:
        why = f" (the audio covers only {clip.audio_s:.2f} s of the video)" if dropped else ""
        raise ClipError("validate", f"too short: {n} frames < {need} (motion + audio context){why}")
    try:
        track = faces.face_track(clip.frames, FaceDetector(data.face_detector))
    except faces.FaceError as e:
        raise ClipError("face", str(e)) from e
    crops = faces.crop_boxes(track, data.face_margin, FaceDetector(data.face_detector))
    frames = faces.crop_resize(clip.frames, crops, size)
    meta = read_sidecar(path_uri, storage_cfg)
    boxes = sidecar_mouth_boxes(meta, n, clip.fps) if meta else None
    if boxes is not None:
        src_w = (clip.source_size or (clip.frames.shape[2],))[0]
        boxes = faces.boxes_to_crop(boxes * (clip.frames.shape[2] / src_w), crops, size)
        box_source = "sidecar"
    else:
        boxes = faces.mouth_from_geometry(n, size)
        box_source = "geometry"
    import torch

    try:
        feats = features(torch.from_numpy(clip.audio), n).numpy()
    except Exception as e:  # a feature failure is this clip's failure
        raise ClipError("features", f"{type(e).__name__}: {e}") from e
    feats16 = np.ascontiguousarray(feats.astype("<f2"))
    boxes = np.clip(boxes, 0, size).astype(np.float32)
    signals = facemotion.motion_signals(frames, boxes)
    return {
        "clip_id": task["clip_id"], "source_uri": uri, "identity": identity_key(meta, task),
        "fps": float(clip.fps), "sample_rate": int(clip.sample_rate), "n_frames": n,
        "height": size, "width": size, "frame_codec": FRAME_CODEC,
        "frames": _encode(frames, data.jpeg_quality),
        "audio_features": feats16.tobytes(), "audio_features_shape": list(feats16.shape),
        "audio_pcm16": (np.clip(clip.audio, -1, 1) * 32767).round().astype("<i2").tobytes(),
        "mouth_boxes": boxes.tolist(),
        "head_pose": signals["head_pose"].tolist(), "eye_open": signals["eye_open"].tolist(),
        "mouth_box_source": box_source, "source_fps": float(clip.source_fps),
        "duration_s": n / clip.fps,
    }


def _trim_to_audio(clip: Clip) -> tuple[Clip, bool]:
    """Drop the frames past the end of the audio (more than one frame of
    silence padding would pair mouths with no sound); returns (clip, dropped)."""
    if clip.audio_s is None:
        return clip, False
    covered = int(clip.audio_s * clip.fps + 1e-6)
    if covered >= clip.n_frames - 1:
        return clip, False
    spf = clip.sample_rate // int(clip.fps)
    return dataclasses.replace(clip, frames=clip.frames[:covered], audio=clip.audio[:covered * spf]), True


# ------------------------------------------------------------------- Ray stage
class ShardBuilder:
    """Ray Data stage: a batch of clip tasks -> one shard + a status row per clip."""

    def __init__(self, model: ModelConfig, data: DataConfig, storage_cfg: StorageConfig, output: str,
                 max_clip_s: float = MAX_CLIP_S):
        import torch

        from dheads.model.audio import AudioFeatures

        torch.set_num_threads(1)  # one actor per CPU: no intra-op oversubscription
        self.model, self.data, self.storage, self.output = model, data, storage_cfg, output
        self.max_clip_s = max_clip_s
        self.features = AudioFeatures(model.audio)

    def __call__(self, batch: dict) -> dict:
        rows, status = [], []
        for i in range(len(batch["source_uri"])):
            task = {k: str(batch[k][i]) for k in ("source_uri", "clip_id", "folder")}
            if "source_path" in batch:
                task["source_path"] = bytes(batch["source_path"][i])
            try:
                row = process_clip(task, self.model, self.data, self.storage, self.features,
                                   max_seconds=self.max_clip_s)
                rows.append(row)
                status.append((task, "ok", "", "", row["n_frames"]))
            except ClipError as e:
                status.append((task, "failed", e.stage, storage.display_name(e.reason), 0))
            except Exception as e:  # an unforeseen bug fails its clip, not the job
                status.append((task, "failed", "internal",
                               storage.display_name(f"{type(e).__name__}: {e}"), 0))
        shard = ""
        if rows:
            try:
                shard = write_shard(rows, self.output, self.storage)
            except Exception as e:
                status = [(t, "failed", "write", f"{type(e).__name__}: {e}", 0) if s == "ok"
                          else (t, s, st, r, 0) for t, s, st, r, _ in status]
        return {
            "source_uri": [t["source_uri"] for t, *_ in status],
            "clip_id": [t["clip_id"] for t, *_ in status],
            "status": [s for _, s, *_ in status],
            "stage": [st for _, _, st, *_ in status],
            "reason": [r for _, _, _, r, _ in status],
            "n_frames": [n for *_, n in status],
            "shard": [shard] * len(status),
        }


# -------------------------------------------------------------------- driver
@dataclass
class Summary:
    clips_in: int
    ok: int
    failed: int
    skipped: int
    frames: int
    seconds_of_video: float
    wall_s: float

    def line(self) -> str:
        return (f"preprocess: {self.ok} ok, {self.failed} failed, {self.skipped} skipped "
                f"of {self.clips_in} clips; {self.frames} frames ({self.seconds_of_video:.1f} s) "
                f"in {self.wall_s:.1f} s")


def _write_reports(cfg: PreprocessJob, results: list[dict], summary: Summary) -> None:
    errors = [r for r in results if r["status"] == "failed"]
    table = pa.table({k: [r[k] for r in errors] for k in ("source_uri", "stage", "reason")},
                     schema=pa.schema([("source_uri", pa.string()), ("stage", pa.string()),
                                       ("reason", pa.string())]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(cfg.output, "errors.parquet"), buf.getvalue(), cfg.storage)
    storage.write_bytes(storage.join(cfg.output, "summary.json"),
                        json.dumps(summary.__dict__, indent=1).encode(), cfg.storage)
    storage.write_bytes(storage.join(cfg.output, "metrics.prom"), _metrics(summary), cfg.storage)


def _metrics(summary: Summary) -> bytes:
    from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest

    disable_created_metrics()

    reg = CollectorRegistry()
    clips = Counter("dheads_preprocess_clips", "Clips by outcome", ["status"], registry=reg)
    clips.labels("ok").inc(summary.ok)
    clips.labels("failed").inc(summary.failed)
    clips.labels("skipped").inc(summary.skipped)
    Counter("dheads_preprocess_frames", "Frames written to shards", registry=reg).inc(summary.frames)
    Gauge("dheads_preprocess_wall_seconds", "Wall time of the last run", registry=reg).set(summary.wall_s)
    gateway = os.environ.get("DHEADS_PUSHGATEWAY")
    if gateway:
        from prometheus_client import push_to_gateway

        try:
            push_to_gateway(gateway, job="dheads_preprocess", registry=reg)
        except OSError as e:
            print(f"preprocess: metrics push to {gateway} failed ({e}); see metrics.prom")
    return generate_latest(reg)


def preprocess(cfg: PreprocessJob, progress: bool = True, tasks: list[dict] | None = None,
               max_clip_s: float = MAX_CLIP_S) -> Summary:
    """Run the pipeline on the connected Ray cluster; returns the summary.

    `tasks` (from `list_clips`) replaces the listing of `cfg.input`;
    `max_clip_s` bounds the seconds decoded per clip."""
    import ray
    from tqdm import tqdm

    t0 = time.time()
    remove_stale_temps(cfg.output, cfg.storage)
    tasks = list_clips(cfg.input, cfg.storage) if tasks is None else tasks
    done = done_set(cfg.output, cfg.storage)
    todo = [t for t in tasks if t["source_uri"] not in done]
    skipped = len(tasks) - len(todo)
    results: list[dict] = []
    if todo:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        per = max(1, cfg.data.clips_per_shard)
        workers = cfg.data.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        workers = max(1, min(workers, math.ceil(len(todo) / per)))
        ds = ray.data.from_items(todo, override_num_blocks=math.ceil(len(todo) / per))
        env = storage.s3_env(cfg.storage)  # workers of an already-running Ray need the endpoint too
        ds = ds.map_batches(ShardBuilder, batch_size=per, num_cpus=1,
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            **({"runtime_env": {"env_vars": env}} if env else {}),
                            fn_constructor_kwargs=dict(model=cfg.model, data=cfg.data,
                                                       storage_cfg=cfg.storage, output=cfg.output,
                                                       max_clip_s=max_clip_s))
        with tqdm(total=len(todo), unit="clip", disable=not progress, desc="preprocess") as bar:
            for row in ds.iter_rows():
                results.append(row)
                bar.update(1)
    ok = [r for r in results if r["status"] == "ok"]
    frames = int(sum(r["n_frames"] for r in ok))
    summary = Summary(clips_in=len(tasks), ok=len(ok), failed=len(results) - len(ok), skipped=skipped,
                      frames=frames, seconds_of_video=frames / cfg.model.audio.fps,
                      wall_s=round(time.time() - t0, 3))
    _write_reports(cfg, results, summary)
    return summary


def run(cfg: PreprocessJob) -> int:
    from dheads.platform.cluster import connect
    from dheads.platform.errors import UserError

    tasks = list_clips(cfg.input, cfg.storage)  # before Ray starts: a wrong input fails at once
    if not tasks:
        where = "no such folder" if not (storage.is_s3(cfg.input) or Path(cfg.input).expanduser().exists()) \
            else f"no videos ({', '.join(VIDEO_EXTS)}) there"
        raise UserError(f"input={cfg.input}: {where}")
    connect(cfg.cluster, cfg.storage)
    summary = preprocess(cfg, tasks=tasks)
    print(summary.line())
    return 0
