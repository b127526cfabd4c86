"""LoRA master weights are float32 on a bf16 model; the LoRA matmul runs in bf16.

Why it matters only shows in bf16: an AdamW step at lr 2e-5 is ~40x smaller than half a bf16 ulp
of a LoRA-A weight, so bf16 LoRA weights round it away. AI Toolkit keeps its LoRA network float32
(`jobs/process/BaseSDTrainProcess.py`, `run`: `self.network.force_to(self.device_torch,
dtype=torch.float32)`), as peft does by default. Its forward (`toolkit/network_mixins.py`,
`ToolkitModuleMixin.forward`) casts the activations up to float32 for the LoRA product; ours casts
the weight down to the compute dtype instead (`wanlora.train.lora` module doc says why). Both keep
float32 masters, gradients and optimizer state, which is what these tests pin.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load

from _helpers import copy_workspace, crash_at_step, make_workspace, tiny_params
from wanlora.config import NetworkConfig, TrainConfig
from wanlora.models.geometry import TINY, build_transformer
from wanlora.train import loop
from wanlora.train.lora import ComputeDtypeLinear, Ema, add_lora, lora_state_dict
from wanlora.train.optim import build_optimizer
from wanlora.train.step import StepBatch, training_step

NET = NetworkConfig(rank=4, alpha=4)


def _expert(dtype: torch.dtype) -> torch.nn.Module:
    """The tiny expert in `dtype` (bf16 weights rounded from the same float32 draw) with a LoRA
    whose A init is the same float32 draw for every dtype."""
    model = build_transformer(TINY, torch.float32, "cpu", 0).to(dtype)
    torch.manual_seed(100)
    add_lora(model, NET)
    return model.train()


def _batches(n: int) -> list[StepBatch]:
    g = torch.Generator().manual_seed(5)
    shape = (1, 16, 2, 4, 4)
    x0 = torch.randn(shape, generator=g)  # one clip: gradients stay correlated from step to step
    text = torch.randn(1, 12, 32, generator=g)
    return [StepBatch(x0, torch.randn(shape, generator=g), torch.rand(1, generator=g) * 1000, text)
            for _ in range(n)]


def _train(model: torch.nn.Module, dtype: torch.dtype, steps: int, lr: float) -> torch.optim.Optimizer:
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], TrainConfig(optimizer="adamw", lr=lr))
    for batch in _batches(steps):
        training_step(model, batch, dtype=dtype)
        opt.step()
        opt.zero_grad()
    return opt


def test_masters_grads_optimizer_state_and_ema_are_float32_while_the_matmul_is_bf16():
    model = _expert(torch.bfloat16)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(lora) == 40 and {p.dtype for p in lora.values()} == {torch.float32}
    assert all("lora_" in n for n in lora) and all(p.dtype == torch.bfloat16 for n, p in model.named_parameters()
                                                     if "lora_" not in n and p.is_floating_point()
                                                     and "norm" not in n and "scale_shift" not in n)
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    linears = [m for m in model.modules() if isinstance(m, ComputeDtypeLinear)]
    assert len(linears) == 40
    hook = linears[0].register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    opt = _train(model, torch.bfloat16, 1, 1e-4)
    hook.remove()
    assert seen == [(torch.bfloat16, torch.bfloat16)]  # the product in the compute dtype, not float32
    training_step(model, _batches(1)[0], dtype=torch.bfloat16)
    assert {p.grad.dtype for p in lora.values()} == {torch.float32}
    state = [s for s in opt.state.values()]
    assert len(state) == 40 and {s["exp_avg"].dtype for s in state} == {s["exp_avg_sq"].dtype for s in state} == {torch.float32}
    ema = Ema(model, decay=0.9)
    ema.update(model)
    assert {v.dtype for v in ema.state_dict().values()} == {torch.float32}



@pytest.mark.parametrize("mode", ["float8", "qfloat8", "nf4", "uint4"])
def test_masters_stay_float32_on_every_quantized_base(mode):
    """Each quantized linear gets peft's wrapper (bitsandbytes' own for nf4); all of them must
    feed the bf16 activations to float32 masters and return float32 gradients."""
    from wanlora.models.quant import quantize_transformer, quantized_modules

    model = build_transformer(TINY, torch.float32, "cpu", 0).to(torch.bfloat16)
    quantize_transformer(model, mode, group_size=32, device="cpu")
    assert len(quantized_modules(model)) == 20
    params = add_lora(model, NET)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = training_step(model.train(), _batches(1)[0], dtype=torch.bfloat16)
    assert out.finite and {p.dtype for p in params} == {torch.float32}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in params)

def test_a_bf16_run_at_lr_2e5_moves_the_lora_as_the_float32_reference_does():
    """30 AdamW steps at lr 2e-5 on the bf16 tiny model against the same run on the float32 model.
    With bf16 LoRA weights (the code before this test) nearly every LoRA-A update rounds away
    (|A| up to 1/sqrt(32) = 0.18: half an ulp is up to 4.9e-4, an Adam step ~2e-5)."""
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _expert(dtype)
        before = {k: v.detach().float().clone() for k, v in lora_state_dict(model).items()}
        _train(model, dtype, 30, 2e-5)
        runs[dtype] = {k: v.detach().float() - before[k] for k, v in lora_state_dict(model).items()}
    ref, got = runs[torch.float32], runs[torch.bfloat16]
    a_keys = [k for k in ref if "lora_A" in k]
    ref_a = torch.cat([ref[k].flatten() for k in a_keys])
    got_a = torch.cat([got[k].flatten() for k in a_keys])
    assert float((ref_a != 0).float().mean()) > 0.99
    assert float((got_a != 0).float().mean()) > 0.99  # bf16 masters: under 10% of A's elements move
    assert float(got_a.norm() / ref_a.norm()) == pytest.approx(1.0, abs=0.1)
    assert float(torch.nn.functional.cosine_similarity(got_a, ref_a, dim=0)) > 0.9


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    base = tmp_path_factory.mktemp("fp32masters")
    return make_workspace(base / "ws", base / "model"), base / "model"


BF16 = {"model": {"dtype": "bf16"}, "train": {"steps": 4, "lr": 2e-5}, "save": {"every": 2, "dtype": "fp32"},
        "multistage": {"switch_every": 1}}


def test_a_bf16_stage_saves_float32_state_and_files_bf16_cannot_hold_and_resumes_exactly(template, tmp_path,
                                                                                        monkeypatch):
    """The trainer's state and a `save.dtype: fp32` file of a bf16 run hold the float32 masters
    (values a bf16 tensor cannot represent), and a run interrupted after its first checkpoint
    resumes to the same losses and the same file bytes."""
    ws, root = template
    params = tiny_params(root, **BF16)
    full = copy_workspace(ws, tmp_path / "full")
    loop.run_stage(params, full)
    tensors = st_load(next((full / "scratch/train").glob("*/state_*/tensors.safetensors")).read_bytes())
    masters = [v for k, v in tensors.items() if k.startswith("lora.high.") and "lora_A" in k]
    moments = [v for k, v in tensors.items() if k.startswith("optim.high.") and v.is_floating_point() and v.dim() > 0]
    assert len(masters) == 20 and {v.dtype for v in masters} == {torch.float32}
    assert moments and {v.dtype for v in moments} == {torch.float32}
    a = torch.cat([v.flatten() for v in masters])
    assert float((a.bfloat16().float() != a).float().mean()) > 0.9
    for expert in ("high", "low"):
        saved = st_load((full / f"data/lora/{expert}/step_000004.safetensors").read_bytes())
        file_a = torch.cat([v.flatten() for k, v in sorted(saved.items()) if "lora_A" in k])
        assert file_a.dtype == torch.float32 and float((file_a.bfloat16().float() != file_a).float().mean()) > 0.9

    cut = copy_workspace(ws, tmp_path / "cut")
    crash_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        loop.run_stage(params, cut)
    monkeypatch.undo()
    loop.run_stage(params, cut)
    for path in sorted((full / "data/lora").rglob("*.safetensors")):
        assert (cut / path.relative_to(full)).read_bytes() == path.read_bytes(), path.name
    losses = [[{k: v for k, v in r.items() if k in ("step", "loss_high", "loss_low")} for r in
               json.loads(next((w / "scratch/train").glob("*/state_*/state.json")).read_text())["history"]]
              for w in (full, cut)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
