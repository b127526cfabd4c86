"""One optimizer step of one expert, and the micro-step it repeats. No I/O.

`optimizer_step` is the whole step on one screen: learning rate, this rank's micro-batches
(`training_step`: noise, predict, loss (+ DOP), backward), the gradient average over the expert's
rank group (`wanlora.train.dist_parallel`: a no-op on one process), clipping, the update and
zero-grad. The loop and the GPU benchmark call it alike. Everything random (timesteps, noise,
caption dropout) is drawn by the caller's `make_batch` from the generator the step passes it, so
the step itself is deterministic and the caller owns reproducibility.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from wanlora.config import Expert, TrainConfig
from wanlora.models.activation_offload import offload_context
from wanlora.models.condition import model_input
from wanlora.train import flowmatch as fm
from wanlora.train import ti2v
from wanlora.train.dist_parallel import group_size, reduce_gradients, sum_over
from wanlora.train.distributed import DistEnv, GlobalBatch, batch_generator
from wanlora.train.lora import lora_disabled
from wanlora.train.optim import lr_at, set_lr


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


MakeBatch = Callable[[list[int], Expert, torch.Generator], StepBatch]


@dataclass
class StepOutcome:
    """One optimizer step as every rank of the group sees it (identical on all of them)."""

    loss: float
    main: float
    preservation: float
    finite: bool
    grad_norm: float
    samples: int
    lr: float


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[GlobalBatch],
                   make_batch: MakeBatch, *, expert: Expert, step: int, cfg: TrainConfig, seed: int,
                   dtype: torch.dtype, env: DistEnv, group: Any = None, micro_batches: int | None = None,
                   sp: int = 1) -> StepOutcome:
    """Optimizer step `step` of `expert`: this rank's micro-batches, the group's average, the update.

    Each micro-batch draws from `batch_generator(seed, expert, epoch, position)`. `micro_batches`:
    the expert's global micro-batches in this step (all ranks; by default every rank's
    `len(batches)`), so the gradient and the losses are means over all of them even when ranks
    ran unequal numbers. `sp` ranks of a replica run the same micro-batches: their losses count
    once and their gradients sum (loss scale n/count, then the group mean: see dist_parallel).
    A non-finite loss on any rank skips the update on every rank, so the LoRAs never diverge.
    """
    lr = lr_at(step, cfg)
    set_lr(optimizer, lr)
    n = group_size(group, env)
    count = micro_batches if micro_batches is not None else len(batches) * n // sp
    loss, main, preservation, bad, samples = 0.0, 0.0, 0.0, 0, 0
    for b in batches:
        out = training_step(
            model, make_batch(b.indices, expert, batch_generator(seed, expert, b.epoch, b.position)), dtype=dtype,
            dop_multiplier=cfg.dop.multiplier if cfg.dop.enabled else 0.0,
            guidance_scale=cfg.differential_guidance.scale if cfg.differential_guidance.enabled else None,
            loss_scale=n / count,  # reduce_gradients then divides by n: the mean over all `count`
        )
        loss, main = loss + out.total / count, main + out.main / count
        preservation += (out.preservation or 0.0) / count
        bad, samples = bad + (not out.finite), samples + len(b.indices)
    loss, main, preservation, bad, samples = (v / sp for v in sum_over([loss, main, preservation, bad, samples],
                                                                        group, env))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = float("nan")
    if bad == 0:
        reduce_gradients(params, group, env)
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss, main, preservation, bad == 0, norm, int(samples), lr)
