"""Model checkpoints: a directory with `model.safetensors` + `config.json`.

Loading never unpickles: weights are read with safetensors, the config with
json, and everything is checked (format tag, config schema, tensor names and
shapes) before the model is built. Anything else, a pickle or a
`torch.save` file included, raises `CheckpointError` with the reason.

This module reads local directories only; `s3://` and other URIs are
downloaded by the platform layer (`dheads.platform.storage`) first, so
`dheads.model` stays free of I/O plumbing.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple, Union

import torch
from torch import nn

from dheads.model.config import AudioConfig, DiffusionConfig, ModelConfig, from_dict, to_dict

FORMAT = "dheads-model"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """The path is not a valid dheads model checkpoint."""


class LoadedModel(NamedTuple):
    model: nn.Module
    model_cfg: ModelConfig
    diffusion_cfg: DiffusionConfig


def save_checkpoint(path: Union[str, Path], model: nn.Module, model_cfg: ModelConfig,
                    diffusion_cfg: DiffusionConfig) -> Path:
    """Write `path/model.safetensors` and `path/config.json`; returns `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS), metadata={"format": FORMAT})
    config = {"format": FORMAT, "version": VERSION, "model": to_dict(model_cfg),
              "diffusion": to_dict(diffusion_cfg), "audio": to_dict(model_cfg.audio)}
    (path / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def _describe_foreign(file: Path) -> str:
    head = file.read_bytes()[:8] if file.is_file() else b""
    if head[:1] == b"\x80":
        return "it is a Python pickle; dheads never unpickles checkpoints"
    if head[:2] == b"PK":
        return "it is a zip archive (a torch.save file?); dheads never unpickles checkpoints"
    return "it is not a safetensors file"


def _read_config(path: Path) -> tuple[ModelConfig, DiffusionConfig]:
    try:
        data = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG}: not a readable JSON config ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path / CONFIG}: missing format tag {FORMAT!r}")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path / CONFIG}: unsupported version {data.get('version')!r}")
    try:
        model_cfg = from_dict(ModelConfig, data["model"])
        diffusion_cfg = from_dict(DiffusionConfig, data["diffusion"])
        if "audio" in data and from_dict(AudioConfig, data["audio"]) != model_cfg.audio:
            raise ValueError("audio config differs from model.audio")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG}: invalid config ({e})") from e
    return model_cfg, diffusion_cfg


def _read_weights(file: Path) -> dict:
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"{file}: weights file missing")
    try:
        return load_file(str(file), device="cpu")
    except Exception as e:  # safetensors raises SafetensorError or OSError variants
        raise CheckpointError(f"{file}: not a valid checkpoint: {_describe_foreign(file)} "
                              f"({type(e).__name__}: {e})") from e


def load_checkpoint(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> LoadedModel:
    """Build the model of a checkpoint directory and load its weights (eval mode).

    `path` is a local directory (a path to its `model.safetensors` also works);
    download remote URIs through `dheads.platform.storage` first."""
    from dheads.model.unet import DiffusedHeads

    s = str(path)
    if "://" in s:
        raise CheckpointError(f"{s}: dheads.model loads local directories only; download "
                              "the checkpoint with dheads.platform.storage first")
    path = Path(s)
    if path.is_file():
        if path.name != WEIGHTS or not (path.parent / CONFIG).is_file():
            raise CheckpointError(f"{path}: not a checkpoint directory ({_describe_foreign(path)}); "
                                  f"expected a directory with {WEIGHTS} and {CONFIG}")
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    model_cfg, diffusion_cfg = _read_config(path)
    state = _read_weights(path / WEIGHTS)
    # the encoder's pretrained weights are part of model.safetensors already
    build_cfg = dataclasses.replace(
        model_cfg, audio=dataclasses.replace(model_cfg.audio, encoder_weights=None))
    with torch.device("meta"):
        model = DiffusedHeads(build_cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    bad = [f"{k}: {got[k]} != {expected[k]}" for k in expected if got[k] != expected[k]]
    if bad:
        raise CheckpointError(f"{path}: tensor shapes do not match the config: {bad[:5]}")
    # The tensors safetensors returns may sit at any byte offset of its buffer
    # (many are not 64-byte aligned); vectorised kernels then take other code
    # paths and a loaded model computed ~1e-5 away from the saved one. A copy
    # into the allocator's own (aligned) storage makes the round trip exact.
    state = {k: v.clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.cfg = model_cfg
    return LoadedModel(model.to(device).eval(), model_cfg, diffusion_cfg)
