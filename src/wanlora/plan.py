"""`wanlora plan`: will this params.yaml fit on my GPU, and how long is a step?

Peak memory and seconds per micro-step are predicted per expert from the geometry of the Wan 2.2
variant (A14B, or TI2V 5B with its activations scaled from the A14B calibration; any expert
config) and the params: base weights by quantization mode, LoRA and optimizer
state, activations per token under the checkpointing mode, and which experts stay on the GPU.
The per-token activation sizes and the throughput constants are calibrated on measurements, not
derived: they come from bench/RESULTS.md (GPU section), and tests/test_plan.py checks the
predictions against that table (within 15%). Change a constant only together with a new
measurement there.

Calibration: memory on one NVIDIA H100 80GB HBM3 (2026-11-25); step times on one NVIDIA H200
(2026-12-01), both with torch 2.11+cu130, diffusers 0.42.1, peft 0.21.2, full-size random
experts, LoRA rank 16 on the six default targets. The H100 rows stay within 15% too (the H200 has
the H100's compute; its faster memory shows in the elementwise work, a few percent). Times are
for that card; scale by your GPU's bf16 matmul rate otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Literal

from wanlora.config import Params
from wanlora.models.activation_offload import PREFETCH_BYTES
from wanlora.models.geometry import CONFIGS, WAN22_A14B, forward_flops, latent_shape
from wanlora.models.variant import LEGACY_VARIANT, VARIANTS, Variant, detect_variant

GIB = 1024**3
TEXT_LEN = 512

# ------------------------------------------- calibration (memory: H100 2026-11-25; time: H200 2026-12-01)
#: Activation GiB per video token held at the step's peak, per checkpointing mode, plus a fixed part.
#: selective: slope of 36.8 GiB (9,216 tokens) -> 61.6 GiB (32,760 tokens), one bf16 expert,
#: compiled. full: the float8 runs at 33f@512² (21.35 GiB, 9,216 tokens) and 81f@1024² (74.0 GiB,
#: 86,016 tokens) less weights and LoRA: 7.4 and 60.1 GiB, a slope of 0.686e-3 and 1.08 GiB that
#: does not grow with the clip (the one block being recomputed). A slope through the 33f run alone
#: (0.80e-3) overstated the 81f@1024² run by 9 GiB. none: not measured; an estimate from the tensors
#: a Wan block saves (~250 KB/token/block).
ACT_GIB_PER_TOKEN = {"selective": 1.056e-3, "full": 0.686e-3, "none": 9.3e-3}
ACT_FIXED_GIB = {"selective": 0.0, "full": 1.08, "none": 0.0}
#: With `model.activation_offloading` what stays on the GPU is one block's working set, which grows
#: with the tokens, and the prefetch window (`PREFETCH_BYTES` of fetched activations waiting for
#: backward). Fitted on two float8, selective, compiled runs on an H100 (third session): activations
#: (peak less weights and LoRA state) of 12.44 GiB at 81f@832x480 (32,760 tokens) and 29.33 GiB at
#: 81f@1024² (86,016 tokens): a slope of 0.317e-3 GiB per token and 2.05 GiB at zero tokens, the
#: window's 2 GiB.
ACT_OFFLOADED_GIB_PER_TOKEN = 0.317e-3
#: Effective rates in TFLOP/s of the three work kinds the step time is made of. Linear work counts
#: forward + input-gradient backward + recomputed forward (elementwise work rides along); attention
#: counts forward-equivalents (backward = 2.5 forwards in a flash kernel that recomputes P). On the
#: H200 (bench/RESULTS.md, H200 section): attention 560, bracketed by the kernel-level timings of
#: cuDNN's bf16 flash attention (forward 560-682, backward 513-528 TFLOP/s at 9,216-32,760 tokens),
#: then compiled linears fitted on the two compiled selective bf16 runs (1.699 s at 9,216 tokens,
#: 9.740 s at 32,760: 551, the H100's fit too) and eager on the naive run (2.372 s at 9,216).
LINEAR_TFLOPS = {"compiled": 551.0, "eager": 373.0}
#: With `quantization.fp8_matmul` the forward and recomputed forward linears run on fp8 tensor cores
#: (the input-gradient backward stays bf16). Effective rate of those two passes, per-token activation
#: quantization included, fitted on the H200's two fp8-matmul runs (1.479 s at 33f@512² both resident,
#: 9.041 s at 81f@832x480): far below the 2x the fp8 units promise, because each linear first reads
#: its input once more to find and apply the per-token scales.
LINEAR_FP8_TFLOPS = 747.0
ATTENTION_TFLOPS = 560.0
#: Optimizer step of one expert's LoRA (bitsandbytes AdamW8bit: ~800 tensors, one launch each): the
#: profiler's 85-95 ms; torch AdamW is foreach and far cheaper (not measured, ~10 ms assumed).
OPTIMIZER_S = {"adamw8bit": 0.09, "adamw": 0.01, "adafactor": 0.03}
#: Seconds per GiB of an expert switch when the inactive expert waits in host memory. The trainer
#: parks experts with `accel.park_frozen`: after a one-time host mirror, parking is free and
#: fetching is one pinned host-to-device copy on the compute stream. Measured (second session,
#: `33f_bf16_sw10_host_adamw`): a steady-state switch of a 26.6 GiB bf16 expert added 0.561 s to its
#: step (2.277 s against a 1.716 s median), ~47 GB/s. The first fetch of each expert in a run costs
#: more (13 s once), which a run of thousands of steps does not notice.
FETCH_S_PER_GIB = 0.0211
#: Memory max_memory_allocated does not show: CUDA context, cuBLAS/cuDNN workspaces, fragmentation.
RESERVE_GIB = 2.0
#: Above this share of the run's time `plan` suggests cheaper previews (issue 19's budget).
PREVIEW_SHARE = 0.05

# ------------------------------------------- several GPUs (`--gpus N`; bench/RESULTS.md, multi-GPU sections)
#: Throughput of N GPUs over N x one GPU's, measured on two H100s with NVLink at 33f@512² (issue 9):
#: data-parallel 1.91x, expert-parallel 1.97x. Not measured at 4 or 8 GPUs.
PARALLEL_EFFICIENCY = {"data": 0.953, "expert": 0.983}
#: Sequence parallelism, NOT YET MEASURED ON A GPU (bench/RESULTS.md: "not yet run"). A model:
#: every block's self-attention moves q, k, v and its output through one all-to-all each, per
#: forward, backward and checkpointing recompute, at an assumed all-to-all rate per GPU over NVLink;
#: per-token activations and compute divide by N; the exchange keeps two extra copies of a block's
#: [tokens/N, dim] bf16 tensor alive at once (staged and received).
ALL_TO_ALL_GBPS = 200.0
EXCHANGE_COPIES = 2

#: Bytes per stored weight element of quantized linears (codes + scales/zero points).
QUANT_BYTES = {"none": 2.0, "float8": 1.0, "qfloat8": 1.0, "uint4": 0.5 + 3 / 64, "nf4": 0.5 + 4 / 64}
#: Optimizer state bytes per LoRA parameter: 8-bit or float32 moments (torch keeps them in the
#: parameter's dtype), Adafactor's factored rows and columns.
OPTIMIZER_BYTES = {"adamw8bit": 2.0, "adamw": 8.0, "adafactor": 0.1}
#: LoRA weight and gradient bytes per parameter: float32 masters (`wanlora.train.lora`).
LORA_BYTES = 8.0

Checkpointing = Literal["none", "full", "selective"]


# -------------------------------------------------------------------------------- geometry
def expert_parameters(config: dict[str, Any]) -> dict[str, int]:
    """Parameter counts of one expert: `block_linear` (the quantizable weight matrices of all blocks),
    `block_other` (their biases, norms, modulation tables), `outside` (embedders, head)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    f, layers = config["ffn_dim"], config["num_layers"]
    patch = config["patch_size"][0] * config["patch_size"][1] * config["patch_size"][2]
    linear = 8 * d * d + 2 * d * f
    other = 8 * d + (f + d) + 4 * d + (2 * d if config["cross_attn_norm"] else 0) + 6 * d
    freq, text = config["freq_dim"], config["text_dim"]
    outside = (
        patch * config["in_channels"] * d + d  # patch embedding
        + freq * d + d + d * d + d  # time embedder
        + d * 6 * d + 6 * d  # time projection
        + text * d + d + d * d + d  # text embedder
        + d * patch * config["out_channels"] + patch * config["out_channels"]  # head
        + 2 * d  # output modulation table
    )
    return {"block_linear": layers * linear, "block_other": layers * other, "outside": outside}


def lora_parameters(config: dict[str, Any], rank: int, targets: list[str]) -> int:
    """LoRA parameters in one expert: rank x (in + out) for each adapted linear of each block."""
    d, f = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"]
    shapes = {"to_q": (d, d), "to_k": (d, d), "to_v": (d, d), "to_out.0": (d, d),
              "ffn.net.0.proj": (d, f), "ffn.net.2": (f, d)}
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"network.target_modules {unknown}: the planner knows {sorted(shapes)}")
    per_block = sum(rank * sum(shapes[t]) * (2 if t in ("to_q", "to_k", "to_v", "to_out.0") else 1)
                    for t in targets)  # attention targets exist in attn1 and attn2
    return config["num_layers"] * per_block


def weight_gib(config: dict[str, Any], quant: str) -> float:
    """GiB of one expert's base on the GPU (quantized modes keep embedders and head in bf16)."""
    n = expert_parameters(config)
    scale_bytes = 4 * config["num_layers"] * (8 * config["num_attention_heads"] * config["attention_head_dim"]
                                              + config["ffn_dim"] + config["num_attention_heads"]
                                              * config["attention_head_dim"]) if quant != "none" else 0
    return (n["block_linear"] * QUANT_BYTES[quant] + 2 * (n["block_other"] + n["outside"]) + scale_bytes) / GIB


def plan_variant(params: Params) -> Variant:
    """The variant a plan is for, without downloading anything: `model.variant` when set; with
    `auto`, what a local model folder holds, else the official release `model.name_or_path`
    names, else T2V A14B (the planner's calibration model)."""
    if params.model.variant != "auto":
        return VARIANTS[params.model.variant]
    folder = Path(params.model.name_or_path).expanduser()
    if (folder / "model_index.json").is_file():
        return detect_variant(folder)
    by_hub = {v.hub_id.lower(): v for v in VARIANTS.values()}
    return by_hub.get(params.model.name_or_path.lower(), VARIANTS[LEGACY_VARIANT])


def activation_scale(config: dict[str, Any]) -> float:
    """Activations per token relative to the A14B the constants were measured on: they grow with
    depth x width. TI2V 5B (30 x 3072) is 0.45 of A14B (40 x 5120): an estimate scaled from the
    A14B calibration, not a measurement (5B rows belong to the GPU measurements)."""
    ref = WAN22_A14B["num_layers"] * WAN22_A14B["num_attention_heads"] * WAN22_A14B["attention_head_dim"]
    return config["num_layers"] * config["num_attention_heads"] * config["attention_head_dim"] / ref


def clip_tokens(frames: int, height: int, width: int, config: dict[str, Any] = WAN22_A14B, spatial: int = 8) -> int:
    _, f, h, w = latent_shape(frames, height, width, spatial=spatial)
    p = config["patch_size"]
    return (f // p[0]) * (h // p[1]) * (w // p[2])


def largest_clip(params: Params) -> tuple[int, int, int]:
    """(frames, height, width) of the biggest bucket any dataset can make: square at its largest
    resolution with its most frames. The step's peak is set by the biggest sample."""
    best = max(((max(d.bucket.num_frames), max(d.bucket.resolutions)) for d in params.datasets.values()),
               key=lambda fr: clip_tokens(fr[0], fr[1], fr[1]))
    return best[0], best[1], best[1]


# ------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class ExpertPlan:
    expert: str
    weights_gib: float
    lora_gib: float
    activations_gib: float
    s_per_step: float


@dataclass(frozen=True)
class PreviewPlan:
    """The previews' predicted cost (`wanlora.train.preview`): how many, seconds each, and their
    share of the run's time (training steps, switches and previews together)."""

    count: int
    seconds: float
    share: float


@dataclass(frozen=True)
class PlanResult:
    """What `wanlora plan` prints: per-expert memory and time, the peak, and what to change."""

    gpu_gib: float
    clip: tuple[int, int, int]
    tokens: int
    quantization: str
    checkpointing: Checkpointing
    compiled: bool
    resident: Literal["both", "one"]
    experts: tuple[ExpertPlan, ...]
    peak_gib: float
    fits: bool
    s_per_step: float
    switch_overhead: float
    previews: PreviewPlan | None = None
    device: str = "auto"
    suggestions: tuple[str, ...] = field(default_factory=tuple)
    gpus: int = 1
    sp: int = 1  # train.sequence_parallel: GPUs sharing one sample's tokens
    mode: Literal["one", "data", "expert"] = "one"  # how the replicas (gpus / sp) split the work
    samples_per_s: float = 0.0  # all GPUs together
    comm_s: float = 0.0  # of s_per_step: sequence-parallel all-to-alls (modelled, unmeasured)


def step_seconds(config: dict[str, Any], tokens: int, checkpointing: Checkpointing, compiled: bool,
                 optimizer: str, dop: bool = False, fp8_matmul: bool = False, expand_timesteps: bool = False) -> float:
    """Predicted seconds of one micro-step of one expert (forward, backward, optimizer); with
    `expand_timesteps` (TI2V 5B) the time embedding runs per token, and counts as linear work."""
    f = forward_flops(config, tokens, TEXT_LEN, expand_timesteps)
    lin, att = f["video_linear"] + (f["time_embed"] if expand_timesteps else 0.0), f["attention"]
    bf16 = LINEAR_TFLOPS["compiled" if compiled else "eager"] * 1e12
    forward = LINEAR_FP8_TFLOPS * 1e12 if fp8_matmul else bf16  # forward and recompute passes
    forward_passes = 1 if checkpointing == "none" else 2
    att_passes = 3.5 + (1.0 if checkpointing == "full" else 0.0)
    t = forward_passes * lin / forward + lin / bf16 + att_passes * att / (ATTENTION_TFLOPS * 1e12)
    if dop:  # the class prompt doubles the trained batch and adds a frozen forward for the prior
        t = 2 * t + lin / forward + att / (ATTENTION_TFLOPS * 1e12)
    return t + OPTIMIZER_S[optimizer]


def exchange_seconds(config: dict[str, Any], tokens: int, sp: int, checkpointing: Checkpointing,
                     dop: bool = False) -> float:
    """Modelled seconds of a micro-step's sequence-parallel all-to-alls (unmeasured, see
    ALL_TO_ALL_GBPS): 4 per block and pass, each sending (sp-1)/sp of a [tokens/sp, dim] bf16 tensor."""
    if sp == 1:
        return 0.0
    d = config["num_attention_heads"] * config["attention_head_dim"]
    passes = 2 + (0 if checkpointing == "none" else 1)  # forward, backward, recompute
    sent = 4 * passes * config["num_layers"] * (tokens / sp) * d * 2 * (sp - 1) / sp
    return sent * (2 if dop else 1) / (ALL_TO_ALL_GBPS * 1e9)


def preview_seconds(params: Params, config: dict[str, Any], compiled: bool, fetch_s: float,
                    variant: Variant = VARIANTS[LEGACY_VARIANT]) -> float:
    """Predicted seconds of one preview: per video (a prompt's; TI2V 5B renders each prompt twice,
    from text and from its start image), `preview_steps` forward passes of the model at the
    preview's tokens (two with guidance above 1: the negative prompt too), at the step model's
    forward rates, plus `fetch_s` for the expert it brings back. Derived from the calibrated
    constants, not measured on its own; the VAE decode of a short small clip is left out."""
    s = params.sample
    if not (s.preview and s.prompts):
        return 0.0
    f = forward_flops(config, clip_tokens(s.preview_num_frames, s.preview_height, s.preview_width, config), TEXT_LEN)
    forward = f["video_linear"] / (LINEAR_TFLOPS["compiled" if compiled else "eager"] * 1e12) + \
        f["attention"] / (ATTENTION_TFLOPS * 1e12)
    videos = len(s.prompts) * (2 if variant.expand_timesteps else 1)
    passes = videos * s.preview_steps * (2 if s.preview_guidance_scale > 1 else 1)
    return passes * forward + fetch_s


def _previews(params: Params, result: PlanResult, config: dict[str, Any], weights_gib: float,
              variant: Variant) -> PreviewPlan | None:
    """How many previews the run renders (every `preview_every`, else `save.every`, and the last
    step) and their share; None when there are none (off, no prompts, one A14B expert trained)."""
    ms, tr, s = params.multistage, params.train, params.sample
    both = len(variant.experts) == 1 or (ms.train_high_noise and ms.train_low_noise)  # TI2V 5B: its one
    if not (s.preview and s.prompts and both):
        return None
    every = params.preview_every
    count = tr.steps // every + (1 if tr.steps % every else 0)
    fetch = weights_gib * FETCH_S_PER_GIB if result.resident == "one" else 0.0
    each = preview_seconds(params, config, result.compiled, fetch, variant)
    training = tr.steps * tr.gradient_accumulation * result.s_per_step * (1 + result.switch_overhead)
    return PreviewPlan(count, each, count * each / (training + count * each))


def _predict(params: Params, gpu_gib: float, config: dict[str, Any], checkpointing: Checkpointing,
             quant: str, clip: tuple[int, int, int], offload: bool, variant: Variant, sp: int = 1,
             experts_per_gpu: int = 2) -> PlanResult:
    """One GPU's memory and step time; with `sp` GPUs sharing each sample's tokens, and at most
    `experts_per_gpu` experts on it (1 under expert-parallel); TI2V 5B: its one transformer."""
    ms, tr = params.multistage, params.train
    names = list(variant.experts if len(variant.experts) == 1 else ms.experts[:experts_per_gpu])  # as train's setup
    tokens = clip_tokens(*clip, config, variant.spatial_factor) * tr.batch_size
    compiled = params.model.compile
    w = weight_gib(config, quant)
    lora = lora_parameters(config, params.network.rank, params.network.target_modules)
    lora_g = lora * (LORA_BYTES + OPTIMIZER_BYTES[tr.optimizer]) / GIB
    held = tokens * (2 if tr.dop.enabled else 1) / sp  # the class prompt doubles the trained batch
    scale = activation_scale(config)
    act = ACT_FIXED_GIB[checkpointing] + ACT_GIB_PER_TOKEN[checkpointing] * scale * held
    if offload:
        act = min(act, ACT_OFFLOADED_GIB_PER_TOKEN * scale * held + PREFETCH_BYTES / GIB)
    if variant.expand_timesteps:  # the per-token modulation table every block reads: [tokens, 6, dim] bf16
        act += held * 6 * config["num_attention_heads"] * config["attention_head_dim"] * 2 / GIB
    if sp > 1:
        act += EXCHANGE_COPIES * held * config["num_attention_heads"] * config["attention_head_dim"] * 2 / GIB
    text = TEXT_LEN * config["text_dim"] * 2 * tr.batch_size / GIB
    fp8 = params.quantization.fp8_matmul and quant == "float8"
    compute = step_seconds(config, tokens, checkpointing, compiled, tr.optimizer, tr.dop.enabled, fp8,
                           variant.expand_timesteps)
    comm = exchange_seconds(config, tokens, sp, checkpointing, tr.dop.enabled)
    s = (compute - OPTIMIZER_S[tr.optimizer]) / sp + OPTIMIZER_S[tr.optimizer] + comm
    plans = tuple(ExpertPlan(e, w, lora_g, act + text, s) for e in names)
    lora_all = lora_g * len(names)  # every expert's LoRA and optimizer state stay on the GPU
    both = len(names) * w + lora_all + act + text
    one = w + lora_all + act + text
    resident: Literal["both", "one"] = "both" if (len(names) == 2 and not params.model.low_vram
                                                  and both + RESERVE_GIB <= gpu_gib) else "one"
    peak = both if resident == "both" and len(names) == 2 else one
    switch = 0.0
    if len(names) == 2 and resident == "one" and ms.expert_choice == "alternate":
        per_switch = w * FETCH_S_PER_GIB
        switch = per_switch / (ms.switch_every * tr.gradient_accumulation * s)
    return PlanResult(gpu_gib, clip, tokens, quant, checkpointing, compiled, resident, plans, peak,
                      peak + RESERVE_GIB <= gpu_gib, s, switch, sp=sp, comm_s=comm)


def parallel_mode(params: Params, gpus: int) -> Literal["one", "data", "expert"]:
    """How the trainer splits `gpus` (`dist_parallel.plan_parallel` over the sequence-parallel replicas)."""
    ms, sp = params.multistage, params.train.sequence_parallel
    if gpus % sp:
        raise ValueError(f"--gpus {gpus} is not a multiple of train.sequence_parallel {sp}: the trainer "
                         "refuses that launch; give a multiple of it")
    replicas = gpus // sp
    if replicas == 1:
        return "one"
    both = ms.train_high_noise and ms.train_low_noise
    split = both and replicas % 2 == 0 and params.train.parallel != "data"
    return "expert" if split else "data"


def plan(params: Params, gpu_gib: float, checkpointing: Checkpointing | None = None,
         config: dict[str, Any] | None = None, clip: tuple[int, int, int] | None = None,
         gpus: int = 1) -> PlanResult:
    """Predict memory per GPU and time for `params` on `gpus` GPUs of `gpu_gib` GiB, and suggest what fits.

    checkpointing: None reads params (train.gradient_checkpointing), as the
    trainer does. config: the expert geometry (default: the variant's, `plan_variant`). clip:
    (frames, height, width) of the largest sample (default: from the datasets' buckets). gpus: the
    GPU count of the launch; train.sequence_parallel of them share each sample, the replicas are
    data- or expert-parallel.
    """
    if gpu_gib <= 0:
        raise ValueError(f"gpu_gib={gpu_gib}: give the GPU's memory in GiB, e.g. 80 or 24")
    variant = plan_variant(params)
    config = config or CONFIGS[variant.name]
    clip = clip or largest_clip(params)
    if checkpointing is None:
        checkpointing = params.train.gradient_checkpointing
    quant = params.quantization.transformer
    offload = params.model.activation_offloading
    mode, sp = parallel_mode(params, gpus), params.train.sequence_parallel
    per_gpu = 1 if mode == "expert" else 2

    def predict(ck: Checkpointing, q: str, off: bool, sp: int = sp) -> PlanResult:
        return _predict(params, gpu_gib, config, ck, q, clip, off, variant, sp, per_gpu)

    result = predict(checkpointing, quant, offload)
    suggestions = []
    if not result.fits:
        # the faster levers first; activation offloading (host RAM, ~2% slower at 81f) after them
        for ck, q, off in (("full", quant, offload), ("selective", "float8", offload), ("full", "float8", offload),
                           ("selective", quant, True), ("selective", "float8", True), ("full", "uint4", offload)):
            if (ck, q, off) == (checkpointing, quant, offload) or (quant == "uint4" and q == "float8"):
                continue
            alt = predict(ck, q, off)  # type: ignore[arg-type]
            if alt.fits:
                change = []
                if q != quant:
                    change.append(f"quantization.transformer: {q}")
                if off != offload:
                    change.append("model.activation_offloading: true (activations wait in host RAM)")
                if ck != checkpointing:
                    change.append(f"checkpointing {ck}" + (" (recompute attention too)" if ck == "full" else ""))
                suggestions.append(f"{' and '.join(change)}: peak {alt.peak_gib:.1f} GiB, {alt.s_per_step:.2f} s/step")
                break
        else:
            suggestions.append(_nothing_fits(params, result))
        sharing = _sequence_parallel_advice(params, result, gpus, config, predict)
        if sharing:
            suggestions.append(sharing)
    if result.switch_overhead > 0.05:
        halve = " or quantization.transformer: float8 to halve the copy" if quant == "none" else ""
        suggestions.append(
            f"expert switches cost {100 * result.switch_overhead:.0f}% of training time: raise "
            f"multistage.switch_every (now {params.multistage.switch_every}){halve}"
        )
    if params.model.compile is False:
        faster = step_seconds(config, result.tokens, checkpointing, True, params.train.optimizer, params.train.dop.enabled,
                              params.quantization.fp8_matmul, variant.expand_timesteps)
        suggestions.append(f"model.compile: true would take ~{faster:.2f} s/step (first step compiles, ~40 s)")
    replicas = gpus // sp
    rate = replicas / result.s_per_step * (PARALLEL_EFFICIENCY[mode] if mode != "one" else 1.0)
    previews = _previews(params, result, config, result.experts[0].weights_gib, variant) if gpus == 1 else None
    if previews is not None and previews.share > PREVIEW_SHARE:
        suggestions.append(f"previews take {100 * previews.share:.0f}% of the run: raise sample.preview_every, or "
                           "lower sample.preview_steps or its size (a step-distilled sample.preview_lora needs 4 steps)")
    return PlanResult(**{**result.__dict__, "previews": previews, "device": params.job.device,
                         "suggestions": tuple(suggestions), "gpus": gpus, "mode": mode, "samples_per_s": rate})


def _sequence_parallel_advice(params: Params, result: PlanResult, gpus: int, config: dict[str, Any],
                              predict: Any) -> str | None:
    """When the run does not fit and there are GPUs to share a sample: the smallest
    train.sequence_parallel (dividing the heads, the largest clip's tokens and `gpus`) that fits
    with the levers as they are."""
    from wanlora.train.sequence_parallel import valid_degrees

    if params.train.sequence_parallel > 1 or gpus < 2:
        return None
    tokens = clip_tokens(*result.clip, config, plan_variant(params).spatial_factor)
    for n in (n for n in valid_degrees(config["num_attention_heads"], [tokens])
              if n <= gpus and gpus % n == 0):
        alt = predict(result.checkpointing, result.quantization, params.model.activation_offloading, n)
        if alt.fits:
            return (f"train.sequence_parallel: {n} ({n} GPUs share each sample's tokens): peak {alt.peak_gib:.1f} GiB "
                    f"a GPU, {alt.s_per_step:.2f} s/step (sequence parallelism is modelled, not yet measured on GPU)")
    return None


def _nothing_fits(params: Params, result: PlanResult) -> str:
    """Advice when no checkpointing / quantization / offloading mix fits: about the larger term."""
    e = result.experts[0]
    fixed = e.weights_gib + e.lora_gib * len(result.experts) + RESERVE_GIB
    if fixed >= result.gpu_gib or e.activations_gib < fixed:
        return (f"the base ({e.weights_gib:.1f} GiB, {result.quantization}) with LoRA state and {RESERVE_GIB:.0f} GiB "
                f"of context is {fixed:.1f} GiB of the {result.gpu_gib:g}: turn on model.layer_offloading (blocks "
                "stream from host memory; the planner does not predict its speed), or use a larger GPU")
    frames, height, width = result.clip
    buckets = {name: (ds.bucket.num_frames, ds.bucket.resolutions) for name, ds in params.datasets.items()}
    now = "; ".join(f"datasets.{n}.bucket.num_frames {f}, resolutions {r}" for n, (f, r) in buckets.items())
    return (f"activations of the largest sample ({frames} frames at {width}x{height}) are "
            f"{e.activations_gib:.1f} GiB: lower its frames or resolution (now {now})")


@dataclass(frozen=True)
class EpochPlan:
    """One pass over the bucketed samples: every window, resolution and flip is a sample."""

    samples: int
    buckets: int
    micro_steps: int
    seconds: float  # of one expert's micro-steps, at each bucket's predicted step time


def epoch(params: Params, samples: list[dict], checkpointing: Checkpointing | None = None,
          config: dict[str, Any] | None = None) -> EpochPlan:
    """What one epoch over data/buckets/samples.jsonl costs: batches never mix buckets, so each
    bucket contributes ceil(count / batch_size) micro-steps at its own token count."""
    variant = plan_variant(params)
    config = config or CONFIGS[variant.name]
    checkpointing = checkpointing or params.train.gradient_checkpointing
    tr, q = params.train, params.quantization
    fp8 = q.fp8_matmul and q.transformer == "float8"
    counts: dict[tuple[int, int, int], int] = {}
    for s in samples:
        key = (s["num_frames"], s["height"], s["width"])
        counts[key] = counts.get(key, 0) + 1
    steps, seconds = 0, 0.0
    for (f, h, w), n in counts.items():
        k = math.ceil(n / tr.batch_size)
        tokens = clip_tokens(f, h, w, config, variant.spatial_factor) * tr.batch_size
        steps += k
        seconds += k * step_seconds(config, tokens, checkpointing, params.model.compile, tr.optimizer,
                                    tr.dop.enabled, fp8, variant.expand_timesteps)
    return EpochPlan(len(samples), len(counts), steps, seconds)


def render(result: PlanResult, epoch_plan: EpochPlan | None = None) -> str:
    """The text `wanlora plan` prints (with an epoch line when the samples are bucketed)."""
    if result.device == "cpu":  # the smoke recipe: GPU memory and H200 step times say nothing about it
        return ("job.device is cpu: training uses no GPU, so there is no GPU memory or step time to predict; "
                "set job.device to auto or cuda (the GPU recipes do) for a prediction")
    f, h, w = result.clip
    lines = [
        f"largest sample: {f} frames at {w}x{h} -> {result.tokens} tokens; base {result.quantization}, "
        f"checkpointing {result.checkpointing}, compile {'on' if result.compiled else 'off'}",
        f"{'expert':<8}{'weights GiB':>12}{'LoRA+opt GiB':>14}{'activations GiB':>17}{'s/step':>9}",
    ]
    for e in result.experts:
        lines.append(f"{e.expert:<8}{e.weights_gib:>12.1f}{e.lora_gib:>14.2f}{e.activations_gib:>17.1f}{e.s_per_step:>9.2f}")
    where = ("one transformer" if len(result.experts) == 1 else
             "both experts on the GPU" if result.resident == "both" else "one expert on the GPU, the other in host memory")
    verdict = "fits" if result.fits else "does NOT fit"
    lines.append(f"peak {result.peak_gib:.1f} GiB (+{RESERVE_GIB:.0f} GiB context/workspace) on a "
                 f"{result.gpu_gib:g} GiB GPU: {verdict} ({where})")
    if result.switch_overhead:
        lines.append(f"expert switching adds ~{100 * result.switch_overhead:.0f}% to training time")
    if result.previews is not None:
        p = result.previews
        lines.append(f"previews: {p.count} of ~{p.seconds:.1f} s each, ~{100 * p.share:.1f}% of the run's time")
    if epoch_plan is not None:
        lines.append(f"one epoch: {epoch_plan.samples} samples (every window, resolution and flip) in "
                     f"{epoch_plan.buckets} bucket(s), {epoch_plan.micro_steps} micro-steps, "
                     f"~{epoch_plan.seconds / 60:.1f} min per expert")
    if result.gpus > 1:
        replicas = result.gpus // result.sp
        how = {"one": "one replica", "data": f"{replicas} data-parallel replicas",
               "expert": f"{replicas} replicas, expert-parallel (each GPU holds one expert)"}[result.mode]
        sp = (f" of {result.sp} GPUs sharing each sample's tokens (sequence-parallel; all-to-alls "
              f"{result.comm_s:.2f} s of the step)" if result.sp > 1 else "")
        lines.append(f"{result.gpus} GPUs: {how}{sp}; memory above is per GPU; ~{result.samples_per_s:.3f} samples/s in all")
        if result.mode != "one":
            lines.append("data/expert-parallel efficiency as measured on 2 H100s (bench/RESULTS.md); 4 and 8 GPUs unmeasured")
        if result.sp > 1:
            lines.append("sequence parallelism is a model (compute / N plus all-to-alls at an assumed "
                         f"{ALL_TO_ALL_GBPS:.0f} GB/s), not yet measured on GPU (bench/RESULTS.md)")
    lines += [f"suggestion: {s}" for s in result.suggestions]
    lines.append("times calibrated on one H200 (bench/RESULTS.md); scale by your GPU's bf16 rate")
    return "\n".join(lines)
