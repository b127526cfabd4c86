"""Sharded base: FSDP2 `fully_shard` over an expert's blocks when one bucket does not fit a card.

Each transformer block becomes one FSDP unit (its frozen base weights and its LoRA tensors are
split over the ranks of the group and all-gathered just for that block's forward and backward),
and the root module takes what is left (patch and text embedders, time embedding, head). Memory
per rank for the weights drops from the expert's size to about size / ranks + two blocks.

The LoRA tensors inside a block are sharded with it, so FSDP reduce-scatters their gradients
itself (`dist_parallel.reduce_gradients` skips such DTensors), the optimizer state is sharded too,
and checkpoints gather and re-shard them (`dist_checkpoint`). Measured in torch 2.13: on CPU with
gloo, `fully_shard` of the tiny Wan expert with a peft LoRA runs forward and backward, with mixed
bf16/fp32 parameters inside a block (diffusers keeps `scale_shift_table` and norms in fp32).

Guards: one process has nothing to shard over; a quantized base (quanto / bitsandbytes tensor
subclasses) and our block offloading both manage the same weights FSDP wants to own, so those
combinations stop with a message rather than fail deep inside FSDP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from wanlora.train.distributed import DistEnv, DistributedError


def _quantized(model: torch.nn.Module) -> bool:
    """Any linear `wanlora.models.quant` recognises as quantized, or any parameter that is a tensor
    subclass (quanto, torchao) or a Parameter subclass (bitsandbytes)."""
    from wanlora.models.quant import quantized_modules

    return bool(quantized_modules(model)) or any(
        type(p) is not torch.nn.Parameter or type(p.data) is not torch.Tensor for p in model.parameters())


def shard_base(model: torch.nn.Module, env: DistEnv, group: Any = None, *, offloading: bool = False,
               reshard_after_forward: bool = True) -> torch.nn.Module:
    """Apply FSDP2 to `model.blocks` and the root, over the ranks of `group` (default: all ranks).

    Call after the LoRA is injected and checkpointing is applied, before the optimizer is built
    (the optimizer must hold the sharded parameters). Returns the same module, now sharded.
    """
    if not env.distributed:
        raise DistributedError("train.sharded_base needs 2+ processes to shard over; launch with "
                               "`torchrun --nproc-per-node N` or set train.sharded_base: false")
    try:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as err:  # torch < 2.6
        raise DistributedError(f"train.sharded_base needs FSDP2 (torch >= 2.6): {err}") from None
    if _quantized(model):
        raise DistributedError("train.sharded_base does not combine with a quantized base "
                               "(quantization.transformer); use one or the other")
    if offloading:
        raise DistributedError("train.sharded_base does not combine with model.layer_offloading; "
                               "sharding already divides the weights over the ranks: turn offloading off")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
        raise DistributedError(f"{type(model).__name__} has no `blocks` list to shard")
    mesh = DeviceMesh.from_group(group or dist.group.WORLD, env.device.type)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model
