"""One micro-step of one expert: noise, predict, loss (+ DOP), backward. No I/O, no state.

The GPU benchmark calls `training_step` with full-size random experts; the loop calls it with
real batches. Everything random (timesteps, noise, caption dropout) is drawn by the caller and
passed in, so the step itself is deterministic and the caller owns reproducibility.

Differential guidance replaces the target by pred + scale * (target - pred), computed without
gradient. Its gradient is exactly `scale` times the plain MSE gradient. With Adam-type
optimizers (adamw, adamw8bit, and Adafactor's normalised update), which divide by a running
gradient scale, a constant factor on the whole gradient changes almost nothing: the update only
moves through (a) gradient clipping, which sees a norm `scale` times larger and so clips more
often, and (b) the balance with the DOP term, whose weight relative to the main loss drops by
1/scale. Expect its effect to come from those two, not from a larger step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from wanlora.models.activation_offload import offload_context
from wanlora.models.condition import model_input
from wanlora.train import flowmatch as fm
from wanlora.train import ti2v
from wanlora.train.lora import lora_disabled


@dataclass
class StepBatch:
    """Tensors of one micro-batch; all drawn by the caller.

    latents: clean latents x0 [B, C, F, H, W]; noise: same shape; timesteps: [B] in [0, 1000];
    embeds: text embeddings [B, L, D] (the trigger word alone where dropped); class_embeds: the DOP
    class prompt's embeddings [B, L, D] or None; weights: per-sample loss weights [B] or None;
    condition: I2V A14B's condition channels [B, 20, F, H, W] (frame mask + start-image latent,
    `wanlora.models.condition`) fed beside the noisy latent, or None.
    clean_first: None for a model with one timestep per sample (A14B), or [B] bool for one with a
    timestep per token (TI2V 5B, `wanlora.train.ti2v`): True where the sample trains image-to-video,
    its first latent frame clean at t = 0 and left out of the loss.
    """

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    class_embeds: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    condition: torch.Tensor | None = None
    clean_first: torch.Tensor | None = None


@dataclass
class StepLosses:
    """Plain floats (never tensors: nothing of the graph outlives the step)."""

    total: float
    main: float
    preservation: float | None
    finite: bool


def _predict(expert: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The expert's velocity prediction; what a graph-building forward saves for backward waits
    in host memory when the expert has activation offloading on."""
    offload = offload_context(expert) if torch.is_grad_enabled() else None
    with offload or contextlib.nullcontext():
        return expert(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]


def training_step(
    expert: torch.nn.Module,
    batch: StepBatch,
    *,
    dtype: torch.dtype,
    dop_multiplier: float = 0.0,
    guidance_scale: float | None = None,
    loss_scale: float = 1.0,
    batch_dop: bool = True,
) -> StepLosses:
    """Forward, loss and backward of `expert` (its LoRA enabled) on `batch`.

    The loss is the (weighted) MSE against the velocity target (I2V A14B: every latent frame, the
    first one included, `wanlora.models.condition`; TI2V 5B image-to-video: the clean first frame
    left out, `wanlora.train.ti2v`), plus, when `batch.class_embeds`
    is given, `dop_multiplier` times the MSE between the LoRA's and the frozen base's
    predictions on the class prompt (same noisy latent, timestep and noise). With `batch_dop`
    the trigger and class passes run as one forward of twice the batch. Backward runs on
    `total * loss_scale` (1/accumulation) only when the loss is finite; otherwise nothing is
    touched and `finite` is False so the caller can skip the step.
    """
    x0 = batch.latents.to(dtype)
    noise = batch.noise.to(dtype)
    t = batch.timesteps.to(x0.device, torch.float32)
    xt = model_input(fm.add_noise(x0, noise, t), batch.condition)  # I2V: the start image beside the noise
    target = fm.velocity_target(x0, noise)
    mask = None
    if batch.clean_first is not None:  # TI2V 5B: a timestep per token, the start frame clean for I2V
        mask = ti2v.frame_mask(x0.shape, batch.clean_first.to(x0.device))
        xt = ti2v.condition(xt, x0, mask)
        t = ti2v.token_timesteps(t, mask, tuple(expert.config.patch_size))
    emb = batch.embeds.to(dtype)
    n = x0.shape[0]

    prior = None
    if batch.class_embeds is not None:
        cls = batch.class_embeds.to(dtype)
        with torch.no_grad(), lora_disabled(expert):
            prior = _predict(expert, xt, t, cls)
        if batch_dop:
            both = _predict(expert, torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([emb, cls]))
            pred, pred_cls = both[:n], both[n:]
        else:
            pred, pred_cls = _predict(expert, xt, t, emb), _predict(expert, xt, t, cls)
    else:
        pred = _predict(expert, xt, t, emb)

    if guidance_scale is not None:
        with torch.no_grad():
            p = pred.detach()
            target = p + guidance_scale * (target - p)

    def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return fm.per_sample_mse(a, b) if mask is None else ti2v.masked_per_sample_mse(a, b, mask)

    main = fm.weighted_mean(mse(pred, target), batch.weights)
    total = main
    preservation = None
    if prior is not None:
        pres = dop_multiplier * mse(pred_cls, prior).mean()
        total = main + pres
        preservation = float(pres.detach())
    finite = bool(torch.isfinite(total.detach()))
    if finite:
        (total * loss_scale).backward()
    return StepLosses(float(total.detach()), float(main.detach()), preservation, finite)
