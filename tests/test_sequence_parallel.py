"""Sequence parallelism (`train.sequence_parallel`, `wanlora.train.sequence_parallel`): the refusals,
and on 2 and 4 forked gloo ranks (torchrun's environment) the tiny expert's prediction and LoRA
gradients against the single-process expert in float32, bf16 and float8 with fp8 matmuls, under
each checkpointing mode and activation offloading; DP x SP optimizer steps against one process
with accumulation; resume across topologies (SP to one process and one process to SP); and the
train stage itself under SP 2 against one process, interrupted and resumed on the other topology.

Reference for the exchange: diffusers 0.42 `attention_dispatch._all_to_all_dim_exchange` (Ulysses:
[B, S/N, H, D] <-> [B, S, H/N, D]); the test's reference is stronger, the unsplit expert itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _dist_helpers import CFG, SAVE_AT, SyntheticData, launch, lora_params, run_steps, tiny_expert  # noqa: E402
from _sp_helpers import CASES, SP_CFG, SP_SHAPES, compiled_main, expert_case, forward_backward, main  # noqa: E402

from wanlora.config import parse_params  # noqa: E402
from wanlora.train.dist_checkpoint import ExpertParts, load_parallel_checkpoint, save_parallel_checkpoint  # noqa: E402
from wanlora.train.dist_parallel import plan_parallel  # noqa: E402
from wanlora.train.distributed import Cursor, DistEnv, DistributedError  # noqa: E402
from wanlora.train.lora import lora_state_dict  # noqa: E402
from wanlora.train.optim import build_optimizer  # noqa: E402
from wanlora.train.sequence_parallel import (  # noqa: E402
    SequenceGroup, bucket_tokens, check_degree, check_world, valid_degrees,
)

ONE = DistEnv()
WAN_VAE = {"scale_factor_temporal": 4, "scale_factor_spatial": 8}


# ------------------------------------------------------------------------------ refusals
def test_degree_must_split_heads_and_every_bucket_naming_the_values_that_do() -> None:
    tokens = {b: bucket_tokens(b, WAN_VAE, [1, 2, 2]) for b in ("1024x1024x81", "832x480x81", "512x512x33")}
    assert tokens == {"1024x1024x81": 86016, "832x480x81": 32760, "512x512x33": 9216}
    assert bucket_tokens("1280x704x121", {"scale_factor_spatial": 16, "scale_factor_temporal": 4}, [1, 2, 2]) \
        == 31 * 22 * 40  # TI2V-5B's VAE: 16x space
    assert valid_degrees(40, [32760]) == [2, 4, 5, 8, 10, 20, 40]
    check_degree(8, 40, tokens)
    with pytest.raises(DistributedError, match=r"sequence_parallel is 5, .*bucket\(s\) 1024x1024x81 \(86016 tokens\)"
                                               r".*every bucket's tokens: 2, 4, 8\. Fix"):
        check_degree(5, 40, tokens)
    with pytest.raises(DistributedError, match=r"is 3, .* the model's 40 attention heads\..*: 2, 4, 8"):
        check_degree(3, 40, tokens)
    with pytest.raises(DistributedError, match=r"24 heads .*: 2, 3, 4, 6, 8, 12, 24"):
        check_degree(5, 24, {"512x512x33": 9216})  # TI2V-5B's 24 heads
    check_degree(1, 40, {"x": 7})  # one rank: nothing to split


def test_world_must_be_a_multiple_and_combinations_are_refused_in_params() -> None:
    check_world(8, 4)
    with pytest.raises(DistributedError, match=r"sequence_parallel is 4 but 6 process\(es\).*launch 4 or 8 processes"):
        check_world(6, 4)
    base = {"model": {"name_or_path": "x"}, "network": {"dropout": 0.1}}
    parse_params(base)
    with pytest.raises(ValueError, match=r"network.dropout 0.1 with train.sequence_parallel 2.*network.dropout: 0"):
        parse_params({**base, "train": {"sequence_parallel": 2}})
    with pytest.raises(ValueError, match="sharded_base and sequence_parallel > 1 together are not supported"):
        parse_params({"train": {"sequence_parallel": 2, "sharded_base": True, "optimizer": "adamw"}})


def test_plans_count_sequence_parallel_replicas() -> None:
    """World = replicas x SP: expert-parallel splits replicas (each expert's group is whole SP
    groups), data-parallel shares batches by replica; an odd replica count cannot split in two."""
    ep = plan_parallel(8, ["high", "low"], "auto", sp=2)
    assert ep.mode == "expert" and ep.groups == {"high": (0, 1, 2, 3), "low": (4, 5, 6, 7)}
    assert [ep.replica(r, "low") for r in (4, 5, 6, 7)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    dp = plan_parallel(4, ["low"], "auto", sp=2)
    assert dp.mode == "data" and [dp.replica(r, "low") for r in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert plan_parallel(4, ["high", "low"], "auto", sp=4).mode == "data"  # one replica: nothing to split
    with pytest.raises(DistributedError, match=r"6 processes are 3 sequence-parallel group\(s\) of 2.*groups of 2"):
        plan_parallel(6, ["high", "low"], "expert", sp=2)


def test_enable_refuses_heads_it_cannot_split() -> None:
    from wanlora.train.sequence_parallel import enable_sequence_parallel

    with pytest.raises(DistributedError, match=r"sequence_parallel is 3, .* 4 attention heads"):
        enable_sequence_parallel(tiny_expert(0, **SP_CFG), SequenceGroup(3, 0, None))


# ----------------------------------------------------------------------- gloo launches
def _single_run(steps: int, accum: int):
    """One process, the SP scenarios' expert and data: `steps` optimizer steps of `accum` micro-batches."""
    model = tiny_expert(0, **SP_CFG)
    opt = build_optimizer(lora_params(model), CFG)
    cursor = Cursor()
    outs = run_steps(model, opt, SyntheticData(SP_SHAPES), cursor, range(steps), ONE, expert="low", accum=accum)
    return model, opt, cursor, outs


def _launch(tmp_path_factory: pytest.TempPathFactory, world: int) -> tuple[Path, dict]:
    """The one-process state the SP run resumes from (replicas = world / SP = 1: accumulation 1),
    then every scenario of `_sp_helpers` on `world` ranks."""
    out = tmp_path_factory.mktemp(f"sp{world}")
    model, opt, cursor, outs = _single_run(SAVE_AT, accum=1)
    save_parallel_checkpoint(out / "one_state", ONE, plan_parallel(1, ["low"]), {"low": ExpertParts(model, opt)},
                             step=SAVE_AT, cursor=cursor, extra={"history": [o.loss for o in outs], "bad_steps": 0})
    launch(main, (out,), world=world, timeout=400)
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return _launch(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return _launch(tmp_path_factory, 4)


#: (prediction, gradient) tolerances per dtype. float32: the prediction is bitwise with 2 ranks
#: (each head's attention and each token's linears see the same numbers; checked below), 4 ranks
#: change CPU matmul blocking at 3 tokens a rank; gradients are sums in another order.
#: bf16: the tolerance of bf16 rounding (8 bits of mantissa) on values of order 1.
TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (2e-2, 5e-3)}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("ranks", ["two", "four"])
def test_sequence_parallel_forward_and_backward_equal_the_single_process_expert(name, ranks, request) -> None:
    out, _ = request.getfixturevalue(ranks)
    case = CASES[name]
    want = forward_backward(expert_case(case, SequenceGroup()), case)
    got = load_file(out / f"exact_{name}.safetensors")
    assert sorted(got) == sorted(want)
    grads = [k for k in want if k.startswith("grad.")]
    assert len(grads) == 2 * 10 * 2 and all(float(want[k].abs().max()) > 1e-5 for k in grads)
    pred_tol, grad_tol = TOL[case.dtype]
    if ranks == "two" and case.dtype == torch.float32:
        assert torch.equal(got["pred"], want["pred"]), "two ranks: the prediction is bitwise the unsplit one"
    torch.testing.assert_close(got["pred"], want["pred"], atol=pred_tol, rtol=pred_tol)
    assert not torch.allclose(want["pred_per_token_t"], want["pred"])  # per-token timesteps shard with the tokens
    torch.testing.assert_close(got["pred_per_token_t"], want["pred_per_token_t"], atol=pred_tol, rtol=pred_tol)
    torch.testing.assert_close(got["loss"], want["loss"], atol=0, rtol=max(pred_tol, 1e-6))
    scale = max(float(want[k].abs().max()) for k in grads)
    for k in grads:
        torch.testing.assert_close(got[k], want[k], atol=grad_tol * scale, rtol=grad_tol, msg=k)


@pytest.mark.slow
def test_compiled_blocks_trace_the_exchange_without_graph_breaks(tmp_path) -> None:
    """torch.compile of each block (fullgraph, aot_eager) on 2 ranks: same prediction, bitwise,
    and the same gradients as the eager single-process expert (~30 s of CPU time tracing)."""
    launch(compiled_main, (tmp_path,), world=2, timeout=400)
    got = load_file(tmp_path / "compiled.safetensors")
    want = forward_backward(expert_case(CASES["fp32"], SequenceGroup()), CASES["fp32"])
    assert torch.equal(got["pred"], want["pred"])
    for k in (k for k in want if k.startswith("grad.")):
        torch.testing.assert_close(got[k], want[k], atol=1e-8, rtol=1e-5, msg=k)


@pytest.mark.parametrize("ranks, sp", [("two", 2), ("four", 2), ("four", 4)])
def test_dp_x_sp_steps_equal_one_process_with_accumulation(ranks, sp, request) -> None:
    """world / SP replicas, one micro-batch each: one process with that accumulation (the same
    batches, draws and mean gradient), through a checkpoint and the step after it."""
    out, results = request.getfixturevalue(ranks)
    replicas = {"two": 2, "four": 4}[ranks] // sp
    model, _, _, outs = _single_run(SAVE_AT + 1, accum=replicas)
    tag = f"sp{sp}x{replicas}"
    assert results[f"{tag}_samples"] == [o.samples for o in outs]  # each replica's samples once, not per SP rank
    assert results[f"{tag}_losses"] == pytest.approx([o.loss for o in outs], rel=1e-6)
    got, want = load_file(out / f"{tag}_lora.safetensors"), lora_state_dict(model)
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("ranks, sp", [("two", 2), ("four", 2), ("four", 4)])
def test_sp_state_resumes_in_one_process(ranks, sp, request) -> None:
    out, results = request.getfixturevalue(ranks)
    replicas = {"two": 2, "four": 4}[ranks] // sp
    tag = f"sp{sp}x{replicas}"
    model = tiny_expert(0, **SP_CFG)
    opt = build_optimizer(lora_params(model), CFG)
    plain = load_parallel_checkpoint(out / f"{tag}_state", ONE, {"low": ExpertParts(model, opt)})
    assert plain["history"] == results[f"{tag}_losses"][:SAVE_AT]
    (nxt,) = run_steps(model, opt, SyntheticData(SP_SHAPES), Cursor(plain["epoch"], plain["position"]),
                       range(SAVE_AT, SAVE_AT + 1), ONE, expert="low", accum=replicas)
    assert nxt.loss == pytest.approx(results[f"{tag}_losses"][SAVE_AT], rel=1e-6)
    got = load_file(out / f"{tag}_lora.safetensors")
    for k, v in lora_state_dict(model).items():
        torch.testing.assert_close(v, got[k], atol=1e-6, rtol=1e-5, msg=k)


def test_ranks_that_find_different_states_stop_together(two) -> None:
    """A multi-node launch whose nodes hold their own workspace copies and only node 0 the state
    (README, several nodes): rank 1 would start at step 0 while rank 0 resumed at 2."""
    _, results = two
    said = results["state_mismatch"]
    assert len(said) == 2 and said[0].startswith(str(two[0] / "one_state")) and "empty_1" in said[1]
    for message in said:  # each rank names its own folder, and the same finding
        assert "the ranks found different training states (step by rank: [2, None]" in message
        assert "copy node 0's folder to the others" in message


@pytest.mark.parametrize("ranks", ["two", "four"])
def test_one_process_state_resumes_under_sp(ranks, request) -> None:
    out, results = request.getfixturevalue(ranks)
    sp = {"two": 2, "four": 4}[ranks]
    model, _, _, outs = _single_run(SAVE_AT + 1, accum=1)
    tag = f"sp{sp}x1_resumed"
    assert results[f"{tag}_losses"] == pytest.approx([outs[SAVE_AT].loss], rel=1e-6)
    got = load_file(out / f"{tag}_lora.safetensors")
    for k, v in lora_state_dict(model).items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5, msg=k)


# --------------------------------------------------------------------------- the train stage
@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The train stage on the tiny workspace (2 heads, 8-token samples, both experts, 4 steps,
    saves every 2): one process; SP 2 on two ranks; SP 2 killed after its step-2 save and resumed
    in one process; one process killed there and resumed under SP 2; expert-parallel on two ranks,
    and on four as two SP groups of two."""
    from _helpers import copy_workspace, crash_at_step, make_workspace, tiny_params
    from test_distributed_stage import _crash_at_step_2

    from wanlora.train import loop

    base = tmp_path_factory.mktemp("sp_stage")
    template, model = make_workspace(base / "template", base / "model"), base / "model"
    one_p, sp_p = (tiny_params(model, train={"steps": 4, "sequence_parallel": n}) for n in (1, 2))
    ws = {name: copy_workspace(template, base / name) for name in ("one", "sp", "sp_then_one", "one_then_sp")}
    loop.run_stage(one_p, ws["one"])
    launch(loop.run_stage, (sp_p, ws["sp"]), world=2)
    with pytest.raises(AssertionError, match="ranks failed"):
        launch(_crash_at_step_2, (sp_p, ws["sp_then_one"]), world=2)
    loop.run_stage(one_p, ws["sp_then_one"])
    with pytest.MonkeyPatch.context() as mp:
        crash_at_step(mp, 2)
        with pytest.raises(KeyboardInterrupt):
            loop.run_stage(one_p, ws["one_then_sp"])
    launch(loop.run_stage, (sp_p, ws["one_then_sp"]), world=2)
    ep = {name: copy_workspace(template, base / name) for name in ("ep", "ep_sp")}
    launch(loop.run_stage, (tiny_params(model, train={"steps": 4}), ep["ep"]), world=2)
    launch(loop.run_stage, (tiny_params(model, train={"steps": 4, "sequence_parallel": 2}), ep["ep_sp"]), world=4)
    return {**ws, **ep, "model": model}


def _history(ws: Path) -> list[dict]:
    return json.loads(next((ws / "scratch/train").glob("*/state_000004/state.json")).read_text())["history"]


@pytest.mark.parametrize("run, reference", [("sp", "one"), ("sp_then_one", "one"), ("one_then_sp", "one"),
                                            ("ep_sp", "ep")])
def test_train_stage_under_sp_equals_one_process_and_resumes_across_topologies(stage_runs, run, reference) -> None:
    """Same LoRA files and losses as without SP, whichever topology wrote which half (the run
    key leaves train.sequence_parallel out, like train.gpus: one state folder); expert-parallel
    x SP 2 on four ranks is expert-parallel on two (each expert on its own SP group)."""
    one, other = stage_runs[reference], stage_runs[run]
    assert [p.name for p in (other / "scratch/train").iterdir()] == [p.name for p in (one / "scratch/train").iterdir()]
    for expert in ("high", "low"):
        for step in (2, 4):
            name = f"data/lora/{expert}/step_{step:06d}.safetensors"
            got, want = load_file(other / name), load_file(one / name)
            assert sorted(got) == sorted(want)
            for k in want:
                # 1% of lr (1e-3): Adam's first steps move an element whose gradient is near eps by
                # up to lr whatever its size, so gradient sums in another order (1e-6 relative) show
                # up to ~2e-6 here (a wrong gradient scale, which Adam hides, fails the grad_norm check)
                torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=f"{name} {k}")
    rows, want_rows = _history(other), _history(one)
    assert [r["step"] for r in rows] == ([2.0, 4.0] if reference == "ep" else [1.0, 2.0, 3.0, 4.0])
    for a, b in zip(rows, want_rows, strict=True):
        keys = sorted(k for k in b if k.startswith("loss_"))
        assert keys == sorted(k for k in a if k.startswith("loss_")) and keys
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-6)
        # the gradient itself, before Adam (which would hide an SP gradient counted twice)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_train_stage_refuses_a_degree_the_model_cannot_split(stage_runs) -> None:
    """Checked from the experts' config.json and the bucket manifest, before any weight loads:
    the tiny model's 2 heads split over 2 ranks only."""
    from wanlora.train.sequence_parallel import check_model_degree

    ws, model = stage_runs["one"], stage_runs["model"]
    buckets = [json.loads(line)["bucket"] for line in (ws / "data/buckets/samples.jsonl").read_text().splitlines()]
    vae = json.loads((model / "vae" / "config.json").read_text())
    check_model_degree(2, model, ("high", "low"), buckets, vae)
    with pytest.raises(DistributedError, match=r"is 4, .* 2 attention heads.*: 2\. Fix"):
        check_model_degree(4, model, ("high", "low"), buckets, vae)
