"""FSDP2 sharding of a built DiffusedHeads, applied from outside the model.

`model/` knows nothing about `torch.distributed`; this one function wraps
each of `model.blocks()` with `fully_shard`, then the root (which holds the
remaining parameters: stems, time/audio embeddings, output head). Same shape
as torchtitan's `parallelize` functions.

GPU: parameters all-gathered and computed in bf16, gradients reduced in fp32
(the sharded fp32 master weights stay with the optimizer). CPU (gloo): fp32
throughout — gloo has no bf16 reduce-scatter worth using and CPU bf16 matmul
is slower than fp32 on most x86 parts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 params/compute with fp32 gradient reduction on CUDA; fp32 on CPU."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, device: torch.device, mesh: DeviceMesh | None = None,
                reshard_after_forward: bool = True) -> FSDPModule:
    """Shard `model` (already on `device`) block by block with FSDP2, in place.

    `model.blocks()` yields the modules to wrap one by one (each becomes one
    all-gather / reduce-scatter unit); the root wrap picks up every parameter
    left over. Needs an initialised default process group (Ray Train's
    TorchTrainer sets it up: gloo on CPU, NCCL on GPU). Returns the model,
    now an `FSDPModule` whose parameters are DTensors sharded on dim 0.
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs torch.distributed to be initialised")
    mesh = mesh or init_device_mesh(device.type, (dist.get_world_size(),))
    mp = mixed_precision(device)
    blocks = list(model.blocks())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward:
        # keeping them unsharded after forward saves one all-gather.
        last = i == len(blocks) - 1
        # fully_shard refuses ModuleList containers even when they define a
        # forward (the UNet's CondSequential); a list of modules is one
        # communication group all the same.
        unit = list(block) if isinstance(block, nn.ModuleList) else block
        fully_shard(unit, mesh=mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and not last)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model  # type: ignore[return-value]
