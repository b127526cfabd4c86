"""Sampling through both experts with the variant's diffusers pipeline itself, from cached text embeddings.

Using the pipeline (not a loop of our own) keeps the routing exactly diffusers': the high-noise
expert for timesteps >= boundary_ratio * 1000, the low-noise one below, classifier-free guidance
on both. The scheduler is flow-match Euler with the params' shift, so samples are comparable
across checkpoints and runs whatever scheduler the model folder ships. UMT5 is never loaded:
prompts come from the text cache, padded as the pipeline pads them. LoRAs enter as peft adapters
(loaded with diffusers' own loader, the low-noise file into `transformer_2`) and leave again,
so one loaded base serves every checkpoint and the baseline. I2V A14B samples through
`WanImageToVideoPipeline` from a start image per prompt (`wanlora.evaluate.start_images`), with no
image encoder (Wan 2.2 has none); a LoRA made for another variant is refused before it loads.
`sample_videos` is what one LoRA state is shown by, in evaluate and in the train stage's previews.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from wanlora.config import Params, SampleConfig
from wanlora.export.formats import folded_state_dict
from wanlora.export.imports import read_lora
from wanlora.models.variant import LEGACY_VARIANT, VARIANTS, Variant, recorded_variant, refuse_other_variant


def build_pipeline(transformer, transformer_2, vae, boundary_ratio: float, shift: float,
                   variant: Variant = VARIANTS[LEGACY_VARIANT]):
    """A text-encoder-free pipeline of `variant` (WanPipeline or WanImageToVideoPipeline) around
    already loaded parts."""
    import diffusers

    parts = dict(tokenizer=None, text_encoder=None, transformer=transformer, transformer_2=transformer_2, vae=vae,
                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
                 boundary_ratio=boundary_ratio)
    if variant.expand_timesteps:  # TI2V 5B: one transformer, a timestep per token
        parts.update(transformer_2=None, boundary_ratio=None, expand_timesteps=True)
    if variant.image_condition:
        parts.update(image_encoder=None, image_processor=None)
    pipe = getattr(diffusers, variant.pipeline)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_pipeline(pipe):
    """TI2V 5B from a start image: `WanImageToVideoPipeline` with `expand_timesteps` around the
    text-to-video pipeline's own modules (one transformer: a LoRA loaded into `pipe` is in both),
    which keeps the start image's latent as the clean first frame at t = 0 (`wanlora.train.ti2v`)."""
    from diffusers import WanImageToVideoPipeline

    i2v = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, image_encoder=None, image_processor=None,
                                  transformer=pipe.transformer, vae=pipe.vae, scheduler=pipe.scheduler,
                                  expand_timesteps=True)
    i2v.set_progress_bar_config(disable=True)
    return i2v


def prompt_texts(params: Params) -> list[str]:
    """Sample prompts as the text cache stored them: [trigger] replaced by the trigger word."""
    from wanlora.models.text import TRIGGER_PLACEHOLDER

    return [p.replace(TRIGGER_PLACEHOLDER, params.job.trigger_word) for p in params.sample.prompts]


def column_labels(params: Params, variant: Variant) -> list[str]:
    """One label per video of `sample_videos`: the prompts; TI2V 5B samples each prompt twice, from
    text alone and then from its start image (`wanlora.evaluate.start_images`), one model doing both."""
    texts = prompt_texts(params)
    return texts + [f"{t} (from its start image)" for t in texts] if variant.expand_timesteps else texts


def prompt_seeds(cfg: SampleConfig) -> list[int]:
    """Seed of each prompt: the same seed for all, or seed + i with walk_seed."""
    return [cfg.seed + i if cfg.walk_seed else cfg.seed for i in range(len(cfg.prompts))]


@contextlib.contextmanager
def lora_applied(pipe, files: Mapping[str, Path], name: str,
                 variant: Variant = VARIANTS[LEGACY_VARIANT]) -> Iterator[None]:
    """Load a checkpoint's LoRA files ({"high"|"low": path}) as adapter `name`, remove it after.

    alpha/rank is folded into B, because a state dict handed to `load_lora_weights` carries no
    adapter metadata and diffusers would assume alpha = rank. A file whose header names another
    variant is refused: a T2V LoRA has the I2V experts' shapes and would load without a word.
    """
    loaded = []
    try:
        for expert, path in sorted(files.items()):
            lora, meta, _ = read_lora(Path(path))
            refuse_other_variant(str(path), recorded_variant(meta), variant,
                                 "Fix: evaluate it with the model it was trained on (model.name_or_path), "
                                 "or train a LoRA for this model")
            pipe.load_lora_weights(folded_state_dict(lora), adapter_name=name, load_into_transformer_2=expert == "low")
            loaded.append(pipe.transformer_2 if expert == "low" else pipe.transformer)  # high, or TI2V 5B's main
        yield
    finally:
        for model in loaded:
            model.delete_adapters(name)


@torch.no_grad()
def generate(
    pipe, prompt_embeds: list[torch.Tensor], negative_embeds: torch.Tensor, cfg: SampleConfig,
    images: list[np.ndarray] | None = None, last_images: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """One video per prompt ([F, H, W, 3] floats in [0, 1]) at its fixed seed; with `images`
    (uint8 [H, W, 3], one per prompt) each starts from its image (image-to-video pipelines), and
    with `last_images` ends on one (the pipeline's `last_image`).

    Embeddings are [1, 512, D] (padded), handed over on the pipeline's execution device: WanPipeline
    casts given embeddings to the transformer's dtype but leaves them where they are. The generator
    lives on the CPU so a seed gives the same starting noise on every device.
    """
    device = pipe._execution_device
    negative = negative_embeds.to(device)
    from PIL import Image

    videos = []
    for i, (emb, seed) in enumerate(zip(prompt_embeds, prompt_seeds(cfg))):
        start = {} if images is None else {"image": Image.fromarray(images[i])}
        if last_images is not None:
            start["last_image"] = Image.fromarray(last_images[i])
        out = pipe(
            **start,
            prompt_embeds=emb.to(device),
            negative_prompt_embeds=negative,
            height=cfg.height,
            width=cfg.width,
            num_frames=cfg.num_frames,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            return_dict=False,
        )[0]
        videos.append(np.asarray(out[0], dtype=np.float32))
    return videos


def sample_videos(
    pipe, variant: Variant, prompt_embeds: list[torch.Tensor], negative_embeds: torch.Tensor, cfg: SampleConfig,
    images: list[np.ndarray] | None = None, last_images: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """The videos that show one LoRA state, in `column_labels` order: each prompt from text (T2V),
    from its start image and end image if any (I2V A14B), or TI2V 5B's both ways, from text alone
    and then from its start image through `image_pipeline`. `pipe` is `build_pipeline`'s."""
    if variant.expand_timesteps:
        return (generate(pipe, prompt_embeds, negative_embeds, cfg)
                + generate(image_pipeline(pipe), prompt_embeds, negative_embeds, cfg, images))
    return generate(pipe, prompt_embeds, negative_embeds, cfg, images, last_images)
