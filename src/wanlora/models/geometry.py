"""Shapes, configs and FLOP counts of the Wan 2.2 T2V A14B transformer, without any weights.

`WAN22_A14B` is the config diffusers stores in `transformer/config.json` (and, identical,
`transformer_2/config.json`) of Wan-AI/Wan2.2-T2V-A14B-Diffusers; `TINY` is the two-layer
version the tests and the demo use. Benchmarks and memory planning build a full-size expert
from `WAN22_A14B` with random weights (`build_transformer`), so GPU work needs no 28 GB
download, and report MFU with `train_flops`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import WanTransformer3DModel

#: Transformer config of each Wan 2.2 T2V A14B expert (checked against the hub's config.json).
WAN22_A14B: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}

#: Two-layer expert with the same structure. text_dim must equal the tiny UMT5's d_model and the
#: channels the tiny VAE's z_dim. rope_max_seq_len stays 1024 like the real model: the rotary
#: tables are computed, not stored, so any demo resolution fits at no cost in file size.
TINY: dict[str, Any] = {
    **WAN22_A14B,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "text_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
}

LATENT_CHANNELS = 16
TEMPORAL_FACTOR = 4
SPATIAL_FACTOR = 8


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """torch's global RNG seeded for building random weights, and put back afterwards: a helper
    that makes a model must not change what its caller draws next."""
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=None if cuda else []):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(
    config: dict[str, Any], dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0
) -> WanTransformer3DModel:
    """A WanTransformer3DModel with random weights, created directly on `device` in `dtype`
    (with diffusers' fp32 exceptions, as from_pretrained gives them).

    Parameters are allocated where they live (default device and dtype set while the modules are
    built), so a 14B expert on a GPU never passes through host memory nor through an fp32 copy:
    peak memory is the bf16 expert itself. The rotary tables are computed in float64/float32 by
    diffusers regardless of the default dtype.
    """
    with seeded(seed, device), torch.device(device), _default_dtype(dtype):
        model = WanTransformer3DModel(**config)
    # diffusers keeps these (norms, time embedder, modulation tables) in fp32 when it loads a
    # checkpoint in half precision; match it so benchmarks measure what training runs.
    keep = set(WanTransformer3DModel._keep_in_fp32_modules or [])
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()
    return model.eval().requires_grad_(False)


def _check_frames(num_frames: int) -> None:
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_FACTOR:
        near = max(1, ((num_frames - 1) // TEMPORAL_FACTOR) * TEMPORAL_FACTOR + 1)
        raise ValueError(
            f"{num_frames} frames: the Wan VAE needs 4n+1 frames (1, 5, 9, ... 33, ... 81); "
            f"use {near}"
        )


def latent_shape(num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(channels, frames, height, width) of the VAE latent of a clip: 4n+1 frames -> n+1, 8x spatial."""
    _check_frames(num_frames)
    if height % SPATIAL_FACTOR or width % SPATIAL_FACTOR:
        raise ValueError(f"{width}x{height}: sides must be multiples of {SPATIAL_FACTOR} for the VAE")
    return (
        LATENT_CHANNELS,
        (num_frames - 1) // TEMPORAL_FACTOR + 1,
        height // SPATIAL_FACTOR,
        width // SPATIAL_FACTOR,
    )


def tokens(num_frames: int, height: int, width: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Patched sequence length the transformer attends over (33 frames at 512x512: 9216)."""
    _, f, h, w = latent_shape(num_frames, height, width)
    if f % patch[0] or h % patch[1] or w % patch[2]:
        raise ValueError(f"{width}x{height}: sides must be multiples of {SPATIAL_FACTOR * patch[1]}")
    return (f // patch[0]) * (h // patch[1]) * (w // patch[2])


def forward_flops(config: dict[str, Any], tokens: int, text_len: int = 512) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one forward pass on one sample, by part.

    `video_linear`: projections and FFN of every block on the video tokens; `attention`: QK^T and
    PV of self-attention (tokens x tokens) and cross-attention (tokens x text); `text_linear`:
    the text embedder and every block's cross-attention K/V on the text; `time_embed`: the
    timestep MLP and modulation projection; `patch_in` / `patch_out`: the patch embedding and the
    output projection. Norms, softmax, rotary and modulation arithmetic are elementwise, not counted.
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    n, length, layers = tokens, text_len, config["num_layers"]
    patch = config["patch_size"][0] * config["patch_size"][1] * config["patch_size"][2]
    return {
        "video_linear": float(layers * 2 * n * (6 * d * d + 2 * d * config["ffn_dim"])),
        "attention": float(layers * 2 * (2 * n * n * d + 2 * n * length * d)),
        "text_linear": float(2 * length * (config["text_dim"] * d + d * d) + layers * 2 * length * 2 * d * d),
        "time_embed": float(2 * (config["freq_dim"] * d + d * d + d * 6 * d)),
        "patch_in": float(2 * n * patch * config["in_channels"] * d),
        "patch_out": float(2 * n * d * patch * config["out_channels"]),
    }


def train_flops(config: dict[str, Any], tokens: int, text_len: int = 512) -> float:
    """FLOPs of one LoRA training step of one expert on one sample, for MFU.

    Forward: every matmul (`forward_flops`). Backward with a frozen base: each linear layer on the
    video path needs only its input gradient (one matmul the size of its forward; weight
    gradients are skipped), and attention needs dQ, dK, dV (twice its forward: the default LoRA
    targets include cross-attention to_k/to_v, so the text-side K and V need gradients too). The
    text path, time embedding and patch embedding run forward only: nothing upstream of them
    trains. Not counted: LoRA's own matmuls (rank << dim), elementwise work, and recomputation by
    gradient checkpointing (MFU counts useful work once). Wan pads text to `text_len` = 512
    tokens, so cross-attention always sees 512 keys.
    """
    f = forward_flops(config, tokens, text_len)
    return sum(f.values()) + f["video_linear"] + 2 * f["attention"] + f["patch_out"]
