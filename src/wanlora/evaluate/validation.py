"""Fixed-noise loss: the flow-matching loss of listed samples at fixed timesteps and fixed noise.

Sample videos show whether a LoRA looks right; this loss, on held-out clips (`wanlora.data.split`),
says when it stopped getting better on clips it never trained on, and the same loss on training
clips beside it shows it memorising. Everything random is fixed (the samples, the noise per
sample, timestep and draw), so two checkpoints differ only by their weights, a rerun reproduces
the numbers, and the per-term losses of two checkpoints can be compared pairwise
(`wanlora.evaluate.best`). Each timestep goes to the expert that owns it at inference
(t >= boundary * 1000: high noise), with the formulas the trainer uses (`wanlora.train.flowmatch`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from wanlora.models.condition import model_input
from wanlora.train.flowmatch import NUM_TRAIN_TIMESTEPS, add_noise, per_sample_mse, velocity_target
from wanlora.train.ti2v import frame_mask, token_timesteps


def expert_of(t: int, boundary_ratio: float | None) -> str:
    """The expert WanPipeline runs at timestep t (TI2V 5B, no boundary: its one transformer)."""
    if boundary_ratio is None:
        return "main"
    return "high" if t >= boundary_ratio * NUM_TRAIN_TIMESTEPS else "low"


@dataclass
class ValItem:
    """One scored sample (held-out or training): its normalised latent [C, F, H, W], padded text
    embedding [L, D] and, for I2V, its condition channels [20, F, H, W] (`wanlora.models.condition`)."""

    id: str
    latent: torch.Tensor
    embeds: torch.Tensor
    condition: torch.Tensor | None = None


def fixed_noise(shape: torch.Size, seed: int, item_index: int, t_index: int, draw: int = 0) -> torch.Tensor:
    """The same noise for a (sample position, timestep, draw) in every evaluation of every checkpoint.

    Keyed by position, not by id: the i-th held-out and the i-th training sample get the same noise."""
    key = hashlib.sha256(f"{seed}/{item_index}/{t_index}/{draw}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


@torch.no_grad()
def fixed_noise_losses(
    experts: Mapping[str, torch.nn.Module],
    items: list[ValItem],
    timesteps: list[int],
    boundary_ratio: float | None,
    seed: int,
    draws: int = 1,
) -> dict[str, list[float]]:
    """{"high": [loss per (item, timestep, draw) of its band, in that order], "low": [...]} (TI2V
    5B: {"main": [...]}, text-to-video with its timestep on every token); an expert with no
    timestep in the list (or no items) gets []."""
    terms: dict[str, list[float]] = {e: [] for e in experts}
    for i, item in enumerate(items):
        x0 = item.latent.float().unsqueeze(0)
        for j, t in enumerate(timesteps):
            expert = expert_of(t, boundary_ratio)
            model = experts[expert]
            param = next(model.parameters())
            # a diffusers model's compute dtype skips the modules it keeps in fp32: a bf16 Wan
            # expert's first parameter is its fp32 scale_shift_table
            dtype = getattr(model, "dtype", param.dtype)
            tt = torch.tensor([float(t)])
            t_in = tt
            if expert == "main":  # TI2V 5B takes a timestep per token
                t_in = token_timesteps(tt, frame_mask(x0.shape, torch.tensor([False])), tuple(model.config.patch_size))
            for d in range(draws):
                noise = fixed_noise(x0.shape, seed, i, j, d)
                cond = None if item.condition is None else item.condition.unsqueeze(0)
                x_t = model_input(add_noise(x0, noise, tt), cond)
                pred = model(
                    x_t.to(param.device, dtype),
                    t_in.to(param.device),
                    item.embeds.unsqueeze(0).to(param.device, dtype),
                    return_dict=False,
                )[0]
                terms[expert].append(float(per_sample_mse(pred.float().cpu(), velocity_target(x0, noise))[0]))
    return terms
