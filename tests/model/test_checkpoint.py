import json
import os
import pickle

import pytest
import torch

from dheads.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dheads.model.config import DiffusionConfig
from dheads.model.flops import example_inputs
from dheads.model.unet import DiffusedHeads


@pytest.fixture
def saved(tmp_path, load_preset, randomise):
    torch.manual_seed(0)
    cfg = load_preset("tiny")
    model = randomise(DiffusedHeads(cfg))
    dcfg = DiffusionConfig(lambda_ls=0.3)
    save_checkpoint(tmp_path / "ckpt", model, cfg, dcfg)
    return tmp_path / "ckpt", model, cfg, dcfg


def test_round_trip_is_bit_exact(saved):
    path, model, cfg, dcfg = saved
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    loaded = load_checkpoint(path)
    assert loaded.model_cfg == cfg and loaded.diffusion_cfg == dcfg
    a, b = model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    inputs = example_inputs(cfg, batch=1)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(torch.ones_like(inputs[0]), *inputs[1:]),
                           loaded.model(torch.ones_like(inputs[0]), *inputs[1:]))


class _Trap:
    """Unpickling this creates a directory: proof that something unpickled."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.makedirs, (self.sentinel,))


def test_a_pickle_posing_as_a_checkpoint_is_refused(saved, tmp_path):
    path, *_ = saved
    sentinel = str(tmp_path / "unpickled")
    (path / "model.safetensors").write_bytes(pickle.dumps({"w": _Trap(sentinel)}, protocol=4))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)
    torch.save({"w": torch.zeros(2)}, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(path)
    loose = tmp_path / "model.pt"
    loose.write_bytes(pickle.dumps(_Trap(sentinel)))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(loose)
    assert not os.path.exists(sentinel)


def test_invalid_checkpoints_get_clear_errors(saved, tmp_path):
    path, *_ = saved
    with pytest.raises(CheckpointError, match="local directories"):
        load_checkpoint("s3://bucket/ckpt")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing")
    # weights that do not fit the config
    config = json.loads((path / "config.json").read_text())
    config["model"]["model_channels"] = 64
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shapes do not match"):
        load_checkpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_checkpoint(path)
    config["format"] = "something-else"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(path)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text(json.dumps(json.loads((path / "config.json").read_text())
                                                    | {"format": "dheads-model"}))
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_checkpoint(garbage)
