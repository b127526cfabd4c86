"""The distributed tests' world: a tiny expert with a LoRA, synthetic cached data, and the
scenarios every rank runs.

`launch` forks one process per rank and gives each the environment torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so `init_distributed` is exercised exactly as
under torchrun. All scenarios share one launch, because a fresh Python with torch, diffusers and
peft costs 5 s (20-40 s on the loaded shared machine). Rank 0 writes what the tests compare; the
same functions with a one-process `DistEnv` give the references.

The trainer's real pieces run here: `add_lora`, `build_optimizer`, `training_step` (inside
`optimizer_step`), `epoch_batches`, `TimestepDistribution`, `lora_file_bytes` and the checkpoint
format. Only the data is local: latents and text embeddings are random tensors per item instead
of cache files, which keeps each process free of a model folder and a text-cache build.

    torchrun --nproc-per-node 2 tests/_dist_helpers.py OUT_DIR      (the same scenarios by hand)
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save as safetensors_bytes

from wanlora.config import NetworkConfig, TrainConfig
from wanlora.data.dataset import epoch_batches
from wanlora.io import atomic_write_bytes, atomic_write_json
from wanlora.models.geometry import TINY
from wanlora.train.dist_checkpoint import ExpertParts, load_parallel_checkpoint, save_parallel_checkpoint
from wanlora.train.dist_parallel import make_groups, plan_parallel, reduce_gradients, world_metrics
from wanlora.train.distributed import (
    Cursor, DistEnv, barrier, batch_generator, distributed, gather_objects, rank_share, shard, take_batches,
)
from wanlora.train.lora import add_lora, lora_file_bytes, lora_state_dict
from wanlora.train.optim import build_optimizer
from wanlora.train.step import StepBatch, StepOutcome, optimizer_step, training_step
from wanlora.train.timesteps import TimestepDistribution, expert_band

TINY_CFG = {**TINY, "rope_max_seq_len": 32}
NET = NetworkConfig(rank=4, alpha=4)
CFG = TrainConfig(optimizer="adamw", lr=1e-2, steps=4, batch_size=2, caption_dropout=0.0,
                  gradient_checkpointing=False, max_grad_norm=1.0)
SEED = 7
BOUNDARY = 0.875
#: 6 items in two buckets of different latent shapes; with batch_size 2 an epoch has 4 batches
BUCKETS = ["a", "a", "a", "b", "b", "b"]
SHAPES = {"a": (16, 2, 4, 4), "b": (16, 1, 4, 6)}
EXPERT_SEEDS = {"high": 1, "low": 2}
SAVE_AT = 2  # the data-parallel run saves after this many steps and runs one more


def tiny_expert(seed: int, dtype: torch.dtype = torch.float32, fp8: bool = False, **config) -> WanTransformer3DModel:
    """The tiny expert (TINY_CFG, `config` overriding) with a rank-4 LoRA whose B is non-zero (so
    every LoRA tensor gets a gradient). In `dtype` as `from_pretrained(torch_dtype=...)` loads it
    (diffusers' fp32 modules kept fp32); `fp8`: float8 block linears with fp8 matmuls (`models.quant`)."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TINY_CFG, **config})
    if dtype != torch.float32:
        keep = set(model._keep_in_fp32_modules)
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not keep & set(name.split(".")):
                t.data = t.data.to(dtype)
    if fp8:
        from wanlora.models.quant import enable_fp8_matmul, quantize_transformer

        quantize_transformer(model, "float8", device="cpu")
        enable_fp8_matmul(model)
    add_lora(model, NET)
    g = torch.Generator().manual_seed(seed + 100)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    return model.train()


def lora_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@dataclass
class SyntheticData:
    """Per-item clean latents and text embeddings (what the caches hold), drawn once from a seed."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=lambda: SHAPES)
    latents: list[torch.Tensor] = field(default_factory=list)
    embeds: list[torch.Tensor] = field(default_factory=list)
    seen_t: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(SEED)
        self.latents = [torch.randn(self.shapes[b], generator=g) for b in BUCKETS]
        self.embeds = [torch.randn(8, TINY_CFG["text_dim"], generator=g) for _ in BUCKETS]
        self.dists = {e: TimestepDistribution("linear", "balanced", expert_band(e, BOUNDARY)) for e in ("high", "low")}

    def make_batch(self, indices: list[int], expert: str, g: torch.Generator) -> StepBatch:
        """Everything random of one micro-batch from its own generator, in a fixed order."""
        latents = torch.stack([self.latents[i] for i in indices])
        t = self.dists[expert].sample(len(indices), g)
        noise = torch.randn(latents.shape, generator=g)
        self.seen_t += t.tolist()
        return StepBatch(latents, noise, t, torch.stack([self.embeds[i] for i in indices]))

    @staticmethod
    def order(epoch: int) -> list[list[int]]:
        return epoch_batches(BUCKETS, CFG.batch_size, SEED, epoch)


def accumulate_grads(model: torch.nn.Module, data: SyntheticData, batches: list, expert: str) -> None:
    """Forward/backward of this rank's micro-batches with the loop's 1/accumulation scale."""
    for b in batches:
        training_step(model, data.make_batch(b.indices, expert, batch_generator(SEED, expert, b.epoch, b.position)),
                      dtype=torch.float32, loss_scale=1 / len(batches))


def run_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, data: SyntheticData, cursor: Cursor,
              steps: range, env: DistEnv, *, expert: str, accum: int = 1, group=None,
              group_rank: int = 0, group_world: int = 1, sp: int = 1,
              dtype: torch.dtype = torch.float32) -> list[StepOutcome]:
    """Optimizer steps `steps` of one expert; group_world replicas (of `sp` ranks each) each run
    `accum` micro-batches."""
    out = []
    for step in steps:
        mine = rank_share(take_batches(data.order, cursor, accum * group_world), group_rank, group_world)
        out.append(optimizer_step(model, opt, mine, data.make_batch, expert=expert, step=step, cfg=CFG, seed=SEED,
                                  dtype=dtype, env=env, group=group, sp=sp))
    return out


def lora_files(tensors: dict[str, dict[str, torch.Tensor]]) -> dict[str, bytes]:
    return {e: lora_file_bytes(t, torch.float32, NET, {"wanlora.expert": e}) for e, t in tensors.items()}


def tensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


# ------------------------------------------------------------------------------ scenarios
def scenario_dp_grads(env: DistEnv, out: Path, results: dict) -> None:
    """Two global micro-batches, one per rank; averaged LoRA gradients to out/dp_grads."""
    model, data = tiny_expert(0), SyntheticData()
    mine = rank_share(take_batches(data.order, Cursor(), 2), env.rank, env.world)
    accumulate_grads(model, data, mine, "low")
    results["dp_grads_buckets"] = reduce_gradients(lora_params(model), None, env, bucket_bytes=4 << 10)
    if env.is_main:
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        atomic_write_bytes(out / "dp_grads.safetensors", tensors_bytes(grads))


def scenario_dp_resume(env: DistEnv, out: Path, results: dict) -> None:
    """Data-parallel steps 0..SAVE_AT-1, a checkpoint, one more step: losses and final LoRA."""
    model, data = tiny_expert(0), SyntheticData()
    opt = build_optimizer(lora_params(model), CFG)
    plan, cursor = plan_parallel(env.world, ["low"], "data"), Cursor()
    outs = run_steps(model, opt, data, cursor, range(SAVE_AT), env, expert="low",
                     group_rank=env.rank, group_world=env.world)
    save_parallel_checkpoint(out / "dp_state", env, plan, {"low": ExpertParts(model, opt)}, step=SAVE_AT,
                             cursor=cursor, extra={"history": [o.loss for o in outs], "bad_steps": 0})
    outs += run_steps(model, opt, data, cursor, range(SAVE_AT, SAVE_AT + 1), env, expert="low",
                      group_rank=env.rank, group_world=env.world)
    results["dp_losses"] = [o.loss for o in outs]
    results["dp_samples"] = [o.samples for o in outs]
    if env.is_main:
        atomic_write_bytes(out / "dp_lora_final.safetensors", tensors_bytes(lora_state_dict(model)))


def scenario_expert_parallel(env: DistEnv, out: Path, results: dict) -> None:
    """Rank 0 trains the high-noise expert, rank 1 the low-noise one, at once; rank 0 saves both."""
    plan = plan_parallel(env.world, ["high", "low"], "auto")
    groups = make_groups(plan, env)
    (expert,) = plan.experts_of(env.rank)
    members = plan.groups[expert]
    model, data = tiny_expert(EXPERT_SEEDS[expert]), SyntheticData()
    opt = build_optimizer(lora_params(model), CFG)
    cursor = Cursor()
    steps = math.ceil(CFG.steps / plan.step_increment)  # each group runs half the steps
    outs = run_steps(model, opt, data, cursor, range(steps), env, expert=expert, group=groups[expert],
                     group_rank=members.index(env.rank), group_world=len(members))
    save_parallel_checkpoint(out / "ep_state", env, plan, {expert: ExpertParts(model, opt)}, step=steps,
                             cursor=cursor, extra={"history": [], "bad_steps": 0}, lora_files=lora_files)
    seen = gather_objects({"expert": expert, "t": [min(data.seen_t), max(data.seen_t)],
                           "losses": [o.loss for o in outs]}, env)
    losses, _, stop = world_metrics(plan, {expert: {"loss": outs[-1].main, "dop": 0.0}}, outs[-1].samples, 1.0, env,
                                    stop=expert == "low")
    results["ep_stop_seen"] = stop  # rank 1 asked to stop: rank 0 learns it in the same all-reduce
    results["ep_logged_losses"] = losses  # what rank 0's progress shows for the last round
    results["ep_plan"] = {"mode": plan.mode, "groups": {e: list(r) for e, r in plan.groups.items()}}
    results["ep_ranks"] = seen


def scenario_sharded(env: DistEnv, out: Path, results: dict) -> None:
    """FSDP2-sharded base, data-parallel: one step from the shared init, then a resume of the
    unsharded data-parallel checkpoint into a sharded model and its next step."""
    from wanlora.train.dist_fsdp import shard_base

    plan = plan_parallel(env.world, ["low"], "data")
    model, data = shard_base(tiny_expert(0), env), SyntheticData()
    opt = build_optimizer(lora_params(model), CFG)
    cursor = Cursor()
    outs = run_steps(model, opt, data, cursor, range(1), env, expert="low", group_rank=env.rank, group_world=env.world)
    save_parallel_checkpoint(out / "fsdp_state", env, plan, {"low": ExpertParts(model, opt)}, step=1,
                             cursor=cursor, extra={"history": [], "bad_steps": 0}, lora_files=lora_files)
    results["fsdp_losses"] = [o.loss for o in outs]

    model2 = shard_base(tiny_expert(0), env)
    opt2 = build_optimizer(lora_params(model2), CFG)
    plain = load_parallel_checkpoint(out / "dp_state", env, {"low": ExpertParts(model2, opt2)})
    cursor2 = Cursor(plain["epoch"], plain["position"])
    step = run_steps(model2, opt2, data, cursor2, range(int(plain["step"]), int(plain["step"]) + 1), env,
                     expert="low", group_rank=env.rank, group_world=env.world)
    results["fsdp_resumed_loss"] = step[0].loss
    save_parallel_checkpoint(out / "fsdp_resumed", env, plan, {"low": ExpertParts(model2, opt2)}, step=SAVE_AT + 1,
                             cursor=cursor2, extra={"history": [], "bad_steps": 0}, lora_files=lora_files)


def scenario_cache_split(env: DistEnv, out: Path, results: dict) -> None:
    """The caching-stage pattern: each rank encodes its shard (disjoint per-sample files), reports
    its problems; after the barrier rank 0 sees every file and writes the merged report."""
    items = [f"clip{i}" for i in range(7)]
    mine = shard(items, env.rank, env.world)
    for item in mine:
        atomic_write_bytes(out / "cache" / f"{item}.bin", item.encode())
    problems = gather_objects([f"{item}: odd" for item in mine if item.endswith(("3", "5"))], env)
    barrier(env)
    if env.is_main:
        results["cache_files"] = sorted(p.name for p in (out / "cache").iterdir())
        results["cache_problems"] = sorted(sum(problems, []))
        results["cache_share"] = mine


SCENARIOS = [scenario_cache_split, scenario_dp_grads, scenario_dp_resume, scenario_expert_parallel, scenario_sharded]


def main(out: Path) -> None:
    run_scenarios(SCENARIOS, out)


def run_scenarios(scenarios: list[Callable[[DistEnv, Path, dict], None]], out: Path) -> None:
    """Every scenario in turn on this rank; rank 0 writes out/results.json (with their seconds)."""
    with distributed("cpu") as env:
        results: dict = {"world": env.world}
        for scenario in scenarios:
            started = time.perf_counter()
            scenario(env, out, results)
            results.setdefault("seconds", {})[scenario.__name__] = round(time.perf_counter() - started, 2)
        if env.is_main:
            atomic_write_json(out / "results.json", results)


# ------------------------------------------------------------------------------ launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    """A forked rank: torchrun's environment variables, one intra-op thread, then `fn(*args)`."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    fn(*args)


def launch(fn: Callable[..., None], args: tuple, world: int, timeout: float = 180) -> None:
    """Run `fn(*args)` on `world` forked ranks; raise naming the ranks that failed.

    Forked, not spawned: each child inherits the already imported torch, diffusers and peft
    instead of paying ~5 s (far more on a loaded machine) to import them again. Safe here because
    the parent never initialised CUDA or a process group, and each child uses one thread.
    """
    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    bad = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    if bad:
        raise AssertionError(f"ranks failed (rank: exit code): {bad}; their tracebacks are in the captured stderr")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
