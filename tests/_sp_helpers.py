"""The sequence-parallel tests' scenarios, run by every rank of a forked gloo launch
(`_dist_helpers.launch`, torchrun's environment), rank 0 writing what the tests compare.

The tiny expert here has 4 heads of 16 (so 2 and 4 ranks both split them) and the synthetic
samples 8 and 12 tokens (both split over 2 and 4). `expert_case` builds the same expert in every
process for each lever combination of `CASES`; the tests build it once more without sequence
parallelism as the reference.

    torchrun --nproc-per-node 2 tests/_sp_helpers.py OUT_DIR      (the same scenarios by hand)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from _dist_helpers import (
    CFG, SAVE_AT, SEED, SyntheticData, lora_params, run_scenarios, run_steps, tensors_bytes, tiny_expert,
)
from wanlora.io import atomic_write_bytes
from wanlora.models.accel import AccelSettings, apply_accel
from wanlora.train.dist_checkpoint import ExpertParts, load_parallel_checkpoint, save_parallel_checkpoint
from wanlora.train.dist_parallel import plan_parallel
from wanlora.train.distributed import Cursor, DistEnv, DistributedError, batch_generator, distributed, gather_objects
from wanlora.train.lora import lora_state_dict
from wanlora.train.optim import build_optimizer
from wanlora.train.sequence_parallel import SequenceGroup, enable_sequence_parallel, make_sequence_group
from wanlora.train.step import training_step

SP_CFG = {"num_attention_heads": 4}  # 4 heads x 16
SP_SHAPES = {"a": (16, 2, 4, 4), "b": (16, 3, 4, 4)}  # 8 and 12 tokens after the (1, 2, 2) patch


@dataclass(frozen=True)
class Case:
    """One lever combination of the trainer's expert (`models.accel`, `models.quant`)."""

    dtype: torch.dtype = torch.float32
    checkpointing: str = "none"
    offload: bool = False
    fp8: bool = False


CASES = {
    "fp32": Case(),
    "fp32_full": Case(checkpointing="full"),
    "fp32_selective_offload": Case(checkpointing="selective", offload=True),
    "bf16_selective": Case(torch.bfloat16, "selective"),
    "fp8_full": Case(torch.bfloat16, "full", fp8=True),
}


def expert_case(case: Case, sp: SequenceGroup) -> torch.nn.Module:
    """The trainer's order: base (quantized to float8 with fp8 matmuls when asked), LoRA
    (float32 masters), `apply_accel`, then sequence parallelism."""
    model = tiny_expert(0, dtype=case.dtype, fp8=case.fp8, **SP_CFG)
    apply_accel(model, AccelSettings(checkpointing=case.checkpointing, activation_offloading=case.offload))
    if case.offload:  # the tiny model's activations are far below the 1 MiB threshold: offload all
        model._wanlora_activation_offload.min_bytes = 1
    return enable_sequence_parallel(model, sp)


def case_batch():
    """Two samples of the 12-token shape with the low-noise expert's draws, as the loop makes them."""
    data = SyntheticData(SP_SHAPES)
    return data.make_batch([3, 4], "low", batch_generator(SEED, "low", 0, 0))


def forward_backward(model: torch.nn.Module, case: Case) -> dict[str, torch.Tensor]:
    """The expert's prediction (no-grad forward) and the LoRA gradients of one `training_step`."""
    batch = case_batch()
    x, emb = batch.latents.to(case.dtype), batch.embeds.to(case.dtype)
    tokens = x.shape[2] * x.shape[3] * x.shape[4] // 4  # the (1, 2, 2) patch
    per_token = batch.timesteps[:, None] + torch.arange(tokens) * 7.0  # TI2V-5B's one timestep per token
    with torch.no_grad():
        pred = model(hidden_states=x, timestep=batch.timesteps, encoder_hidden_states=emb, return_dict=False)[0]
        pred_tokens = model(hidden_states=x, timestep=per_token, encoder_hidden_states=emb, return_dict=False)[0]
    losses = training_step(model, batch, dtype=case.dtype)
    out = {"pred": pred.float(), "pred_per_token_t": pred_tokens.float(),
           "loss": torch.tensor(losses.total, dtype=torch.float64)}
    out.update({f"grad.{n}": p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    return out


def sum_gradients(got: dict[str, torch.Tensor], sp: SequenceGroup) -> dict[str, torch.Tensor]:
    """The SP ranks' gradient shares summed into the whole gradient (in place), on every rank."""
    for k, v in got.items():
        if k.startswith("grad."):
            dist.all_reduce(v, group=sp.group)
    return got


# ------------------------------------------------------------------------------ scenarios
def scenario_exact(env: DistEnv, out: Path, results: dict) -> None:
    """Every case once over all ranks in one sequence-parallel group: prediction and summed LoRA
    gradients of one step (the ranks' gradients are shares of the whole one)."""
    sp = make_sequence_group(env, env.world)
    for name, case in CASES.items():
        got = sum_gradients(forward_backward(expert_case(case, sp), case), sp)
        if env.is_main:
            atomic_write_bytes(out / f"exact_{name}.safetensors", tensors_bytes(got))


def _sp_run(env: DistEnv, out: Path, sp_size: int, results: dict, resume_from: Path | None = None) -> None:
    """Optimizer steps over (world / sp_size) replicas of `sp_size` ranks: SAVE_AT steps, a
    checkpoint, one more; or, from `resume_from` (a state of any topology), its next step."""
    sp = make_sequence_group(env, sp_size)
    plan = plan_parallel(env.world, ["low"], "data", sp_size)
    replica, replicas = plan.replica(env.rank, "low")
    model = enable_sequence_parallel(tiny_expert(0, **SP_CFG), sp)
    opt = build_optimizer(lora_params(model), CFG)
    data, cursor, start = SyntheticData(SP_SHAPES), Cursor(), SAVE_AT
    tag = f"sp{sp_size}x{replicas}"
    kw = dict(expert="low", group_rank=replica, group_world=replicas, sp=sp_size)
    outs = []
    if resume_from is None:
        outs = run_steps(model, opt, data, cursor, range(SAVE_AT), env, **kw)
        save_parallel_checkpoint(out / f"{tag}_state", env, plan, {"low": ExpertParts(model, opt)}, step=SAVE_AT,
                                 cursor=cursor, extra={"history": [o.loss for o in outs], "bad_steps": 0})
    else:
        plain = load_parallel_checkpoint(resume_from, env, {"low": ExpertParts(model, opt)})
        cursor, start, tag = Cursor(plain["epoch"], plain["position"]), int(plain["step"]), f"{tag}_resumed"
    outs += run_steps(model, opt, data, cursor, range(start, start + 1), env, **kw)
    results[f"{tag}_losses"] = [o.loss for o in outs]
    results[f"{tag}_samples"] = [o.samples for o in outs]
    if env.is_main:
        atomic_write_bytes(out / f"{tag}_lora.safetensors", tensors_bytes(lora_state_dict(model)))


def scenario_steps(env: DistEnv, out: Path, results: dict) -> None:
    """Sequence-parallel training steps for every split of the world that has SP: SP = world
    (one replica), and with 4 ranks also 2 replicas of SP 2 (DP x SP); then the resume of a
    one-process state (written by the test before the launch) into SP = world."""
    for sp_size in (s for s in (2, 4) if s <= env.world and env.world % s == 0):
        _sp_run(env, out, sp_size, results)
    _sp_run(env, out, env.world, results, resume_from=out / "one_state")

def scenario_state_mismatch(env: DistEnv, out: Path, results: dict) -> None:
    """Nodes with their own workspace copies, the state on node 0's only: rank 0 reads the
    one-process state, the others an empty folder; every rank must stop, none may train on."""
    model = tiny_expert(0, **SP_CFG)
    folder = out / "one_state" if env.rank == 0 else out / f"empty_{env.rank}"
    try:
        load_parallel_checkpoint(folder, env, {"low": ExpertParts(model, build_optimizer(lora_params(model), CFG))})
        said = None
    except DistributedError as err:
        said = str(err)
    results["state_mismatch"] = gather_objects(said, env)


SCENARIOS = [scenario_exact, scenario_steps, scenario_state_mismatch]


def compiled_main(out: Path) -> None:
    """The fp32 case with every block compiled as `apply_accel(compile=True)` does, but with the
    `aot_eager` backend and fullgraph: dynamo and AOT autograd trace forward and backward through
    the all-to-alls with no graph break; only inductor's code generation (a C++ build per graph on
    CPU, minutes here) is left out."""
    with distributed("cpu") as env:
        sp = make_sequence_group(env, env.world)
        model = expert_case(CASES["fp32"], sp)
        for block in model.blocks:
            block.compile(backend="aot_eager", fullgraph=True)
        got = sum_gradients(forward_backward(model, CASES["fp32"]), sp)
        if env.is_main:
            atomic_write_bytes(out / "compiled.safetensors", tensors_bytes(got))


def main(out: Path) -> None:
    run_scenarios(SCENARIOS, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
