"""Typed job configurations and Hydra composition.

Each job (`dheads <job> ...`) has a root dataclass schema registered in
Hydra's ConfigStore under `<job>_schema`; `configs/<job>.yaml` lists it first
in its defaults, so a typo or a wrong type fails at compose time. `compose()`
returns the typed object: DictConfig stops here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from dheads.model.config import (
    AudioConfig,
    DiffusionConfig,
    ModelConfig,
    SamplerConfig,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A config that does not compose or does not validate."""


class LRSchedule(str, Enum):
    cosine = "cosine"      # linear warm-up, then cosine down to min_lr_ratio × lr
    constant = "constant"  # linear warm-up, then constant


class IdentitySource(str, Enum):
    """Which frame of a training clip is the identity frame of a tuple."""
    first = "first"    # frame 0 (how dubbing starts: the clip's first frame)
    random = "random"  # a random frame other than the target (the official default)


class Joints(str, Enum):
    """How the frames of a long item join up (docs/jobs-and-config.md, "Long items")."""
    carry = "carry"          # one unit per item: every frame's motion frames are the previous generated frames
    crossfade = "crossfade"  # independent segments side by side, each from the identity, cross-faded at the cuts


class FaceDetector(str, Enum):
    none = "none"  # frames are already face crops (like ../shared/benchmark)
    haar = "haar"  # OpenCV 4.x Haar cascade


# ----------------------------------------------------------------- shared parts
@dataclass
class StorageConfig:
    """Object-store access. Credentials come from the standard AWS chain."""
    endpoint_url: Optional[str] = None  # e.g. http://127.0.0.1:5000 (moto_server)
    region: str = "us-east-1"


@dataclass
class ClusterConfig:
    # None: start (or join, if RAY_ADDRESS is set) a local Ray instance.
    address: Optional[str] = None
    # Job Submission API endpoint used by `dheads submit`.
    dashboard_address: str = "http://127.0.0.1:8265"
    num_cpus: Optional[int] = None


@dataclass
class DataConfig:
    shards: str = "runs/shards"          # URI of preprocessed Parquet shards
    # Videos to preprocess into `shards` first when there are none there yet
    # (`dheads train` then needs no separate `dheads preprocess`). None: off.
    source: Optional[str] = None
    face_detector: FaceDetector = FaceDetector.none
    face_margin: float = 0.35            # extra context around a detected face box
    min_frames: int = 8                  # shorter clips are rejected
    max_side: int = 1024                 # decode-time downscale bound (4K input)
    clips_per_shard: int = 16
    workers: int = 0                     # preprocess actors; 0: one per CPU of the cluster
    jpeg_quality: int = 95               # shard frame codec (see jobs/preprocess.py)
    shuffle_buffer: int = 2048
    frames_per_clip_epoch: int = 16      # training tuples drawn per clip per pass
    identity_frame: IdentitySource = IdentitySource.first
    # Joint colour jitter of identity, target and motion frames (one draw per
    # tuple): per-channel gain in 1 ± s and offset in ± s/2 ([-1, 1] units). 0: off.
    color_jitter: float = 0.0
    # Share of each clip's tuples whose target lies in or next to a blink
    # (`platform/facemotion.py::detect_blinks` on the shard's eye_open; models
    # with motion.eye_embed only). Blinks cover ~5 % of frames; drawn at that
    # rate the eye embedding barely sees one. 0: uniform draws.
    blink_tuples: float = 0.0
    # Share of tuples whose older motion frame (k−2) is the identity frame (at
    # k−2's pose with motion.pose_warp): the context of the frame loop's
    # motion.stabilize_every 1, otherwise seen in training only at k = 2. 0: off.
    stabilize_tuples: float = 0.0
    seed: int = 0


@dataclass
class TrainerConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    batch_size: int = 8                  # per worker
    steps: int = 200
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    lr_schedule: LRSchedule = LRSchedule.cosine
    min_lr_ratio: float = 0.0            # the cosine ends at this fraction of lr
    grad_clip: float = 1.0
    # CPU only: forward + loss under bf16 autocast (measured 1.5-1.8x faster
    # per step on an AVX512-BF16 x86 core); None: where the CPU supports it
    # (model/precision.py). GPUs use FSDP2's bf16 policy anyway.
    cpu_bf16: Optional[bool] = None
    ema_rate: float = 0.999
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    max_failures: int = 2
    # Steps between ray.train.report calls (the CSV and Prometheus get every
    # step). Ray Train's controller consumes one report per poll (2 s): a
    # report per sub-second step blocks the step until the next poll.
    log_every: int = 1
    sample_every: int = 0                # 0: no val videos during training
    sample_clips: int = 2
    storage_path: str = "runs"           # local path or s3:// URI
    name: str = "dheads-train"
    seed: int = 0
    # End this invocation after this step (a checkpoint is written there);
    # rerunning the same command goes on. 0: run to `steps`. For time-boxed
    # (spot / queue-window) jobs.
    stop_at_step: int = 0
    sample_frames: int = 8               # frames per val clip in the sample videos
    export_at_end: bool = True           # EMA weights -> <run>/export when `steps` is reached
    metrics_port: Optional[int] = None   # rank 0 serves Prometheus /metrics here (0: any free port)
    metrics_host: str = "127.0.0.1"      # set 0.0.0.0 explicitly for an off-node scraper
    pushgateway: Optional[str] = None    # host:port of a Prometheus Pushgateway


@dataclass
class DubConfig:
    # carry: an item is generated in order in one slot, its motion frames
    # carried through (no joints, no restart from the identity; a long item
    # is not spread over slots). crossfade: the item is cut at quiet frames
    # into segments of at most max_segment_s that run side by side, each
    # starting from the identity (lower latency for one long item, visible
    # joints). docs/quality.md measures both on a 60 s clip.
    joints: Joints = Joints.carry
    max_segment_s: float = 8.0           # (crossfade)
    min_segment_s: float = 2.0           # (crossfade)
    # Segment joints (crossfade, segments.py): each segment but the last runs
    # `crossfade_frames` past its end, blended into the next; each but the
    # first starts `lead_in_frames` before its cut and drops them (its
    # start-up frames). 6 + 4 measured on a 30 s clip (docs/quality.md).
    crossfade_frames: int = 6
    lead_in_frames: int = 4
    batch_size: int = 16                 # concurrent segments per model worker
    num_workers: int = 1
    use_gpu: bool = False
    identity_frame: int = 0              # which frame of an identity video
    face_detector: FaceDetector = FaceDetector.none
    face_margin: float = 0.35            # as in preprocessing (DataConfig.face_margin)
    cpus_per_worker: float = 1.0         # Ray resources of one model worker
    num_threads: int = 0                 # torch intra-op threads per worker; 0: torch default
    prepare_concurrency: int = 2         # Ray Data tasks decoding items / encoding outputs
    max_audio_s: float = 600.0           # longer audio fails the item with a reason
    # An identity image is refused from its header above this many pixels;
    # an identity video is decoded only up to its frame, at most this one.
    max_image_pixels: int = 40_000_000
    max_identity_frame: int = 1500       # 60 s at 25 fps
    # Input files over this size fail their item before a byte is read (S3:
    # from the object's size; inputs are streamed to disk, never held whole).
    max_image_mb: float = 50.0           # an identity image
    max_media_mb: float = 1024.0         # an identity video or an audio file
    overwrite: bool = False              # (dheads dub) regenerate outputs that exist instead of skipping
    # CPU only: the UNet under bf16 autocast (1.5-2x faster on AVX512-BF16
    # cores; for models trained with trainer.cpu_bf16 it is what they saw);
    # None: where the CPU supports it (model/precision.py).
    cpu_bf16: Optional[bool] = None
    # Inference-time overrides of the checkpoint's motion settings
    # (model.motion.infer_noise / stabilize_every); None: the checkpoint's.
    motion_noise: Optional[float] = None
    stabilize_every: Optional[int] = None


@dataclass
class AutoscalingConfig:
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    token: Optional[str] = None          # else env DHEADS_API_TOKEN (tenant "default")
    # `tenant: token` lines, one per tenant (e.g. a mounted Secret); jobs are
    # visible only to their tenant. Tokens: at least 32 characters.
    tokens_file: Optional[str] = None
    # `{tenant}` in a prefix is the caller's tenant. The job store and the
    # uploads folder are never allowed, whatever this says.
    allowed_uris: List[str] = field(default_factory=lambda: ["runs/"])
    # Prefixes every tenant may read but none may write (shared inputs).
    # With several tenants, allowed_uris and output_dir must contain {tenant}.
    shared_uris: List[str] = field(default_factory=list)
    # A local directory (SQLite, WAL: one node) or a postgresql:// URL (several
    # ingresses / nodes; the URL may also come from env DHEADS_JOB_STORE_URL).
    job_store: str = "runs/jobstore"
    upload_dir: Optional[str] = None     # uploaded inputs; default <job_store>/uploads (local)
    max_items_per_job: int = 64
    # queued + running items one tenant may have at once (429 past it); 0: no limit
    max_open_items_per_tenant: int = 10000
    # bytes of uploads one tenant's jobs may hold at once (429 past it); 0: no limit
    max_upload_gb_per_tenant: float = 20.0
    max_body_kb: float = 1024.0          # JSON job body; counted while it streams in
    max_audio_s: float = 120.0
    max_upload_mb: float = 50.0          # both files of a multipart job, counted while streaming
    # The ingress replicas' own listener for POST /v1/jobs (uploads), on `host`:
    # it reads a body only as fast as it is handled (Serve's proxy buffers
    # bodies whole); the Serve port then refuses multipart (421). null: off.
    upload_port: Optional[int] = 8001
    # With no upload listener (upload_port null): multipart bodies on the Serve
    # port are refused (415), since Serve's proxy queues a whole body before
    # the token is checked; true accepts them anyway, up to max_upload_mb.
    multipart_via_serve: bool = False
    max_upload_connections: int = 32     # requests open on the upload listener at once; more: 503
    # The upload listener closes a connection whose request headers take
    # longer than this, or whose body sends nothing for body_timeout_s while
    # the handler waits for it (slow clients cannot hold its slots).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    lease_s: float = 30.0                # an ingress holds an item this long between renewals
    max_attempts: int = 3                # claims of an item before it fails with its last error
    poll_s: float = 1.0                  # how often an ingress renews leases and claims items
    store_timeout_s: float = 10.0        # PostgreSQL statement timeout; TCP keepalive/user timeout from it
    job_ttl_s: float = 604800.0          # a finished job is deleted this long after (7 days)
    upload_ttl_s: float = 86400.0        # uploaded files are deleted this long after upload
    # Outputs (the mp4s of succeeded items) deleted this long after their job
    # finished; the job's results then say so. null: outputs are kept.
    output_ttl_s: Optional[float] = None
    output_dir: str = "runs/dubbed"      # default output prefix for uploads / items without one
    max_batch_size: int = 16             # @serve.batch admission batch
    batch_wait_timeout_s: float = 0.01     # late segments join the slot pool anyway
    item_concurrency: int = 8            # items of all jobs prepared/stitched at once by one ingress
    ingress_replicas: int = 1            # ingresses sharing the job store (leases keep them apart)
    segment_retries: int = 3             # re-sends of a segment whose replica died
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)


# ------------------------------------------------------------------- job roots
@dataclass
class InfoJob:
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class SynthJob:
    out: str = "runs/synth"
    n: int = 16
    seed: int = 0
    image_size: int = 128
    fps: int = 25
    min_s: float = 2.0
    max_s: float = 5.0
    workers: int = 2


@dataclass
class PreprocessJob:
    input: str = "runs/synth"
    output: str = "runs/shards"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


@dataclass
class TrainJob:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    val: Optional[str] = None            # URI of val clips for sample videos


class ExportWeights(str, Enum):
    ema = "ema"      # the exponential moving average (what sampling should use)
    model = "model"  # the raw optimizer weights (inspection, very short runs)


@dataclass
class ExportJob:
    run: str = "runs/dheads-train"       # Ray Train run folder (local or s3://)
    out: str = "runs/export"
    weights: ExportWeights = ExportWeights.ema
    step: int = 0                        # the checkpoint step_<step> of the run; 0: the latest
    storage: StorageConfig = field(default_factory=StorageConfig)


@dataclass
class DubJob:
    manifest: str = "runs/manifest.jsonl"
    output: str = "runs/dubbed"
    checkpoint: str = "runs/export"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    dub: DubConfig = field(default_factory=DubConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    seed: int = 0


@dataclass
class ServeJob:
    checkpoint: str = "runs/export"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    dub: DubConfig = field(default_factory=DubConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    blocking: bool = True                # keep the driver alive serving


@dataclass
class EvalJob:
    generated: str = "runs/dubbed"       # folder / s3 prefix of mp4s, matched by file stem
    reference: str = "runs/reference"    # same stems; optional <stem>.json ground truth
    generated_b: Optional[str] = None    # a second run (another seed) of the same stems: variety
    out: str = "runs/eval"               # metrics.json + index.html + img/ (local or s3://)
    fps: float = 25.0                    # both clips are decoded at this rate
    max_lag: int = 5                     # sync lag search range, frames (±)
    report: bool = True                  # write the HTML report next to metrics.json
    storage: StorageConfig = field(default_factory=StorageConfig)


JOB_SCHEMAS: dict[str, type] = {
    "info": InfoJob,
    "synth": SynthJob,
    "preprocess": PreprocessJob,
    "train": TrainJob,
    "export": ExportJob,
    "dub": DubJob,
    "serve": ServeJob,
    "eval": EvalJob,
}

_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for job, schema in JOB_SCHEMAS.items():
        cs.store(name=f"{job}_schema", node=schema)
    _registered = True


def compose(job: str, overrides: list[str] | None = None) -> Any:
    """Compose `configs/<job>.yaml` with `overrides` into the job's dataclass.

    Raises ConfigError with Hydra's message on a typo, a wrong type or an
    unknown group option.
    """
    if job not in JOB_SCHEMAS:
        raise ConfigError(f"unknown job {job!r}; jobs: {', '.join(sorted(JOB_SCHEMAS))}")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=job, overrides=list(overrides or []))
        return OmegaConf.to_object(cfg)
    except Exception as e:  # hydra/omegaconf raise several types; one message for users
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        raise ConfigError(f"config error for `dheads {job}`: {e}{cause}") from e
    finally:
        GlobalHydra.instance().clear()


def to_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


__all__ = [
    "AudioConfig", "ModelConfig", "DiffusionConfig", "SamplerConfig",
    "StorageConfig", "ClusterConfig", "DataConfig", "TrainerConfig", "DubConfig",
    "ServeConfig", "AutoscalingConfig", "FaceDetector", "ConfigError", "LRSchedule", "IdentitySource",
    "compose", "to_yaml", "JOB_SCHEMAS",
]
