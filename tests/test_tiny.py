"""Tiny model builder and geometry: real layout, loadable by diffusers, deterministic; shapes and FLOPs."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers import shared_tiny_model
from diffusers import UniPCMultistepScheduler, WanPipeline
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from wanlora.models.geometry import (
    TINY, TINY_TI2V_5B, WAN22_A14B, WAN22_TI2V_5B, build_transformer, forward_flops, tokens, train_flops,
)
from wanlora.models.tiny import make_tiny, tiny_tokenizer

LAYOUT = {
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
    "transformer_2/config.json", "transformer_2/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    *(f"captioner/{f}" for f in ("chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                                 "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")),
}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_determinism(tmp_path_factory, tmp_path):
    root = shared_tiny_model(tmp_path_factory)
    files = _files(root)
    assert set(files) == LAYOUT
    assert _files(make_tiny(tmp_path / "again", seed=0)) == files  # same seed, same bytes
    other = _files(make_tiny(tmp_path / "seed1", seed=1))
    assert other["transformer/diffusion_pytorch_model.safetensors"] != files["transformer/diffusion_pytorch_model.safetensors"]
    assert files["transformer/diffusion_pytorch_model.safetensors"] != files["transformer_2/diffusion_pytorch_model.safetensors"]

    index = json.loads(files["model_index.json"])
    assert index["boundary_ratio"] == 0.875
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    sched = json.loads(files["scheduler/scheduler_config.json"])
    assert (sched["_class_name"], sched["prediction_type"], sched["use_flow_sigmas"]) == (
        "UniPCMultistepScheduler", "flow_prediction", True)
    config = json.loads(files["transformer/config.json"])
    assert {k: config[k] for k in TINY} == {**TINY, "patch_size": [1, 2, 2]}


def test_tiny_captioner_is_qwen3_vl_and_captions_through_the_loader(tmp_path_factory):
    """The captioner make_tiny writes has the default architecture, loads through
    `load_captioner` (safetensors, no remote code) and writes text from frames."""
    import numpy as np

    from wanlora.config import DEFAULT_CAPTIONER
    from wanlora.models.captioner import Captioner, Decoding

    root = shared_tiny_model(tmp_path_factory) / "captioner"
    config = json.loads((root / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and "Qwen3-VL" in DEFAULT_CAPTIONER
    captioner = Captioner(root, "fp32", "cpu", 64, Decoding(8, 1, 1.3))
    assert type(captioner.model).__name__ == "Qwen3VLForConditionalGeneration"
    frames = list(np.random.default_rng(0).integers(0, 255, (2, 48, 80, 3), dtype=np.uint8))
    ids = captioner.prompt_ids(2, "describe it", captioner.images(images=[np.zeros((64, 64, 3), np.uint8)] * 2,
                                                                  return_tensors="pt")["image_grid_thw"])
    assert (ids == config["image_token_id"]).sum() == 8  # 64x64 = 4x4 patches of 16, merged 2x2: 4 tokens each
    text = captioner(frames, "describe the person")
    assert text and text == captioner(frames, "describe the person")


def test_diffusers_pipeline_loads_and_generates(tmp_path_factory):
    pipe = WanPipeline.from_pretrained(shared_tiny_model(tmp_path_factory), torch_dtype=torch.float32)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler) and pipe.transformer_2 is not None
    run = dict(num_inference_steps=2, num_frames=5, height=32, width=32, output_type="np")
    a = pipe("sks walking in a park", generator=torch.Generator().manual_seed(0), **run).frames
    b = pipe("sks walking in a park", generator=torch.Generator().manual_seed(0), **run).frames
    assert a.shape == (1, 5, 32, 32, 3)
    assert (a == b).all() and 0 <= a.min() and a.max() <= 1 and a.std() > 0


def test_tokenizer_covers_arbitrary_english():
    tok = tiny_tokenizer()
    ids = tok("The quick brown fox jumps over 13 lazy dogs; isn't it odd? (yes!)")["input_ids"]
    assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id == 1
    assert tok.pad_token_id == 0
    assert tok("")["input_ids"] == [1]
    assert tok.convert_ids_to_tokens(tok("sks walking")["input_ids"]) == ["\u2581sks", "\u2581walking", "</s>"]


def test_full_size_config_has_14b_parameters():
    with torch.device("meta"):
        model = build_transformer(WAN22_A14B, torch.bfloat16, "meta")
    assert sum(p.numel() for p in model.parameters()) == 14_288_491_584
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].scale_shift_table.dtype == torch.float32  # as from_pretrained keeps it
    assert len(model.blocks) == 40 and model.blocks[0].attn1.to_q.weight.shape == (5120, 5120)


def test_build_transformer_is_seeded():
    a, b = build_transformer(TINY, torch.float32, seed=3), build_transformer(TINY, torch.float32, seed=3)
    c = build_transformer(TINY, torch.float32, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.blocks[0].attn1.to_q.weight, c.blocks[0].attn1.to_q.weight)


def _counted_flops(config: dict, channels: int, t: torch.Tensor) -> tuple[int, int]:
    """PyTorch's FLOP count of a forward and of a LoRA training step (math attention so every
    matmul is visible; gradients needed exactly where LoRA training needs them: from the first
    block on, and through cross-attention K/V, default LoRA targets) on a 3x8x12 latent."""
    model = build_transformer(config, torch.float32)
    latents, text = torch.randn(1, channels, 3, 8, 12), torch.randn(1, 512, 32)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            model(latents, t, text)
        model.patch_embedding.bias.requires_grad_(True)
        for block in model.blocks:
            block.attn2.to_k.bias.requires_grad_(True)
            block.attn2.to_v.bias.requires_grad_(True)
        with FlopCounterMode(display=False) as step:
            model(latents, t, text).sample.square().mean().backward()
    return fwd.get_total_flops(), step.get_total_flops()


def test_flops_match_pytorch_flop_counter():
    """forward_flops and train_flops equal PyTorch's count on the tiny model."""
    n = 3 * 4 * 6
    fwd, step = _counted_flops(TINY, 16, torch.tensor([500.0]))
    assert fwd == sum(forward_flops(TINY, n, 512).values())
    assert step == train_flops(TINY, n, 512)


def test_full_size_step_flops():
    # 33 frames at 512x512: 663 TFLOP per step; 2.77 s/step on an H100 (STACK.md) is ~30% MFU at 790 TFLOP/s
    assert tokens(33, 512, 512) == 9216
    assert train_flops(WAN22_A14B, 9216) == pytest.approx(663.21e12, rel=1e-4)


# ------------------------------------------------------------------------------- TI2V 5B
LAYOUT_TI2V = {f for f in LAYOUT if not f.startswith("transformer_2/")}


def test_ti2v_layout_and_determinism(tmp_path_factory, tmp_path):
    """The real Wan2.2-TI2V-5B-Diffusers layout: one transformer, no boundary, expand_timesteps,
    the Wan 2.2 VAE (48 channels, residual, 2x2 pixel patch, 16x spatial)."""
    root = shared_tiny_model(tmp_path_factory, variant="ti2v-5b")
    files = _files(root)
    assert set(files) == LAYOUT_TI2V
    assert _files(make_tiny(tmp_path / "again", seed=0, variant="ti2v-5b")) == files
    index = json.loads(files["model_index.json"])
    assert index["expand_timesteps"] is True and index["boundary_ratio"] is None
    assert index["transformer_2"] == [None, None]
    vae = json.loads(files["vae/config.json"])
    assert {k: vae[k] for k in ("z_dim", "is_residual", "patch_size", "in_channels", "scale_factor_spatial")} == {
        "z_dim": 48, "is_residual": True, "patch_size": 2, "in_channels": 12, "scale_factor_spatial": 16}
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == 48
    config = json.loads(files["transformer/config.json"])
    assert {k: config[k] for k in TINY_TI2V_5B} == {**TINY_TI2V_5B, "patch_size": [1, 2, 2]}
    assert json.loads(files["scheduler/scheduler_config.json"])["flow_shift"] == 5.0


def test_ti2v_pipeline_loads_and_generates(tmp_path_factory):
    """WanPipeline.from_pretrained reads expand_timesteps from the folder and samples with a
    timestep per token (32 px per token: 64x96 is 2x3 tokens a latent frame)."""
    pipe = WanPipeline.from_pretrained(shared_tiny_model(tmp_path_factory, variant="ti2v-5b"), torch_dtype=torch.float32)
    assert pipe.config.expand_timesteps and pipe.transformer_2 is None and pipe.vae_scale_factor_spatial == 16
    seen = []
    pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.append(kw["timestep"].shape), with_kwargs=True)
    run = dict(num_inference_steps=2, num_frames=9, height=64, width=96, output_type="np", guidance_scale=1.0)
    a = pipe("sks walking in a park", generator=torch.Generator().manual_seed(0), **run).frames
    assert a.shape == (1, 9, 64, 96, 3) and a.std() > 0
    assert seen == [torch.Size([1, 3 * 2 * 3])] * 2


def test_full_size_ti2v_config_has_5b_parameters():
    """Wan 2.2 TI2V 5B: dim 3072 = 24 heads x 128, 30 layers, ffn 14336, 48 channels in and out,
    UMT5's 4096 text dim (the hub's transformer/config.json; Wan's wan/configs/wan_ti2v_5B.py)."""
    with torch.device("meta"):
        model = build_transformer(WAN22_TI2V_5B, torch.bfloat16, "meta")
    assert sum(p.numel() for p in model.parameters()) == 4_999_787_712
    assert len(model.blocks) == 30 and model.blocks[0].attn1.to_q.weight.shape == (3072, 3072)
    assert model.blocks[0].ffn.net[0].proj.weight.shape == (14336, 3072)
    assert model.patch_embedding.in_channels == 48 and model.proj_out.out_features == 48 * 4
    assert model.condition_embedder.text_embedder.linear_1.in_features == 4096


def test_ti2v_flops_match_pytorch_flop_counter():
    """With a timestep per token the time embedding runs once per token: forward_flops and
    train_flops with expand_timesteps equal PyTorch's count on the tiny 5B transformer."""
    n = 3 * 4 * 6
    fwd, step = _counted_flops(TINY_TI2V_5B, 48, torch.full((1, n), 500.0))
    assert fwd == sum(forward_flops(TINY_TI2V_5B, n, 512, expand_timesteps=True).values())
    assert step == train_flops(TINY_TI2V_5B, n, 512, expand_timesteps=True)
    assert fwd > sum(forward_flops(TINY_TI2V_5B, n, 512).values())


def test_full_size_ti2v_step_flops():
    # 121 frames at 1280x704 (the 5B's native 720p): 31 x 22 x 40 = 27,280 tokens at 16x VAE and 2x2 patch
    assert tokens(121, 704, 1280, spatial=16) == 27280
    assert tokens(33, 512, 512, spatial=16) == 2304  # a quarter of the A14B's 9216 at the same clip
    assert train_flops(WAN22_TI2V_5B, 2304, expand_timesteps=True) == pytest.approx(48.10e12, rel=1e-3)
    with pytest.raises(ValueError, match="multiples of 32"):
        tokens(33, 496, 512, spatial=16)
