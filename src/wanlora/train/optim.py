"""Optimizers and the learning-rate schedule.

Each expert has its own optimizer over its own LoRA (an optimizer step of one expert must not
apply weight decay or stale momentum to the other). The schedule is a pure function of the
global optimizer step, written into each optimizer's param groups before its step, so it needs
no saved state of its own and resumes exactly.

adamw8bit: bitsandbytes' AdamW8bit. It runs on CPU too with bitsandbytes >= 0.45 (measured with
0.50.2; tensors under 4096 elements keep 32-bit state there, as on GPU). If bitsandbytes cannot be
imported we stop with a message naming the fix rather than silently training with another
optimizer, since the two differ in memory and, slightly, in results.

AdamW and AdamW8bit take `train.betas` and `train.eps`; eps defaults to 1e-6, the value AI Toolkit
passes to both (`toolkit/optimizer.py`, `get_optimizer`; torch's own default is 1e-8). eps is the
floor of Adam's denominator, so it damps the update of every element whose gradient is small.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from wanlora.config import TrainConfig


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer params.train names, at the peak learning rate."""
    if cfg.optimizer == "adamw":
        # fused: one kernel for all tensors on CUDA instead of a launch per tensor
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 fused=params[0].is_cuda)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # explicit LR (our schedule drives it), no relative step / warm-up init of its own
        return Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    bnb = check_optimizer(cfg)
    return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def check_optimizer(cfg: TrainConfig) -> Any:
    """bitsandbytes for adamw8bit (None for the others), or the fix. Setup calls this before it
    loads and quantizes the experts: on the 24 GB tier that is ~10 minutes, spent for nothing when
    the optimizer then cannot be built (measured on an H200 without bitsandbytes)."""
    if cfg.optimizer != "adamw8bit":
        return None
    try:
        import bitsandbytes as bnb
    except Exception as err:  # ImportError, or a broken native library
        raise RuntimeError(
            f"train.optimizer is adamw8bit but bitsandbytes cannot be loaded ({err}); "
            "install it (pip install bitsandbytes) or set train.optimizer: adamw"
        ) from None
    return bnb


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule over
    the remaining steps, with progress p from 0 at the first step after warm-up to 1 at
    `train.steps`: constant; cosine or linear decay to zero; or linear_ramp, torch's `LinearLR`
    (lr x (start + (end - start) x p)), which is what AI Toolkit runs for `linear`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_scheduler == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.lr_scheduler == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.lr_scheduler == "linear_ramp":
        return cfg.lr * (cfg.lr_start_factor + (cfg.lr_end_factor - cfg.lr_start_factor) * progress)
    return cfg.lr * (1 - progress)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
