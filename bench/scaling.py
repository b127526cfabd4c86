"""Multi-GPU scaling of LoRA training at full Wan 2.2 A14B size: 1 vs 2 vs 4 (vs 8) GPUs.

One configuration per launch; the launcher sets the GPU count, rank 0 appends one row.
`bench/run_scaling.sh` runs the table's launches on a device machine; by hand:

    cd REPO && export PYTHONPATH=$PWD/src:$PWD
    for n in 1 2 4; do torchrun --nproc-per-node $n -m bench.scaling --mode data; done
    for n in 2 4; do torchrun --nproc-per-node $n -m bench.scaling --mode expert; done
    torchrun --nproc-per-node 2 -m bench.scaling --mode data --sharded      # FSDP2 base
    for n in 2 4 8; do torchrun --nproc-per-node $n -m bench.scaling --mode data --sp $n --shape 81x1024x1024; done
    python bench/common.py table bench/out
    # CPU dry run of the harness (gloo, tiny model):
    torchrun --nproc-per-node 2 -m bench.scaling --tiny --mode data

The step is the train stage's code path through `wanlora.train.step.optimizer_step`:
random full-size experts (`wanlora.models.geometry.build_transformer`), `add_lora`, `apply_accel`
(selective checkpointing, regional compile on CUDA), params' optimizer, `training_step` per
micro-batch, the fp32 bucketed all-reduce of LoRA gradients, clipping, the optimizer step. Each
replica runs `--accum` micro-batches of one clip per step (`--shape`, default 33f@512x512: 9,216
tokens). With `--sp N` (`train.sequence_parallel`) a replica is N GPUs sharing each clip's tokens
(`wanlora.train.sequence_parallel`): world = replicas x N.

Columns: s/step is rank 0's median (every step ends in a collective, so all ranks agree within
noise); `samples_per_s` in `extra` is every rank's own rate summed (the global throughput the
train progress bar shows); `efficiency` is that divided by N x the 1-GPU rate of the same mode
and shape already in rows.jsonl (data mode's 1-GPU row is the reference for expert mode too:
both train one expert per GPU). MFU counts one expert-step per rank.
"""

from __future__ import annotations

import contextlib
import io
import time

import torch

from bench.common import (
    Shape, append_row, common_args, device_and_dtype, failed_row, geometry, make_row, random_batch, read_rows,
    reset_peak, step_counts, sync, time_steps,
)
from wanlora.config import parse_params
from wanlora.models.accel import AccelSettings, apply_accel
from wanlora.models.geometry import build_transformer
from wanlora.plan import clip_tokens
from wanlora.train.dist_parallel import make_groups, plan_parallel, sum_over
from wanlora.train.distributed import Cursor, distributed, rank_share, take_batches
from wanlora.train.lora import add_lora
from wanlora.train.optim import build_optimizer
from wanlora.train.sequence_parallel import check_degree, enable_sequence_parallel, make_sequence_group
from wanlora.train.step import StepBatch, optimizer_step
from wanlora.train.timesteps import TimestepDistribution, expert_band

S33 = Shape(33, 512, 512)
TINY_SHAPE = Shape(5, 32, 32)
BOUNDARY = 0.875


def world_throughput(samples: int, seconds: float, env) -> float:
    """Samples per second of all ranks together (each rank's own rate, summed)."""
    return sum_over([samples / max(seconds, 1e-9)], None, env)[0]


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["data", "expert"], default="data")
    p.add_argument("--sharded", action="store_true", help="FSDP2 fully_shard on the frozen base blocks")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per rank and optimizer step")
    p.add_argument("--no-compile", action="store_true", help="skip regional torch.compile")
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel GPUs per replica (train.sequence_parallel)")
    p.add_argument("--shape", default="33x512x512", help="clip as FRAMESxHEIGHTxWIDTH, e.g. 81x1024x1024")
    p.add_argument("--checkpointing", choices=["selective", "full", "none"], default="selective")
    p.add_argument("--offload", action="store_true", help="activation offloading (model.activation_offloading)")
    args = p.parse_args()
    device_and_dtype(args.tiny)  # exits with a message on a CPU-only machine without --tiny
    with distributed("auto") as env:
        quiet = contextlib.nullcontext() if env.is_main else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            run(args, env)


def run(args, env) -> None:
    cfg = geometry(args.tiny)
    device, dtype = env.device, (torch.bfloat16 if env.device.type == "cuda" else torch.float32)
    shape = TINY_SHAPE if args.tiny else Shape(*(int(v) for v in args.shape.split("x")))
    compile_ = env.device.type == "cuda" and not args.no_compile
    optimizer = "adamw" if args.tiny or args.sharded else "adamw8bit"  # 8-bit cannot step FSDP's DTensors
    params = parse_params({"train": {"optimizer": optimizer, "caption_dropout": 0.0, "sharded_base": args.sharded}})
    plan = plan_parallel(env.world, ("high", "low") if args.mode == "expert" else ("high",), args.mode, args.sp)
    groups = make_groups(plan, env)
    sequence = make_sequence_group(env, args.sp)
    (expert,) = plan.experts_of(env.rank)
    replica, replicas = plan.replica(env.rank, expert)
    name = (f"{plan.mode[0]}p{env.world}" + (f"_sp{args.sp}" if args.sp > 1 else "") + ("_fsdp" if args.sharded else "")
            + (f"_acc{args.accum}" if args.accum > 1 else "") + ("" if shape == S33 else f"_{shape.label}")
            + (f"_{args.checkpointing}" if args.checkpointing != "selective" else "") + ("_offload" if args.offload else ""))
    t0 = time.perf_counter()
    try:
        model = build_transformer(cfg, dtype, device, seed=0 if expert == "high" else 1)
        lora = add_lora(model, params.network)
        apply_accel(model, AccelSettings(checkpointing=args.checkpointing, compile=compile_,
                                         activation_offloading=args.offload))
        check_degree(args.sp, cfg["num_attention_heads"], {shape.label: clip_tokens(shape.frames, shape.height, shape.width, cfg)})
        enable_sequence_parallel(model, sequence)
        model.train()
        if args.sharded:
            from wanlora.train.dist_fsdp import shard_base

            shard_base(model, env, groups[expert])
            lora = [q for q in model.parameters() if q.requires_grad]
        opt = build_optimizer(lora, params.train)
        clean = random_batch(cfg, shape, device, dtype)
        dist_t = TimestepDistribution("linear", "balanced", expert_band(expert, BOUNDARY))

        def make_batch(indices: list[int], e: str, g: torch.Generator) -> StepBatch:
            noise = torch.randn(clean["latent"].shape, generator=g).to(device, dtype)
            return StepBatch(clean["latent"], noise, dist_t.sample(len(indices), g).to(device), clean["text"])

        cursor = Cursor()
        order = [[0] for _ in range(1 << 16)]  # one sample per batch; the cursor walks a long epoch
        outcome = {}

        def step(i: int) -> None:
            mine = rank_share(take_batches(lambda _: order, cursor, args.accum * replicas), replica, replicas)
            outcome["last"] = optimizer_step(model, opt, mine, make_batch, expert=expert, step=i, cfg=params.train,
                                             seed=0, dtype=dtype, env=env, group=groups[expert], sp=args.sp)

        sync(device)
        build_s = time.perf_counter() - t0
        print(f"{name}: built in {build_s:.1f} s on {env.world} rank(s)", flush=True)
        reset_peak(device)
        times = time_steps(step, *step_counts(args), device)
        s_step = sorted(times)[len(times) // 2]
        sps = world_throughput(args.accum / args.sp, s_step, env)  # a replica's SP ranks share its samples
        row = make_row(name, cfg, shape, times, device,
                       note=f"{plan.mode}-parallel, {env.world} GPU(s), sequence-parallel {args.sp}, "
                            f"sharded={args.sharded}, compile={compile_}, checkpointing {args.checkpointing}, "
                            f"offload={args.offload}",
                       extra={"world": env.world, "mode": plan.mode, "sp": args.sp, "sharded": args.sharded,
                              "accum": args.accum, "build_s": build_s, "samples_per_s": sps,
                              "loss": outcome["last"].loss})
        row.extra["efficiency"] = efficiency(args, row.shape, sps, env.world)
    except torch.OutOfMemoryError as err:
        row = failed_row(name, cfg, shape, device, err)
    if env.is_main:
        append_row(args.out, row)


def efficiency(args, shape: str, samples_per_s: float, world: int) -> float | None:
    """Global samples/s over world x the 1-GPU data-parallel rate of this shape, when measured."""
    path = args.out / "rows.jsonl"
    ones = [r for r in read_rows(path) if r["shape"] == shape and r["extra"].get("world") == 1
            and not r["extra"].get("sharded") and r["extra"].get("accum") == args.accum] if path.is_file() else []
    if not ones:
        return None
    return samples_per_s / (world * ones[-1]["extra"]["samples_per_s"])


if __name__ == "__main__":
    main()
