"""The train stage itself on two gloo ranks (forked, with torchrun's environment): data-parallel
equals one process with doubled accumulation, expert-parallel writes both LoRAs from rank 0, and
a state written by two ranks resumes in one process at the global data position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from _dist_helpers import launch
from _helpers import copy_workspace, make_workspace, tiny_params
from wanlora.train import loop


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("dist_stage")
    return make_workspace(base / "ws", base / "model"), base / "model"


def _state(ws: Path) -> dict:
    return json.loads(next((ws / "scratch/train").glob("*/state_*/state.json")).read_text())


def _crash_at_step_2(params, ws: Path) -> None:
    """run_stage in a forked rank, failing right after the step-2 checkpoint."""
    real = loop.make_batch

    def make_batch(tr, indices, expert, g):
        if tr.step == 2:
            raise RuntimeError("simulated crash")
        return real(tr, indices, expert, g)

    loop.make_batch = make_batch  # this forked process only
    loop.run_stage(params, ws)


@pytest.mark.parametrize("switch_every", [2, 1])
def test_data_parallel_stage_equals_one_process_with_doubled_accumulation(template, tmp_path, switch_every):
    """With switch_every 1 every optimizer step holds one micro-batch of each expert (the schedule
    counts micro-batches), so rank 0 trains the high-noise expert while rank 1 trains the
    low-noise one in the same step, and each expert's gradient is still its global mean."""
    model = template[1]
    ms = {"switch_every": switch_every}
    two = copy_workspace(template[0], tmp_path / "two")
    launch(loop.run_stage, (tiny_params(model, train={"steps": 4, "parallel": "data"}, multistage=ms), two), world=2)
    one = copy_workspace(template[0], tmp_path / "one")
    loop.run_stage(tiny_params(model, train={"steps": 4, "parallel": "data", "gradient_accumulation": 2},
                               multistage=ms), one)
    for expert in ("high", "low"):
        got, want = (load_file(ws / f"data/lora/{expert}/step_000004.safetensors") for ws in (two, one))
        assert sorted(got) == sorted(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)
    rows_two, rows_one = _state(two)["history"], _state(one)["history"]
    for a, b in zip(rows_two, rows_one, strict=True):
        losses = sorted(k for k in b if k.startswith("loss_"))
        assert losses == sorted(k for k in a if k.startswith("loss_"))
        assert len(losses) == (2 if switch_every == 1 else 1)
        assert [a[k] for k in losses] == pytest.approx([b[k] for k in losses], rel=1e-5)
    assert _state(two)["parallel"] == {"mode": "data", "world": 2}


def test_expert_parallel_stage_writes_both_loras_from_rank_0(template, tmp_path):
    ws = copy_workspace(template[0], tmp_path / "ws")
    launch(loop.run_stage, (tiny_params(template[1], train={"steps": 4}, save={"every": 2}), ws), world=2)
    for expert in ("high", "low"):
        names = sorted(p.name for p in (ws / f"data/lora/{expert}").iterdir())
        assert names == ["step_000002.safetensors", "step_000004.safetensors"]
        with safe_open(str(ws / f"data/lora/{expert}/step_000004.safetensors"), framework="pt") as f:
            assert f.metadata()["wanlora.expert"] == expert and f.metadata()["wanlora.step"] == "4"
    state = _state(ws)
    assert state["parallel"] == {"mode": "expert", "world": 2} and sorted(state["optimizers"]) == ["high", "low"]
    # each round both experts step (global step +2) and rank 0 logs both losses
    assert [r["step"] for r in state["history"]] == [2.0, 4.0]
    assert all(r["loss_high"] > 0 and r["loss_low"] > 0 for r in state["history"])
    assert (ws / "data/train_live/metrics.json").is_file()


def test_two_rank_state_resumes_in_one_process(template, tmp_path):
    ws = copy_workspace(template[0], tmp_path / "ws")
    params = tiny_params(template[1], train={"steps": 4, "parallel": "data"}, save={"every": 2})
    with pytest.raises(AssertionError, match="ranks failed"):
        launch(_crash_at_step_2, (params, ws), world=2)
    before = _state(ws)
    assert before["step"] == 2 and (before["epoch"], before["position"]) == (2, 0)  # 2 steps x 2 ranks x 1 batch
    loop.run_stage(params, ws)  # same params: same state folder, now one process
    after = _state(ws)
    assert after["step"] == 4 and after["history"][:2] == before["history"]
    assert (after["epoch"], after["position"]) == (3, 0)  # +1 batch per step: the global position went on
    assert after["parallel"] == {"mode": "data", "world": 1}
    assert sorted(p.name for p in (ws / "data/lora/low").iterdir())[-1] == "step_000004.safetensors"


def _odd_steps_refused(params, ws: Path) -> None:
    from wanlora.train.distributed import DistributedError

    with pytest.raises(DistributedError, match=r"train.steps is 3, .* multiple of 2, or train.parallel: data"):
        loop.run_stage(params, ws)


def test_expert_parallel_refuses_a_step_count_it_would_overshoot(template, tmp_path):
    """Each expert-parallel round steps both experts (global step +2): 3 steps would end at 4."""
    ws = copy_workspace(template[0], tmp_path / "ws")
    launch(_odd_steps_refused, (tiny_params(template[1], train={"steps": 3}), ws), world=2)
    assert not (ws / "data/lora").exists()
