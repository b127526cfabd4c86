"""`wanlora import-aitk` trains what AI Toolkit trains: its shipped Wan 2.2 example and variants.

Every expected value comes from AI Toolkit's code (ostris/ai-toolkit, read at commit 27a03a9,
August 2026), cited per test; the configs are written here in our own words in the shape of
`config/examples/train_lora_wan22_14b_24gb.yaml` (no file of AI Toolkit is read at run time).
Where AI Toolkit's behaviour is a torch or diffusers object (its schedulers, AdamW), the test
builds that object and compares numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from wanlora.aitk import import_config
from wanlora.config import EmaConfig, TrainConfig, dump_params, parse_params
from wanlora.train.optim import build_optimizer, lr_at

# The keys and values of AI Toolkit's 24 GB Wan 2.2 example; names, paths and prompts are ours.
EXAMPLE = {
    "job": "extension",
    "config": {
        "name": "harbour_boats_v1",
        "process": [{
            "type": "sd_trainer",
            "training_folder": "output",
            "device": "cuda:0",
            "network": {"type": "lora", "linear": 32, "linear_alpha": 32},
            "save": {"dtype": "float16", "save_every": 250, "max_step_saves_to_keep": 4},
            "datasets": [{"folder_path": "/data/boats", "caption_ext": "txt", "caption_dropout_rate": 0.05,
                          "num_frames": 1, "resolution": [512, 768, 1024]}],
            "train": {"batch_size": 1, "steps": 2000, "gradient_accumulation": 1, "train_unet": True,
                      "train_text_encoder": False, "gradient_checkpointing": True, "noise_scheduler": "flowmatch",
                      "timestep_type": "linear", "optimizer": "adamw8bit", "lr": "1e-4",
                      "optimizer_params": {"weight_decay": "1e-4"}, "dtype": "bf16", "switch_boundary_every": 10,
                      "cache_text_embeddings": True},
            "model": {"name_or_path": "ai-toolkit/Wan2.2-T2V-A14B-Diffusers-bf16", "arch": "wan22_14b",
                      "quantize": True,
                      "qtype": "uint4|ostris/accuracy_recovery_adapters/wan22_14b_t2i_torchao_uint4.safetensors",
                      "quantize_te": True, "qtype_te": "qfloat8", "low_vram": True,
                      "model_kwargs": {"train_high_noise": True, "train_low_noise": True}},
            "sample": {"sampler": "flowmatch", "sample_every": 250, "sample_start_step": 0, "width": 1024,
                       "height": 1024, "num_frames": 1, "fps": 16,
                       "prompts": ["a fishing boat leaving the harbour at dawn", "two sailboats racing in a storm"],
                       "neg": "", "seed": 42, "walk_seed": True, "guidance_scale": 3.5, "sample_steps": 25},
        }],
    },
    "meta": {"name": "[name]", "version": "1.0"},
}
META_NOTES = ["meta.name='[name]' (not used: wanlora writes its own lineage metadata)",
              "meta.version='1.0' (not used: wanlora writes its own lineage metadata)"]


def _import(tmp_path: Path, train: dict | None = None, **sections) -> tuple:
    """The example with `train` keys merged into its train section, other sections merged likewise
    and plain process keys (trigger_word) set."""
    job = yaml.safe_load(yaml.safe_dump(EXAMPLE))  # a deep copy
    process = job["config"]["process"][0]
    process["train"].update(train or {})
    for name, value in sections.items():
        process[name] = {**process.get(name, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return import_config(path)


def test_the_shipped_24gb_example_maps_every_key(tmp_path):
    """Each value is what AI Toolkit runs for the example: rank 32 at scale 1 (peft format,
    toolkit/lora_special.py LoRASpecialNetwork.__init__: alpha = lora_dim), AdamW8bit with eps 1e-6
    (toolkit/optimizer.py get_optimizer), constant lr (toolkit/scheduler.py), switch every 10
    (config_modules.TrainConfig.switch_boundary_every), uint4 with the recovery adapter, fp16 files."""
    params, unmapped = _import(tmp_path)
    assert unmapped == META_NOTES
    assert (params.job.name, params.job.output_dir, params.job.device, params.job.trigger_word) == (
        "harbour_boats_v1", "output", "cuda:0", "")
    assert (params.network.rank, params.network.alpha, params.network.target_modules) == (
        32, 32.0, ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"])
    assert (params.save.dtype, params.save.every, params.save.keep_last) == ("fp16", 250, 4)
    t = params.train
    assert (t.steps, t.batch_size, t.gradient_accumulation, t.gradient_checkpointing) == (2000, 1, 1, "selective")
    assert (t.optimizer, t.lr, t.weight_decay, t.betas, t.eps) == ("adamw8bit", 1e-4, 1e-4, (0.9, 0.999), 1e-6)
    assert (t.lr_scheduler, t.warmup_steps, t.max_grad_norm) == ("constant", 0, 1.0)
    assert (t.timestep_type, t.timestep_bias, t.caption_dropout) == ("linear", "balanced", 0.05)
    assert (t.ema.enabled, t.dop.enabled, t.differential_guidance.enabled) == (False, False, False)
    assert (params.multistage.switch_every, params.multistage.train_high_noise, params.multistage.train_low_noise) == (
        10, True, True)
    q = params.quantization
    assert (q.transformer, q.text_encoder, q.recovery.source) == (
        "uint4", "qfloat8", "ostris/accuracy_recovery_adapters/wan22_14b_t2i_torchao_uint4.safetensors")
    assert (params.model.dtype, params.model.low_vram) == ("bf16", True)
    ds = params.datasets["boats"]
    assert (ds.bucket.resolutions, ds.bucket.num_frames, ds.captions.extension) == ([512, 768, 1024], [1], "txt")
    s = params.sample
    assert (s.width, s.height, s.fps, s.seed, s.guidance_scale, s.steps, s.every_checkpoint) == (
        1024, 1024, 16, 42, 3.5, 25, 1)
    assert parse_params(yaml.safe_load(dump_params(params))) == params


def test_linear_alpha_is_ignored_as_in_ai_toolkit(tmp_path):
    """toolkit/lora_special.py, LoRASpecialNetwork.__init__: for transformer models (Wan)
    `peft_format` is forced on and then `self.alpha = self.lora_dim`: linear_alpha never scales."""
    params, unmapped = _import(tmp_path, network={"linear": 16, "linear_alpha": 1})
    assert (params.network.rank, params.network.alpha) == (16, 16.0)
    assert unmapped[0] == ("network.linear_alpha=1 (AI Toolkit's Wan LoRA is peft-format: alpha = rank, update "
                           "scale 1, whatever linear_alpha says; imported as network.alpha 16.0)")


@pytest.mark.parametrize(("train", "field", "want"), [
    ({"timestep_type": "sigmoid"}, "timestep_type", "sigmoid"),
    ({"content_or_style": "content"}, "timestep_bias", "high_noise"),
    ({"content_or_style": "style"}, "timestep_bias", "low_noise"),
])
def test_timestep_variants(tmp_path, train, field, want):
    """config_modules.TrainConfig: timestep_type and content_or_style as the example spells them
    (content draws small timestep indices, high noise: see wanlora.aitk's module doc)."""
    params, unmapped = _import(tmp_path, train)
    assert getattr(params.train, field) == want and unmapped == META_NOTES


def _torch_lrs(make, steps: int, lr: float = 1.0) -> list[float]:
    """The lr of each of `steps` optimizer steps of a torch scheduler, stepped as AI Toolkit steps
    it (BaseSDTrainProcess.run: `lr_scheduler.step(step_num)` once, then SDTrainer.hook_train_loop:
    `lr_scheduler.step()` after every step)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_scheduler_linear_is_torch_linearlr_ramping_up_from_a_third(tmp_path):
    """toolkit/scheduler.py get_lr_scheduler('linear') returns torch LinearLR(optimizer,
    total_iters=steps) (BaseSDTrainProcess.run sets total_iters = train.steps): start_factor 1/3,
    end_factor 1, so the rate rises from lr/3 to lr. Ours decayed to zero."""
    params, unmapped = _import(tmp_path, {"lr_scheduler": "linear", "steps": 40})
    assert unmapped == META_NOTES
    cfg = params.train
    want = _torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, total_iters=40), 40, lr=1e-4)
    got = [lr_at(k, cfg) for k in range(40)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[0] == pytest.approx(1e-4 / 3) and got[-1] > got[0]
    custom = _import(tmp_path, {"lr_scheduler": "linear", "steps": 40,
                                "lr_scheduler_params": {"start_factor": 1.0, "end_factor": 0.1}})[0].train
    want = _torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.1,
                                                                  total_iters=40), 40, lr=1e-4)
    assert [lr_at(k, custom) for k in range(40)] == pytest.approx(want, rel=1e-12)


def test_cosine_schedules_are_torch_cosine_annealing_over_the_run(tmp_path):
    """toolkit/scheduler.py: cosine is CosineAnnealingLR(T_max=total_iters) and cosine_with_restarts
    CosineAnnealingWarmRestarts(T_0=total_iters); total_iters = train.steps, so both are one
    cosine period from lr to 0 over the run."""
    steps = 30
    cosine = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps), steps)
    restarts = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=steps), steps)
    for name, want in (("cosine", cosine), ("cosine_with_restarts", restarts)):
        params, unmapped = _import(tmp_path, {"lr_scheduler": name, "steps": steps, "lr": 1.0})
        assert params.train.lr_scheduler == "cosine" and unmapped == META_NOTES
        assert [lr_at(k, params.train) for k in range(steps)] == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_warmup_keys(tmp_path):
    """AI Toolkit's only warm-up is `constant_with_warmup` (toolkit/scheduler.py: diffusers'
    get_constant_schedule_with_warmup, num_warmup_steps from lr_scheduler_params, 1000 when absent).
    `lr_warmup_steps` appears nowhere in AI Toolkit's code or history: its run had no warm-up, so
    the import reports it rather than adding one."""
    from diffusers.optimization import get_constant_schedule_with_warmup

    params, unmapped = _import(tmp_path, {"lr_scheduler": "constant_with_warmup", "steps": 20, "lr": 1.0,
                                          "lr_scheduler_params": {"num_warmup_steps": 8}})
    assert (params.train.lr_scheduler, params.train.warmup_steps) == ("constant", 8) and unmapped == META_NOTES
    want = _torch_lrs(lambda o: get_constant_schedule_with_warmup(o, num_warmup_steps=8), 20)
    got = [lr_at(k, params.train) for k in range(20)]
    # ours never spends a step at lr 0: its warm-up is AI Toolkit's one step earlier (README)
    assert got[:8] == pytest.approx(want[1:9]) and got[8:] == want[8:] == [1.0] * 12
    default = _import(tmp_path, {"lr_scheduler": "constant_with_warmup"})[0]
    assert default.train.warmup_steps == 1000
    params, unmapped = _import(tmp_path, {"lr_warmup_steps": 100})
    assert params.train.warmup_steps == 0
    assert unmapped[0].startswith("train.lr_warmup_steps=100 (AI Toolkit never reads this key, so its run had no "
                                  "warm-up; not applied.")


def test_schedulers_ai_toolkit_cannot_run_are_reported(tmp_path):
    """toolkit/scheduler.py: 'step' builds StepLR(..., total_iters=...) and any other name goes to
    diffusers' schedule functions with total_iters; both raise, so AI Toolkit stops on them."""
    for name in ("step", "polynomial"):
        params, unmapped = _import(tmp_path, {"lr_scheduler": name})
        assert params.train.lr_scheduler == "constant"
        assert unmapped[0].startswith(f"train.lr_scheduler='{name}' (not supported (AI Toolkit")


def test_optimizer_params_and_eps(tmp_path):
    """toolkit/optimizer.py get_optimizer: AdamW and AdamW8bit are built with eps=1e-6 and
    **optimizer_params (betas, weight_decay); an eps in optimizer_params collides with that keyword.
    The defaults are the optimizers' own (betas (0.9, 0.999), weight decay 0.01)."""
    params, unmapped = _import(tmp_path, {"optimizer": "adamw",
                                          "optimizer_params": {"betas": [0.9, 0.99], "weight_decay": 0.05}})
    t = params.train
    assert (t.optimizer, t.betas, t.eps, t.weight_decay) == ("adamw", (0.9, 0.99), 1e-6, 0.05) and unmapped == META_NOTES
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], t)
    assert (opt.defaults["betas"], opt.defaults["eps"], opt.defaults["weight_decay"]) == ((0.9, 0.99), 1e-6, 0.05)
    params, unmapped = _import(tmp_path, {"optimizer_params": {"eps": 1e-8}})
    assert params.train.eps == 1e-8 and "multiple values for keyword argument eps" in unmapped[0]
    bare = _import(tmp_path, {"optimizer": "adamw", "optimizer_params": {}})[0].train
    assert (bare.betas, bare.eps, bare.weight_decay) == ((0.9, 0.999), 1e-6, 0.01)


def test_our_adam_defaults_are_ai_toolkits():
    """toolkit/optimizer.py: eps=1e-6 for adamw and adamw8bit (torch's default is 1e-8)."""
    for name in ("adamw", "adamw8bit"):
        opt = build_optimizer([torch.nn.Parameter(torch.zeros(4096))], TrainConfig(optimizer=name))
        assert (opt.defaults["eps"], tuple(opt.defaults["betas"])) == (1e-6, (0.9, 0.999)), name


def _adamw_run(grads: list[list[torch.Tensor]], reduce: str, clip: float, eps: float) -> torch.Tensor:
    p = torch.nn.Parameter(torch.linspace(-0.2, 0.2, 64, dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=1e-3, eps=eps, weight_decay=0.01)
    for micro in grads:
        total = torch.stack(micro).sum(0)
        p.grad = total if reduce == "sum" else total / len(micro)
        torch.nn.utils.clip_grad_norm_([p], clip)
        opt.step()
    return p.detach()


def test_accumulation_import_reproduces_summed_gradients(tmp_path):
    """extensions_built_in/sd_trainer/SDTrainer.py hook_train_loop: each of the accumulated
    micro-batches is back-propagated unscaled (the gradients add up) and the sum is clipped at
    max_grad_norm; wanlora averages them. For Adam the two agree exactly when eps and the clipping
    norm are divided by N, which is what the import does."""
    params, _ = _import(tmp_path, {"gradient_accumulation": 4, "optimizer": "adamw"})
    assert (params.train.gradient_accumulation, params.train.eps, params.train.max_grad_norm) == (4, 2.5e-7, 0.25)
    g = torch.Generator().manual_seed(0)
    # gradients near eps (where eps matters), and sums whose norm straddles max_grad_norm 1.0
    for scale in [lambda: 1e-6, lambda: float(torch.rand((), generator=g)) / 8 + 1 / 32]:
        grads = [[torch.randn(64, generator=g, dtype=torch.float64) * scale() for _ in range(4)] for _ in range(12)]
        theirs = _adamw_run(grads, "sum", 1.0, 1e-6)
        ours = _adamw_run(grads, "mean", params.train.max_grad_norm, params.train.eps)
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-8)  # exact but for clip_grad_norm_'s own +1e-6
        unscaled = _adamw_run(grads, "mean", 1.0, 1e-6)
        assert not torch.allclose(unscaled, theirs, rtol=0, atol=1e-6)


def test_a_step_holding_both_experts_scales_by_each_experts_share(tmp_path):
    """SDTrainer.hook_train_loop with switch_boundary_every 1 and accumulation 4 alternates the
    experts inside the step: each expert's LoRA gets the sum of its own 2 micro-batch gradients
    (the other expert's pass leaves it untouched), and the EMA then updates both experts at every
    optimizer step, as ours does when both step: decay as written."""
    params, unmapped = _import(tmp_path, {"gradient_accumulation": 4, "switch_boundary_every": 1, "optimizer": "adamw",
                                          "ema_config": {"use_ema": True}})
    t = params.train
    assert (t.gradient_accumulation, params.multistage.switch_every, t.eps, t.max_grad_norm) == (4, 1, 5e-7, 0.5)
    assert t.ema.decay == 0.999 and unmapped == META_NOTES


def test_legacy_gradient_accumulation_steps_sees_the_same_samples(tmp_path):
    """jobs/process/BaseSDTrainProcess.py run: with gradient_accumulation_steps N each of the
    `steps` loop iterations takes one batch and the optimizer steps only every N iterations
    (grad_accumulation_step counter), so 2000 steps at N=4 are 500 optimizer steps of 4 batches;
    saving and sampling count iterations. Only whole accumulations are applied."""
    params, unmapped = _import(tmp_path, {"gradient_accumulation_steps": 4, "optimizer": "adamw"})
    t = params.train
    assert (t.gradient_accumulation, t.steps, t.batch_size) == (4, 500, 1)
    assert t.steps * t.gradient_accumulation * t.batch_size == 2000  # samples seen, as in AI Toolkit
    assert (params.save.every, params.sample.every_checkpoint) == (62, 1)  # 250 / 4 iterations
    assert (t.eps, t.max_grad_norm) == (2.5e-7, 0.25)
    odd, notes = _import(tmp_path, {"gradient_accumulation_steps": 3, "steps": 1000})
    assert odd.train.steps == 333 and any(n.startswith("train.steps=1000 (AI Toolkit applies only whole") for n in notes)


def test_dop_variant(tmp_path):
    """config_modules.TrainConfig: diff_output_preservation, _multiplier, _class, as SDTrainer uses them."""
    params, unmapped = _import(tmp_path, {"diff_output_preservation": True, "diff_output_preservation_multiplier": 0.8,
                                          "diff_output_preservation_class": "boat"}, trigger_word="h4rb0r")
    d = params.train.dop
    assert (d.enabled, d.multiplier, d.preservation_class, params.job.trigger_word) == (True, 0.8, "boat", "h4rb0r")
    assert unmapped == META_NOTES


def test_ema_variants(tmp_path):
    """toolkit/config_modules.py EMAConfig: decay 0.999 by default; BaseSDTrainProcess.setup_ema
    averages every parameter of the optimizer and SDTrainer.hook_train_loop updates it after each
    optimizer step (toolkit/ema.py update: s -= (1 - d)(s - p)). With the example's switch every 10
    the waiting expert's average still moves each step, which ours does not: reported."""
    params, unmapped = _import(tmp_path, {"ema_config": {"use_ema": True}})
    assert (params.train.ema.enabled, params.train.ema.decay) == (True, 0.999)
    assert unmapped[0].startswith("train.ema_config.ema_decay=0.999 (AI Toolkit also moves the waiting expert's")
    alternate, notes = _import(tmp_path, {"ema_config": {"use_ema": True, "ema_decay": 0.99}, "switch_boundary_every": 1})
    assert alternate.train.ema.decay == pytest.approx(0.99 ** 2) and notes == META_NOTES
    one, notes = _import(tmp_path, {"ema_config": {"use_ema": True}}, model={"model_kwargs": {"train_low_noise": False}})
    assert one.train.ema.decay == 0.999 and notes == META_NOTES
    assert EmaConfig().decay == 0.999


def test_alternating_experts_ema_equals_ai_toolkits_at_decay_squared(monkeypatch):
    """toolkit/ema.py ExponentialMovingAverage.update over both experts' LoRA at every optimizer
    step, the experts taking turns each step, against our `Ema` of each expert updated at its own
    steps with d^2: the same average for each expert once the other has stepped after it."""
    import wanlora.train.lora as lora

    monkeypatch.setattr(lora, "lora_state_dict", lambda holder: {"w": holder.w})  # one tensor per expert
    d = 0.9
    g = torch.Generator().manual_seed(1)
    holders = {e: torch.nn.Module() for e in ("high", "low")}
    for h in holders.values():
        h.w = torch.zeros(8)
    theirs = {e: h.w.clone() for e, h in holders.items()}  # AI Toolkit: p.clone() at setup
    ours = {e: lora.Ema(h, d * d) for e, h in holders.items()}
    for step in range(12):
        active, idle = ("high", "low") if step % 2 == 0 else ("low", "high")
        holders[active].w += torch.randn(8, generator=g)
        for e in theirs:  # every parameter, every optimizer step
            theirs[e] -= (1 - d) * (theirs[e] - holders[e].w)
        ours[active].update(holders[active])
        assert torch.allclose(ours[idle].shadow["w"], theirs[idle], rtol=0, atol=1e-6), (step, idle)
    assert not torch.allclose(ours["low"].shadow["w"], theirs["low"], atol=1e-3)  # just stepped: half a pair apart
