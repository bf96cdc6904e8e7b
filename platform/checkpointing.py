"""Training checkpoints: one interface for everything a run needs to go on.

A checkpoint is a torch.distributed.checkpoint (DCP) directory — each rank
writes its own shard of the model, the optimizer and the EMA weights — plus a
`job.json` with the model and diffusion configs (so `dheads export` can build
the network without the training config). It travels through
`ray.train.report(checkpoint=...)`, which merges the ranks' directories into
`<storage_path>/<name>/step_XXXXXXXX/` (a local path or `s3://`), keeps the
last `CheckpointConfig.num_to_keep`, and hands the latest back to a restarted
run through `ray.train.get_checkpoint()` (after a worker failure, or when the
same command is run again with the same storage_path and name).

What is saved (`TrainingState`, a DCP `Stateful`, as in Ray's FSDP2
template's `AppState`): sharded model and optimizer state, sharded EMA
weights, the progress counters (step, data epoch, batches consumed in that
epoch) and each rank's torch RNG state.

Reading never unpickles anything from storage beyond plain data: DCP's
`.metadata` is a pickle, and DCP's own reader `pickle.load`s it (and its
default planner `torch.load(weights_only=False)`s every non-tensor value), so
a crafted checkpoint runs code on resume and on `dheads export`. Every DCP
read here goes through `SafeFileSystemReader` (the metadata through
`MetadataUnpickler`, which admits only DCP's metadata dataclasses, torch.Size,
dtypes, layouts and paths, then checks the structure) and `SafeLoadPlanner`
(non-tensor values through `torch.load(weights_only=True)`). Anything else
raises `CheckpointError` with one line saying what was refused.
"""
from __future__ import annotations

import io
import json
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from dheads.model.checkpoint import CheckpointError
from dheads.model.config import DiffusionConfig, ModelConfig, from_dict, to_dict
from dheads.platform import storage
from dheads.platform.config import StorageConfig

CHECKPOINT_PREFIX = "step_"
JOB_FILE = "job.json"
# Written into a step's folder in the run's storage after Ray Train has
# uploaded every rank's files: `.metadata` alone can arrive before the shards
# (an upload cut short), so only a step with the marker counts as complete.
COMPLETE_FILE = "COMPLETE"


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


@dataclass
class Progress:
    """Where training stands: optimizer steps done and the data position."""
    step: int = 0
    epoch: int = 0              # passes over the training set started so far - 1
    batches_in_epoch: int = 0   # batches of `epoch` already consumed by every rank

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.step, self.epoch, self.batches_in_epoch], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Progress":
        step, epoch, pos = (int(v) for v in t.tolist())
        return cls(step, epoch, pos)


class TrainingState(Stateful):
    """Model + optimizer + EMA + progress + RNG of one rank, as DCP sees it.

    `ema` maps parameter names to tensors shaped like the (sharded) parameters.
    Counters and RNG states are tensors, so nothing here is pickled.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema: dict[str, torch.Tensor], progress: Progress):
        self.model = model
        self.optimizer = optimizer
        self.ema = ema
        self.progress = progress

    @staticmethod
    def _rng_key() -> str:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return f"rank{rank}"

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {
            "model": model_sd,
            "optim": optim_sd,
            "ema": self.ema,
            "progress": self.progress.as_tensor(),
            # Per-rank keys: DCP would otherwise keep one copy of a plain tensor.
            "rng": {self._rng_key(): rng},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer,
                       model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        with torch.no_grad():
            for name, t in sd["ema"].items():
                if t is not self.ema[name]:
                    self.ema[name].copy_(t)
        # in place: the training loop holds this very Progress object
        vars(self.progress).update(vars(Progress.from_tensor(sd["progress"])))
        rng = sd.get("rng", {}).get(self._rng_key())
        if rng:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])


# ------------------------------------------------------------ safe DCP reading
_METADATA_FILE = ".metadata"
# Everything a DCP `.metadata` pickle may name (torch 2.11, measured on the
# checkpoints this module writes): the metadata dataclasses, the storage info,
# torch.Size, dtypes (`torch.float32`...), layouts (pickled as
# `torch.serialization._get_layout("torch.strided")`), the memory-format enum,
# and the checkpoint id (a pathlib path). None of them runs code on load.
_ALLOWED_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}


# Bounds checked before `.metadata` is unpickled (a paper-size model's is
# ~1 MB and ~10^5 opcodes): the file's size, its opcodes, and the size of the
# largest object it builds, counted as a tree. Shared references (memo GETs)
# let ~300 bytes describe a tuple nest of 2^depth nodes, which costs 2^depth
# to hash inside the unpickler, before any other check could run.
MAX_METADATA_BYTES = 256 << 20
MAX_METADATA_OPS = 20_000_000
MAX_METADATA_TREE = 50_000_000


def check_pickle_cost(data: bytes, source: str) -> None:
    """Refuse (CheckpointError) a pickle over the bounds above, from its
    opcodes alone (pickletools; nothing is built or imported)."""
    import pickletools

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {source}: {_METADATA_FILE} {what}; refusing to load it "
                               "(a crafted or foreign file)")

    if len(data) > MAX_METADATA_BYTES:
        raise refuse(f"is {len(data)} bytes, over {MAX_METADATA_BYTES}")
    mark = object()
    stack: list = []
    memo: dict = {}
    try:
        for n, (op, arg, _) in enumerate(pickletools.genops(data)):
            if n > MAX_METADATA_OPS:
                raise refuse(f"has over {MAX_METADATA_OPS} opcodes")
            name = op.name
            if name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
                continue
            if name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
                continue
            before = [s.name for s in op.stack_before]
            popped = 0
            if "mark" in before:
                while stack[-1] is not mark:
                    popped += stack.pop()
                stack.pop()
                before = before[:before.index("mark")]
            for _ in before:
                popped += stack.pop()
            size = 1 + popped
            if size > MAX_METADATA_TREE:
                raise refuse(f"builds an object of over {MAX_METADATA_TREE} nodes (shared references "
                             "nested to blow up)")
            for s in op.stack_after:
                stack.append(mark if s.name == "mark" else size)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or malformed opcodes
        raise refuse(f"is not a well-formed pickle ({type(e).__name__}: {e})") from e


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file, refusing every global that is not
    checkpoint metadata (os.system, builtins.eval, subprocess.*, ...)."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if name in _ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"checkpoint {self.source}: {_METADATA_FILE} names {module}.{name}, which is not "
            f"checkpoint metadata; refusing to load it (a crafted or foreign file)")


def read_checkpoint_metadata(path: str | Path) -> "dcp.Metadata":
    """The DCP `Metadata` of a local checkpoint directory, through
    `MetadataUnpickler`, with its structure checked; else CheckpointError."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata, Metadata, MetadataIndex, TensorStorageMetadata)

    file = Path(path, _METADATA_FILE)
    try:
        data = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {_METADATA_FILE} ({e.strerror or e})") from e
    check_pickle_cost(data, str(path))
    try:
        meta = MetadataUnpickler(io.BytesIO(data), str(path)).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated / garbage bytes: any unpickling failure
        raise CheckpointError(f"checkpoint {path}: {_METADATA_FILE} is not DCP metadata "
                              f"({type(e).__name__}: {e})") from e

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {_METADATA_FILE} {what}; refusing to load it")

    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise bad(f"holds a {type(meta).__name__}, not DCP Metadata")
    for key, item in meta.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(item, (TensorStorageMetadata, BytesStorageMetadata)):
            raise bad(f"entry {key!r} is not tensor or bytes metadata")
    for index, info in (meta.storage_data or {}).items():
        if not (isinstance(index, MetadataIndex) and isinstance(info, _StorageInfo) and _plain_slice(info)):
            raise bad(f"storage entry {getattr(index, 'fqn', index)!r} is not a plain data file slice")
    for key, route in (meta.planner_data or {}).items():
        if not isinstance(key, str) or not isinstance(route, tuple) \
                or not all(isinstance(k, (str, int)) for k in route):
            raise bad(f"planner entry {key!r} is not a key path")
    return meta


def _plain_slice(info) -> bool:
    """A byte range of a data file in the checkpoint directory itself: no
    path (`../`, `/etc/...`), no hidden file, no stream transform."""
    rel = info.relative_path
    return (isinstance(rel, str) and bool(rel) and not rel.startswith(".")
            and "/" not in rel and "\\" not in rel
            and isinstance(info.offset, int) and isinstance(info.length, int)
            and info.offset >= 0 and info.length >= 0 and not info.transform_descriptors)


class SafeFileSystemReader(dcp.FileSystemReader):
    """`dcp.FileSystemReader` whose metadata comes from `read_checkpoint_metadata`.

    The metadata is read (and refused) once, before DCP runs: DCP itself
    swallows a `read_metadata` error and falls back to per-rank metadata.
    """

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._metadata = None

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None and str(checkpoint_id) != str(self.path):
            self._metadata = None
        super().reset(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> "dcp.Metadata":
        if kwargs.get("rank") is not None:   # per-rank metadata: never written here
            raise CheckpointError(f"checkpoint {self.path}: no per-rank metadata")
        if self._metadata is None:
            self._metadata = read_checkpoint_metadata(self.path)
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """`DefaultLoadPlanner` loading non-tensor values (optimizer hyper-parameters,
    ...) with `torch.load(weights_only=True)` instead of a full unpickle."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            first = " ".join(str(e).split())[:200]
            raise CheckpointError(f"checkpoint value {fqn}: refusing to unpickle it ({first})") from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def dcp_load(state: dict[str, Any], path: str | Path, planner: dcp.DefaultLoadPlanner | None = None) -> None:
    """`dcp.load` of a local checkpoint directory through the safe reader and
    planner; a refusal anywhere surfaces as the CheckpointError that caused it."""
    from torch.distributed.checkpoint.api import CheckpointException

    reader = SafeFileSystemReader(path)
    reader.read_metadata()   # refuse before DCP starts (collective on every rank)
    try:
        dcp.load(state, storage_reader=reader, planner=planner or SafeLoadPlanner())
    except CheckpointException as e:
        for exc, _trace in e.failures.values():
            if isinstance(exc, CheckpointError):
                raise CheckpointError(str(exc)) from None
        raise


class Checkpointer:
    """Saves and restores a `TrainingState` through Ray Train's storage.

    Every rank calls `save` / `restore` (both are collective).
    """

    def __init__(self, state: TrainingState, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig,
                 run_uri: str | None = None, storage_cfg: StorageConfig | None = None):
        self.state = state
        self.model_cfg = model_cfg
        self.diffusion_cfg = diffusion_cfg
        self.run_uri, self.storage_cfg = run_uri, storage_cfg  # where Ray Train persists the steps

    def restore(self) -> bool:
        """Load the latest checkpoint Ray Train has for this run, if any."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as path:
            self.load_from(path)
        return True

    def load_from(self, path: str) -> None:
        keys = read_checkpoint_metadata(path).state_dict_metadata
        state: dict[str, Any] = {"app": self.state}
        # RNG states are per rank: a run resumed on a different number of
        # workers keeps its own generators instead.
        if not any(k.startswith(f"app.rng.{TrainingState._rng_key()}.") for k in keys):
            state = {"app": _WithoutRng(self.state)}
        dcp_load(state, path)

    def save(self, metrics: dict[str, float]) -> None:
        """Write the DCP shards of every rank and report them as one checkpoint."""
        import ray.train

        step = self.state.progress.step
        with tempfile.TemporaryDirectory(prefix="dheads-ckpt-") as tmp:
            dcp.save({"app": self.state}, checkpoint_id=tmp)
            if not dist.is_initialized() or dist.get_rank() == 0:
                Path(tmp, JOB_FILE).write_text(json.dumps({
                    "step": step,
                    "model": to_dict(self.model_cfg),
                    "diffusion": to_dict(self.diffusion_cfg),
                }, indent=2))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(step))
        # report returns once every rank's upload is done (it synchronises the ranks)
        if self.run_uri is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            storage.write_bytes(storage.join(self.run_uri, checkpoint_dir_name(step), COMPLETE_FILE),
                                json.dumps({"step": step}).encode(), self.storage_cfg)


class _WithoutRng(Stateful):
    def __init__(self, inner: TrainingState):
        self.inner = inner

    def state_dict(self) -> dict[str, Any]:
        sd = self.inner.state_dict()
        sd.pop("rng")
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.inner.load_state_dict(sd)


# ------------------------------------------------------------ offline reading
def latest_checkpoint(run_uri: str, storage_cfg: StorageConfig | None = None) -> str | None:
    """URI of the newest complete `step_*` checkpoint directory of a run
    folder, or None: one with `COMPLETE_FILE`; in a run that has no marker
    at all (written before markers existed), one with `.metadata`."""
    fs, path = storage.resolve(run_uri, storage_cfg)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    steps = sorted(i.base_name for i in infos
                   if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX))
    marked = [n for n in steps if storage.exists(storage.join(run_uri, n, COMPLETE_FILE), storage_cfg)]
    if marked:
        return storage.join(run_uri, marked[-1])
    for name in reversed(steps):  # a directory without metadata is an upload cut short
        if storage.exists(storage.join(run_uri, name, ".metadata"), storage_cfg):
            return storage.join(run_uri, name)
    return None


def download(checkpoint_uri: str, local_dir: str, storage_cfg: StorageConfig | None = None) -> str:
    """Copy a checkpoint directory (local or s3://) into `local_dir`."""
    if not storage.is_s3(checkpoint_uri):
        return checkpoint_uri
    import pyarrow.fs as pafs

    fs, path = storage.resolve(checkpoint_uri, storage_cfg)
    pafs.copy_files(path, local_dir, source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def load_ema_model(checkpoint_dir: str, use_ema: bool = True
                   ) -> tuple[nn.Module, ModelConfig, DiffusionConfig, int]:
    """Plain (unsharded) DiffusedHeads holding the EMA weights (or, with
    `use_ema=False`, the raw weights) of a local DCP checkpoint.

    Runs in one process without a process group: DCP reassembles the shards
    written by all ranks. Buffers come from the trained model's state.
    """
    from dheads.model.unet import DiffusedHeads

    meta = json.loads(Path(checkpoint_dir, JOB_FILE).read_text())
    model_cfg = from_dict(ModelConfig, meta["model"])
    diffusion_cfg = from_dict(DiffusionConfig, meta["diffusion"])
    model = DiffusedHeads(model_cfg)
    model_sd = model.state_dict()
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    dcp_load({"app": {"model": model_sd, "ema": ema}}, checkpoint_dir,
             planner=SafeLoadPlanner(allow_partial_load=False))
    if use_ema:
        model_sd.update(ema)
    model.load_state_dict(model_sd)
    return model.eval(), model_cfg, diffusion_cfg, int(meta["step"])


# ------------------------------------------------------------ model checkpoints
_FETCHED: dict[tuple[str, str | None], str] = {}


def fetch_model_checkpoint(uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """A local directory holding the model checkpoint (`model.safetensors` +
    `config.json`) at `uri`: local paths as they are, `s3://` downloaded once
    per process. Raises CheckpointError saying what is missing and how to
    make one, before anything else starts."""
    from dheads.model.checkpoint import CONFIG, WEIGHTS, CheckpointError

    hint = "train one with `dheads train` and `dheads export`, or pass checkpoint=<folder>"
    if not storage.is_s3(uri):
        path = Path(uri).expanduser()
        if not (path / CONFIG).is_file():
            what = "no such folder" if not path.exists() else f"no {CONFIG} there"
            raise CheckpointError(f"checkpoint {uri}: {what}; {hint}")
        return str(path)
    key = (uri, storage_cfg.endpoint_url if storage_cfg else None)
    cached = _FETCHED.get(key)
    if cached and Path(cached, WEIGHTS).is_file():
        return cached
    if not storage.exists(storage.join(uri, CONFIG), storage_cfg):
        raise CheckpointError(f"checkpoint {uri}: no {CONFIG} there; {hint}")
    local = tempfile.mkdtemp(prefix="dheads-ckpt-")
    for name in (CONFIG, WEIGHTS):
        Path(local, name).write_bytes(storage.read_bytes(storage.join(uri, name), storage_cfg))
    _FETCHED[key] = local
    return local


__all__ = ["Progress", "TrainingState", "Checkpointer", "latest_checkpoint", "download",
           "load_ema_model", "checkpoint_dir_name", "fetch_model_checkpoint", "JOB_FILE",
           "read_checkpoint_metadata", "dcp_load", "SafeFileSystemReader", "SafeLoadPlanner",
           "MetadataUnpickler"]
