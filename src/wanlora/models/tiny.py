"""A tiny random Wan 2.2 T2V A14B in the real diffusers layout, built offline in under a second.

Tests and the demo run every stage on it: same folder layout, same classes, same config keys as
Wan-AI/Wan2.2-T2V-A14B-Diffusers, so the loaders, caches, trainer and sampler take the code paths
they take on the real model. Only the sizes differ (see `wanlora.models.geometry.TINY`). The
files are a pure function of the seed: two builds with one seed are byte-identical, so a demo
rebuilt from scratch keeps its DVC caches.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from wanlora.models.geometry import TINY, build_transformer, seeded

#: T2V A14B's expert switch: the high-noise expert takes timesteps >= 875 of 1000.
BOUNDARY_RATIO = 0.875

#: The real repo samples with UniPC in flow-prediction mode (AI Toolkit ships the same config).
SCHEDULER = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "num_train_timesteps": 1000,
    "solver_order": 2,
    "solver_type": "bh2",
    "final_sigmas_type": "zero",
}

_WORDS = (
    "a an the of in on at to with and or is are was his her their its this that it he she they "
    "person man woman child dog cat car tree park street city beach forest room house sky sun "
    "walking running sitting standing looking smiling dancing jumping holding wearing "
    "red blue green black white yellow bright dark small large old young slowly camera video "
    "close up shot view light shadow water road sks ohwx"
).split()


def tiny_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer built in memory: whole words for a small vocabulary, single
    characters for everything else, so it tokenizes any English text (unknown scripts become
    <unk>). Special ids follow UMT5: pad 0, eos 1, unk 2."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS]
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab += [("\u2581" + c, -4.0) for c in chars]
    vocab += [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_text_encoder(vocab_size: int, seed: int) -> UMT5EncoderModel:
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TINY["text_dim"],
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    with seeded(seed):
        return UMT5EncoderModel(config).eval()


def tiny_vae(seed: int) -> AutoencoderKLWan:
    with seeded(seed):
        return AutoencoderKLWan(
            base_dim=8,
            z_dim=TINY["in_channels"],
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ).eval()


def make_tiny(out_dir: Path, seed: int = 0, patch: list[int] | None = None) -> Path:
    """Write a tiny Wan 2.2 T2V model (two 2-layer experts, VAE, UMT5, tokenizer, UniPC
    scheduler, model_index.json with boundary_ratio 0.875) to `out_dir`; return `out_dir`.

    Every component gets its own seed offset so changing one part's size leaves the others'
    weights alone. Loadable by `wanlora.models.loading` and by `WanPipeline.from_pretrained`.
    `patch` replaces the experts' patch size: with the tiny width (32) a [1, 2, 2] patch (64
    values) cannot pass through the model, so a test that overfits uses [1, 1, 1].
    """
    out_dir = Path(out_dir)
    expert = TINY if patch is None else {**TINY, "patch_size": patch}
    tokenizer = tiny_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(len(tokenizer), seed + 3),
        vae=tiny_vae(seed + 2),
        scheduler=UniPCMultistepScheduler(**SCHEDULER),
        transformer=build_transformer(expert, torch.float32, "cpu", seed),
        transformer_2=build_transformer(expert, torch.float32, "cpu", seed + 1),
        boundary_ratio=BOUNDARY_RATIO,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
