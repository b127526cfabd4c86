"""Data- and expert-parallel training: who trains what, and the reductions of a step.

Data-parallel: every rank holds the active expert(s); each optimizer step takes the next
A*N batches of the global order (A = train.gradient_accumulation, N ranks), rank r runs batches
r, r+N, ..., and the LoRA gradients are averaged. That is exactly one process with accumulation
A*N: same batches, same random draws (see `wanlora.train.distributed`), same averaged gradient.

Expert-parallel (two experts, an even number of ranks): the first half of the ranks trains the
high-noise expert, the second half the low-noise one, at the same time, each on its own timestep
band and data-parallel inside its group; no rank loads the other expert and there is no
switching. `train.steps` keeps its meaning (optimizer steps of both experts together), so each
group runs half of them.

Why a manual all-reduce of LoRA gradients rather than torch DDP: the reduction runs once per
optimizer step, after the last accumulation micro-step, over the LoRA gradients only (r16 on both
attentions and the FFN of A14B: 76.7M values, 307 MB as fp32). At NVLink's few hundred GB/s that
is about 1-2 ms (an estimate; bench/scaling.py measures the whole step) against 2-15 s of compute
per step, so DDP's overlap with backward would save well under 1%. In exchange the model stays
unwrapped: peft's disable_adapters (DOP's prior pass), set_adapters, block offloading hooks,
checkpointing, quantized bases and FSDP all see the bare module; there is no no_sync bookkeeping
for accumulation and no "parameter marked ready twice" failure when DOP runs two forwards before
one backward. Gradients are summed in fp32, the LoRA's master dtype (`wanlora.train.lora`).
Expert-parallel groups of one rank skip the reduction entirely.

The optimizer step itself (`wanlora.train.step.optimizer_step`) calls `reduce_gradients` and
`sum_over`; this module holds no training code.

Sequence-parallel (`train.sequence_parallel: S`, `wanlora.train.sequence_parallel`): S contiguous
ranks run one replica, the same micro-batches with the same random draws, each on 1/S of the
tokens; the plans above then count replicas (world = replicas x S) and an expert's group holds all
ranks of its replicas. Each SP rank's LoRA gradient is its share of the replica's, so the group
average with the loss scaled by the group size sums over SP and averages over replicas.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from wanlora.config import Expert
from wanlora.train.distributed import DistEnv, DistributedError
from wanlora.train.experts import ORDER

Mode = Literal["auto", "data", "expert"]
BUCKET_BYTES = 64 << 20


@dataclass(frozen=True)
class ParallelPlan:
    """Which ranks train which expert. In data mode every rank is in every expert's group.
    `sp` ranks in a row form one sequence-parallel replica (1: every rank is a replica)."""

    mode: Literal["data", "expert"]
    world: int
    groups: dict[Expert, tuple[int, ...]]
    sp: int = 1

    def replica(self, rank: int, expert: Expert) -> tuple[int, int]:
        """(index of `rank`'s replica in the expert's group, replicas in that group): which share
        of the global batches the rank runs (`rank_share`), the same for all SP ranks of a replica."""
        members = self.groups[expert]
        return members.index(rank) // self.sp, len(members) // self.sp

    def experts_of(self, rank: int) -> tuple[Expert, ...]:
        """The experts rank `rank` loads and trains, in schedule order."""
        return tuple(e for e in ORDER if e in self.groups and rank in self.groups[e])

    def leader(self, expert: Expert) -> int:
        """The rank that speaks for an expert's group (sends its state to rank 0)."""
        return self.groups[expert][0]

    @property
    def step_increment(self) -> int:
        """Global optimizer steps one round completes: 1, or one per expert when they train at once.

        The global step keeps the single-process meaning (optimizer steps of both experts
        together), so the learning-rate schedule, `save.every` and checkpoints line up across modes.
        """
        return 1 if self.mode == "data" else len(self.groups)


def plan_parallel(world: int, active: Iterable[Expert], mode: Mode = "auto", sp: int = 1) -> ParallelPlan:
    """The plan for `world` ranks and the active experts, with `sp` ranks per sequence-parallel
    replica (`world` a multiple of it; `sequence_parallel.check_world`).

    auto: expert-parallel when both experts train and the replicas split evenly, else data-parallel.
    """
    experts = tuple(e for e in ORDER if e in set(active))  # never empty: params refuse it (`MultistageConfig`)
    everyone = tuple(range(world))
    replicas = world // sp
    can_split = len(experts) == 2 and replicas >= 2 and replicas % 2 == 0
    if mode == "expert" and not can_split:
        why = "only one expert is active" if len(experts) < 2 else (
            f"{world} process(es) do not split in two" if sp == 1 else
            f"{world} processes are {replicas} sequence-parallel group(s) of {sp}, which do not split in two")
        raise DistributedError(f"train.parallel is 'expert' but {why}. Fix: launch an even number of "
                               f"{'processes' if sp == 1 else f'groups of {sp} processes'} "
                               "with both multistage.train_* true, or set train.parallel: data")
    if mode == "data" or (mode == "auto" and not can_split):
        return ParallelPlan("data", world, {e: everyone for e in experts}, sp)
    half = world // 2
    return ParallelPlan("expert", world, {"high": everyone[:half], "low": everyone[half:]}, sp)


def make_groups(plan: ParallelPlan, env: DistEnv) -> dict[Expert, Any]:
    """Process groups per expert (None means the default group of all ranks).

    `new_group` is collective: every rank creates every group, in the same order, even groups it
    is not part of.
    """
    if not env.distributed or plan.mode == "data":
        return {e: None for e in plan.groups}
    return {e: dist.new_group(list(plan.groups[e])) for e in ORDER if e in plan.groups}


def group_size(group: Any, env: DistEnv) -> int:
    return dist.get_world_size(group) if env.distributed else 1


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor (an FSDP-sharded parameter): FSDP reduces its gradient itself."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def reduce_gradients(params: list[torch.nn.Parameter], group: Any, env: DistEnv,
                     bucket_bytes: int = BUCKET_BYTES) -> int:
    """Average the gradients of `params` over `group`, in fp32 buckets; returns the number of
    all-reduce calls. A missing gradient counts as zero (the rank skipped backward)."""
    n = group_size(group, env)
    plain = [p for p in params if p.requires_grad and not is_sharded(p)]
    if n == 1 or not plain:
        return 0
    for p in plain:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for p in plain:
        if buckets[-1] and size + 4 * p.numel() > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += 4 * p.numel()
    for bucket in buckets:
        flat = torch.cat([p.grad.reshape(-1).float() for p in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= n
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()
    return len(buckets)


def sum_over(values: list[float], group: Any, env: DistEnv) -> list[float]:
    """Element-wise sums of `values` over the ranks of `group` (one small all-reduce)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.tolist()


def world_metrics(plan: ParallelPlan, metrics: dict[Expert, dict[str, float]], samples: int, seconds: float,
                  env: DistEnv, stop: bool = False) -> tuple[dict[str, float], float, bool]:
    """What rank 0 logs for one round, in one all-reduce.

    `metrics` holds, for each expert this rank stepped in the round, its group means (e.g.
    {"loss": main, "dop": preservation}; the same names for every expert and on every rank).
    Returns them as "<name>_<expert>" for every expert that stepped this round (in expert mode
    the other group's too; in data mode both when the round held micro-batches of both), the
    samples per second of all ranks summed, and whether any rank is stopping (then all stop
    together rather than leave the other expert group waiting in a collective).
    """
    experts = [e for e in ORDER if e in plan.groups]
    names = sorted(next(iter(metrics.values())))
    width = 1 + len(names)
    rate = samples / plan.sp / max(seconds, 1e-9)  # the SP ranks of a replica ran the same samples
    values = [0.0] * (width * len(experts)) + [rate, float(stop)]
    for expert, means in metrics.items():
        share = 1.0 / len(plan.groups[expert])  # every member holds the group's means: each adds its share
        at = width * experts.index(expert)
        values[at:at + width] = [share] + [means[n] * share for n in names]
    summed = sum_over(values, None, env)
    logged = {f"{n}_{e}": summed[width * k + 1 + j] for k, e in enumerate(experts) if summed[width * k] > 0.5
              for j, n in enumerate(names)}
    return logged, summed[-2], summed[-1] > 0
