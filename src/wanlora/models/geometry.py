"""Shapes, configs and FLOP counts of the Wan 2.2 transformers, without any weights.

`WAN22_A14B` is the config diffusers stores in `transformer/config.json` (and, identical,
`transformer_2/config.json`) of Wan-AI/Wan2.2-T2V-A14B-Diffusers, `WAN22_I2V_A14B` the I2V
release's, `WAN22_TI2V_5B` the one of Wan-AI/Wan2.2-TI2V-5B-Diffusers (one transformer, 48 latent
channels from the Wan 2.2 VAE, whose 16x spatial compression makes a 2x2 patch 32 pixels), all in
`CONFIGS` per variant; `TINY_CONFIGS` holds the two-layer versions the tests and the demo use.
Benchmarks and memory planning build a full-size expert
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

#: Wan 2.2 I2V A14B: each expert as T2V's, but the patch embedding takes 36 channels (noisy
#: latent 16 + frame mask 4 + start-image latent 16; Wan-AI/Wan2.2-I2V-A14B-Diffusers, no image
#: encoder: image_dim stays None, so the blocks have no k_img/v_img).
WAN22_I2V_A14B: dict[str, Any] = {**WAN22_A14B, "in_channels": 36}
TINY_I2V: dict[str, Any] = {**TINY, "in_channels": 36}

#: Transformer config of Wan 2.2 TI2V 5B (checked against the hub's config.json and against the
#: Wan team's `wan/configs/wan_ti2v_5B.py`: dim 3072 = 24 heads x 128, 30 layers, ffn 14336,
#: in_dim 48). The rest of the structure (patch, qk norm, rotary) is the A14B's.
WAN22_TI2V_5B: dict[str, Any] = {
    **WAN22_A14B,
    "num_attention_heads": 24,
    "in_channels": 48,
    "out_channels": 48,
    "ffn_dim": 14336,
    "num_layers": 30,
}

#: Two-layer 5B transformer; channels stay 48 (the tiny Wan 2.2 VAE's z_dim), sizes as `TINY`.
TINY_TI2V_5B: dict[str, Any] = {
    **WAN22_TI2V_5B,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "text_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
}

#: Full-size and tiny transformer config of each variant (`wanlora.models.variant`).
CONFIGS: dict[str, dict[str, Any]] = {"t2v-a14b": WAN22_A14B, "i2v-a14b": WAN22_I2V_A14B, "ti2v-5b": WAN22_TI2V_5B}
TINY_CONFIGS: dict[str, dict[str, Any]] = {"t2v-a14b": TINY, "i2v-a14b": TINY_I2V, "ti2v-5b": TINY_TI2V_5B}

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


def latent_shape(num_frames: int, height: int, width: int, channels: int = LATENT_CHANNELS,
                 spatial: int = SPATIAL_FACTOR) -> tuple[int, int, int, int]:
    """(channels, frames, height, width) of the VAE latent of a clip: 4n+1 frames -> n+1, and
    `spatial`x smaller sides (8 for the Wan 2.1 VAE of the A14B models, 16 with 48 channels for
    the Wan 2.2 VAE of TI2V 5B)."""
    _check_frames(num_frames)
    if height % spatial or width % spatial:
        raise ValueError(f"{width}x{height}: sides must be multiples of {spatial} for the VAE")
    return (channels, (num_frames - 1) // TEMPORAL_FACTOR + 1, height // spatial, width // spatial)


def tokens(num_frames: int, height: int, width: int, patch: tuple[int, int, int] = (1, 2, 2),
           spatial: int = SPATIAL_FACTOR) -> int:
    """Patched sequence length the transformer attends over (33 frames at 512x512: 9216 on A14B;
    2304 on TI2V 5B, whose VAE compresses 16x)."""
    _, f, h, w = latent_shape(num_frames, height, width, spatial=spatial)
    if f % patch[0] or h % patch[1] or w % patch[2]:
        raise ValueError(f"{width}x{height}: sides must be multiples of {spatial * patch[1]}")
    return (f // patch[0]) * (h // patch[1]) * (w // patch[2])


def forward_flops(config: dict[str, Any], tokens: int, text_len: int = 512,
                  expand_timesteps: bool = False) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one forward pass on one sample, by part.

    `video_linear`: projections and FFN of every block on the video tokens; `attention`: QK^T and
    PV of self-attention (tokens x tokens) and cross-attention (tokens x text); `text_linear`:
    the text embedder and every block's cross-attention K/V on the text; `time_embed`: the
    timestep MLP and modulation projection, once per sample, or once per token with
    `expand_timesteps` (TI2V 5B: every token has its own timestep, so the MLP sees `tokens` rows);
    `patch_in` / `patch_out`: the patch embedding and the output projection. Norms, softmax,
    rotary and modulation arithmetic are elementwise, not counted.
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    n, length, layers = tokens, text_len, config["num_layers"]
    patch = config["patch_size"][0] * config["patch_size"][1] * config["patch_size"][2]
    return {
        "video_linear": float(layers * 2 * n * (6 * d * d + 2 * d * config["ffn_dim"])),
        "attention": float(layers * 2 * (2 * n * n * d + 2 * n * length * d)),
        "text_linear": float(2 * length * (config["text_dim"] * d + d * d) + layers * 2 * length * 2 * d * d),
        "time_embed": float((n if expand_timesteps else 1) * 2 * (config["freq_dim"] * d + d * d + d * 6 * d)),
        "patch_in": float(2 * n * patch * config["in_channels"] * d),
        "patch_out": float(2 * n * d * patch * config["out_channels"]),
    }


def train_flops(config: dict[str, Any], tokens: int, text_len: int = 512, expand_timesteps: bool = False) -> float:
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
    f = forward_flops(config, tokens, text_len, expand_timesteps)
    return sum(f.values()) + f["video_linear"] + 2 * f["attention"] + f["patch_out"]
