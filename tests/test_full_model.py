"""bench/full_model.py, the full-size random-weight writer, run at tiny size: the folder it writes
must be what the loaders and diffusers' WanPipeline read, part for part, as `make-tiny`'s is."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.full_model import UMT5_XXL, build, main
from wanlora.models.geometry import WAN22_A14B
from wanlora.models.loading import ALL_PARTS, check_layout, load_text_encoder, load_tokenizer, load_transformer, load_vae
from wanlora.models.tiny import make_tiny


def test_the_tiny_write_loads_like_make_tiny_with_parts_placed_elsewhere(tmp_path: Path) -> None:
    from diffusers import WanPipeline

    root, shm = tmp_path / "wan", tmp_path / "shm"
    main([str(root), "--tiny", "--device", "cpu", "--shard-gib", "0.00002", "--parts", "transformer", "vae"])
    main([str(root), "--tiny", "--device", "cpu", "--skip-small", "--parts", "transformer_2", "text_encoder",
          "--place", f"transformer_2={shm}", f"text_encoder={shm}"])
    assert (root / "transformer_2").is_symlink() and (shm / "transformer_2" / "config.json").is_file()
    assert (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()  # sharded
    check_layout(root, ALL_PARTS)
    ref = WanPipeline.from_pretrained(make_tiny(tmp_path / "ref"))
    ours = WanPipeline.from_pretrained(root)
    assert ours.config.boundary_ratio == ref.config.boundary_ratio == 0.875
    for part in ("transformer", "transformer_2", "text_encoder", "vae"):
        a, b = getattr(ours, part).state_dict(), getattr(ref, part).state_dict()
        assert a.keys() == b.keys(), part
        vocab = {"shared.weight", "encoder.embed_tokens.weight"}  # ours keeps UMT5's full vocabulary
        assert all(a[k].shape == b[k].shape for k in a if k not in vocab), part
        assert all(torch.isfinite(t.float()).all() for t in a.values()), part
    low = load_transformer(root, "low", "bf16")
    assert low.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert not torch.equal(low.blocks[0].attn1.to_q.weight, load_transformer(root, "high", "bf16").blocks[0].attn1.to_q.weight)
    encoder = load_text_encoder(root, "bf16")
    ids = load_tokenizer(root)("sks walking in a park", return_tensors="pt").input_ids
    assert encoder(input_ids=ids).last_hidden_state.shape[-1] == 32
    assert load_vae(root, "fp32").config.z_dim == 16


def test_full_size_parts_have_the_published_geometry() -> None:
    """On the meta device (no memory): 14.29B parameters per expert with the hub's config (26.7 GiB
    in bf16, as written on the H200), the UMT5-XXL encoder's 5.68B, and the VAE's published
    (= diffusers' default) config."""
    expert = build("transformer", tiny=False, device="meta", seed=0)
    assert {k: expert.config[k] for k in WAN22_A14B} == {k: (list(v) if isinstance(v, tuple) else v)
                                                         for k, v in WAN22_A14B.items()}
    assert 14.28e9 < sum(p.numel() for p in expert.parameters()) < 14.30e9
    encoder = build("text_encoder", tiny=False, device="meta", seed=0)
    assert {k: getattr(encoder.config, k) for k in ("d_model", "d_ff", "num_layers", "num_heads", "vocab_size")} == \
        {k: UMT5_XXL[k] for k in ("d_model", "d_ff", "num_layers", "num_heads", "vocab_size")}
    assert 5.67e9 < sum(p.numel() for p in encoder.parameters()) < 5.69e9  # tied embedding counted once
    vae = build("vae", tiny=False, device="meta", seed=0)
    assert vae.config.base_dim == 96 and list(vae.config.dim_mult) == [1, 2, 4, 4] and vae.config.z_dim == 16
    assert json.loads(json.dumps(vae.config["latents_mean"]))[:2] == [-0.7571, -0.7089]
