"""Tiny Wan expert and inputs shared by the quantization and recovery tests."""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from wanlora.models.geometry import TINY

TINY_CONFIG = {**TINY, "freq_dim": 32, "rope_max_seq_len": 32}  # the package's tiny expert, smaller tables


def tiny_expert(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> WanTransformer3DModel:
    """2 layers, 2 heads x 16, text_dim 32, ffn 64; frozen, eval mode, seeded weights."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype: no fp32 copy, no diffusers cast warning
    try:
        model = WanTransformer3DModel(**TINY_CONFIG)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def tiny_inputs(seed: int = 1, dtype: torch.dtype = torch.bfloat16, frames: int = 2) -> dict:
    """One forward's kwargs: a 16-token video latent, 8 text tokens, one timestep."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 16, frames, 4, 4, generator=g).to(dtype),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g).to(dtype),
        "return_dict": False,
    }
