"""Flow matching as Wan 2.2 and diffusers define it.

The diffusers scheduler (`FlowMatchEulerDiscreteScheduler`) and the Wan pipeline agree on:
sigma = t / 1000; the noisy latent is x_t = (1 - sigma) * x0 + sigma * eps; the transformer
predicts the velocity eps - x0. Training samples t itself (see `wanlora.train.timesteps`), so
these are plain formulas of a continuous t, not look-ups into a 1000-entry table; the tests check
them against the scheduler's `scale_noise` and its shifted sigmas.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    """Noise level of a timestep in [0, 1000]."""
    return t / NUM_TRAIN_TIMESTEPS


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The flow-match time shift diffusers applies to its sigmas: s*sigma / (1 + (s-1)*sigma).

    A shift above 1 moves the schedule toward high noise, which video models need at large
    token counts; Wan 2.2 T2V trains and samples with shift 5.
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Inverse of `shift_sigma`."""
    return sigma / (shift - (shift - 1) * sigma)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) * x0 + sigma * noise, per sample; sigma is cast to the latent dtype
    (a float32 sigma against bf16 latents would promote the input and break the conv)."""
    sigma = sigma_of(t).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the transformer learns to predict: d x_t / d sigma = noise - x0."""
    return noise - x0


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, in float32 so bf16 rounding does not bias the loss."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Batch loss: the mean of per-sample losses, each times its timestep weight when one is set."""
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample)).mean()
