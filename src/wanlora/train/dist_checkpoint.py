"""Rank-independent checkpoints: what every rank count can save and resume.

The saved state is the same `scratch/train/<key>/` layout as `wanlora.train.checkpoint` (tensors
in safetensors under `lora.<expert>.*`, `optim.<expert>.*`, `ema.<expert>.*`; plain values in
JSON) and holds only what does not depend on the launch: the LoRA weights and their optimizer
state (identical on every data-parallel rank), the global step, the global data cursor, the
expert schedule and the history. No per-rank RNG state is needed, because every random draw is a
function of (seed, expert, batch position) (see `wanlora.train.distributed`). So a state written
by 2 ranks resumes on 1, 4 or 8, in either parallel mode.

Saving is collective: each expert group's leader sends its LoRA and optimizer state to rank 0
(expert-parallel: rank 0 holds only the high-noise expert), rank 0 alone writes the state and
the LoRA pair, and every rank waits at a barrier so nobody reads a half-written state. FSDP-sharded
LoRA tensors are gathered into full tensors for saving and re-sharded like their parameter on load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from wanlora.config import Expert
from wanlora.train import checkpoint as ckpt
from wanlora.train.dist_parallel import ParallelPlan, is_sharded
from wanlora.train.distributed import Cursor, DistEnv, DistributedError, barrier, gather_objects
from wanlora.train.experts import ORDER
from wanlora.train.lora import Ema, load_lora_state_dict, lora_state_dict

#: expert -> LoRA file bytes, e.g. a closure over `wanlora.train.lora.lora_file_bytes` and lineage.
LoraFiles = Callable[[dict[Expert, dict[str, torch.Tensor]]], dict[Expert, bytes]]


@dataclass
class ExpertParts:
    """What one rank holds of one expert: the model (with its LoRA), its optimizer, its EMA."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: Ema | None = None


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor (collective for an FSDP-sharded one: call on every rank of the group)."""
    if is_sharded(t):
        t = t.full_tensor()
    return t.detach().cpu().contiguous()


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` placed as `ref` is: sharded the same way for a DTensor, else on its device."""
    if is_sharded(ref):
        from torch.distributed.tensor import distribute_tensor

        # every rank holds the full tensor (each read the file): slice locally, no scatter
        return distribute_tensor(full.to(ref.device_mesh.device_type, ref.dtype), ref.device_mesh, ref.placements,
                                 src_data_rank=None)
    return full.to(ref.device)


def expert_state(expert: Expert, parts: ExpertParts) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, plain optimizer record) of one expert, in the checkpoint's key layout."""
    tensors = {f"lora.{expert}.{k}": _full(v) for k, v in lora_state_dict(parts.model).items()}
    opt_tensors, opt_plain = ckpt.flatten_optimizer(_FullStateView(parts.optimizer), f"optim.{expert}")
    tensors.update(opt_tensors)
    if parts.ema is not None:
        tensors.update({f"ema.{expert}.{k}": _full(v) for k, v in parts.ema.state_dict().items()})
    return tensors, opt_plain


class _FullStateView:
    """An optimizer seen through `state_dict()` with sharded state tensors made full, so
    `checkpoint.flatten_optimizer` writes the same records for sharded and plain LoRAs."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        state = {i: {k: (_full(v) if torch.is_tensor(v) and is_sharded(v) else v) for k, v in slots.items()}
                 for i, slots in sd["state"].items()}
        return {"state": state, "param_groups": sd["param_groups"]}


# ------------------------------------------------------------------------------ transfer
def _pack(tensors: dict[str, torch.Tensor]) -> tuple[list[tuple[str, str, list[int]]], torch.Tensor]:
    """All tensors as one byte buffer plus (name, dtype, shape) records: one message, any dtypes."""
    meta, chunks = [], []
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        meta.append((name, str(t.dtype).removeprefix("torch."), list(t.shape)))
        chunks.append(t.reshape(-1).view(torch.uint8))
    return meta, torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)


def _unpack(meta: list[tuple[str, str, list[int]]], buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, dtype_name, shape in meta:
        dtype = getattr(torch, dtype_name)
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out[name] = buffer[offset:offset + n].clone().view(dtype).reshape(shape)  # clone: aligned storage
        offset += n
    return out


def send_to_main(env: DistEnv, src: int, payload: tuple[dict[str, torch.Tensor], Any] | None
                 ) -> tuple[dict[str, torch.Tensor], Any] | None:
    """Move (tensors, plain) from rank `src` to rank 0; rank 0 gets it, `src` and others get None.

    Collective between ranks `src` and 0 only; uses the object channel for the plain part (our own
    processes, never user files) and one byte buffer for all tensors.
    """
    if src == 0:
        return payload if env.rank == 0 else None
    if env.rank == src:
        assert payload is not None, "the sending rank must hold the state"
        meta, buffer = _pack(payload[0])
        dist.send_object_list([payload[1], meta, buffer.numel()], dst=0)
        dist.send(buffer.to(env.device), dst=0)
        return None
    if env.rank == 0:
        box: list[Any] = [None, None, None]
        dist.recv_object_list(box, src=src)
        plain, meta, size = box
        buffer = torch.empty(size, dtype=torch.uint8, device=env.device)
        dist.recv(buffer, src=src)
        return _unpack(meta, buffer.cpu()), plain
    return None


# ------------------------------------------------------------------------- save / load
def save_parallel_checkpoint(
    folder: Path,
    env: DistEnv,
    plan: ParallelPlan,
    local: dict[Expert, ExpertParts],
    *,
    step: int,
    cursor: Cursor,
    extra: dict[str, Any],
    lora_files: LoraFiles | None = None,
    keep_last: int = 4,
) -> None:
    """Write the rank-independent state (and the LoRA pair) from rank 0; collective over all ranks.

    `extra` carries the loop's plain values (history, bad_steps, schedule). `lora_files` turns
    each expert's file tensors (EMA when kept, else the LoRA) into file bytes.
    """
    gathered: dict[Expert, tuple[dict[str, torch.Tensor], Any]] = {}
    for e in (e for e in ORDER if e in plan.groups):
        mine = expert_state(e, local[e]) if e in local else None  # every group member: FSDP gathers
        got = send_to_main(env, plan.leader(e), mine if env.rank == plan.leader(e) else None)
        if got is not None:
            gathered[e] = got
    if env.is_main:
        tensors: dict[str, torch.Tensor] = {}
        plain: dict[str, Any] = {**extra, "epoch": cursor.epoch, "position": cursor.position,
                                 "optimizers": {}, "parallel": {"mode": plan.mode, "world": plan.world}}
        for e, (t, opt_plain) in gathered.items():
            tensors.update(t)
            plain["optimizers"][e] = opt_plain
        if lora_files is not None:
            ckpt.save_lora_pair(folder, step, lora_files({e: _file_tensors(tensors, e) for e in gathered}))
        try:
            ckpt.save_state(folder, step, tensors, plain)
        except BaseException:
            ckpt.discard_loras(folder, step)  # a pair without its state is not a checkpoint
            raise
        ckpt.prune_loras(folder, keep_last)
    barrier(env)


def _file_tensors(tensors: dict[str, torch.Tensor], expert: Expert) -> dict[str, torch.Tensor]:
    """What an expert's LoRA file holds: the EMA weights when kept, else the trained ones."""
    for kind in ("ema", "lora"):
        prefix = f"{kind}.{expert}."
        found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if found:
            return found
    raise KeyError(f"no LoRA tensors for the {expert}-noise expert in the state")


def load_parallel_checkpoint(folder: Path, env: DistEnv, local: dict[Expert, ExpertParts]) -> dict[str, Any] | None:
    """Load the latest state into this rank's experts; returns its plain values (step, epoch,
    position, history, ...) or None when there is none. Every rank reads the files itself."""
    barrier(env)  # a state being written by rank 0 is complete before anyone reads
    found = ckpt.load_state(folder)
    steps = gather_objects(None if found is None else int(found[1]["step"]), env)
    if len(set(steps)) > 1:  # e.g. nodes with their own workspace copies, the state only on node 0's
        raise DistributedError(
            f"{folder}: the ranks found different training states (step by rank: {steps}; None: no state). "
            "Fix: give every node the same scratch/train/<run key>/ (a shared workspace, or copy node 0's "
            "folder to the others) before resuming, or delete it everywhere to start again")
    if found is None:
        return None
    tensors, plain = found
    for e, parts in local.items():
        if e not in plain["optimizers"]:
            raise ValueError(f"{folder}: the saved state has no {e}-noise expert (it trained "
                             f"{sorted(plain['optimizers'])}); use a fresh run for a changed multistage")
        current = lora_state_dict(parts.model)
        prefix = f"lora.{e}."
        saved = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_lora_state_dict(parts.model, {k: _like(v, current[k]) if k in current else v for k, v in saved.items()})
        ckpt.restore_optimizer(parts.optimizer, tensors, plain["optimizers"][e])
        _reshard_optimizer_state(parts.optimizer)
        if parts.ema is not None:
            prefix = f"ema.{e}."
            parts.ema.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return plain


def _reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Place restored state tensors like their parameter: the saved full moments of an
    FSDP-sharded LoRA tensor become shards again (scalars such as Adam's step stay as they are)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            slots = optimizer.state.get(p, {})
            for k, v in slots.items():
                if torch.is_tensor(v) and not is_sharded(v) and v.shape == p.shape:
                    slots[k] = _like(v, p)
