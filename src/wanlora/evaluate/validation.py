"""Validation loss: the flow-matching loss on held-out samples at fixed timesteps and fixed noise.

Sample videos show whether a LoRA looks right; the validation loss says when it stopped getting
better on clips it never trained on, which picks the "best" checkpoint to export. Everything
random is fixed (which samples, the noise per sample and timestep), so two checkpoints differ
only by their weights, and a rerun reproduces the numbers. Each timestep goes to the expert
that owns it at inference (t >= boundary * 1000: high noise), with the formulas the trainer uses
(`wanlora.train.flowmatch`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from wanlora.train.flowmatch import NUM_TRAIN_TIMESTEPS, add_noise, per_sample_mse, velocity_target


def held_out_ids(sample_ids: list[str], n: int, seed: int) -> list[str]:
    """The validation samples: the first `n` ids of a seeded shuffle of the sorted ids, sorted.

    A pure function of (ids, n, seed), so the trainer can leave out exactly these samples.
    """
    ids = sorted(sample_ids)
    random.Random(seed).shuffle(ids)
    return sorted(ids[:n])


def expert_of(t: int, boundary_ratio: float) -> str:
    """The expert WanPipeline runs at timestep t."""
    return "high" if t >= boundary_ratio * NUM_TRAIN_TIMESTEPS else "low"


@dataclass
class ValItem:
    """One held-out sample: its normalised latent [C, F, H, W] and padded text embedding [L, D]."""

    id: str
    latent: torch.Tensor
    embeds: torch.Tensor


def fixed_noise(shape: torch.Size, seed: int, item_index: int, t_index: int) -> torch.Tensor:
    """The same noise for a (sample, timestep) pair in every evaluation of every checkpoint."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + item_index * 1009 + t_index)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


@torch.no_grad()
def validation_loss(
    experts: Mapping[str, torch.nn.Module],
    items: list[ValItem],
    timesteps: list[int],
    boundary_ratio: float,
    seed: int,
) -> dict[str, float | None]:
    """{"val_loss_high": mean MSE over items x its timesteps, "val_loss_low": ...}; None for an
    expert with no timestep in the list (or no items)."""
    sums: dict[str, list[float]] = {"high": [], "low": []}
    for i, item in enumerate(items):
        x0 = item.latent.float().unsqueeze(0)
        for j, t in enumerate(timesteps):
            expert = expert_of(t, boundary_ratio)
            model = experts[expert]
            param = next(model.parameters())
            # a diffusers model's compute dtype skips the modules it keeps in fp32: a bf16 Wan
            # expert's first parameter is its fp32 scale_shift_table
            dtype = getattr(model, "dtype", param.dtype)
            noise = fixed_noise(x0.shape, seed, i, j)
            tt = torch.tensor([float(t)])
            x_t = add_noise(x0, noise, tt)
            pred = model(
                x_t.to(param.device, dtype),
                tt.to(param.device),
                item.embeds.unsqueeze(0).to(param.device, dtype),
                return_dict=False,
            )[0]
            loss = per_sample_mse(pred.float().cpu(), velocity_target(x0, noise))
            sums[expert].append(float(loss[0]))
    return {f"val_loss_{e}": (sum(v) / len(v) if v else None) for e, v in sums.items()}
