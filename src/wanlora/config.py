"""The typed schema of params.yaml.

Every knob a user can turn lives here once, with its meaning in the field's description; the
README's params reference and `wanlora init` are generated from these classes. Sections are named
after AI Toolkit's panels so its users find their way. Models are strict: an unknown key is an
error with a did-you-mean, never a silent default, because a misspelt knob that is ignored costs a
day of GPU time.

DVC reads params.yaml itself (for `dvc params diff` and `-S` overrides), so every value is a plain
scalar, list or mapping: no class paths, no code.
"""

from __future__ import annotations

import difflib
import re
import warnings
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wanlora.errors import UserError

DEFAULT_MODEL = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]

# Value sets named once: the schema's fields below use them, and the code that branches on them
# (quantization, the AI Toolkit importer, the experts) imports them from here.
Expert = Literal["high", "low", "main"]  # transformer (t >= boundary), transformer_2; main: TI2V 5B's one transformer
EXPERTS: tuple[Expert, ...] = get_args(Expert)
Dtype = Literal["bf16", "fp16", "fp32"]
TransformerQType = Literal["none", "float8", "qfloat8", "nf4", "uint4"]
TextEncoderQType = Literal["none", "float8", "qfloat8"]
Optimizer = Literal["adamw8bit", "adamw", "adafactor"]
TimestepType = Literal["linear", "sigmoid", "shift", "weighted"]
TimestepBias = Literal["balanced", "high_noise", "low_noise"]


def nearest_4n1(n: int) -> int:
    """The valid Wan frame count (4n+1, at least 1) closest to n; the VAE needs 4n+1 frames."""
    return max(1, round((n - 1) / 4) * 4 + 1)


class ParamsError(UserError, ValueError):
    """A params.yaml problem a person must fix; the message says where and how."""


class Section(BaseModel):
    """Base of every section: strict keys, validated on assignment, no coercion of garbage."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------- job
class JobConfig(Section):
    name: str = Field("wan22_lora", description="Run name; used in exported file names, so a plain file name.")
    trigger_word: str = Field(
        "sks", description="Word that names the concept; replaces [trigger] in captions and prompts, and "
        "[name] in captions, as AI Toolkit does."
    )
    output_dir: str = Field("exports", description="Folder that `wanlora export` writes to.")
    seed: int = Field(42, ge=0, description="Seed for data order, timesteps, noise and sampling.")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda or cuda:N.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        """Export writes `<name>_stepN_<expert>_noise.safetensors`: a separator or `..` would put it
        outside the workspace, and characters Windows forbids break copying it into ComfyUI there."""
        bad = sorted({c for c in v if c in '/\\:*?"<>|' or ord(c) < 32})
        if not v or len(v) > 128 or v in (".", "..") or bad or v != v.strip(" .") or v.startswith("-"):
            shown = f": {', '.join(repr(c) for c in bad)} not allowed" if bad else ""
            raise ValueError(f"must be a plain file name (1-128 characters, no path separators, not '.' or '..', "
                             f"no leading '-' or dot, no trailing space or dot){shown}; e.g. my_character_v1")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v


# ------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    name_or_path: str = Field(
        DEFAULT_MODEL,
        description="Local diffusers folder or hub id of a Wan 2.2 model (T2V A14B, I2V A14B or TI2V-5B).",
    )
    revision: str = Field("main", description="Hub revision (branch, tag or commit) to pin.")
    variant: Literal["auto", "t2v-a14b", "i2v-a14b", "ti2v-5b"] = Field(
        "auto", description="Which Wan 2.2 model: auto reads it from the folder (model_index.json and the "
        "transformer config); a name is checked against the folder, and a mismatch stops naming both."
    )
    dtype: Dtype = Field(
        "bf16", description="Compute dtype of the base and of the LoRA matmul; LoRA weights, gradients "
        "and optimizer state stay float32.")
    flow_shift: float = Field(
        5.0, gt=0, description="Training shift of the flow-match schedule (5 for Wan 2.2 T2V)."
    )
    low_vram: bool = Field(
        False, description="Keep only the active expert on the GPU (the other waits in pinned CPU memory), "
        "even when both would fit."
    )
    layer_offloading: bool = Field(
        False, description="Block offloading: stream transformer blocks from CPU memory during each step."
    )
    layer_offloading_fraction: float = Field(
        1.0, ge=0, le=1, description="Share of blocks that live in CPU memory when offloading."
    )
    attention_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = Field(
        "auto", description="SDPA backend; auto lets PyTorch choose."
    )
    compile: bool = Field(False, description="torch.compile each transformer block (GPU only).")
    activation_offloading: bool = Field(
        False, description="Keep the activations saved for backward in pinned CPU memory, copied while "
        "the GPU computes: lets long clips keep attention outputs (selective checkpointing) on 80 GB. "
        "Costs host RAM of their size (~1.7 GiB per block at 81f 1024x1024) and ~2% of step time; the "
        "losses equal those without it (bench/RESULTS.md)."
    )


# ------------------------------------------------------------------------------ quantization


class RecoveryConfig(Section):
    """Accuracy recovery for 4-bit bases: a frozen low-rank correction beside the LoRA."""

    source: str = Field(
        "fitted",
        description="'fitted' (calibrated locally on your cached data), 'none', or the path / "
        "hub path of an AI Toolkit adapter (owner/repo/file.safetensors, pin a revision with a trailing @COMMIT).",
    )
    rank: int = Field(16, ge=1, le=512, description="Rank of a locally fitted correction.")
    calibration_samples: int = Field(8, ge=1, description="Cached samples used for calibration.")
    distill_steps: int = Field(0, ge=0, description="Optional block-distillation refinement steps.")


class QuantizationConfig(Section):
    transformer: TransformerQType = Field(
        "none", description="Base weights of both experts: none (bf16), float8, qfloat8, nf4, uint4. qfloat8 "
        "(optimum-quanto) cannot move between GPU and host: one expert per process on a GPU; prefer float8."
    )
    group_size: int = Field(64, ge=16, description="Group size for uint4 / nf4 blocks.")
    fp8_matmul: bool = Field(
        False, description="With transformer: float8, run the base linears on fp8 tensor cores (activations "
        "rounded to e4m3 per token; Ada/Hopper GPUs). Faster, slightly less exact."
    )
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    text_encoder: TextEncoderQType = Field(
        "none", description="UMT5 weights while caching text embeddings."
    )
    cache_dir: str = Field(
        "scratch/quant", description="Where quantized weights are cached, keyed by source and settings."
    )

    @model_validator(mode="after")
    def _fp8_needs_float8(self) -> "QuantizationConfig":
        if self.fp8_matmul and self.transformer != "float8":
            raise ValueError(f"fp8_matmul needs transformer: float8 (got {self.transformer}); set one or the other")
        return self

    @model_validator(mode="before")
    @classmethod
    def _aitk_qtype(cls, data: Any) -> Any:
        """Accept AI Toolkit's 'uint4|<adapter>' spelling for the transformer type."""
        if isinstance(data, dict) and isinstance(data.get("transformer"), str) and "|" in data["transformer"]:
            qtype, adapter = data["transformer"].split("|", 1)
            data = {**data, "transformer": qtype}
            data["recovery"] = {**dict(data.get("recovery") or {}), "source": adapter}
        return data


# -------------------------------------------------------------------------------- multistage
NO_EXPERT = "train_high_noise and train_low_noise are both false: nothing to train; set at least one to true"


class MultistageConfig(Section):
    train_high_noise: bool = Field(True, description="Train a LoRA for the high-noise expert.")
    train_low_noise: bool = Field(True, description="Train a LoRA for the low-noise expert.")
    switch_every: int = Field(
        10, ge=1,
        description="Micro-batches one expert trains before the other takes over, counted as AI Toolkit counts them: "
        "with gradient_accumulation 2, switch_every 1 trains both experts in every optimizer step.",
    )
    expert_choice: Literal["alternate", "proportional"] = Field(
        "alternate",
        description="alternate: switch_every micro-batches in turn; proportional: pick each optimizer step's expert "
        "with the probability of its timestep band.",
    )
    boundary_ratio: float | None = Field(
        None, gt=0, lt=1, description="Expert boundary as a share of 1000 steps; null reads model_index.json."
    )

    @property
    def experts(self) -> tuple[Expert, ...]:
        """The A14B experts these settings train, high-noise first; never empty (`_one_expert`)."""
        return tuple(e for e, on in (("high", self.train_high_noise), ("low", self.train_low_noise)) if on)

    @model_validator(mode="after")
    def _one_expert(self) -> "MultistageConfig":
        """The one place that refuses a run with no expert: the trainer's parts rely on it."""
        if not self.experts:
            raise ValueError(NO_EXPERT)
        return self


# ----------------------------------------------------------------------------------- network
class NetworkConfig(Section):
    type: Literal["lora"] = Field("lora", description="Adapter type.")
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank (16-32 for characters).")
    alpha: float = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha/rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="diffusers module names to adapt in every block (self- and cross-attention, FFN).",
    )

    @field_validator("rank")
    @classmethod
    def _rank_warn(cls, v: int) -> int:
        if v > 64:
            warnings.warn(f"network.rank={v} is above 64: big files, slow steps, rarely better", stacklevel=2)
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one module, e.g. " + ", ".join(DEFAULT_TARGETS))
        return v


# -------------------------------------------------------------------------------------- save
class SaveConfig(Section):
    dtype: Dtype = Field("bf16", description="dtype of saved LoRA tensors (training keeps float32 masters).")
    every: int = Field(250, ge=1, description="Save a checkpoint pair every this many steps.")
    keep_last: int = Field(4, ge=1, description="How many checkpoint pairs to keep.")


# ------------------------------------------------------------------------------------- train
class DopConfig(Section):
    """Differential Output Preservation: keep the class prompt's output as the base model gives it."""

    enabled: bool = Field(False, description="Add the preservation loss.")
    multiplier: float = Field(1.0, ge=0, description="Weight of the preservation loss.")
    preservation_class: str = Field("person", description="Word that replaces the trigger.")


class DifferentialGuidanceConfig(Section):
    enabled: bool = Field(False, description="Push the target past the prediction.")
    scale: float = Field(3.0, gt=0, description="target := pred + scale*(target - pred).")


class EmaConfig(Section):
    enabled: bool = Field(False, description="Keep an exponential moving average of LoRA weights.")
    decay: float = Field(
        0.999, gt=0, lt=1, description="EMA decay per optimizer step of the LoRA's own expert (AI Toolkit's default)."
    )


class TrainConfig(Section):
    batch_size: int = Field(1, ge=1, le=8, description="Samples per micro-step (same bucket).")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    steps: int = Field(2000, ge=1, description="Optimizer steps in total, both experts together.")
    optimizer: Optimizer = Field("adamw8bit", description="Optimizer.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="Decoupled weight decay.")
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="AdamW / AdamW8bit moment decays (beta1, beta2)."
    )
    eps: float = Field(1e-6, gt=0, description="AdamW / AdamW8bit denominator epsilon (1e-6 as AI Toolkit).")
    lr_scheduler: Literal["constant", "cosine", "linear", "linear_ramp"] = Field(
        "constant", description="LR schedule after warm-up: constant; cosine or linear decay to 0 at train.steps; "
        "linear_ramp from lr x lr_start_factor to lr x lr_end_factor (AI Toolkit's linear: 1/3 to 1)."
    )
    lr_start_factor: float = Field(1 / 3, ge=0, description="linear_ramp: share of lr at the first step.")
    lr_end_factor: float = Field(1.0, ge=0, description="linear_ramp: share of lr at train.steps.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables.")
    loss: Literal["mse"] = Field("mse", description="Loss against the velocity target.")
    timestep_type: TimestepType = Field(
        "linear", description="Distribution of training timesteps (README has plots)."
    )
    timestep_bias: TimestepBias = Field(
        "balanced", description="Skew of the timestep draw."
    )
    last_frame: bool = Field(
        False, description="I2V A14B: condition every sample on its last frame as well as its first (first-and-last-"
        "frame to video, WanImageToVideoPipeline's last_image); samples then end on the held-out clip's last frame, "
        "or on sample.last_images."
    )
    latent_mode: Literal["distribution", "mode"] = Field(
        "distribution", description="Cache VAE mean+logvar and sample each step, or cache the deterministic mode."
    )
    caption_dropout: float = Field(
        0.05, ge=0, le=1,
        description="Probability that a sample's caption is replaced by the trigger word alone (DOP's class prompt "
        "by the class word alone), or by the empty caption when job.trigger_word is empty, as AI Toolkit does.",
    )
    gradient_checkpointing: Literal["selective", "full", "none"] = Field(
        "selective",
        description="Per-block recompute in backward: selective keeps self-attention outputs (fastest that fits), "
        "full recomputes everything (least memory), none keeps all activations. true means selective.",
    )
    cache_text_embeddings: Literal[True] = Field(
        True, description="Always true: training reads the text cache, so UMT5 never shares the GPU with an expert."
    )
    unload_text_encoder: bool = Field(
        False, description="AI Toolkit's meaning: ignore caption files and caption every clip with the trigger word alone."
    )
    dop: DopConfig = Field(default_factory=DopConfig)
    differential_guidance: DifferentialGuidanceConfig = Field(default_factory=DifferentialGuidanceConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    max_bad_steps: int = Field(5, ge=1, description="Stop after this many NaN/inf losses in a row.")
    parallel: Literal["auto", "data", "expert"] = Field(
        "auto",
        description="Under torchrun with 2+ GPUs: expert (the two experts train at once, each on half the "
        "GPUs), data (every GPU holds the active expert, batches split), auto (expert when both experts "
        "train and the GPU count is even, else data).",
    )
    sharded_base: bool = Field(
        False, description="Shard each expert's frozen base over its GPUs (FSDP2) when a bucket does not fit one card."
    )
    gpus: int = Field(
        1, ge=0, description="GPUs `dvc repro` trains on: the stage re-runs itself under torchrun with this many "
        "processes (0 = every visible GPU). Ignored when launched by torchrun or accelerate."
    )
    sequence_parallel: int = Field(
        1, ge=1, description="Split each sample's tokens over this many GPUs (Ulysses: self-attention trades heads "
        "for tokens by all-to-all), for clips one GPU cannot hold; the GPU count must be a multiple (the rest is "
        "data- or expert-parallel). Must divide the heads (A14B 40: 2, 4, 5, 8) and every bucket's tokens."
    )

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1); AdamW's default is [0.9, 0.999]")
        return v

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_bool(cls, v: Any) -> Any:
        """AI Toolkit's true/false: true is our fastest mode that saves memory, false is none."""
        return {True: "selective", False: "none"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _sharded_optimizer(self) -> TrainConfig:
        """FSDP2 hands the optimizer sharded DTensor parameters; bitsandbytes' 8-bit kernels and
        Adafactor's factored state need whole local tensors (measured on two H100s: bitsandbytes
        stops with "got mixed torch.Tensor and DTensor"). A LoRA's AdamW state is a few hundred MB,
        so the 8-bit saving hardly matters next to a sharded base."""
        if self.sharded_base and self.optimizer != "adamw":
            raise ValueError(f"sharded_base needs optimizer: adamw (got {self.optimizer!r}): the "
                             "8-bit and Adafactor optimizers cannot step FSDP's sharded parameters")
        if self.sharded_base and self.sequence_parallel > 1:
            raise ValueError("sharded_base and sequence_parallel > 1 together are not supported yet (FSDP over "
                             "sequence-parallel ranks is untested): sequence parallelism already divides the "
                             "activations; for the weights use quantization.transformer: float8")
        return self


# ---------------------------------------------------------------------------------- datasets
class TrimConfig(Section):
    enabled: bool = Field(True, description="Cut static intros and outros.")
    black_level: float = Field(16.0, ge=0, le=255, description="Mean luma at or below which a frame is black.")
    motion_threshold: float = Field(
        2.0, ge=0, description="Largest mean absolute difference (0-255) over a 4x4 grid of blurred, "
        "brightness-matched 64-px grey frames, against the first frame of a still run, above which the picture moves. "
        "A still run must also not drift at 384 px beyond its own noise (slow motion is motion)."
    )
    min_static_seconds: float = Field(0.25, ge=0, description="Shortest still run that counts as static.")
    max_scan_seconds: float = Field(20.0, gt=0, description="Stop scanning an end after this long.")
    letterbox: bool = Field(True, description="Detect letterbox / pillarbox bars and crop them.")


class BucketConfig(Section):
    resolutions: list[int] = Field(
        default_factory=lambda: [512], description="Target areas as side lengths (512 means 512x512 pixels)."
    )
    num_frames: list[int] = Field(
        default_factory=lambda: [33], description="Allowed frame counts, each 4n+1; a clip gets the largest that fits."
    )
    frame_sampling: Literal["auto", "window", "spread"] = Field(
        "auto", description="auto: contiguous windows at `fps` (true speed) covering the kept range, or one sample "
        "spread over it where that plays within 25% of true speed; window: windows only; spread: evenly over the "
        "whole kept range (AI Toolkit's default: a clip longer than the bucket plays its motion too fast)."
    )
    windows_per_clip: int | None = Field(
        None, ge=1, description="At most this many windows per clip (null: as many as cover the kept range)."
    )
    fps: float | None = Field(
        None, gt=0, description="Frame rate windows are resampled to by time; null: the model's own (16 for the "
        "A14B models, 24 for TI2V 5B)."
    )
    every_resolution: bool = Field(
        True, description="A sample at every listed resolution the clip reaches without upscaling (AI Toolkit); "
        "false: the largest only."
    )
    allow_upscale: bool = Field(False, description="Allow buckets larger than the source.")

    @field_validator("num_frames")
    @classmethod
    def _four_n_plus_one(cls, v: list[int]) -> list[int]:
        bad = [n for n in v if n < 1 or (n - 1) % 4]
        if bad or not v:
            raise ValueError(
                f"frame counts must be 4n+1 (1, 5, 9, ..., 33, 41, 81); got {bad or v}: "
                f"use {[nearest_4n1(n) for n in bad] or [33]}"
            )
        return sorted(set(v))

    @field_validator("resolutions")
    @classmethod
    def _res(cls, v: list[int]) -> list[int]:
        bad = [r for r in v if r < 16 or r % 16]
        if bad or not v:
            raise ValueError(f"resolutions must be multiples of 16, at least 16; got {bad or v}")
        return sorted(set(v))


class CaptionConfig(Section):
    extension: str = Field("txt", description="Caption file extension beside each clip.")
    default_caption: str = Field("", description="Caption for clips that have none ('' reports them).")
    trigger_position: Literal["start", "end", "none"] = Field(
        "start", description="Where to insert the trigger when a caption lacks it: start ('sks a dog', as AI "
        "Toolkit), end ('a dog, sks'; after a full stop 'A dog. sks') or none."
    )
    non_utf8: Literal["error", "decode_latin1"] = Field(
        "error", description="error: report non-UTF-8 captions; decode_latin1: decode with a warning."
    )
    max_tokens: int = Field(512, ge=1, le=512, description="UMT5 keeps this many tokens.")


class DatasetConfig(Section):
    folder: str = Field("data/raw", description="Folder of clips, images and same-stem captions.")
    trim: TrimConfig = Field(default_factory=TrimConfig)
    bucket: BucketConfig = Field(default_factory=BucketConfig)
    captions: CaptionConfig = Field(default_factory=CaptionConfig)
    flip_horizontal: bool = Field(False, description="Add mirrored copies (not for text or asymmetry).")
    cache_latents: bool = Field(True, description="Encode windows once with the VAE.")
    on_error: Literal["skip", "fail"] = Field("skip", description="Bad input: report and skip, or stop.")
    role: Literal["train", "validation"] = Field(
        "train", description="validation: never trained on; its clips give the held-out loss that picks 'best' "
        "(sample.validation_clips is then not taken from the training datasets)."
    )
    i2v_share: float | None = Field(
        None, ge=0, le=1, description="TI2V 5B only: probability that a video sample trains image-to-video (its first "
        "latent frame kept clean at t = 0 as the start image, left out of the loss) instead of text-to-video; "
        "null: 0.5, so one LoRA serves both (AI Toolkit's do_i2v: true is 1.0). Images always train text-to-image."
    )

    @model_validator(mode="after")
    def _validation_cached(self) -> "DatasetConfig":
        if self.role == "validation" and not self.cache_latents:
            raise ValueError("a validation dataset is scored from the latent cache: set cache_latents: true")
        return self


# ------------------------------------------------------------------------------- autocaption
#: The default captioner: Qwen3-VL 8B (AI Toolkit's captioner family) is ~17.5 GB in bf16, so it fits
#: the 24 GB tier on its own; the stage frees it before any expert or UMT5 is loaded.
DEFAULT_CAPTIONER = "Qwen/Qwen3-VL-8B-Instruct"

#: One prompt per `wanlora init` recipe, after the seed guide's caption advice: a character caption
#: describes everything but the person (the trigger stands for them), a style caption names the look
#: and not the objects, a motion caption names the motion and camera move in the same words each time.
CAPTION_PROMPTS = {
    "character": (
        "These are frames from one video clip. Write one caption of at most 60 words for it. Call the "
        "main person [trigger] and do not describe their face, age, ethnicity or body; describe their "
        "clothing, pose and action, the setting, the lighting and the framing (close-up, medium or wide "
        "shot). Plain prose, no lists, no preamble."
    ),
    "style": (
        "These are frames from one video clip. Write one caption of at most 60 words that describes its "
        "visual style only: colour palette, contrast, texture and grain, brushwork or rendering, lighting, "
        "lens and depth of field. Name the subject in a few words only. End with: [trigger] style. "
        "Plain prose, no lists, no preamble."
    ),
    "motion": (
        "These are frames from one video clip, in order. Write one caption of at most 60 words. Start by "
        "naming the main motion and the camera move explicitly (for example: orbit 180 around the subject, "
        "dolly in, pan left, side scroll), then the subject and the setting in a few words. Use the word "
        "[trigger] for the motion. Plain prose, no lists, no preamble."
    ),
}


class AutocaptionConfig(Section):
    """A vision-language model writes captions for clips that have none, as a cached DVC stage."""

    mode: Literal["missing", "all", "off"] = Field(
        "missing", description="missing: caption clips without a caption file; all: every clip (your files still "
        "win in the captions stage); off: no auto captions."
    )
    model: str = Field(DEFAULT_CAPTIONER, description="Hub id or local folder of a Qwen-VL-class captioner "
                       "(qwen2_5_vl, qwen3_vl), safetensors only.")
    revision: str = Field("main", description="Hub revision (branch, tag or commit) of the captioner to pin.")
    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Captioner dtype.")
    prompt: str = Field(CAPTION_PROMPTS["character"], description="Instruction given with the frames; "
                        "`wanlora init` sets the recipe's prompt. [trigger] becomes job.trigger_word later.")
    frames: int = Field(6, ge=1, le=32, description="Frames per clip, spread over the kept, cropped range.")
    frame_side: int = Field(448, ge=32, le=1344, description="Each frame is resized to about this side "
                            "squared in pixels (aspect kept) before the captioner sees it.")
    max_new_tokens: int = Field(160, ge=8, le=1024, description="Most tokens the captioner may write per clip.")
    num_beams: int = Field(1, ge=1, le=8, description="Beam search width; 1 is greedy. Decoding never samples, "
                           "so a rerun writes byte-identical captions.")
    repetition_penalty: float = Field(1.05, ge=1.0, le=2.0, description="Penalty on repeated tokens while "
                                      "decoding (1 disables).")


# ------------------------------------------------------------------------------------ sample
class SampleConfig(Section):
    prompts: list[str] = Field(
        default_factory=lambda: ["[trigger] walking through a park"], description="Prompts per checkpoint."
    )
    negative_prompt: str = Field("", description="Negative prompt for classifier-free guidance.")
    images: list[str] = Field(
        default_factory=list, description="I2V: the start image of each prompt (workspace-relative image, or a "
        "video whose first frame is used), one per prompt; empty: prompt i starts from the first frame of the "
        "i-th held-out sample (of the training samples when none is held out). T2V and 5B text-to-video: empty."
    )
    last_images: list[str] = Field(
        default_factory=list, description="I2V with train.last_frame: the last frame of each prompt's video, one per "
        "prompt beside sample.images; empty: the last frame of the sample the start frame came from."
    )
    steps: int = Field(25, ge=1, description="Sampler steps.")
    guidance_scale: float = Field(3.5, ge=1, description="Classifier-free guidance scale (2-4 works).")
    num_frames: int = Field(33, ge=1, description="Frames per sample, 4n+1.")
    width: int = Field(512, ge=16, description="Sample width, multiple of 16.")
    height: int = Field(512, ge=16, description="Sample height, multiple of 16.")
    fps: int | None = Field(None, ge=1, description="Frame rate of written videos; null: the model's own (16 for the "
                            "A14B models, 24 for TI2V 5B).")
    seed: int = Field(42, ge=0, description="Seed of the first prompt.")
    walk_seed: bool = Field(True, description="Prompt i uses seed + i.")
    every_checkpoint: int = Field(1, ge=1, description="Sample every Nth saved checkpoint.")
    baseline: bool = Field(True, description="Also sample without the LoRA at the same seeds.")
    validation_clips: int = Field(
        2, ge=0, description="Whole clips (or images) held out of training for the validation loss, chosen by "
        "job.seed, when no dataset has role: validation; at most a fifth of the clips (fewer: the loss is on "
        "training clips, labelled so). 0: no validation loss."
    )
    validation_timesteps: list[int] = Field(
        default_factory=lambda: [100, 300, 500, 700, 900, 950], description="Fixed timesteps of validation loss."
    )
    validation_noise_draws: int = Field(
        2, ge=1, le=16, description="Fixed noise draws per clip and timestep; their spread sets the noise margin "
        "of the 'best' checkpoint choice."
    )
    preview: bool = Field(True, description="Render the prompts during training into data/train_live/previews.")
    preview_every: int = Field(0, ge=0, description="Preview every this many steps; 0: at every save (save.every).")
    preview_steps: int = Field(8, ge=1, description="Sampler steps of a preview (4 with a step-distilled preview_lora).")
    preview_guidance_scale: float = Field(3.5, ge=1, description="Guidance of previews (1 with a step-distilled preview_lora).")
    preview_num_frames: int = Field(17, ge=1, description="Frames per preview, 4n+1.")
    preview_width: int = Field(256, ge=16, description="Preview width, multiple of 16.")
    preview_height: int = Field(256, ge=16, description="Preview height, multiple of 16.")
    preview_lora: dict[Literal["high", "low"], str] = Field(
        default_factory=dict, description="Safetensors LoRA per expert stacked for previews only (e.g. LightX2V).")

    @model_validator(mode="after")
    def _one_image_per_prompt(self) -> "SampleConfig":
        for key, what in (("images", "start"), ("last_images", "last")):
            listed = getattr(self, key)
            if listed and len(listed) != len(self.prompts):
                raise ValueError(f"sample.{key} lists {len(listed)} {what} image(s) for {len(self.prompts)} prompt(s): "
                                 f"give one per prompt, or none to take held-out samples' {what} frames")
        if self.last_images and not self.images:
            raise ValueError("sample.last_images needs sample.images (a start image for each prompt as well)")
        return self

    @field_validator("validation_timesteps")
    @classmethod
    def _timesteps(cls, v: list[int]) -> list[int]:
        bad = [t for t in v if not 0 <= t < 1000]
        if bad:
            raise ValueError(f"timesteps must lie in 0..999, got {bad}")
        return v

    # Field validators, not one for the section: the error then names sample.num_frames and its
    # value, not the whole sample mapping.
    @field_validator("num_frames", "preview_num_frames")
    @classmethod
    def _four_n_plus_one(cls, v: int) -> int:
        if (v - 1) % 4:
            raise ValueError(f"must be 4n+1 (the VAE's frame grid): use {nearest_4n1(v)}")
        return v

    @field_validator("width", "height", "preview_width", "preview_height")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"must be a multiple of 16: use {max(16, round(v / 16) * 16)}")
        return v


class ExportConfig(Section):
    step: str = Field(
        "best", description="'best' (per expert: lowest held-out loss, or an earlier checkpoint within its noise; "
        "README: how best is chosen), 'last', or a step number."
    )
    formats: list[Literal["comfyui", "diffusers"]] = Field(
        default_factory=lambda: ["comfyui", "diffusers"], description="File formats to write."
    )

    @field_validator("step")
    @classmethod
    def _step(cls, v: str) -> str:
        if v not in ("best", "last") and not str(v).isdigit():
            raise ValueError("must be 'best', 'last' or a step number")
        return str(v)


# ------------------------------------------------------------------------------------ params
class Params(Section):
    job: JobConfig = Field(default_factory=JobConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    multistage: MultistageConfig = Field(default_factory=MultistageConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    save: SaveConfig = Field(default_factory=SaveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    datasets: dict[str, DatasetConfig] = Field(
        default_factory=lambda: {"main": DatasetConfig()},
        description="Named datasets; each reads its own folder with its own settings.",
    )
    autocaption: AutocaptionConfig = Field(default_factory=AutocaptionConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @property
    def preview_every(self) -> int:
        """Steps between training previews: `sample.preview_every`, 0 meaning at every save."""
        return self.sample.preview_every or self.save.every

    @field_validator("datasets")
    @classmethod
    def _some_dataset(cls, v: dict[str, DatasetConfig]) -> dict[str, DatasetConfig]:
        if not v:
            raise ValueError("needs at least one dataset, e.g. {main: {folder: data/raw}}")
        return v

    @model_validator(mode="after")
    def _sequence_dropout(self) -> "Params":
        """LoRA dropout draws its mask from the batch's seed over the layer's input; under sequence
        parallelism each rank's input is its token shard, so the masks (and the step) would differ
        from one GPU's, and every shard would reuse the same draw."""
        if self.train.sequence_parallel > 1 and self.network.dropout > 0:
            raise ValueError(f"network.dropout {self.network.dropout} with train.sequence_parallel "
                             f"{self.train.sequence_parallel}: dropout masks would be drawn per token shard, so the "
                             "step would not be one GPU's. Fix: network.dropout: 0, or train.sequence_parallel: 1")
        return self


# ------------------------------------------------------------------------------- loading
def _known_keys(loc: tuple) -> list[str]:
    """Field names valid where an unknown key was found (a pydantic error location), for did-you-mean."""
    cls: Any = Params
    in_mapping = False
    for part in loc[:-1]:
        if in_mapping:  # a free name such as a dataset's: its value has the mapping's value type
            in_mapping = False
            continue
        ann = cls.model_fields[part].annotation
        if getattr(ann, "__origin__", None) is dict:
            cls, in_mapping = ann.__args__[1], True
        else:
            cls = ann
    return list(cls.model_fields)


# AI Toolkit spellings people carry over, which difflib cannot link to ours.
AITK_NAMES = {
    "learning_rate": "lr", "linear": "rank", "linear_alpha": "alpha", "save_every": "every",
    "max_step_saves_to_keep": "keep_last", "switch_boundary_every": "switch_every", "folder_path": "folder",
    "caption_ext": "extension", "flip_x": "flip_horizontal", "sample_steps": "steps", "neg": "negative_prompt",
    "caption_dropout_rate": "caption_dropout", "content_or_style": "timestep_bias", "qtype": "transformer",
    "qtype_te": "text_encoder", "ema_config": "ema", "diff_output_preservation": "dop",
}


def format_errors(err: ValidationError, source: str) -> str:
    """Turn pydantic's errors into lines a person can act on: where, what, and the fix."""
    lines = [f"{source}: {err.error_count()} problem(s)"]
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _known_keys(loc)
            alias = AITK_NAMES.get(str(loc[-1]))
            close = [alias] if alias in known else difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(known)
            lines.append(f"  {where}: unknown key; {hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_params(data: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a params mapping; raise ParamsError with every problem listed."""
    try:
        return Params.model_validate(data or {})
    except ValidationError as err:
        raise ParamsError(format_errors(err, source)) from None


class _ParamsLoader(yaml.SafeLoader):
    """YAML 1.2 booleans (true/false only), as DVC reads and writes params.yaml (ruamel): `dvc exp
    run -S` rewrites `autocaption.mode: off` unquoted, and YAML 1.1 would read it back as false."""


_ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; a missing or malformed file names itself in the error."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run `wanlora init` to write one")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ParamsLoader)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return parse_params(data, str(path))


class _ParamsDumper(yaml.SafeDumper):
    """PyYAML folds U+0085 (NEL) inside single-quoted scalars; such strings are written double-quoted."""


_ParamsDumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style='"' if "\x85" in s else None)
)


def dump_params(params: Params) -> str:
    """params.yaml text for a Params: every field written out, so nothing is a hidden default."""
    return yaml.dump(params.model_dump(mode="json"), Dumper=_ParamsDumper, sort_keys=False, allow_unicode=True,
                     width=100)
