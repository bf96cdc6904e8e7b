"""Dubbing items: the one item type, its media I/O, and its result.

An item is an identity (an image, or a video whose chosen frame is cropped
as in preprocessing) + audio (any audio file or a video's audio track) + the
URI of the mp4 to write. `prepare_item` decodes both inputs once and cuts the
audio into segments; `finish_item` stitches the generated segments, muxes the
item's own audio back (rebuilt from the segments) and writes the mp4
atomically.

The failure policy, the same in `dheads dub`, Serve and the benchmarks: an
item that cannot be dubbed as asked (bad media, a missing object, a bucket
that does not exist, a denied write) raises `ItemError` and fails at once
with that reason; only a transient storage error (`StorageError.transient`:
the store unreachable or throttling) is tried again, `TRANSIENT_TRIES` times
in all: in place by `retry_transient` (dub, benchmarks), as further
attempts of the claimed item in Serve (`serve.max_attempts`).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Optional, TypeVar

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from dheads.platform import storage
from dheads.platform.config import DubConfig, FaceDetector, StorageConfig
from dheads.platform.dubbing.segments import (
    FPS, SAMPLE_RATE, Segment, assemble, item_seed, n_video_frames, segment_item,
)
from dheads.platform.media import IMAGE_EXTS, MediaError, read_audio, read_frame, read_image, write_video


class ItemError(ValueError):
    """An item that cannot be dubbed; the message is the reason shown to users."""


TRANSIENT_TRIES = 3          # calls in all, for an item step that meets a transient storage error
T = TypeVar("T")


@contextlib.contextmanager
def _reason(where: str, *kinds: type[Exception]):
    """Errors of `kinds` inside become the item's reason, `ItemError("<where>: ...")`;
    a transient storage error goes up as itself, to be tried again."""
    try:
        yield
    except kinds as e:
        if isinstance(e, storage.StorageError) and e.transient:
            raise
        raise ItemError(f"{where}: {e}") from e


def retry_transient(step: Callable[[], T], tries: int = TRANSIENT_TRIES, delay_s: float = 1.0) -> T:
    """`step()`, called again while it raises a transient StorageError,
    `tries` calls at most; then that error, its message saying how many tries
    it had. The waits double from `delay_s`, each cut to a random 50–100 %
    (jitter: workers that failed together do not retry together)."""
    attempt = 1
    while True:
        try:
            return step()
        except storage.StorageError as e:
            if not e.transient:
                raise
            if attempt >= tries:
                raise storage.StorageError(f"{e} (transient; gave up after {tries} tries)",
                                           transient=True) from e
        time.sleep(delay_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))
        attempt += 1


class ItemStatus(str, Enum):
    queued = "queued"          # (serve) accepted, not started
    running = "running"        # (serve) being prepared, sampled or written
    succeeded = "succeeded"    # the output was written
    skipped = "skipped"        # (dub) the output existed already: a re-run
    failed = "failed"          # with a reason
    cancelled = "cancelled"    # (serve) its job was cancelled


FINAL_STATUSES = frozenset({ItemStatus.succeeded, ItemStatus.skipped, ItemStatus.failed,
                            ItemStatus.cancelled})


class DubItem(BaseModel):
    """One item to dub: the request item of the HTTP API, the base of the job
    store's record, a manifest row of `dheads dub`, what `prepare_item` reads.

    `item_id` and `output` may be left out by a request; the job fills them
    in (`with_defaults`) before anything runs.
    """
    identity: str = Field(description="URI of an image or a video (its chosen frame is the identity)")
    audio: str = Field(description="URI of wav/mp3/m4a/flac audio or a video with an audio track")
    output: Optional[str] = Field(None, description="URI of the mp4; default <output_dir>/[<job>/]<item_id>.mp4")
    item_id: Optional[str] = Field(None, description="default: item<n> (API), the audio's file stem (manifest)")
    identity_frame: Optional[int] = Field(None, ge=0, description="frame of an identity video; default dub.identity_frame")

    def with_defaults(self, item_id: str, output_dir: str) -> "DubItem":
        """This item with `item_id` and `output` (`<output_dir>/<item_id>.mp4`) set where missing."""
        item_id = self.item_id or item_id
        return self.model_copy(update={"item_id": item_id,
                                       "output": self.output or storage.join(output_dir, f"{item_id}.mp4")})

    @classmethod
    def from_row(cls, row: dict, output_dir: str | None = None) -> "DubItem":
        """A manifest row -> DubItem with `item_id` (default: the audio's file
        stem) and `output` (default: `<output_dir>/<item_id>.mp4`) set."""
        missing = [k for k in ("identity", "audio") if not row.get(k)]
        if missing:
            raise ItemError(f"missing field(s) {missing}")
        frame = row.get("identity_frame")
        frame = None if frame is None or (isinstance(frame, float) and math.isnan(frame)) else int(frame)
        try:
            item = cls(identity=str(row["identity"]), audio=str(row["audio"]),
                       output=str(row["output"]) if row.get("output") else None,
                       item_id=str(row.get("item_id") or row.get("id") or Path(str(row["audio"])).stem),
                       identity_frame=frame)
        except ValidationError as e:
            raise ItemError(str(e.errors(include_url=False, include_context=False))) from e
        if item.output is None and not output_dir:
            raise ItemError("missing field 'output' and no output directory configured")
        return item.with_defaults(item.item_id, output_dir or "")


class DubResult(BaseModel):
    """What became of an item: the `dheads dub` results table and the API's results."""
    item_id: str
    status: ItemStatus
    output: Optional[str] = None
    seconds: Optional[float] = None     # of video written
    reason: Optional[str] = None

    def to_row(self) -> dict:
        """The row of `results.parquet` / `results.jsonl`."""
        return {"item": self.item_id, "status": self.status.value, "output": self.output,
                "seconds": self.seconds, "reason": self.reason}


# --------------------------------------------------------------- media in
def load_identity(uri: str, size: int, cfg: DubConfig, frame: Optional[int] = None,
                  storage_cfg: StorageConfig | None = None) -> np.ndarray:
    """The identity frame `[size, size, 3]` uint8: an image, or frame `frame` of
    a video, face-cropped with the preprocessing detector and margin."""
    from dheads.platform.faces import crop_boxes, crop_resize, face_track

    image_file = Path(uri).suffix.lower() in IMAGE_EXTS
    limit = cfg.max_image_mb if image_file else cfg.max_media_mb
    with storage.local_path(uri, storage_cfg, max_bytes=round(limit * 2**20)) as path:
        if image_file:   # refused from the header above the limit
            image = read_image(path, max_pixels=cfg.max_image_pixels)
        else:  # decoded only up to that frame; past the end: the last one
            index = cfg.identity_frame if frame is None else frame
            problem = identity_frame_problem(index, cfg)
            if problem:
                raise ItemError(problem)
            image = read_frame(path, index, fps=FPS)
    detector = FaceDetector(cfg.face_detector)
    boxes = crop_boxes(face_track(image[None], detector), cfg.face_margin, detector)
    return crop_resize(image[None], boxes, size)[0]


def identity_frame_problem(index: int, cfg: DubConfig) -> Optional[str]:
    """Why frame `index` of an identity video may not be used, or None: the
    video is decoded up to that frame, so `dub.max_identity_frame` bounds it
    (checked at submission by the service and when the item runs)."""
    if index > cfg.max_identity_frame:
        return (f"identity_frame {index} is over the limit of {cfg.max_identity_frame} "
                "(dub.max_identity_frame; an identity video is decoded up to its frame)")
    return None


def load_audio(uri: str, storage_cfg: StorageConfig | None = None,
               max_seconds: float | None = None, max_mb: float | None = None) -> np.ndarray:
    """Any audio file, or a video's audio track -> `[S]` float32, 16 kHz mono;
    decoding stops with a MediaError past `max_seconds` (None: the media
    layer's own bound); a file over `max_mb` fails before it is read."""
    limit = {} if max_seconds is None else {"max_seconds": max_seconds}
    max_bytes = None if max_mb is None else round(max_mb * 2**20)
    with storage.local_path(uri, storage_cfg, max_bytes=max_bytes) as path:
        return read_audio(path, SAMPLE_RATE, **limit)


def check_job_items(items: list[DubItem]) -> None:
    """Refuse a job (ItemError, one line) whose items share an `item_id` or an
    `output`, or write an output onto one of the job's inputs. Items must have
    their ids and outputs set (`with_defaults` / `from_row`)."""
    def norm(uri: str) -> str:
        return uri if storage.is_s3(uri) else os.path.realpath(os.path.expanduser(uri))

    for field in ("item_id", "output"):
        seen: dict[str, int] = {}
        for n, item in enumerate(items):
            value = getattr(item, field)
            key = norm(value) if field == "output" else value
            if key in seen:
                raise ItemError(f"duplicate {field} {value!r} (items {seen[key]} and {n}); "
                                f"every item needs its own {field}")
            seen[key] = n
    inputs = {norm(u): n for n, item in enumerate(items) for u in (item.identity, item.audio)}
    for n, item in enumerate(items):
        if norm(item.output) in inputs:
            raise ItemError(f"output {item.output!r} of item {n} is an input of item "
                            f"{inputs[norm(item.output)]}; an output never replaces an input")


@dataclass
class PreparedItem:
    item: DubItem
    n_frames: int               # of the output video
    segments: list[Segment]


def prepare_item(item: DubItem, cfg: DubConfig, image_size: int,
                 storage_cfg: StorageConfig | None = None, seed: int = 0) -> PreparedItem:
    """Decode identity and audio (once), check limits, and segment (seeded
    `item_seed(seed, item_id)`: the job's `seed` and the item's id). Raises
    ItemError (with the media stage in the message) for anything a user must
    fix, a transient StorageError for the store being away."""
    with _reason(f"audio {item.audio}", MediaError, storage.StorageError):
        # decoding stops a little past the limit; the exact check follows
        audio = load_audio(item.audio, storage_cfg, max_seconds=cfg.max_audio_s + 1.0, max_mb=cfg.max_media_mb)
    seconds = len(audio) / SAMPLE_RATE
    if seconds > cfg.max_audio_s:
        raise ItemError(f"audio is {seconds:.1f} s, over the limit of {cfg.max_audio_s:g} s")
    if seconds < 1.0 / FPS:
        raise ItemError("audio is shorter than one video frame")
    with _reason(f"identity {item.identity}", MediaError, storage.StorageError, ValueError):
        identity = load_identity(item.identity, image_size, cfg, item.identity_frame, storage_cfg)
    segments = segment_item(item.item_id, identity, audio, cfg, item_seed(seed, item.item_id))
    return PreparedItem(item, n_video_frames(len(audio)), segments)


# -------------------------------------------------------------- media out
def write_output(uri: str, frames: np.ndarray, audio: np.ndarray,
                 storage_cfg: StorageConfig | None = None) -> float:
    """Encode H.264 + AAC and write atomically to `uri` (temporary name, then
    rename / copy). Returns the video's seconds."""
    with tempfile.TemporaryDirectory(prefix="dheads-dub-") as tmp:
        local = os.path.join(tmp, "out.mp4")
        write_video(local, frames, fps=FPS, audio=audio, sample_rate=SAMPLE_RATE)
        storage.upload_file(local, uri, storage_cfg)
    return len(frames) / FPS


def finish_item(output: str, segments: list[Segment], frames: dict[int, np.ndarray],
                storage_cfg: StorageConfig | None = None) -> float:
    """Stitch an item's generated segments (`frames` by segment index) and
    write its mp4 with the item's audio. Returns the video's seconds. A bad
    output (it cannot be encoded, or written where asked) raises ItemError
    ("output: ..."); a transient storage error goes up as itself."""
    with _reason("output", MediaError, storage.StorageError, ValueError):
        video, audio = assemble(segments, frames)
        return write_output(output, video, audio, storage_cfg)


def prepare_result(item: DubItem, cfg: DubConfig, image_size: int,
                   storage_cfg: StorageConfig | None = None, seed: int = 0) -> "PreparedItem | DubResult":
    """`prepare_item` under the failure policy (a transient error tried again
    in place): the prepared item, or its `failed` result with the reason."""
    try:
        return retry_transient(lambda: prepare_item(item, cfg, image_size, storage_cfg, seed))
    except (ItemError, storage.StorageError) as e:
        return DubResult(item_id=item.item_id, status=ItemStatus.failed, output=item.output, reason=str(e))


def finish_result(item_id: str, output: str, segments: list[Segment], frames: dict[int, np.ndarray],
                  storage_cfg: StorageConfig | None = None, delay_s: float = 1.0) -> DubResult:
    """`finish_item` under the failure policy (a transient error tried again
    in place), as the item's result: succeeded, or failed with the reason."""
    try:
        seconds = retry_transient(lambda: finish_item(output, segments, frames, storage_cfg), delay_s=delay_s)
    except (ItemError, storage.StorageError) as e:
        return DubResult(item_id=item_id, status=ItemStatus.failed, output=output, reason=str(e))
    return DubResult(item_id=item_id, status=ItemStatus.succeeded, output=output, seconds=seconds)


__all__ = ["ItemError", "ItemStatus", "FINAL_STATUSES", "DubItem", "DubResult", "PreparedItem",
           "TRANSIENT_TRIES", "retry_transient", "prepare_result", "check_job_items", "identity_frame_problem",
           "load_identity", "load_audio", "prepare_item", "write_output", "finish_item", "finish_result"]
