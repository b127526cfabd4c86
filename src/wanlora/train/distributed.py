"""Running under torchrun / accelerate launch: the process group, rank-aware I/O, seeds, data order.

`torchrun --nproc-per-node N` (and `accelerate launch`, which starts the same way) sets RANK,
WORLD_SIZE and LOCAL_RANK; `init_distributed` reads them, pins each rank to GPU LOCAL_RANK and
opens the process group (NCCL on CUDA, gloo on CPU). Without those variables it returns a
one-process environment and every helper here is a no-op, so the single-GPU path is the same code.
Under plain `dvc repro`, `relaunch_if_needed` re-runs the stage script under torchrun when
train.gpus asks for more than one GPU.

Reproducibility does not rest on per-rank random streams. Everything random about one global
batch (latent draw, timesteps, noise, caption dropout, LoRA dropout) comes from a generator seeded
by (job.seed, expert, epoch, position of that batch in the epoch): a pure function of *which*
batch it is, not of which rank or how many ranks run it. Hence N ranks with accumulation A compute
exactly what 1 rank computes with accumulation N*A, and a checkpoint needs no RNG state of any
rank: resuming with another rank count continues the same sequence from the global data cursor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from wanlora.errors import UserError
from wanlora.lock import HOLDER_ENV, die_with_parent

T = TypeVar("T")


class DistributedError(UserError, RuntimeError):
    """A launch or configuration problem; the message says how to fix it."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among `world`, its GPU, and whether it opened the group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Only the main rank writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer; "
                               "launch with torchrun or accelerate launch, which set it") from None


def launch_ranks() -> tuple[int, int, int]:
    """(rank, world, local_rank) as torchrun / accelerate set them; (0, 1, 0) when not launched so."""
    world = _env_int("WORLD_SIZE") or 1
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if world == 1:
        return 0, 1, 0
    if rank is None:
        raise DistributedError(f"WORLD_SIZE={world} but RANK is not set; launch with "
                               "`torchrun --nproc-per-node N` or `accelerate launch`, not by hand")
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    return rank, world, rank if local is None else local


def _rank_device(device: str, local_rank: int, world: int) -> torch.device:
    """The device of this rank: GPU `local_rank` for auto/cuda, the CPU for cpu."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if device.startswith("cuda:") and world > 1:
        raise DistributedError(f"job.device is {device!r} but {world} processes were launched: each needs its own "
                               "GPU. Fix: set job.device: auto (or cuda) so rank r uses GPU LOCAL_RANK")
    if not torch.cuda.is_available():
        raise DistributedError(f"job.device is {device!r} but no CUDA device is visible; set job.device: cpu")
    index = local_rank if world > 1 or device == "auto" else (torch.device(device).index or 0)
    if index >= torch.cuda.device_count():
        raise DistributedError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                               "launch at most that many processes per node (--nproc-per-node)")
    return torch.device("cuda", index)


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Detect the launcher, pin this rank's GPU and open the process group (NCCL on CUDA, gloo on CPU).

    A group that accelerate (or the caller) already opened is reused and left open on exit. The
    timeout is generous because rank 0 alone writes checkpoints while the others wait.
    """
    rank, world, local = launch_ranks()
    dev = _rank_device(device, local, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return DistEnv(device=dev)
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise DistributedError(f"an open process group (rank {dist.get_rank()} of {dist.get_world_size()}) "
                                   f"disagrees with RANK={rank}, WORLD_SIZE={world}")
        return DistEnv(rank, world, local, dev, owns_group=False)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistEnv(rank, world, local, dev, owns_group=True)


def shutdown(env: DistEnv) -> None:
    """Close the group this process opened (a reused one stays open for its owner)."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[DistEnv]:
    """`init_distributed` for the duration of a block; the group is destroyed even on error."""
    env = init_distributed(device)
    try:
        yield env
    finally:
        shutdown(env)


# ------------------------------------------------------------------ self-launch for DVC
def launch_count(gpus: int, device: str) -> int:
    """How many processes the train stage should run: `gpus` (train.gpus; 0 = every visible GPU),
    1 on CPU or with a pinned `cuda:N` device, and never more than the GPUs there are."""
    if device == "cpu" or device.startswith("cuda:") or not torch.cuda.is_available():
        return 1
    visible = torch.cuda.device_count()
    if gpus > visible:
        raise DistributedError(f"train.gpus is {gpus} but {visible} GPU(s) are visible; "
                               f"set train.gpus: {visible} (or 0 for all of them)")
    return gpus or visible


def relaunch_command(nproc: int, argv: Sequence[str]) -> list[str] | None:
    """The torchrun command that reruns this stage script on `nproc` local processes, or None
    when one process suffices or a launcher (torchrun, accelerate) already started us.

    This is what lets `dvc repro` train on several GPUs (train.gpus) with no change to dvc.yaml:
    the stage's plain `python stages/train.py` re-executes itself under torchrun's launcher.
    """
    if nproc <= 1 or os.environ.get("WORLD_SIZE") is not None:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *argv]


def relaunch_if_needed(gpus: int, device: str) -> None:
    """Run this script again under torchrun when several GPUs should train, then exit with its
    status; return (doing nothing) in the single-process case and inside launched ranks."""
    cmd = relaunch_command(launch_count(gpus, device), sys.argv)
    if cmd is not None:  # we hold the train lock: the ranks run under it and die with us
        env = {**os.environ, HOLDER_ENV: str(os.getpid())}
        raise SystemExit(subprocess.call(cmd, env=env, preexec_fn=die_with_parent))


# --------------------------------------------------------------------- rank-aware I/O
def barrier(env: DistEnv, group: Any = None) -> None:
    """Wait for every rank (of `group`); nothing to do in one process."""
    if env.distributed:
        dist.barrier(group=group, **({"device_ids": [env.device.index]} if env.device.type == "cuda" else {}))


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This rank's share of a work list: every `world`-th item from `rank` on.

    Strided rather than contiguous: manifests are sorted by id, so neighbours tend to be clips of
    one source and similar size, and striding spreads long ones evenly over ranks. The shares are
    disjoint and together are exactly `items`.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return list(items)[rank::world]


def gather_objects(obj: T, env: DistEnv) -> list[T]:
    """Every rank's `obj` (problems found, files written), in rank order, on every rank.

    Uses torch's pickled object collectives between our own processes only; never on user files.
    """
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------ seeds
def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed that is a pure function of (seed, keys); distinct keys give unrelated streams."""
    digest = hashlib.sha256(json.dumps([seed, *keys]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def batch_generator(seed: int, expert: str, epoch: int, position: int) -> torch.Generator:
    """The generator of one global batch (see module doc); also seeds torch's global RNG, which
    LoRA dropout draws from, so dropout masks are a function of the batch too."""
    torch.manual_seed(derive_seed(seed, "dropout", expert, epoch, position))
    return torch.Generator().manual_seed(derive_seed(seed, "batch", expert, epoch, position))


# ------------------------------------------------------------------------- data order
@dataclass(frozen=True)
class GlobalBatch:
    """One batch of the global order: where it sits (epoch, position) and its item indices."""

    epoch: int
    position: int
    indices: list[int]


@dataclass
class Cursor:
    """The global data position: the next batch is batch `position` of epoch `epoch`.

    It counts batches of the single global order, so it means the same for any rank count.
    """

    epoch: int = 0
    position: int = 0


def take_batches(order: Callable[[int], list[list[int]]], cursor: Cursor, count: int) -> list[GlobalBatch]:
    """The next `count` global batches from `order(epoch)` (the trainer's seeded epoch order),
    advancing `cursor` across epoch ends. Every rank calls this with the same arguments and then
    keeps its own share (`rank_share`), so all ranks agree on the cursor without communicating."""
    out = []
    for _ in range(count):
        batches = order(cursor.epoch)
        if not batches:
            raise ValueError("the epoch order is empty: no sample to train on")
        out.append(GlobalBatch(cursor.epoch, cursor.position, batches[cursor.position]))
        cursor.position += 1
        if cursor.position == len(batches):
            cursor.epoch, cursor.position = cursor.epoch + 1, 0
    return out


def rank_share(batches: list[GlobalBatch], rank: int, world: int) -> list[GlobalBatch]:
    """The micro-batches rank `rank` of `world` runs in one optimizer step: batches r, r+N, r+2N...

    With one batch per rank and step, rank r takes the batch a single process would run as its
    r-th accumulation micro-step.
    """
    if len(batches) % world:
        raise ValueError(f"{len(batches)} batches do not split evenly over {world} ranks")
    return shard(batches, rank, world)
