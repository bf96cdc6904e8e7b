"""Model checkpoints for inference (`model.safetensors` + `config.json`,
written by `dheads export`): a local folder, or `s3://` fetched once per
process. Loading them is `model/checkpoint.py` (safetensors and JSON only).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from dheads.platform import storage
from dheads.platform.config import StorageConfig

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
    local = storage.download_dir(uri, tempfile.mkdtemp(prefix="dheads-ckpt-"), storage_cfg,
                                 names=(CONFIG, WEIGHTS))
    _FETCHED[key] = local
    return local


__all__ = ["fetch_model_checkpoint"]
