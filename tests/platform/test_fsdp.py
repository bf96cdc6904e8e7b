"""FSDP2 sharding of DiffusedHeads, block by block, in a one-process gloo group
(the 2-process case runs under Ray Train in tests/jobs/test_train.py)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist


@pytest.fixture
def gloo_group(free_port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny_cfg():
    from dheads.platform.config import compose

    return compose("train", ["model=tiny", "model.image_size=32"]).model


def test_every_block_is_its_own_fsdp_unit_and_outputs_match(gloo_group):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from dheads.model.flops import example_inputs
    from dheads.model.unet import DiffusedHeads
    from dheads.platform.fsdp import shard_model

    cfg = tiny_cfg()
    torch.manual_seed(0)
    plain = DiffusedHeads(cfg)
    torch.manual_seed(0)
    sharded = shard_model(DiffusedHeads(cfg), torch.device("cpu"))

    assert isinstance(sharded, FSDPModule)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    # each block is one communication group (ModuleList blocks: their children)
    for block in sharded.blocks():
        units = list(block) if isinstance(block, torch.nn.ModuleList) else [block]
        assert all(isinstance(u, FSDPModule) for u in units), type(block).__name__

    x, t, identity, motion, audio = example_inputs(cfg, batch=2)
    x = torch.randn_like(x)
    t = torch.tensor([3, 500])
    with torch.no_grad():
        assert torch.allclose(plain(x, t, identity, motion, audio),
                              sharded(x, t, identity, motion, audio), atol=1e-6)


def test_mixed_precision_is_bf16_on_gpu_and_fp32_on_cpu():
    from dheads.platform.fsdp import mixed_precision

    gpu = mixed_precision(torch.device("cuda"))
    assert gpu.param_dtype == torch.bfloat16 and gpu.reduce_dtype == torch.float32
    cpu = mixed_precision(torch.device("cpu"))
    assert cpu.param_dtype is None and cpu.reduce_dtype is None


def test_shard_model_needs_a_process_group():
    from dheads.model.unet import DiffusedHeads
    from dheads.platform.fsdp import shard_model

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    with pytest.raises(RuntimeError, match="initialised"):
        shard_model(DiffusedHeads(tiny_cfg()), torch.device("cpu"))
