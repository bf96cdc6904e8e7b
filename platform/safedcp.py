"""Reading a torch.distributed.checkpoint (DCP) directory without running
anything it contains.

Reading never unpickles anything from storage beyond plain data: DCP's
`.metadata` is a pickle, and DCP's own reader `pickle.load`s it (and its
default planner `torch.load(weights_only=False)`s every non-tensor value), so
a crafted checkpoint runs code on resume and on `dheads export`. Every DCP
read in dheads goes through `SafeFileSystemReader` (the metadata through
`MetadataUnpickler`, which admits only DCP's metadata dataclasses, torch.Size,
dtypes, layouts and paths, then checks the structure) and `SafeLoadPlanner`
(non-tensor values through `torch.load(weights_only=True)`). Anything else
raises `CheckpointError` with one line saying what was refused.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from dheads.model.checkpoint import CheckpointError

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


__all__ = ["read_checkpoint_metadata", "dcp_load", "check_pickle_cost", "SafeFileSystemReader",
           "SafeLoadPlanner", "MetadataUnpickler", "MAX_METADATA_BYTES", "MAX_METADATA_OPS",
           "MAX_METADATA_TREE"]
