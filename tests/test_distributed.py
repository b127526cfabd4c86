"""Multi-process training building blocks: launch detection, sharding of work, seeds, data order,
parallel plans, and (two gloo processes launched like torchrun) data-parallel gradients,
expert-parallel training, FSDP2-sharded bases and rank-count-independent resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _dist_helpers import (  # noqa: E402
    BUCKETS, CFG, EXPERT_SEEDS, SAVE_AT, SEED, SyntheticData, accumulate_grads, launch, lora_params, main,
    run_steps, tiny_expert,
)

from wanlora.data.dataset import epoch_batches  # noqa: E402
from wanlora.train.dist_checkpoint import ExpertParts, _pack, _unpack, load_parallel_checkpoint  # noqa: E402
from wanlora.train.dist_fsdp import shard_base  # noqa: E402
from wanlora.train.dist_parallel import plan_parallel, reduce_gradients, world_metrics  # noqa: E402
from wanlora.train.distributed import (  # noqa: E402
    Cursor, DistEnv, DistributedError, _rank_device, batch_generator, derive_seed, init_distributed, launch_count, launch_ranks,
    rank_share, relaunch_command, relaunch_if_needed, shard, take_batches,
)
from wanlora.train.lora import PREFIX, lora_state_dict  # noqa: E402
from wanlora.train.optim import build_optimizer  # noqa: E402

ONE = DistEnv()


def assert_close_dicts(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), atol=atol, rtol=1e-4, msg=k)


# ------------------------------------------------------------------------------ pure parts
def test_shard_splits_work_disjointly_and_completely() -> None:
    items = [f"clip{i:02d}" for i in range(10)]
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts[0] == ["clip00", "clip03", "clip06", "clip09"]
    assert parts[2] == ["clip02", "clip05", "clip08"]
    assert sorted(sum(parts, [])) == items
    assert shard(items, 0, 1) == items
    with pytest.raises(ValueError, match="rank 3 is not in 0..2"):
        shard(items, 3, 3)


def test_launch_ranks_reads_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launch_ranks() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(DistributedError, match="RANK is not set.*torchrun"):
        launch_ranks()
    monkeypatch.setenv("RANK", "6")
    with pytest.raises(DistributedError, match=r"RANK=6 is outside 0..3"):
        launch_ranks()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch_ranks() == (2, 4, 0)
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(DistributedError, match="WORLD_SIZE='four' is not an integer"):
        launch_ranks()


def test_single_process_environment_and_device_conflict(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world, env.is_main, env.distributed, env.device.type) == (0, 1, True, False, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(DistributedError, match="each needs its own GPU.*job.device: auto"):
        init_distributed("cuda:1")
    with pytest.raises(DistributedError, match="needs 2\\+ processes"):
        shard_base(tiny_expert(0), ONE)


def test_rank_device_on_a_cuda_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default job.device `auto` on one GPU (a bug found on the H100: it parsed "auto" as a
    device string), a pinned cuda:N alone, and GPU LOCAL_RANK for each of several ranks."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _rank_device("auto", 0, 1) == torch.device("cuda", 0)
    assert _rank_device("cuda", 0, 1) == torch.device("cuda", 0)
    assert _rank_device("cuda:1", 0, 1) == torch.device("cuda", 1)
    assert _rank_device("auto", 1, 2) == torch.device("cuda", 1)
    assert _rank_device("cpu", 1, 2) == torch.device("cpu")
    with pytest.raises(DistributedError, match="LOCAL_RANK=2 but only 2 GPU"):
        _rank_device("auto", 2, 3)


@pytest.mark.parametrize("mode", ["uint4", "qfloat8"])
def test_shard_base_refuses_a_quantized_base_before_any_collective(mode: str) -> None:
    from wanlora.models.quant import quantize_transformer

    model = tiny_expert(0)
    quantize_transformer(model, mode, group_size=16, device="cpu")
    two = DistEnv(rank=0, world=2)  # no process group: the guard must stop before FSDP is touched
    with pytest.raises(DistributedError, match="does not combine with a quantized base"):
        shard_base(model, two)
    with pytest.raises(DistributedError, match="does not combine with model.layer_offloading"):
        shard_base(tiny_expert(0), two, offloading=True)


def test_stage_relaunches_itself_under_torchrun_only_when_useful(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch_count(0, "cpu") == 1 and launch_count(4, "cuda:1") == 1  # no GPU here / one pinned GPU
    cmd = relaunch_command(4, ["stages/train.py"])
    assert cmd is not None and cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                                           "stages/train.py"]
    assert relaunch_command(1, ["stages/train.py"]) is None
    monkeypatch.setenv("WORLD_SIZE", "4")  # already a launched rank: never launch again
    assert relaunch_command(4, ["stages/train.py"]) is None
    relaunch_if_needed(0, "cpu")  # returns: nothing to relaunch on a CPU machine


def test_seeds_are_functions_of_their_keys() -> None:
    assert 0 <= derive_seed(42, "x") < 2**63
    a = batch_generator(5, "low", 1, 3)
    dropout_a = torch.rand(4)
    b = batch_generator(5, "low", 1, 3)
    dropout_b = torch.rand(4)
    assert torch.equal(torch.rand(6, generator=a), torch.rand(6, generator=b))
    assert torch.equal(dropout_a, dropout_b)  # torch's global RNG (LoRA dropout) is seeded per batch too
    first = torch.rand(6, generator=batch_generator(5, "low", 1, 3))
    for other in (batch_generator(5, "high", 1, 3), batch_generator(5, "low", 1, 4), batch_generator(6, "low", 1, 3)):
        assert not torch.equal(first, torch.rand(6, generator=other))


def test_take_batches_follows_the_global_order_across_epochs() -> None:
    order = SyntheticData.order
    assert len(order(0)) == 4  # 3 + 3 samples in two buckets, batches of 2
    cursor = Cursor(0, 2)
    got = take_batches(order, cursor, 6)
    assert [(b.epoch, b.position) for b in got] == [(0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert [b.indices for b in got] == order(0)[2:] + order(1)
    assert order(1) == epoch_batches(BUCKETS, 2, SEED, 1) != order(0)
    assert (cursor.epoch, cursor.position) == (2, 0)
    shares = [rank_share(got, r, 2) for r in range(2)]
    assert [b.position for b in shares[0]] == [2, 0, 2] and [b.position for b in shares[1]] == [3, 1, 3]
    with pytest.raises(ValueError, match="do not split evenly over 4 ranks"):
        rank_share(got, 0, 4)


def test_plan_parallel_modes() -> None:
    ep = plan_parallel(4, ["low", "high"])
    assert ep.mode == "expert" and ep.groups == {"high": (0, 1), "low": (2, 3)}
    assert ep.experts_of(3) == ("low",) and ep.leader("low") == 2
    dp = plan_parallel(3, ["high", "low"])
    assert dp.mode == "data" and dp.experts_of(1) == ("high", "low")
    assert plan_parallel(2, ["high", "low"], "data").mode == "data"
    assert plan_parallel(4, ["low"]).groups == {"low": (0, 1, 2, 3)}
    with pytest.raises(DistributedError, match="3 process\\(es\\) do not split in two.*train.parallel: data"):
        plan_parallel(3, ["high", "low"], "expert")
    with pytest.raises(DistributedError, match="only one expert is active"):
        plan_parallel(2, ["high"], "expert")


def test_world_metrics_in_one_process() -> None:
    plan = plan_parallel(1, ["high", "low"])
    logged, rate, stop = world_metrics(plan, {"low": {"loss": 2.5, "dop": 0.25}}, 4, 2.0, ONE)
    assert logged == {"dop_low": 0.25, "loss_low": 2.5} and rate == 2.0 and not stop  # high did not step
    assert world_metrics(plan, {"low": {"loss": 2.5}}, 4, 2.0, ONE, stop=True)[2]
    # a step that held micro-batches of both experts logs both
    both = world_metrics(plan, {"high": {"loss": 1.5}, "low": {"loss": 2.5}}, 4, 2.0, ONE)[0]
    assert both == {"loss_high": 1.5, "loss_low": 2.5}
    assert plan.step_increment == 1 and plan_parallel(2, ["high", "low"]).step_increment == 2


def test_pack_round_trips_mixed_dtypes() -> None:
    tensors = {"a": torch.randn(3, 2).to(torch.bfloat16), "b": torch.tensor(7, dtype=torch.int64),
               "c": torch.arange(5, dtype=torch.float32)}
    meta, buffer = _pack(tensors)
    assert buffer.dtype == torch.uint8 and buffer.numel() == 6 * 2 + 8 + 5 * 4
    back = _unpack(meta, buffer)
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)


def test_reduce_gradients_is_a_no_op_in_one_process() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert reduce_gradients([p], None, ONE) == 0 and torch.equal(p.grad, torch.full((3,), 2.0))


# ------------------------------------------------------------------- two gloo processes
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """All scenarios of `_dist_helpers` on 2 CPU processes (one launch: start-up dominates)."""
    out = tmp_path_factory.mktemp("dist")
    launch(main, (out,), world=2)
    return out, json.loads((out / "results.json").read_text())


def test_cache_stages_split_work_and_rank0_sees_all(two_ranks) -> None:
    _, results = two_ranks
    assert results["cache_files"] == [f"clip{i}.bin" for i in range(7)]
    assert results["cache_share"] == ["clip0", "clip2", "clip4", "clip6"]
    assert results["cache_problems"] == ["clip3: odd", "clip5: odd"]  # rank 1 found them, rank 0 reports


def single_run(steps: int, accum: int, expert: str = "low", seed: int = 0):
    """The one-process reference: `steps` optimizer steps with `accum` micro-batches each."""
    model, data = tiny_expert(seed), SyntheticData()
    opt = build_optimizer(lora_params(model), CFG)
    cursor = Cursor()
    outs = run_steps(model, opt, data, cursor, range(steps), ONE, expert=expert, accum=accum)
    return model, opt, outs, data


def test_data_parallel_gradients_equal_single_process(two_ranks) -> None:
    out, results = two_ranks
    model, data = tiny_expert(0), SyntheticData()
    accumulate_grads(model, data, take_batches(data.order, Cursor(), 2), "low")
    want = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    got = load_file(out / "dp_grads.safetensors")
    assert len(want) == 2 * 10 * 2 and all(float(g.abs().max()) > 1e-4 for g in want.values())
    assert_close_dicts(got, want, atol=1e-6)
    assert results["dp_grads_buckets"] == 6  # 5,632 fp32 LoRA values in 4 KiB buckets (1,024 values)


def test_data_parallel_run_equals_one_process_with_doubled_accumulation(two_ranks) -> None:
    out, results = two_ranks
    model, _, outs, _ = single_run(SAVE_AT + 1, accum=2)
    assert results["dp_samples"] == [o.samples for o in outs] == [3, 3, 3]
    assert results["dp_losses"] == pytest.approx([o.loss for o in outs], rel=1e-5)
    assert_close_dicts(load_file(out / "dp_lora_final.safetensors"), lora_state_dict(model))


def test_resume_two_process_checkpoint_in_one_process(two_ranks) -> None:
    out, results = two_ranks
    ref_model, ref_opt, _, _ = single_run(SAVE_AT, accum=2)
    model = tiny_expert(0)
    opt = build_optimizer(lora_params(model), CFG)
    plain = load_parallel_checkpoint(out / "dp_state", ONE, {"low": ExpertParts(model, opt)})
    assert plain is not None and plain["step"] == SAVE_AT and plain["parallel"] == {"mode": "data", "world": 2}
    assert (plain["epoch"], plain["position"]) == (1, 0)  # 2 steps x 2 batches = one epoch of 4
    assert plain["history"] == pytest.approx(results["dp_losses"][:SAVE_AT], rel=1e-9)
    assert_close_dicts(lora_state_dict(model), lora_state_dict(ref_model))
    for p, q in zip(lora_params(model), lora_params(ref_model)):
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"], atol=1e-9, rtol=1e-4)
        assert float(opt.state[p]["step"]) == SAVE_AT
    cursor = Cursor(plain["epoch"], plain["position"])
    (nxt,) = run_steps(model, opt, SyntheticData(), cursor, range(SAVE_AT, SAVE_AT + 1), ONE, expert="low", accum=2)
    assert nxt.loss == pytest.approx(results["dp_losses"][SAVE_AT], rel=1e-5)
    assert_close_dicts(lora_state_dict(model), load_file(out / "dp_lora_final.safetensors"))


def test_expert_parallel_trains_both_experts_and_rank0_writes_both(two_ranks) -> None:
    out, results = two_ranks
    assert results["ep_plan"] == {"mode": "expert", "groups": {"high": [0], "low": [1]}}
    high, low = results["ep_ranks"]
    assert (high["expert"], low["expert"]) == ("high", "low")
    assert high["t"][0] >= 875 and low["t"][1] < 875  # each group draws only its own band
    steps = CFG.steps // 2
    for rank, expert in enumerate(("high", "low")):
        path = out / "ep_state" / "lora" / expert / f"step_{steps:06d}.safetensors"
        model, _, outs, _ = single_run(steps, accum=1, expert=expert, seed=EXPERT_SEEDS[expert])
        saved = load_file(path)
        assert all(k.startswith(PREFIX) for k in saved)
        assert_close_dicts(saved, lora_state_dict(model))
        assert not torch.allclose(saved[PREFIX + "blocks.0.attn1.to_q.lora_A.weight"],
                                  lora_state_dict(tiny_expert(EXPERT_SEEDS[expert]))[PREFIX + "blocks.0.attn1.to_q.lora_A.weight"])
        assert results["ep_ranks"][rank]["losses"] == pytest.approx([o.loss for o in outs], rel=1e-5)
    assert results["ep_logged_losses"] == pytest.approx({"loss_high": high["losses"][-1], "loss_low": low["losses"][-1],
                                                         "dop_high": 0.0, "dop_low": 0.0})
    assert results["ep_stop_seen"] is True
    state = json.loads((out / "ep_state" / f"state_{steps:06d}" / "state.json").read_text())
    assert sorted(state["optimizers"]) == ["high", "low"] and state["step"] == steps


def test_sharded_base_matches_unsharded_and_resumes_unsharded_state(two_ranks) -> None:
    out, results = two_ranks
    model, _, outs, _ = single_run(1, accum=2)
    assert results["fsdp_losses"] == pytest.approx([outs[0].loss], rel=1e-5)
    assert_close_dicts(load_file(out / "fsdp_state" / "lora" / "low" / "step_000001.safetensors"),
                       lora_state_dict(model))
    assert results["fsdp_resumed_loss"] == pytest.approx(results["dp_losses"][SAVE_AT], rel=1e-5)
    # the step after the resume used the re-sharded Adam moments: same LoRA as the unsharded run
    assert_close_dicts(load_file(out / "fsdp_resumed" / "lora" / "low" / f"step_{SAVE_AT + 1:06d}.safetensors"),
                       load_file(out / "dp_lora_final.safetensors"))
