"""wanlora's own training step at full Wan 2.2 A14B size, one configuration per process.

The step is the train stage's code path: `wanlora.train.lora.add_lora` on each expert,
`wanlora.models.accel.apply_accel` (checkpointing mode, regional compile, SDPA backend),
`wanlora.train.optim.build_optimizer` (params' optimizer, adamw8bit by default),
`wanlora.train.experts.ExpertSchedule` / `ExpertPlacer` (which expert trains, where the other
waits), `wanlora.train.step.training_step` (noise, predict, loss, backward), gradient clipping
and the optimizer step. Weights are random (`wanlora.models.geometry.build_transformer`), inputs
are random latents and a 512-token padded text embedding.

    python -m bench.train_step CONFIG [--tiny] [--profile] [--steps N] [--warmup N]
    python -m bench.train_step --list
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.common import (
    Shape, append_row, common_args, device_and_dtype, failed_row, geometry, make_row,
    random_batch, reset_peak, step_counts, sync, time_steps, variant_of, write_profile,
)
from wanlora.config import parse_params
from wanlora.models.accel import AccelSettings, apply_accel, park_frozen
from wanlora.models.geometry import build_transformer
from wanlora.models.quant import enable_fp8_matmul, quantize_transformer
from wanlora.train.experts import ExpertPlacer, ExpertSchedule
from wanlora.train.lora import add_lora
from wanlora.train.optim import build_optimizer
from wanlora.train.step import StepBatch, training_step
from wanlora.train.timesteps import expert_band

BOUNDARY = 0.875


@dataclass(frozen=True)
class BenchConfig:
    """One row of the table: clip size, experts, where they live, and the levers."""

    shape: Shape
    experts: tuple[str, ...] = ("high", "low")
    switch_every: int = 1
    low_vram: bool = False
    quant: str = "none"
    checkpointing: str = "selective"
    compile: bool = True
    optimizer: str = "adamw8bit"
    fp8_matmul: bool = False
    activation_offloading: bool = False
    lora: str = "masters"  # `lora_variant`: the product's float32 masters, or bf16 / peft_fp32 to compare
    attention_backend: str = "auto"
    variant: str = "t2v-a14b"  # i2v-a14b: 36 input channels; ti2v-5b: the one 5B transformer ("main")
    i2v_5b: bool = False  # TI2V 5B trained image-to-video (first latent frame clean, out of the loss)
    warmup: int | None = None
    steps: int | None = None
    note: str = ""


S33 = Shape(33, 512, 512)
S81 = Shape(81, 480, 832)
S81_1024 = Shape(81, 1024, 1024)
S121_720P = Shape(121, 704, 1280)  # TI2V 5B's own size: 27,280 tokens through its 16x VAE

CONFIGS: dict[str, BenchConfig] = {
    # the naive baseline's setting with our step and levers: one expert, apples to apples
    "ours_33f_1expert": BenchConfig(S33, experts=("high",)),
    "ours_33f_1expert_nocompile": BenchConfig(S33, experts=("high",), compile=False),
    "ours_33f_1expert_fullckpt": BenchConfig(S33, experts=("high",), checkpointing="full"),
    # issue 7 targets
    "33f_bf16_both_sw1": BenchConfig(S33, note="both experts resident, switch_every 1"),
    "33f_bf16_sw10_host": BenchConfig(S33, switch_every=10, low_vram=True, warmup=2, steps=10,
                                      note="inactive expert parked in host memory; the 9th timed step switches"),
    "81f_bf16_1expert": BenchConfig(S81, experts=("high",), warmup=2, steps=3),
    "81f_bf16_1expert_fullckpt": BenchConfig(S81, experts=("high",), checkpointing="full", warmup=2, steps=3),
    "81f_1024_bf16_fullckpt": BenchConfig(S81_1024, experts=("high",), checkpointing="full", warmup=1, steps=1),
    "81f_1024_float8_fullckpt": BenchConfig(S81_1024, experts=("high",), quant="float8", checkpointing="full",
                                            compile=False, warmup=0, steps=1,
                                            note="does it fit: one uncompiled step, no warm-up"),
    "81f_float8_both_sw1": BenchConfig(S81, quant="float8", warmup=2, steps=4, note="both experts resident"),
    # 24 GB tier: one expert on the card (the other waits in host memory), 4-bit or float8 base
    "33f_float8_1expert_fullckpt": BenchConfig(S33, experts=("high",), quant="float8", checkpointing="full"),
    "33f_uint4_1expert_fullckpt": BenchConfig(S33, experts=("high",), quant="uint4", checkpointing="full"),
    "33f_float8_1expert": BenchConfig(S33, experts=("high",), quant="float8"),
    # second session's levers: fused torch AdamW, fp8 tensor-core matmuls, activation offloading
    "33f_bf16_both_sw1_adamw": BenchConfig(S33, optimizer="adamw", note="both resident, switch_every 1"),
    "33f_fp8mm_both_sw1_adamw": BenchConfig(S33, quant="float8", fp8_matmul=True, optimizer="adamw",
                                            note="both resident, switch_every 1"),
    "33f_bf16_sw10_host_adamw": BenchConfig(S33, switch_every=10, low_vram=True, optimizer="adamw", warmup=2, steps=25,
                                            note="inactive expert in host memory; the 9th and 19th timed steps switch"),
    "81f_bf16_1expert_adamw": BenchConfig(S81, experts=("high",), optimizer="adamw", warmup=2, steps=3),
    "81f_fp8mm_1expert_adamw": BenchConfig(S81, experts=("high",), quant="float8", fp8_matmul=True,
                                           optimizer="adamw", warmup=2, steps=3),
    "81f_float8_sel_offload": BenchConfig(S81, experts=("high",), quant="float8", optimizer="adamw",
                                          activation_offloading=True, warmup=2, steps=3,
                                          note="offloading where selective also fits without it: same losses?"),
    "81f_float8_1expert_adamw": BenchConfig(S81, experts=("high",), quant="float8", optimizer="adamw", warmup=2, steps=3),
    "81f_1024_bf16_sel_offload": BenchConfig(S81_1024, experts=("high",), optimizer="adamw", activation_offloading=True,
                                             warmup=1, steps=2, note="selective ckpt, activations in host memory"),
    "81f_1024_fp8mm_sel_offload": BenchConfig(S81_1024, experts=("high",), quant="float8", fp8_matmul=True,
                                              optimizer="adamw", activation_offloading=True, warmup=1, steps=2,
                                              note="selective ckpt, activations in host memory, fp8 matmuls"),
    # H200 session (issue 20): what the LoRA's precision costs, same levers (`lora_variant`)
    "33f_bf16_both_sw1_adamw_bf16lora": BenchConfig(S33, optimizer="adamw", lora="bf16",
                                                    note="both resident, switch_every 1, bf16 LoRA weights"),
    "33f_bf16_both_sw1_adamw_fp32lora": BenchConfig(S33, optimizer="adamw", lora="peft_fp32",
                                                    note="both resident, switch_every 1, peft's float32 LoRA"),
    "33f_fp8mm_both_sw1_adamw_fp32lora": BenchConfig(S33, quant="float8", fp8_matmul=True, optimizer="adamw",
                                                     lora="peft_fp32", note="both resident, switch_every 1, peft's float32 LoRA"),
    "81f_fp8mm_1expert_adamw_fp32lora": BenchConfig(S81, experts=("high",), quant="float8", fp8_matmul=True,
                                                    optimizer="adamw", lora="peft_fp32", warmup=2, steps=3),
    "81f_1024_float8_sel_offload": BenchConfig(S81_1024, experts=("high",), quant="float8", optimizer="adamw",
                                               activation_offloading=True, warmup=1, steps=2,
                                               note="selective ckpt, activations in host memory"),
    # issue 20, part 4: the other variants (naive baseline: bench/baseline_naive.py --variant)
    "33f_i2v_bf16_1expert_adamw": BenchConfig(S33, experts=("high",), optimizer="adamw", variant="i2v-a14b"),
    "33f_i2v_bf16_both_sw1_adamw": BenchConfig(S33, optimizer="adamw", variant="i2v-a14b",
                                               note="both resident, switch_every 1"),
    "81f_i2v_fp8mm_1expert_adamw": BenchConfig(S81, experts=("high",), quant="float8", fp8_matmul=True,
                                               optimizer="adamw", variant="i2v-a14b", warmup=2, steps=3),
    "121f_5b_bf16_adamw": BenchConfig(S121_720P, experts=("main",), optimizer="adamw", variant="ti2v-5b",
                                      warmup=2, steps=3, note="TI2V 5B text-to-video, a timestep per token"),
    "121f_5b_bf16_adamw_i2v": BenchConfig(S121_720P, experts=("main",), optimizer="adamw", variant="ti2v-5b",
                                          i2v_5b=True, warmup=2, steps=3, note="TI2V 5B image-to-video: first latent frame clean"),
}


def lora_variant(model: torch.nn.Module, params: list[torch.nn.Parameter], mode: str,
                 dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """The LoRA `add_lora` made (float32 masters, bf16 compute: "masters"), or one to compare with.

    "bf16": the weights in the compute dtype, as the product kept them before float32 masters.
    "peft_fp32": peft's own float32 LoRA (AI Toolkit's): each adapted linear casts its input to
    float32 and runs the LoRA matmuls there.
    """
    from peft.tuners.lora import LoraLayer

    if mode == "bf16":
        for p in params:
            p.data = p.data.to(dtype)
    elif mode == "peft_fp32":
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.cast_input_dtype_enabled = True
                for linears in (layer.lora_A, layer.lora_B):
                    for linear in linears.values():
                        linear.__class__ = torch.nn.Linear
    elif mode != "masters":
        raise ValueError(f"lora={mode!r}: use masters, bf16 or peft_fp32")
    return params


def _batch(cfg: dict, shape: Shape, expert: str, step: int, device: torch.device, dtype: torch.dtype,
           clean: dict[str, torch.Tensor], i2v_5b: bool = False) -> StepBatch:
    """Fresh noise and an in-band timestep each step, drawn on the device (no host round trip).
    I2V A14B's condition channels come with `clean`; TI2V 5B gets a timestep per token
    (`clean_first`: its image-to-video mode when `i2v_5b`)."""
    g = torch.Generator(device=device).manual_seed(1000 + step)
    lo, hi = expert_band(expert, BOUNDARY)  # type: ignore[arg-type]
    t = lo + (hi - lo) * torch.rand(1, device=device, generator=g)
    noise = torch.randn(clean["latent"].shape, device=device, dtype=dtype, generator=g)
    first = torch.tensor([i2v_5b], device=device) if variant_of(cfg).expand_timesteps else None
    return StepBatch(latents=clean["latent"], noise=noise, timesteps=t, embeds=clean["text"],
                     condition=clean.get("condition"), clean_first=first)


def build(name: str, bc: BenchConfig, tiny: bool):
    """Experts with LoRA and levers, their optimizers, schedule and placer; and the step function."""
    cfg = geometry(tiny, bc.variant)
    device, dtype = device_and_dtype(tiny)
    multistage = {} if bc.experts == ("main",) else {  # TI2V 5B: one transformer, no multistage keys
        "train_high_noise": "high" in bc.experts, "train_low_noise": "low" in bc.experts,
        "switch_every": bc.switch_every}
    params = parse_params({
        "model": {"low_vram": bc.low_vram, "compile": bc.compile and device.type == "cuda",
                  "activation_offloading": bc.activation_offloading},
        "quantization": {"transformer": bc.quant, "fp8_matmul": bc.fp8_matmul},
        "train": {"optimizer": bc.optimizer},
        "multistage": multistage,
    })
    settings = AccelSettings(checkpointing=bc.checkpointing, compile=params.model.compile,  # type: ignore[arg-type]
                             activation_offloading=params.model.activation_offloading,
                             attention_backend=bc.attention_backend)  # type: ignore[arg-type]
    models, optims, lora = {}, {}, {}
    for i, e in enumerate(bc.experts):
        m = build_transformer(cfg, dtype, device, seed=i)
        quantize_transformer(m, bc.quant, params.quantization.group_size)  # a no-op for "none"
        if params.quantization.fp8_matmul:
            enable_fp8_matmul(m)
        lora[e] = lora_variant(m, add_lora(m, params.network), bc.lora, dtype)
        apply_accel(m, settings)
        m.train()
        optims[e] = build_optimizer(lora[e], params.train)
        models[e] = m
        if bc.low_vram and i == 0 and len(bc.experts) > 1 and device.type == "cuda":
            park_frozen(m, "host", device, False)  # make room for the next one, as the trainer's placer would
    # Residency is the configuration's, not `both_fit`'s guess (a fixed 35% reserve says two bf16
    # experts never fit on 80 GB, though at 33f they do): the table measures what each setting costs.
    placer = ExpertPlacer(models, device, fit=not bc.low_vram)
    schedule = ExpertSchedule(tuple(bc.experts), bc.switch_every)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    clean = random_batch(cfg, bc.shape, device, dtype)
    max_norm = params.train.max_grad_norm

    losses: list[float] = []

    def step(i: int) -> None:
        e = schedule.next_expert(gen)
        model = placer.activate(e)
        out = training_step(model, _batch(cfg, bc.shape, e, i, device, dtype, clean, bc.i2v_5b),
                            dtype=dtype)
        losses.append(out.total)  # a non-finite loss skips backward: such a step times a forward only
        schedule.record(1)
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(lora[e], max_norm)
        optims[e].step()
        optims[e].zero_grad(set_to_none=True)
        if (upcoming := schedule.upcoming()) is not None:
            placer.prepare(upcoming)  # as the train loop: the copy queued after the optimizer step

    return cfg, device, step, losses


def run(name: str, bc: BenchConfig, args) -> None:
    cfg = geometry(args.tiny, bc.variant)
    device, _ = device_and_dtype(args.tiny)
    shape = bc.shape if not args.tiny else Shape(5, 32, 32)
    bc = replace(bc, shape=shape)
    warmup, steps = step_counts(args, bc.warmup, bc.steps)
    t0 = time.perf_counter()
    try:
        cfg, device, step, losses = build(name, bc, args.tiny)
        sync(device)
        build_s = time.perf_counter() - t0
        print(f"{name}: built in {build_s:.1f} s", flush=True)
        reset_peak(device)
        times = time_steps(step, warmup, steps, device)
        compiled = bc.compile and device.type == "cuda"
        levers = (f"ckpt={bc.checkpointing} compile={compiled} quant={bc.quant}{'+fp8mm' if bc.fp8_matmul else ''} "
                  f"opt={bc.optimizer}{' act_offload' if bc.activation_offloading else ''}"
                  f" lora={bc.lora}{' attn=' + bc.attention_backend if bc.attention_backend != 'auto' else ''} "
                  f"experts={'+'.join(bc.experts)}")
        bad = [k for k, v in enumerate(losses) if not math.isfinite(v)]
        invalid = f"INVALID: non-finite loss from step {bad[0]} on (backward skipped), times are not steps" if bad else ""
        row = make_row(name, cfg, shape, times, device, note="; ".join(x for x in (invalid, levers, bc.note) if x),
                       extra={"build_s": build_s, "mean_s": sum(times) / len(times), "losses": losses})
        if bad:
            row = replace(row, s_step=None, mfu=None)
        if args.profile:
            write_profile(step, device, args.out / f"profile_{name}.md")
    except torch.OutOfMemoryError as err:
        row = failed_row(name, cfg, shape, device, err)
    append_row(args.out, row)


def quant_cache(mode: str, args) -> None:
    """Seconds to quantize one expert on the GPU, write the cache, and load it back into a fresh
    expert (the loader's bf16 build is not timed: with real weights it is a disk read of 28 GB).

    The page cache is dropped before the load when the OS lets us, so the read comes from disk.
    """
    import tempfile

    from wanlora.models.quant import DEFAULT_EXCLUDE, cache_key, load_quantized, save_quantized

    cfg = geometry(args.tiny)
    device, dtype = device_and_dtype(args.tiny)
    key = cache_key({"source": "random", "seed": 0}, mode, 64, DEFAULT_EXCLUDE, None)
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as folder:
        m = build_transformer(cfg, dtype, device)
        sync(device)
        t0 = time.perf_counter()
        quantize_transformer(m, mode)
        sync(device)
        t1 = time.perf_counter()
        save_quantized(m, folder, key)
        t2 = time.perf_counter()
        del m
        fresh = build_transformer(cfg, dtype, device, seed=1)
        dropped = "page cache kept"
        if device.type == "cuda":  # the lent GPU machine only: never on a shared workstation
            try:
                os.system("sync")
                Path("/proc/sys/vm/drop_caches").write_text("1\n")
                dropped = "page cache dropped"
            except OSError:
                pass
        sync(device)
        t3 = time.perf_counter()
        load_quantized(fresh, folder, key)
        sync(device)
        t4 = time.perf_counter()
    times = {"quantize_s": t1 - t0, "save_s": t2 - t1, "load_s": t4 - t3}
    note = f"quantize {times['quantize_s']:.1f} s, save {times['save_s']:.1f} s, load {times['load_s']:.1f} s ({dropped})"
    row = make_row(f"quant_cache_{mode}", cfg, Shape(1, 16, 16), [times["quantize_s"] + times["load_s"]], device,
                   note=note, extra=times)
    append_row(args.out, replace(row, shape="-", tokens=0, mfu=None))


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="configuration name (--list shows them)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--cache-dir", default=None, help="where quant_cache_* writes its temporary cache")
    args = p.parse_args()
    if args.list or not args.config:
        print("\n".join(f"{k}: {v}" for k, v in CONFIGS.items()))
        return
    if args.config.startswith("quant_cache_"):
        quant_cache(args.config.removeprefix("quant_cache_"), args)
        return
    if args.config not in CONFIGS:
        sys.exit(f"unknown configuration {args.config!r}; known: {', '.join(CONFIGS)}")
    run(args.config, CONFIGS[args.config], args)


if __name__ == "__main__":
    main()
