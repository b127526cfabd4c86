"""Tiny random Wan 2.2 models (T2V A14B, I2V A14B, TI2V 5B) in the real diffusers layouts, built
offline in under a second, and a tiny random Qwen3-VL captioner (the default architecture of the
autocaption stage) beside them.

Tests and the demo run every stage on them: same folder layout, same classes, same config keys as
the Wan-AI/Wan2.2-*-Diffusers releases (TI2V 5B: one transformer, the 48-channel Wan 2.2 VAE with
its 2x2 pixel patch and 16x spatial compression, `expand_timesteps` in model_index.json), so the
loaders, caches, trainer and sampler take the code paths they take on the real models. Only the
sizes differ (`wanlora.models.geometry.TINY_CONFIGS`). The files are a pure function of the seed:
two builds with one seed are byte-identical, so a demo rebuilt from scratch keeps its DVC caches.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline,
                       WanTransformer3DModel)
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from wanlora.models.geometry import TINY, TINY_CONFIGS, build_transformer, seeded
from wanlora.models.variant import get_variant

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

#: TI2V 5B ships the same UniPC configuration with the shift of its inference config (5.0).
SCHEDULER_TI2V = {**SCHEDULER, "flow_shift": 5.0}

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


def tiny_vae_22(seed: int) -> AutoencoderKLWan:
    """The Wan 2.2 VAE's structure at toy width: residual blocks, a 2x2 pixel patch in front of
    the 8x convolutional downsampling (so 16x spatial and 12 input channels), 48 latent channels.
    Its per-channel latent statistics are seeded values, not the real VAE's: the tiny model is
    random, and non-trivial statistics make a missed (de)normalisation visible in tests."""
    g = torch.Generator().manual_seed(seed + 1000)
    mean = (torch.rand(48, generator=g) - 0.5).tolist()
    std = (0.5 + torch.rand(48, generator=g)).tolist()
    with seeded(seed):
        return AutoencoderKLWan(
            base_dim=8,
            z_dim=TINY_CONFIGS["ti2v-5b"]["in_channels"],
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            latents_mean=[round(v, 4) for v in mean],
            latents_std=[round(v, 4) for v in std],
        ).eval()


def tiny_expert(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> WanTransformer3DModel:
    """One tiny T2V expert in memory (`TINY`, `overrides` on top) with the weights `make_tiny`
    gives an expert of that seed: for tests that need a transformer and no model folder."""
    return build_transformer({**TINY, **overrides}, dtype, "cpu", seed)


def make_tiny(out_dir: Path, seed: int = 0, variant: str = "t2v-a14b", expert: dict[str, Any] | None = None) -> Path:
    """Write a tiny Wan 2.2 model of `variant` (`wanlora.models.variant`) to `out_dir`; return it.
    `expert` overrides the transformers' config (a test that must overfit wants patch [1, 1, 1]).

    t2v-a14b: two 2-layer experts, VAE, UMT5, tokenizer, UniPC scheduler, model_index.json with
    boundary_ratio 0.875, loadable by `WanPipeline.from_pretrained`. i2v-a14b: the same parts with
    36-channel experts and boundary_ratio 0.9 as a `WanImageToVideoPipeline` with no image encoder
    (Wan 2.2 I2V has none). ti2v-5b: one 2-layer transformer with 48 channels, the Wan 2.2 VAE,
    model_index.json with expand_timesteps true and no boundary, loadable by
    `WanPipeline.from_pretrained`, which then samples with a timestep per token as it does for the
    real model. Every component gets its own seed offset so changing one part's size
    leaves the others' weights alone; the T2V files are those this function always wrote.
    """
    out_dir = Path(out_dir)
    v = get_variant(variant)
    if v.name not in TINY_CONFIGS:
        raise ValueError(f"make-tiny: no tiny {v.name} yet; use one of {', '.join(TINY_CONFIGS)}")
    config = {**TINY_CONFIGS[v.name], **(expert or {})}
    tokenizer = tiny_tokenizer()
    parts = dict(tokenizer=tokenizer, text_encoder=tiny_text_encoder(len(tokenizer), seed + 3),
                 transformer=build_transformer(config, torch.float32, "cpu", seed))
    if v.expand_timesteps:  # TI2V 5B: one transformer, the Wan 2.2 VAE, a timestep per token
        pipe = WanPipeline(**parts, vae=tiny_vae_22(seed + 2), scheduler=UniPCMultistepScheduler(**SCHEDULER_TI2V),
                           expand_timesteps=True)
    else:
        parts.update(vae=tiny_vae(seed + 2), scheduler=UniPCMultistepScheduler(**SCHEDULER),
                     transformer_2=build_transformer(config, torch.float32, "cpu", seed + 1), boundary_ratio=v.boundary)
        if v.pipeline == "WanImageToVideoPipeline":
            pipe = WanImageToVideoPipeline(**parts, image_encoder=None, image_processor=None)
        else:
            pipe = WanPipeline(**parts)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    make_tiny_vlm(out_dir / CAPTIONER_FOLDER, seed + 4)
    return out_dir


#: Where `make_tiny` puts the tiny captioner, inside the Wan folder (diffusers ignores the extra folder).
CAPTIONER_FOLDER = "captioner"
_VLM_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")
#: Qwen's chat layout, reduced to what the captioner sends: one user turn of images and text.
_VLM_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_vlm_tokenizer():
    """A word-level tokenizer with Qwen's special tokens, built in memory (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w in _WORDS if w not in ("sks", "ohwx")] + list(string.punctuation) + ["\n", "user", "assistant"]
    vocab = {tok: i for i, tok in enumerate([*_VLM_SPECIAL, "<unk>", *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    backend.add_special_tokens(list(_VLM_SPECIAL))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<unk>")
    tokenizer.chat_template = _VLM_TEMPLATE
    return tokenizer


def make_tiny_vlm(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen3-VL (2-layer vision tower and language model, width 32) with its
    tokenizer, chat template and PIL image processor config, in the layout of
    Qwen/Qwen3-VL-8B-Instruct; loadable by `wanlora.models.loading.load_captioner`."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out_dir = Path(out_dir)
    tokenizer = tiny_vlm_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _VLM_SPECIAL}
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "pad_token_id": ids["<|endoftext|>"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                "mrope_interleaved": True},
        },
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 32,
            "num_position_embeddings": 16, "deepstack_visual_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                             size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128}).save_pretrained(out_dir)
    return out_dir
