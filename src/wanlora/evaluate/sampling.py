"""Sampling through both experts with WanPipeline itself, from cached text embeddings.

Using the pipeline (not a loop of our own) keeps the routing exactly diffusers': the high-noise
expert for timesteps >= boundary_ratio * 1000, the low-noise one below, classifier-free guidance
on both. The scheduler is flow-match Euler with the params' shift, so samples are comparable
across checkpoints and runs whatever scheduler the model folder ships. UMT5 is never loaded:
prompts come from the text cache, padded as the pipeline pads them. LoRAs enter as peft adapters
(loaded with diffusers' own loader, the low-noise file into `transformer_2`) and leave again,
so one loaded base serves every checkpoint and the baseline.
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


def build_pipeline(transformer, transformer_2, vae, boundary_ratio: float, shift: float):
    """A text-encoder-free WanPipeline around already loaded parts."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        transformer=transformer,
        transformer_2=transformer_2,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        boundary_ratio=boundary_ratio,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_texts(params: Params) -> list[str]:
    """Sample prompts as the text cache stored them: [trigger] replaced by the trigger word."""
    from wanlora.models.text import TRIGGER_PLACEHOLDER

    return [p.replace(TRIGGER_PLACEHOLDER, params.job.trigger_word) for p in params.sample.prompts]


def prompt_seeds(cfg: SampleConfig) -> list[int]:
    """Seed of each prompt: the same seed for all, or seed + i with walk_seed."""
    return [cfg.seed + i if cfg.walk_seed else cfg.seed for i in range(len(cfg.prompts))]


@contextlib.contextmanager
def lora_applied(pipe, files: Mapping[str, Path], name: str) -> Iterator[None]:
    """Load a checkpoint's LoRA files ({"high"|"low": path}) as adapter `name`, remove it after.

    alpha/rank is folded into B, because a state dict handed to `load_lora_weights` carries no
    adapter metadata and diffusers would assume alpha = rank.
    """
    loaded = []
    try:
        for expert, path in sorted(files.items()):
            lora, _, _ = read_lora(Path(path))
            pipe.load_lora_weights(folded_state_dict(lora), adapter_name=name, load_into_transformer_2=expert == "low")
            loaded.append(pipe.transformer if expert == "high" else pipe.transformer_2)
        yield
    finally:
        for model in loaded:
            model.delete_adapters(name)


@torch.no_grad()
def generate(
    pipe, prompt_embeds: list[torch.Tensor], negative_embeds: torch.Tensor, cfg: SampleConfig
) -> list[np.ndarray]:
    """One video per prompt ([F, H, W, 3] floats in [0, 1]) at its fixed seed.

    Embeddings are [1, 512, D] (padded), handed over on the pipeline's execution device: WanPipeline
    casts given embeddings to the transformer's dtype but leaves them where they are. The generator
    lives on the CPU so a seed gives the same starting noise on every device.
    """
    device = pipe._execution_device
    negative = negative_embeds.to(device)
    videos = []
    for emb, seed in zip(prompt_embeds, prompt_seeds(cfg)):
        out = pipe(
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
