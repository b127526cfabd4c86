"""`wanlora import-aitk`: an AI Toolkit Wan 2.2 job config as our params, with nothing lost silently.

Every key of the job's first process is either mapped to a params key, recognised as having no
effect (it is at AI Toolkit's own default, or only touches logging and UI state), or returned in
the list of unmapped keys with its value and the reason. Where a key is absent, AI Toolkit's
default is used for the knobs that change what is learned (rank 4 and alpha 1, lr 1e-6, sigmoid
timesteps, switching experts every step, caption dropout 0, ...), so the import trains what
AI Toolkit would have trained; engineering knobs (dtype, caching, checkpointing) keep ours.

Meanings that differ and how they are mapped (read from AI Toolkit's toolkit/config_modules.py,
jobs/process/BaseSDTrainProcess.py and extensions_built_in/diffusion_models/wan22/):
- `train.content_or_style`: timestep indices index a descending schedule, and `content` draws
  indices as u^3 (small indices = high t) while `style` draws 1-u^3 (low t); its UI labels them
  "High Noise" and "Low Noise". So content -> timestep_bias high_noise, style -> low_noise.
- `train.unload_text_encoder: true` makes AI Toolkit train on the trigger word alone and ignore
  captions; it maps to our knob of the same name and meaning. `cache_text_embeddings: false` is
  reported: wanlora always trains from the text cache.
- The LoRA: AI Toolkit's Wan network is peft-format (toolkit/lora_special.py), so alpha = rank
  (update scale 1) whatever `linear_alpha` says; with `transformer_only` (its default) it adapts
  every Linear inside `blocks`, which is our default `network.target_modules`.
- Schedules (toolkit/scheduler.py): `linear` is torch's LinearLR(total_iters=steps) at its
  defaults, a ramp *up* from lr/3 to lr (our `linear_ramp`); `cosine` and `cosine_with_restarts`
  (T_0 = steps: one period) are our cosine; `constant_with_warmup` is constant after
  `lr_scheduler_params.num_warmup_steps` (1000 when absent). `lr_warmup_steps` is no AI Toolkit
  key: its run had no warm-up, so it is reported, not applied.
- Optimizers (toolkit/optimizer.py): AdamW and AdamW8bit get eps 1e-6 and `optimizer_params`.
- Accumulation: AI Toolkit sums the micro-batch gradients (SDTrainer.hook_train_loop) and clips
  the sum; we average them. Adam is invariant to that factor N except through eps and clipping,
  so an import divides eps and max_grad_norm by the N micro-batches each expert gets per step (half
  of them when switch_boundary_every splits every step between the experts). The legacy
  `gradient_accumulation_steps: N` steps the optimizer every N of its `steps` (each one batch):
  it becomes accumulation N with steps, save and sample intervals divided by N.
- EMA (toolkit/ema.py over every trainable parameter): each optimizer step also moves the waiting
  expert's average toward its unchanged weights. Ours averages an expert at its own steps only, so
  when the experts alternate every optimizer step the same average is decay d**2 (when every step
  trains both, d as written).
- `sample.sample_every` counts steps; wanlora samples every Nth saved checkpoint, so it becomes
  the nearest whole number of `save.save_every` intervals (reported when not exact).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from wanlora.config import Optimizer, Params, ParamsError, TimestepType, format_errors
from wanlora.models.variant import LEGACY_VARIANT, get_variant

_MISSING = object()
#: Limits on an imported config: real AI Toolkit jobs are a few KB with a few hundred values.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000
NOTE_CHARS = 200
_DEFAULT_OUTPUT_DIR = "exports"

# Keys that never change what is trained (logging, UI state, options of other architectures).
_IGNORED = {
    "type", "sqlite_db_path", "performance_log_every", "logging.log_every", "logging.use_ui_logger",
    "logging.verbose", "logging.project_name", "logging.run_name", "train.bypass_guidance_embedding",
    "train.force_first_sample", "save.save_format", "save.hf_private", "save.hf_repo_id",
    "datasets[].cache_latents", "datasets[].cache_latents_to_disk", "datasets[].cache_text_embeddings",
    "datasets[].mask_min_value", "datasets[].fps", "datasets[].buckets", "datasets[].bucket_tolerance",
    "datasets[].num_workers", "datasets[].prefetch_factor", "datasets[].cache_latents_num_workers",
    "network.lokr_full_rank", "network.lokr_factor", "network.conv", "network.conv_alpha",
}
# AI Toolkit defaults of options wanlora lacks: at these values the option does nothing there either.
_NOOP_DEFAULTS: dict[str, Any] = {
    "logging.use_wandb": False, "save.push_to_hub": False,
    "network.transformer_only": True, "network.split_multistage_loras": True, "network.all_layers": False,
    "network.pretrained_lora_path": None, "network.layer_offloading": False,
    "network.network_kwargs.ignore_if_contains": [], "network.network_kwargs.only_if_contains": [],
    "model.block_compile": False, "model.attn_masking": False, "model.te_name_or_path": None,
    "model.layer_offloading_text_encoder_percent": 1.0, "model.auto_memory": False,
    "train.train_unet": True, "train.train_text_encoder": False, "train.noise_scheduler": "flowmatch",
    "train.loss_type": "mse", "train.noise_offset": 0.0, "train.min_snr_gamma": None, "train.snr_gamma": None,
    "train.disable_sampling": False, "train.weight_jitter": 0.0, "train.linear_timesteps": False,
    "train.linear_timesteps2": False, "train.blank_prompt_preservation": False, "train.do_prior_divergence": False,
    "train.inverted_mask_prior": False, "train.min_denoising_steps": 0, "train.max_denoising_steps": 999,
    "train.ema_config.use_feedback": False,
    "train.ema_config.param_multiplier": 1.0, "train.do_guidance_loss": False,
    "datasets[].type": "image", "datasets[].flip_y": False, "datasets[].num_repeats": 1, "datasets[].is_reg": False,
    "datasets[].network_weight": 1.0, "datasets[].mask_path": None, "datasets[].controls": [],
    "datasets[].control_path": None, "datasets[].token_dropout_rate": 0.0, "datasets[].shuffle_tokens": False,
    "datasets[].keep_tokens": 0, "datasets[].random_crop": False, "datasets[].random_scale": False,
    "datasets[].scale": 1.0, "datasets[].loss_multiplier": 1.0, "datasets[].augments": [],
    "datasets[].alpha_mask": False, "datasets[].do_i2v": False, "datasets[].auto_frame_count": False,
    "datasets[].square_crop": False, "datasets[].diff_output_preservation": False,
    "datasets[].diff_output_preservation_class": "", "datasets[].dataset_path": None,
    "datasets[].prior_reg": False, "datasets[].standardize_images": False,
    "sample.sampler": "flowmatch", "sample.sample_start_step": 0, "sample.network_multiplier": 1.0,
    "sample.guidance_rescale": 0.0, "sample.format": "jpg",
}
# AI Toolkit's default, qfloat8 (optimum-quanto), becomes our float8: the same e4m3 codes with a
# scale per output channel, held in plain tensors that can move between GPU and host (quanto's
# cannot, see accel.QFLOAT8_MOVES) and closer to bf16 on NVIDIA GPUs (bench/RESULTS.md).
_QTYPES = {"qfloat8": "float8", "float8": "float8", "uint4": "uint4"}
# The nearest type we have for AI Toolkit types we lack: never smaller in memory than asked for
# is impossible for uint2/uint3, so those report the extra memory in the note.
_QTYPE_NEAREST = {"uint2": "uint4", "uint3": "uint4", "int4": "uint4", "qint4": "uint4",
                  "uint5": "float8", "uint6": "float8", "uint7": "float8", "uint8": "float8",
                  "int8": "float8", "qint8": "float8"}
_DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "fp32": "fp32", "float32": "fp32"}
_OPTIMIZERS = get_args(Optimizer)  # AI Toolkit names ours as we do
_DEFAULT_WEIGHT_DECAY = {"adamw8bit": 0.01, "adamw": 0.01, "adafactor": 0.0}  # the optimizers' own defaults
_TIMESTEP_TYPES = get_args(TimestepType)  # the same names in AI Toolkit
_BIAS = {"balanced": "balanced", "content": "high_noise", "style": "low_noise"}
_ATTENTION = {"native": "auto", "flash": "flash"}
#: AI Toolkit's model.arch -> our variant (extensions_built_in/diffusion_models/wan22/: Wan2214bModel,
#: Wan2214bI2VModel, Wan225bModel).
ARCHES = {"wan22_14b": "t2v-a14b", "wan22_14b_i2v": "i2v-a14b", "wan22_5b": "ti2v-5b"}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of nested mappings; lists of mappings get [i] (datasets[0].folder_path)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        out = {}
        for i, v in enumerate(node):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: node}


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _generic(key: str) -> str:
    return re.sub(r"\[\d+\]", "[]", key)


class _Import:
    """The keys still to map, the params tree being built, and where each value came from."""

    def __init__(self, process: dict[str, Any]):
        self.src = _flatten(process)
        self.tree: dict[str, Any] = Params().model_dump(mode="json")
        self.tree["datasets"] = {}
        self.origin: dict[str, str] = {}
        self.notes: list[str] = []
        self.per_optimizer_step = 1  # AI Toolkit steps per optimizer step (legacy accumulation)
        self.one_transformer = False  # TI2V 5B: no experts, so no multistage settings (set by _model)

    def take(self, key: str, default: Any = _MISSING) -> Any:
        """The value of an AI Toolkit key (consumed), or `default` when absent."""
        if key in self.src:
            return self.src.pop(key)
        if default is _MISSING:
            raise KeyError(key)
        return default

    def has(self, key: str) -> bool:
        return key in self.src

    def put(self, ours: str, value: Any, source: str) -> None:
        node = self.tree
        *parents, leaf = ours.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        self.origin[ours] = f"{source}={value!r}"

    def scale(self, ours: str, factor: float, kind: Callable[[float], Any], how: str) -> None:
        """Multiply an already built value by `factor`, keeping where it came from."""
        source = self.origin.get(ours, ours).split("=")[0]
        self.put(ours, kind(_get(self.tree, ours) * factor), f"{source} {how}")

    def note(self, key: str, value: Any, why: str) -> None:
        self.notes.append(f"{key}={_short(value)} ({why})")

    def leftovers(self) -> None:
        """Report every key no rule consumed, unless it cannot matter (see _IGNORED, _NOOP_DEFAULTS)."""
        for key, value in sorted(self.src.items()):
            g = _generic(key)
            if g in _IGNORED or (g in _NOOP_DEFAULTS and value == _NOOP_DEFAULTS[g]):
                continue
            self.note(key, value, "not supported")
        self.src.clear()


def _short(value: Any, limit: int = NOTE_CHARS) -> str:
    """repr of a value for a note, cut to `limit` characters (a config can hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _expanded_size(data: Any, cap: int) -> int:
    """Values in `data` counted as if every YAML alias were written out, stopping past `cap`:
    aliases share one object, so a 645-byte file can stand for billions of values (and a
    recursive alias for infinitely many), which the key walk and notes would then expand."""
    count, stack = 0, [data]
    while stack and count <= cap:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamsError(f"{path}: not found")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ParamsError(f"{path}: {path.stat().st_size:,} bytes; an AI Toolkit job config is a few KB "
                          f"(limit {MAX_CONFIG_BYTES:,}). Fix: pass the job's .yaml or .json itself")
    text = path.read_text(encoding="utf-8")
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ParamsError(f"{path}: not valid {kind}: {err}") from None
    except RecursionError:
        raise ParamsError(f"{path}: nested too deeply to be an AI Toolkit job config") from None
    if _expanded_size(data, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise ParamsError(
            f"{path}: expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases such as *name repeat "
            "what they point to; nested ones multiply). Fix: write the values out, or remove the aliases"
        )
    config = data.get("config") if isinstance(data, dict) else None
    process = config.get("process") if isinstance(config, dict) else None
    if not isinstance(process, list) or not process or not isinstance(process[0], dict):
        raise ParamsError(f"{path}: no config.process list; expected an AI Toolkit job config (job: extension)")
    return data


def _float(key: str, value: Any) -> float:
    """YAML 1.1 reads `1e-4` as a string; AI Toolkit users write it that way."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ParamsError(f"AI Toolkit key {key}={value!r}: not a number") from None


def _job(imp: _Import, config: dict[str, Any]) -> None:
    if "name" in config:
        imp.put("job.name", config["name"], "config.name")
    trigger = imp.take("trigger_word", None)
    # No trigger in AI Toolkit means captions are used as written and [trigger] becomes ''.
    imp.put("job.trigger_word", trigger or "", "trigger_word")
    if imp.has("device"):
        imp.put("job.device", imp.take("device"), "device")
    if imp.has("training_folder"):
        imp.put("job.output_dir", imp.take("training_folder"), "training_folder")


def _network(imp: _Import) -> None:
    kind = imp.take("network.type", "lora")
    if kind != "lora":
        imp.note("network.type", kind, "not supported: wanlora trains plain LoRA; imported as lora")
    rank = imp.take("network.rank", None)
    linear = imp.take("network.linear", None)
    src = "network.rank" if rank is not None else "network.linear"
    rank = rank if rank is not None else (linear if linear is not None else 4)
    imp.put("network.rank", rank, src)
    # peft format for Wan: lora_special.LoRASpecialNetwork sets alpha = rank, so the scale is 1
    imp.put("network.alpha", float(rank), src)
    for key in ("network.linear_alpha", "network.alpha"):
        alpha = imp.take(key, None)
        if alpha is not None and _float(key, alpha) != rank:
            imp.note(key, alpha, f"AI Toolkit's Wan LoRA is peft-format: alpha = rank, update scale 1, whatever "
                     f"{key.split('.')[1]} says; imported as network.alpha {float(rank)}")
    dropout = imp.take("network.dropout", None)
    if dropout is not None:
        imp.put("network.dropout", dropout, "network.dropout")


def _save(imp: _Import) -> None:
    dtype = imp.take("save.dtype", "float16")
    if dtype in _DTYPES:
        imp.put("save.dtype", _DTYPES[dtype], "save.dtype")
    else:
        imp.note("save.dtype", dtype, "not supported: use bf16, fp16 or fp32")
    imp.put("save.every", imp.take("save.save_every", 1000), "save.save_every")
    imp.put("save.keep_last", imp.take("save.max_step_saves_to_keep", 5), "save.max_step_saves_to_keep")


def _quantization(imp: _Import) -> None:
    quantize = imp.take("model.quantize", False)
    qtype = str(imp.take("model.qtype", "qfloat8"))
    adapter = imp.take("model.accuracy_recovery_adapter", None)
    if "|" in qtype:
        qtype, adapter = qtype.split("|", 1)
    if not quantize:
        imp.put("quantization.transformer", "none", "model.quantize")
    else:
        ours = _QTYPES.get(qtype) or _QTYPE_NEAREST.get(qtype)
        if ours is None:
            raise ParamsError(
                f"AI Toolkit key model.qtype={qtype!r}: no wanlora equivalent; use one of "
                f"{', '.join(_QTYPES)} (quantization.transformer)"
            )
        if qtype not in _QTYPES:
            imp.note("model.qtype", qtype, f"not supported: imported as the nearest wanlora type, {ours}")
        elif qtype == "qfloat8":
            imp.note("model.qtype", qtype, "imported as float8: the same e4m3 rounding in plain tensors, which "
                     "can move between GPU and host memory and run faster (quantization.transformer: qfloat8 "
                     "keeps optimum-quanto)")
        imp.put("quantization.transformer", ours, "model.qtype")
        if ours == "uint4":
            # Without an adapter AI Toolkit trains on the plain 4-bit base; keep that, not our fitted default.
            imp.put("quantization.recovery.source", adapter or "none", "model.qtype")
        elif adapter:
            imp.note("model.accuracy_recovery_adapter", adapter,
                     f"not used: recovery applies to 4-bit bases, not {ours}")
    quantize_te = imp.take("model.quantize_te", quantize)
    qtype_te = imp.take("model.qtype_te", "qfloat8")
    if not quantize_te:
        imp.put("quantization.text_encoder", "none", "model.quantize_te")
    else:
        te = qtype_te if qtype_te in ("qfloat8", "float8") else "float8"
        if te != qtype_te:
            imp.note("model.qtype_te", qtype_te, "not supported: imported as float8")
        imp.put("quantization.text_encoder", te, "model.qtype_te")


def _model(imp: _Import) -> None:
    arch = imp.take("model.arch", None)
    name = str(arch).split(":")[0]  # the UI writes 'wan22_14b:t2v'; AI Toolkit drops the tag
    if name not in ARCHES:
        raise ParamsError(
            f"AI Toolkit key model.arch={arch!r}: wanlora imports Wan 2.2 A14B jobs: "
            + ", ".join(f"{a} ({v})" for a, v in ARCHES.items())
        )
    variant = get_variant(ARCHES[name])
    imp.one_transformer = len(variant.experts) == 1
    if variant.name != LEGACY_VARIANT:  # T2V jobs import as they always did: auto finds T2V in a T2V folder
        imp.put("model.variant", variant.name, "model.arch")
    if imp.has("model.name_or_path"):
        imp.put("model.name_or_path", imp.take("model.name_or_path"), "model.name_or_path")
    elif variant.name != LEGACY_VARIANT:
        imp.put("model.name_or_path", variant.hub_id, "model.arch")
    for ours, theirs in (("model.low_vram", "model.low_vram"), ("model.compile", "model.compile"),
                         ("multistage.train_high_noise", "model.model_kwargs.train_high_noise"),
                         ("multistage.train_low_noise", "model.model_kwargs.train_low_noise")):
        if imp.has(theirs) and imp.one_transformer and ours.startswith("multistage."):
            imp.note(theirs, imp.take(theirs), "TI2V 5B is one transformer: no expert to leave out")
        elif imp.has(theirs):
            imp.put(ours, imp.take(theirs), theirs)
    offload = imp.take("model.layer_offloading", None)
    if offload is None and imp.has("model.auto_memory"):  # the deprecated spelling
        offload = imp.take("model.auto_memory")
    if offload is not None:
        imp.put("model.layer_offloading", bool(offload), "model.layer_offloading")
    if imp.has("model.layer_offloading_transformer_percent"):
        imp.put("model.layer_offloading_fraction", imp.take("model.layer_offloading_transformer_percent"),
                "model.layer_offloading_transformer_percent")
    _quantization(imp)


def _optimizer(imp: _Import) -> None:
    """The optimizer, its lr and `optimizer_params` as toolkit/optimizer.py `get_optimizer` builds them."""
    name = imp.take("train.optimizer", "adamw")
    lr = imp.take("train.lr", 1e-6)
    params = {k: imp.take(f"train.optimizer_params.{k}") for k in ("weight_decay", "betas", "eps")
              if imp.has(f"train.optimizer_params.{k}")}
    if name.lower() not in _OPTIMIZERS:
        # The lr belongs to that optimizer (prodigy wants 1.0): carrying it over would wreck AdamW.
        imp.note("train.optimizer", name, f"not supported: use {', '.join(_OPTIMIZERS)}; kept adamw8bit")
        imp.note("train.lr", lr, f"belongs to {name}; kept wanlora's default")
        for k, v in params.items():
            imp.note(f"train.optimizer_params.{k}", v, f"belongs to {name}; kept wanlora's default")
        return
    ours = name.lower()
    imp.put("train.optimizer", ours, "train.optimizer")
    imp.put("train.lr", _float("train.lr", lr), "train.lr")
    decay = params.pop("weight_decay", None)
    decay = _DEFAULT_WEIGHT_DECAY[ours] if decay is None else _float("train.optimizer_params.weight_decay", decay)
    imp.put("train.weight_decay", decay, "train.optimizer_params.weight_decay")
    if ours == "adafactor":
        for k, v in params.items():
            imp.note(f"train.optimizer_params.{k}", v, "not supported for adafactor: AdamW's betas and eps only")
        return
    betas = params.get("betas", [0.9, 0.999])
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ParamsError(f"AI Toolkit key train.optimizer_params.betas={betas!r}: give two numbers, e.g. [0.9, 0.999]")
    imp.put("train.betas", [_float("train.optimizer_params.betas", b) for b in betas], "train.optimizer_params.betas")
    imp.put("train.eps", 1e-6, "train.optimizer")  # get_optimizer passes eps=1e-6 to AdamW and AdamW8bit
    if "eps" in params:
        imp.put("train.eps", _float("train.optimizer_params.eps", params["eps"]), "train.optimizer_params.eps")
        imp.note("train.optimizer_params.eps", params["eps"], "AI Toolkit passes eps=1e-6 itself and stops with "
                 "'got multiple values for keyword argument eps' on this key; imported as written")


def _scheduler(imp: _Import, steps: int) -> None:
    """The schedule toolkit/scheduler.py `get_lr_scheduler` really runs for the configured name.
    BaseSDTrainProcess always passes total_iters=steps, which overrides a total_iters, T_max or
    T_0 of the user's and makes diffusers' own schedule functions (its fallback) refuse to start."""
    sched = imp.take("train.lr_scheduler", "constant")
    pre = "train.lr_scheduler_params."
    for key in ("total_iters", "T_max", "T_0"):
        if imp.has(pre + key):
            value = imp.take(pre + key)
            if value != steps:
                imp.note(pre + key, value, f"AI Toolkit replaces it with train.steps ({steps})")
    if sched == "linear":
        imp.put("train.lr_scheduler", "linear_ramp", "train.lr_scheduler")
        imp.put("train.lr_start_factor", _float(pre + "start_factor", imp.take(pre + "start_factor", 1 / 3)),
                "train.lr_scheduler_params.start_factor")
        imp.put("train.lr_end_factor", _float(pre + "end_factor", imp.take(pre + "end_factor", 1.0)),
                "train.lr_scheduler_params.end_factor")
    elif sched in ("cosine", "cosine_with_restarts", "constant"):
        imp.put("train.lr_scheduler", "cosine" if sched.startswith("cosine") else "constant", "train.lr_scheduler")
    elif sched == "constant_with_warmup":
        imp.put("train.lr_scheduler", "constant", "train.lr_scheduler")
        imp.put("train.warmup_steps", int(imp.take(pre + "num_warmup_steps", 1000)),
                "train.lr_scheduler_params.num_warmup_steps")
    else:
        why = ("AI Toolkit's StepLR gets total_iters and stops" if sched == "step" else
               "AI Toolkit hands it to diffusers with total_iters, which its schedules refuse, and stops")
        imp.note("train.lr_scheduler", sched, f"not supported ({why}); kept constant")
    if imp.has("train.lr_warmup_steps"):
        imp.note("train.lr_warmup_steps", imp.take("train.lr_warmup_steps"),
                 "AI Toolkit never reads this key, so its run had no warm-up; not applied. Its warm-up is "
                 "lr_scheduler: constant_with_warmup with lr_scheduler_params.num_warmup_steps; ours train.warmup_steps")


def _accumulation(imp: _Import) -> None:
    """Micro-batches per optimizer step, and the legacy `gradient_accumulation_steps` (one batch
    per AI Toolkit step, an optimizer step every N of them: BaseSDTrainProcess.run), turned into
    accumulation N over steps / N optimizer steps, so the same samples are seen and applied."""
    accum = int(imp.take("train.gradient_accumulation", 1))
    legacy = int(imp.take("train.gradient_accumulation_steps", 1))
    if legacy == -1:
        imp.note("train.gradient_accumulation_steps", -1, "whole-epoch accumulation not supported; kept 1")
        legacy = 1
    tree = imp.tree
    if legacy > 1:
        steps = tree["train"]["steps"]
        imp.put("train.gradient_accumulation", legacy, "train.gradient_accumulation_steps")
        imp.put("train.steps", max(1, steps // legacy), "train.steps")
        if steps % legacy:
            imp.note("train.steps", steps, f"AI Toolkit applies only whole accumulations: {steps // legacy} optimizer "
                     f"steps of {legacy} batches")
        imp.per_optimizer_step = legacy  # sample.sample_every counts the same batches
        for ours in ("save.every", "train.warmup_steps"):
            if _get(tree, ours):
                imp.scale(ours, 1 / legacy, lambda v: max(1, int(v)), f"/ {legacy}")
        n = legacy
    else:
        imp.put("train.gradient_accumulation", accum, "train.gradient_accumulation")
        n = accum
    ms = tree["multistage"]
    if not imp.one_transformer and ms["train_high_noise"] and ms["train_low_noise"] and ms["switch_every"] % n:
        # switch_every counts micro-batches: a step holds both experts, each averaging its own share
        n = n // 2 if n % (2 * ms["switch_every"]) == 0 else n
    if n > 1:  # AI Toolkit sums an expert's n gradients, we average them: same Adam step with eps and clip / n
        if tree["train"]["optimizer"] != "adafactor":
            imp.scale("train.eps", 1 / n, float, f"/ {n} (summed gradients)")
        if tree["train"]["max_grad_norm"]:
            imp.scale("train.max_grad_norm", 1 / n, float, f"/ {n} (summed gradients)")


def _train(imp: _Import) -> None:
    for ours, theirs, default in (("train.steps", "train.steps", 1000), ("train.batch_size", "train.batch_size", 1),
                                  ("train.max_grad_norm", "train.max_grad_norm", 1.0),
                                  ("multistage.switch_every", "train.switch_boundary_every", 1)):
        if imp.one_transformer and ours.startswith("multistage."):
            if imp.has(theirs):  # Wan225bModel has one transformer: AI Toolkit never switches
                imp.note(theirs, imp.take(theirs), "TI2V 5B is one transformer: nothing to switch between")
            continue
        imp.put(ours, imp.take(theirs, default), theirs)
    for ours, theirs in (("train.gradient_checkpointing", "train.gradient_checkpointing"),
                         ("train.unload_text_encoder", "train.unload_text_encoder")):
        if imp.has(theirs):
            imp.put(ours, imp.take(theirs), theirs)
    if imp.has("train.cache_text_embeddings") and not imp.take("train.cache_text_embeddings"):
        imp.note("train.cache_text_embeddings", False, "wanlora always trains from the text cache; kept true")
    _optimizer(imp)
    if imp.tree["train"]["optimizer"] == "adafactor":  # SDTrainer.hook_train_loop clips all but adafactor
        imp.put("train.max_grad_norm", 0.0, "train.optimizer")
    _scheduler(imp, imp.tree["train"]["steps"])
    ttype = imp.take("train.timestep_type", "sigmoid")
    if ttype in _TIMESTEP_TYPES:
        imp.put("train.timestep_type", ttype, "train.timestep_type")
    else:
        imp.note("train.timestep_type", ttype, f"not supported: use {', '.join(sorted(_TIMESTEP_TYPES))}; kept linear")
    bias = imp.take("train.content_or_style", "balanced")
    if bias not in _BIAS:
        raise ParamsError(f"AI Toolkit key train.content_or_style={bias!r}: use balanced, content or style")
    imp.put("train.timestep_bias", _BIAS[bias], "train.content_or_style")
    dtype = imp.take("train.dtype", None)
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ParamsError(f"AI Toolkit key train.dtype={dtype!r}: use bf16, fp16 or fp32")
        imp.put("model.dtype", _DTYPES[dtype], "train.dtype")
    if imp.has("train.attention_backend"):
        backend = imp.take("train.attention_backend")
        if backend in _ATTENTION:
            imp.put("model.attention_backend", _ATTENTION[backend], "train.attention_backend")
        else:
            imp.note("train.attention_backend", backend, "not supported: kept auto")
    _accumulation(imp)
    _preservation(imp)


def _preservation(imp: _Import) -> None:
    """DOP, differential guidance and EMA: optional losses and weight averaging."""
    dop = bool(imp.take("train.diff_output_preservation", False))
    imp.put("train.dop.enabled", dop, "train.diff_output_preservation")
    imp.put("train.dop.multiplier", imp.take("train.diff_output_preservation_multiplier", 1.0),
            "train.diff_output_preservation_multiplier")
    cls = imp.take("train.diff_output_preservation_class", "")
    if cls:
        imp.put("train.dop.preservation_class", cls, "train.diff_output_preservation_class")
    elif dop:
        raise ParamsError("AI Toolkit key train.diff_output_preservation_class is empty while DOP is on: "
                          "name the class the trigger belongs to, e.g. person")
    imp.put("train.differential_guidance.enabled", bool(imp.take("train.do_differential_guidance", False)),
            "train.do_differential_guidance")
    if imp.has("train.differential_guidance_scale"):
        imp.put("train.differential_guidance.scale", imp.take("train.differential_guidance_scale"),
                "train.differential_guidance_scale")
    ema = bool(imp.take("train.ema_config.use_ema", False))
    imp.put("train.ema.enabled", ema, "train.ema_config.use_ema")
    decay = _float("train.ema_config.ema_decay", imp.take("train.ema_config.ema_decay", 0.999))
    if not ema:
        return
    imp.put("train.ema.decay", decay, "train.ema_config.ema_decay")
    tree = imp.tree
    both = not imp.one_transformer and tree["multistage"]["train_high_noise"] and tree["multistage"]["train_low_noise"]
    switch, accum = tree["multistage"]["switch_every"], tree["train"]["gradient_accumulation"]
    if both and switch == accum:
        # the experts alternate every optimizer step: AI Toolkit's update at the other expert's
        # step pulls the average toward the same unchanged weights, so two updates make one of d^2
        imp.put("train.ema.decay", decay ** 2, "train.ema_config.ema_decay squared (experts alternate every step)")
    elif both and switch > accum:  # (switch < accum: both experts step at every step, as AI Toolkit's EMA)
        imp.note("train.ema_config.ema_decay", decay, "AI Toolkit also moves the waiting expert's average toward "
                 "its unchanged weights at the other expert's steps; wanlora averages each expert at its own steps "
                 "only (README, Coming from AI Toolkit); imported as written")


def _dataset_name(folder: str, index: int, taken: set[str]) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(str(folder).rstrip("/\\")).name)
    return name if name and name not in taken else f"ds{index}"


def _datasets(imp: _Import, count: int) -> None:
    dropout_seen: tuple[str, float] | None = None
    for i in range(count):
        p = f"datasets[{i}]"
        folder = imp.take(f"{p}.folder_path", None)
        if not folder:
            raise ParamsError(f"AI Toolkit key {p}.folder_path is missing: wanlora reads clips from a folder")
        name = _dataset_name(folder, i, set(imp.tree["datasets"]))
        ds = f"datasets.{name}"
        imp.put(f"{ds}.folder", folder, f"{p}.folder_path")
        imp.put(f"{ds}.captions.extension", str(imp.take(f"{p}.caption_ext", "txt")).lstrip("."), f"{p}.caption_ext")
        res = imp.take(f"{p}.resolution", 512)
        imp.put(f"{ds}.bucket.resolutions", res if isinstance(res, list) else [res], f"{p}.resolution")
        imp.put(f"{ds}.bucket.num_frames", [imp.take(f"{p}.num_frames", 1)], f"{p}.num_frames")
        imp.put(f"{ds}.flip_horizontal", bool(imp.take(f"{p}.flip_x", False)), f"{p}.flip_x")
        if imp.one_transformer:  # Wan225bModel.get_noise_prediction: do_i2v conditions every video on its first frame
            imp.put(f"{ds}.i2v_share", 1.0 if imp.take(f"{p}.do_i2v", False) else 0.0, f"{p}.do_i2v")
        default_caption = imp.take(f"{p}.default_caption", None)
        if default_caption:
            imp.put(f"{ds}.captions.default_caption", default_caption, f"{p}.default_caption")
        if not imp.take(f"{p}.shrink_video_to_frames", True):
            imp.put(f"{ds}.bucket.frame_sampling", "window", f"{p}.shrink_video_to_frames")
            imp.put(f"{ds}.bucket.fps", imp.take(f"{p}.fps", 24), f"{p}.fps")
        rate = _float(f"{p}.caption_dropout_rate", imp.take(f"{p}.caption_dropout_rate", 0.0))
        if dropout_seen is None:
            dropout_seen = (f"{p}.caption_dropout_rate", rate)
            imp.put("train.caption_dropout", rate, dropout_seen[0])
        elif rate != dropout_seen[1]:
            imp.note(f"{p}.caption_dropout_rate", rate, f"one rate for all datasets: kept {dropout_seen[1]} "
                     f"from {dropout_seen[0]}")
        trigger = imp.take(f"{p}.trigger_word", None)
        if trigger and not imp.tree["job"]["trigger_word"]:
            imp.put("job.trigger_word", trigger, f"{p}.trigger_word")
        elif trigger and trigger != imp.tree["job"]["trigger_word"]:
            imp.note(f"{p}.trigger_word", trigger, "one trigger word for all datasets: kept job.trigger_word "
                     f"{imp.tree['job']['trigger_word']!r}")


def _sample(imp: _Import) -> None:
    for ours, theirs, default in (
        ("sample.width", "sample.width", 512), ("sample.height", "sample.height", 512),
        ("sample.num_frames", "sample.num_frames", 1), ("sample.fps", "sample.fps", 16),
        ("sample.seed", "sample.seed", 0), ("sample.walk_seed", "sample.walk_seed", False),
        ("sample.guidance_scale", "sample.guidance_scale", 7.0), ("sample.steps", "sample.sample_steps", 20),
    ):
        imp.put(ours, imp.take(theirs, default), theirs)
    imp.put("sample.negative_prompt", imp.take("sample.neg", None) or "", "sample.neg")
    prompts = list(imp.take("sample.prompts", []))
    i = 0
    while imp.has(f"sample.samples[{i}].prompt"):
        prompts.append(imp.take(f"sample.samples[{i}].prompt"))
        if imp.has(f"sample.samples[{i}].ctrl_img"):  # an I2V start image, usually a path on the AI Toolkit machine
            imp.note(f"sample.samples[{i}].ctrl_img", imp.take(f"sample.samples[{i}].ctrl_img"),
                     "start image not imported: copy it into the workspace and list it in sample.images (one "
                     "per prompt); without them each prompt starts from a held-out clip's first frame")
        for key in [k for k in imp.src if k.startswith(f"sample.samples[{i}].")]:
            imp.note(key, imp.take(key), "per-prompt settings not supported: every prompt uses the sample.* values")
        i += 1
    imp.put("sample.prompts", prompts, "sample.prompts")
    imp.put("sample.baseline", not imp.take("train.skip_first_sample", False), "train.skip_first_sample")
    raw = imp.take("sample.sample_every", 100)
    every = max(1, raw // imp.per_optimizer_step)
    save_every = imp.tree["save"]["every"]
    nth = max(1, round(every / save_every))
    imp.put("sample.every_checkpoint", nth, "sample.sample_every")
    if nth * save_every != every:
        imp.note("sample.sample_every", raw, f"wanlora samples saved checkpoints: every {nth} checkpoint(s) "
                 f"= {nth * save_every} steps")


def _validate(imp: _Import, path: Path) -> Params:
    """Params from the built tree; a range error names our key and the AI Toolkit key it came from."""
    try:
        return Params.model_validate(imp.tree)
    except ValidationError as err:
        lines = [format_errors(err, f"{path} (imported from AI Toolkit)")]
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            lines += [f"  {ours} came from AI Toolkit {came}" for ours, came in imp.origin.items()
                      if ours == where or ours.startswith(where + ".")]
        raise ParamsError("\n".join(lines)) from None


def _confine(imp: _Import) -> None:
    """Keep what the import writes inside the workspace: `config.name` (used in export file
    names) becomes a plain file name, an absolute or escaping `training_folder` (where exports
    go) is not carried over, and a dataset `folder_path` with `..` is flagged."""
    name = str(imp.tree["job"]["name"])
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._-") or "wan22_lora"
    if safe != name:
        imp.put("job.name", safe, "config.name")
        imp.note("config.name", name, f"not a plain file name; imported as job.name {safe!r}")
    out = str(imp.tree["job"]["output_dir"])
    if Path(out).is_absolute() or ".." in Path(out).parts or out.startswith("~"):
        imp.put("job.output_dir", _DEFAULT_OUTPUT_DIR, "training_folder")
        imp.note("training_folder", out, "outside the workspace: wanlora writes exports inside it; kept "
                 f"job.output_dir {_DEFAULT_OUTPUT_DIR!r} (pass `wanlora export --out` to copy them elsewhere)")
    for ds_name, ds in imp.tree["datasets"].items():
        if ".." in Path(str(ds["folder"])).parts:
            imp.note(f"datasets.{ds_name}.folder", ds["folder"], "has '..': it reads clips from outside the "
                     "folder the config names; check this is the data you mean")


def import_config(path: Path) -> tuple[Params, list[str]]:
    """Params for an AI Toolkit job config (YAML or JSON), and every key it could not map, as
    "key=value (why)" with keys relative to config.process[0]."""
    path = Path(path)
    data = _read(path)
    config = data["config"]
    process = config["process"]
    imp = _Import(process[0])
    _job(imp, config)
    _network(imp)
    _save(imp)
    _model(imp)
    _train(imp)
    _datasets(imp, len(process[0].get("datasets") or []))
    if not imp.tree["datasets"]:
        raise ParamsError(f"{path}: config.process[0].datasets is empty; add a dataset with a folder_path")
    _sample(imp)
    _confine(imp)
    imp.leftovers()
    meta = data.get("meta")
    for key, value in sorted(meta.items() if isinstance(meta, dict) else []):
        imp.note(f"meta.{key}", value, "not used: wanlora writes its own lineage metadata")
    if data.get("job", "extension") != "extension":
        imp.note("job", data["job"], "not supported: only AI Toolkit 'extension' jobs are training jobs")
    for key in sorted(set(config) - {"name", "process"}):
        imp.note(f"config.{key}", config[key], "not supported")
    for key in sorted(set(data) - {"job", "config", "meta"}):
        imp.note(key, data[key], "not supported")
    for i in range(1, len(process)):
        imp.note(f"config.process[{i}]", process[i].get("type"), "only the first process is imported")
    return _validate(imp, path), imp.notes
