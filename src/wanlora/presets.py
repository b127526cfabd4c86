"""`wanlora init` presets: a training recipe (what you teach) on a hardware tier (what you own).

The presets are data, not branches: each tier and each recipe is a list of settings, every one
with the reason it is there, and `make_params` lays the recipe over the tier over the schema
defaults. `describe` prints the same reasons into the header of the params.yaml it writes, so a
person reading the file learns why a value is what it is before changing it.

Memory figures in the reasons come from bench measurements on one H100 (docs in STACK.md): a
14B expert is ~27 GiB in bf16, ~13 GiB in float8 and ~7 GiB in uint4; with full gradient
checkpointing 33 frames at 512x512 (9,216 tokens) need ~9 GiB of activations and 81 frames at
832x480 (32,760 tokens) ~27 GiB, growing about linearly with the token count
((frames-1)/4+1 latent frames x (side/16)^2 patches).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from wanlora.config import CAPTION_PROMPTS, Params, ParamsError, dump_params, parse_params
from wanlora.io import atomic_write_text
from wanlora.models.variant import LEGACY_VARIANT, VARIANTS

Recipe = Literal["character", "style", "motion", "smoke"]
Vram = Literal[12, 16, 24, 48, 80, 141]


@dataclass(frozen=True)
class Setting:
    key: str  # dotted params key; datasets.main.* is the default dataset
    value: Any
    why: str


def _tier_resolutions(sides: list[int], frames: list[int], why: str,
                      pace: str = "16-fps windows keep motion at its true speed; spreading an 8 s clip over 33 "
                                  "frames plays it 4x fast") -> tuple[Setting, ...]:
    return (
        Setting("datasets.main.bucket.resolutions", sides, why),
        Setting("datasets.main.bucket.num_frames", frames, why),
        Setting("datasets.main.bucket.every_resolution", True,
                "each clip at every listed size it reaches without upscaling, as AI Toolkit trains it"),
        Setting("datasets.main.bucket.frame_sampling", "auto", pace),
    )


TIERS: dict[int, tuple[Setting, ...]] = {
    24: (
        Setting("quantization.transformer", "uint4", "a bf16 expert is ~27 GiB; uint4 is ~7 GiB"),
        Setting("quantization.recovery.source", "fitted",
                "a fitted low-rank correction wins back most of the 4-bit error"),
        Setting("quantization.text_encoder", "float8", "UMT5-XXL is ~11 GiB in bf16; float8 halves it while caching"),
        Setting("model.low_vram", True, "only the expert being trained sits on the GPU; the other waits in CPU memory"),
        Setting("model.layer_offloading", False,
                "uint4 weights (~7 GiB) + 33f@512 activations (~9 GiB) fit 24 GB without it"),
        *_tier_resolutions([512], [33],
                           "33 frames at 512x512 is the largest window whose activations fit beside a uint4 expert"),
        Setting("multistage.switch_every", 10,
                "with low_vram each switch moves an expert over PCIe; 10 steps amortise it"),
        Setting("sample.width", 512, "samples at the training size cost no extra memory"),
        Setting("sample.height", 512, "samples at the training size cost no extra memory"),
        Setting("sample.num_frames", 33, "samples at the training length cost no extra memory"),
    ),
    48: (
        Setting("quantization.transformer", "float8",
                "a float8 expert (~13 GiB) keeps near-bf16 quality; 4-bit is not needed"),
        Setting("quantization.text_encoder", "float8", "UMT5-XXL in float8 leaves room to cache with the VAE loaded"),
        Setting("model.low_vram", True,
                "two float8 experts (~26 GiB) plus 41f@768 activations (~21 GiB) overflow 48 GB"),
        Setting("model.layer_offloading", False,
                "one float8 expert and its activations fit; streaming blocks would only slow steps"),
        *_tier_resolutions([512, 768], [33, 41],
                           "41f at 768x768 (25k tokens) is the largest window that fits beside one float8 expert"),
        Setting("multistage.switch_every", 10,
                "low_vram moves a 13 GiB expert per switch (~0.5 s); every 10 steps keeps that near 1%"),
        Setting("sample.width", 832, "Wan 2.2's native 16:9 480p"),
        Setting("sample.height", 480, "Wan 2.2's native 16:9 480p"),
        Setting("sample.num_frames", 41, "the longest training window"),
    ),
    80: (
        Setting("quantization.transformer", "float8", "float8 frees ~14 GiB per expert for long, large windows"),
        Setting("quantization.text_encoder", "float8", "UMT5-XXL in float8 leaves room to cache with the VAE loaded"),
        Setting("model.low_vram", True,
                "two float8 experts (~26 GiB) plus 61f@1024 activations (~54 GiB) overflow 80 GB"),
        Setting("model.layer_offloading", False, "one float8 expert and its activations fit"),
        *_tier_resolutions([512, 768, 1024], [41, 61],
                           "81 frames at 1024x1024 (86k tokens, ~71 GiB of activations) would not fit; 61 does"),
        Setting("train.gradient_checkpointing", "full",
                "61f@1024 keeps ~69 GiB of activations with selective checkpointing, ~52 GiB with full: "
                "only full fits beside a float8 expert (`wanlora plan` shows both)"),
        Setting("multistage.switch_every", 1,
                "a ~0.5 s expert swap is small beside a ~20 s step; alternating every step balances both"),
        Setting("sample.width", 832, "Wan 2.2's native 16:9 480p"),
        Setting("sample.height", 480, "Wan 2.2's native 16:9 480p"),
        Setting("sample.num_frames", 81, "Wan 2.2's native 5 s clip"),
    ),
    141: (
        Setting("quantization.transformer", "none", "bf16 weights: no quantization error at all, memory allows it"),
        Setting("quantization.text_encoder", "none", "bf16 UMT5 fits easily"),
        Setting("model.low_vram", False, "both bf16 experts (~54 GiB) plus 81f@1024 activations (~71 GiB) fit 141 GB"),
        Setting("model.layer_offloading", False, "everything fits on the GPU"),
        *_tier_resolutions([512, 768, 1024], [41, 61, 81], "81 frames at 1024x1024 fits beside a bf16 expert"),
        Setting("multistage.switch_every", 1, "both experts stay on the GPU, so switching costs nothing"),
        Setting("sample.width", 1280, "Wan 2.2's 720p, which fits easily here"),
        Setting("sample.height", 720, "Wan 2.2's 720p, which fits easily here"),
        Setting("sample.num_frames", 81, "Wan 2.2's native 5 s clip"),
    ),
}

#: Why TI2V 5B buckets sample by time: at its own 24 fps (bucket.fps left null).
_TI2V_PACE = "windows at the 5B's 24 fps keep motion at its true speed (121 frames is its native 5 s)"


def _ti2v_samples(side: int, frames: int, why: str) -> tuple[Setting, ...]:
    """Square samples of `side` px and `frames` frames (both multiples the 5B accepts)."""
    return (Setting("sample.width", side, why), Setting("sample.height", side, why),
            Setting("sample.num_frames", frames, "the 5B's native 5 s at 24 fps" if frames == 121 else
                    "the longest training window"))


#: TI2V 5B's tiers: one 5B transformer (~9.3 GiB in bf16, ~4.7 GiB in float8) and the 16x VAE,
#: whose tokens are a quarter of A14B's at one clip size, put video LoRAs on 12-24 GB cards. The
#: figures are `wanlora plan`'s, whose activations for 5B are scaled from the A14B calibration.
TI2V_TIERS: dict[int, tuple[Setting, ...]] = {
    12: (
        Setting("quantization.transformer", "float8", "a float8 5B (~4.7 GiB) leaves 12 GB room for 81-frame windows"),
        Setting("quantization.text_encoder", "float8", "UMT5-XXL is ~11 GiB in bf16; float8 halves it while caching"),
        *_tier_resolutions([512], [49, 81], "81 frames at 512x512 (5k tokens at 16x): ~8 GiB at the peak", _TI2V_PACE),
        *_ti2v_samples(512, 81, "samples at the training size cost no extra memory"),
    ),
    16: (
        Setting("quantization.transformer", "float8", "a float8 5B (~4.7 GiB) keeps near-bf16 quality"),
        Setting("quantization.text_encoder", "float8", "UMT5-XXL in float8 leaves room to cache with the VAE loaded"),
        *_tier_resolutions([512, 768], [49, 81, 121], "121 frames at 768x768 (18k tokens) fit with full checkpointing",
                           _TI2V_PACE),
        Setting("train.gradient_checkpointing", "full",
                "121f@768 keeps ~14 GiB at the peak with selective checkpointing, ~12 GiB with full: "
                "only full fits 16 GB (`wanlora plan` shows both)"),
        *_ti2v_samples(768, 121, "AI Toolkit's 5B sample size"),
    ),
    24: (
        Setting("quantization.transformer", "none", "the bf16 5B is ~9.3 GiB: no quantization error, memory allows it"),
        Setting("quantization.text_encoder", "float8", "UMT5-XXL in float8 leaves room to cache with the VAE loaded"),
        *_tier_resolutions([512, 768], [49, 81, 121], "121 frames at 768x768 beside a bf16 5B: ~19 GiB at the peak",
                           _TI2V_PACE),
        *_ti2v_samples(768, 121, "AI Toolkit's 5B sample size"),
    ),
}

RECIPES: dict[str, tuple[Setting, ...]] = {
    "character": (
        Setting("network.rank", 16, "16 holds a face and build; go to 32 only for many outfits or angles"),
        Setting("network.alpha", 16, "alpha = rank keeps the update scale at 1, so lr means the same at any rank"),
        Setting("train.steps", 2500, "characters converge in 2000-3000 steps on 10-30 clips"),
        Setting("train.timestep_type", "linear", "identity lives at every noise level: sample them evenly"),
        Setting("train.timestep_bias", "balanced",
                "both experts matter: layout (high noise) and face detail (low noise)"),
        Setting("train.dop.enabled", False,
                "off until you see the trigger leak into every person; costs a second forward pass"),
        Setting("train.dop.preservation_class", "person", "what the trigger is an instance of, for DOP"),
        Setting("sample.prompts", ["[trigger] walking through a park, medium shot",
                                   "close-up of [trigger] smiling, soft window light",
                                   "[trigger] running on a beach at sunset, tracking shot"],
                "the same person across framing, light and motion shows identity is learned, not memorised"),
        Setting("autocaption.prompt", CAPTION_PROMPTS["character"],
                "auto captions describe everything but the person, so the trigger alone carries the identity"),
    ),
    "style": (
        Setting("network.rank", 16, "a look needs few directions; higher ranks start copying content"),
        Setting("network.alpha", 16, "alpha = rank keeps the update scale at 1"),
        Setting("train.steps", 2000, "styles converge in 1500-2500 steps"),
        Setting("train.timestep_type", "shift",
                "the flow shift puts more draws at high noise, where palette and composition form"),
        Setting("train.timestep_bias", "high_noise",
                "Wan 2.2's high-noise expert sets the global look; the low-noise one refines texture"),
        Setting("train.dop.enabled", False, "off by default; turn on if unstyled prompts start taking the style"),
        Setting("train.dop.preservation_class", "scene",
                "a style applies to whole scenes, so DOP preserves plain scenes"),
        Setting("sample.prompts", ["a city street at night, [trigger] style",
                                   "a portrait of an old fisherman, [trigger] style",
                                   "a forest river in spring, [trigger] style"],
                "varied subjects show the style transfers instead of its training content"),
        Setting("autocaption.prompt", CAPTION_PROMPTS["style"],
                "auto captions name the look, not the objects, so the style is not tied to the training content"),
    ),
    "motion": (
        Setting("network.rank", 16, "a motion is a small change to the model; 16 holds it"),
        Setting("network.alpha", 16, "alpha = rank keeps the update scale at 1"),
        Setting("train.steps", 2000, "motions converge in 1500-2500 steps"),
        Setting("train.timestep_type", "linear", "motion is set early and refined late: sample every level evenly"),
        Setting("train.timestep_bias", "balanced",
                "both experts carry motion: trajectory at high noise, timing detail at low"),
        Setting("train.dop.enabled", False, "a motion has no class to preserve"),
        Setting("sample.prompts", ["a woman doing [trigger] in a kitchen",
                                   "an astronaut doing [trigger] on the moon",
                                   "a dog doing [trigger] in a meadow"],
                "different subjects show the motion is learned, not the people who performed it"),
        Setting("autocaption.prompt", CAPTION_PROMPTS["motion"],
                "auto captions name the motion and camera move in the same words on every clip"),
    ),
    # Not a way to train: a check of the whole path (your clips and captions through every stage to
    # an export and its audit) in minutes on a CPU, with the tiny model of `wanlora make-tiny`,
    # before GPU hours go into the real recipe. No tier applies (see _settings): no quantization,
    # both tiny experts resident, the schema defaults.
    "smoke": (
        Setting("job.device", "cpu", "the tiny model runs anywhere; no GPU is needed to check the path"),
        Setting("model.dtype", "fp32", "a CPU has no fast bf16 matmuls; float32 is quicker there"),
        *_tier_resolutions([64], [9], "the smallest windows: every clip still goes through trim, bucket and VAE"),
        Setting("network.rank", 4, "a tiny model has tiny layers"),
        Setting("network.alpha", 4, "alpha = rank keeps the update scale at 1"),
        Setting("train.steps", 8, "enough for two checkpoints of both experts; the tiny model learns nothing"),
        Setting("train.optimizer", "adamw", "bitsandbytes' 8-bit AdamW needs a GPU"),
        Setting("train.gradient_checkpointing", "none", "tiny activations: recomputing them only costs time"),
        Setting("multistage.switch_every", 2, "both experts train within the few steps"),
        Setting("save.every", 4, "two checkpoint pairs: evaluate and export then have a choice"),
        Setting("sample.prompts", ["[trigger] in a short test clip"], "one prompt shows the sampler runs"),
        Setting("sample.steps", 2, "the sampler path, not picture quality"),
        Setting("sample.num_frames", 9, "the training length"),
        Setting("sample.width", 64, "the training size"),
        Setting("sample.height", 64, "the training size"),
        Setting("sample.validation_clips", 1, "one held-out clip (a training-clip loss under five clips), so 'best' exists"),
        Setting("sample.preview_steps", 2, "previews at each save show the path, like the samples"),
        Setting("sample.preview_num_frames", 9, "the training length"),
        Setting("sample.preview_width", 64, "the training size"),
        Setting("sample.preview_height", 64, "the training size"),
        Setting("autocaption.mode", "off", "the real captioner is an 8B model; to check its path too, set "
                "autocaption.model to the captioner/ folder `wanlora make-tiny` writes and mode to missing"),
    ),
}


#: What a variant changes on top of its tier and recipe. I2V A14B's experts are T2V's but for a
#: 36-channel patch embedding (20 channels more into a 5120-wide layer: ~0.1M parameters of 14B),
#: so every A14B tier's memory figures hold for it unchanged.
VARIANT_SETTINGS: dict[str, tuple[Setting, ...]] = {
    "t2v-a14b": (),
    "i2v-a14b": (
        Setting("model.name_or_path", VARIANTS["i2v-a14b"].hub_id, "the official Wan 2.2 I2V A14B release"),
        Setting("model.variant", "i2v-a14b",
                "checked against the folder: a T2V base would train a LoRA that fits no I2V model"),
        Setting("sample.images", [],
                "each prompt starts from a held-out clip's first frame; list your own start images here"),
    ),
    "ti2v-5b": (
        Setting("model.name_or_path", VARIANTS["ti2v-5b"].hub_id, "the official Wan 2.2 TI2V 5B release"),
        Setting("model.variant", "ti2v-5b",
                "checked against the folder: an A14B base has other shapes and a 16-channel VAE"),
        Setting("sample.images", [],
                "each prompt is sampled from text and from a held-out clip's first frame; list start images here"),
    ),
}

#: Recipes that run on the CPU, where a GPU tier's settings mean nothing.
CPU_RECIPES = {"smoke"}


def _settings(recipe: str, vram: int, variant: str = LEGACY_VARIANT) -> tuple[Setting, ...]:
    if variant not in VARIANT_SETTINGS:
        raise ParamsError(f"variant '{variant}' has no presets; choose one of: {', '.join(VARIANT_SETTINGS)}")
    if recipe not in RECIPES:
        raise ParamsError(f"recipe '{recipe}' is unknown; choose one of: {', '.join(RECIPES)}")
    one = len(VARIANTS[variant].experts) == 1  # type: ignore[index]
    tiers = TI2V_TIERS if one else TIERS
    if vram not in tiers:
        fits = [t for t in tiers if t <= vram]
        hint = f"use {max(fits)} (the largest tier at or below your card)" if fits else f"{min(tiers)} GB is the smallest tier"
        raise ParamsError(f"vram {vram} is not a tier ({', '.join(map(str, tiers))}); {hint}")
    chosen = RECIPES[recipe] if recipe in CPU_RECIPES else tiers[vram] + RECIPES[recipe]
    if one:  # one transformer: no expert settings (the trainer refuses them)
        chosen = tuple(s for s in chosen if not s.key.startswith("multistage."))
    return chosen + VARIANT_SETTINGS[variant]


def _put(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree[part]
    tree[leaf] = value


def make_params(recipe: Recipe, vram: Vram, model: str | None = None, trigger: str | None = None,
                variant: str = LEGACY_VARIANT) -> Params:
    """Validated params for a recipe on a tier: schema defaults, then the tier, then the recipe,
    then what the variant changes (`VARIANT_SETTINGS`)."""
    tree = Params().model_dump(mode="json")
    for s in _settings(recipe, vram, variant):
        _put(tree, s.key, s.value)
    if model is not None:
        tree["model"]["name_or_path"] = model
    if trigger is not None:
        tree["job"]["trigger_word"] = trigger
    return parse_params(tree, f"preset {recipe}/{vram}GB")


def describe(recipe: Recipe, vram: Vram, variant: str = LEGACY_VARIANT) -> str:
    """One line per preset setting, `key: value  (why)`, for the header of the written params.yaml."""
    return "\n".join(f"{s.key}: {s.value}  ({s.why})" for s in _settings(recipe, vram, variant))


def init_header(recipe: Recipe, vram: Vram, variant: str = LEGACY_VARIANT) -> str:
    """The header `wanlora init` writes: the command line, then why each preset value is there."""
    flag = "" if variant == LEGACY_VARIANT else f" --variant {variant}"
    return f"wanlora init --recipe {recipe} --vram {vram}{flag}\n" + describe(recipe, vram, variant)


_INIT_LINE = re.compile(r"# wanlora init --recipe \S+ --vram (\d+)( --variant \S+)?\n")


def init_vram(path: str | Path) -> int | None:
    """The GPU tier `wanlora init` wrote `path` for (its header's first line), if it did."""
    with open(path, encoding="utf-8") as f:
        m = _INIT_LINE.fullmatch(f.readline())
    return int(m.group(1)) if m else None


def write_params(path: str | Path, params: Params, header_comment: str) -> None:
    """params.yaml with `header_comment` as YAML comment lines above every key written out."""
    header = "".join(f"# {line}".rstrip() + "\n" for line in header_comment.splitlines())
    atomic_write_text(path, header + dump_params(params))
