"""Shared by the TI2V 5B tests: a tiny TI2V 5B and a trainable workspace with a 48-channel cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from _train_helpers import tiny_params, write_inputs
from safetensors.torch import save

from wanlora.io import atomic_write_bytes, atomic_write_json, read_jsonl
from wanlora.models.geometry import TINY_TI2V_5B, build_transformer
from wanlora.models.latents import sample_key, variant_fields
from wanlora.models.loading import model_identity
from wanlora.models.text import run_stage as text_cache
from wanlora.models.tiny import make_tiny
from wanlora.models.variant import VARIANTS

BUCKET = "64x64x9"  # 3 latent frames of 4x4 through the 16x Wan 2.2 VAE
TI2V = VARIANTS["ti2v-5b"]


def tiny_ti2v(folder: Path, patch: list[int] | None = None) -> Path:
    """The tiny TI2V 5B; with `patch`, its transformer rebuilt with that patch size and 64 wide."""
    if not (folder / "model_index.json").is_file():
        make_tiny(folder, variant="ti2v-5b")
        if patch is not None:
            shutil.rmtree(folder / "transformer")
            wide = {**TINY_TI2V_5B, "patch_size": patch, "attention_head_dim": 32}  # 64 wide: room for 48 channels
            build_transformer(wide, torch.float32).save_pretrained(folder / "transformer")
    return folder


def ti2v_workspace(ws: Path, model: Path, n_clips: int = 2, patch: list[int] | None = None) -> Path:
    """Manifests, text cache and a 48-channel latent cache (smooth: one value per channel) as the
    stages write them for TI2V 5B."""
    root = tiny_ti2v(model, patch)
    ws.mkdir(parents=True, exist_ok=True)
    write_inputs(ws, n_clips, [BUCKET] * n_clips)
    text_cache(root=root, captions_manifest=ws / "data/captions/captions.jsonl", prompts=[], trigger="sks",
               dropout=("sks", "person"), out_dir=ws / "data/cache/text", dtype="fp32", quant="none", device="cpu")
    g, vae, keys = torch.Generator().manual_seed(0), model_identity(root, "vae"), {}
    for rec in read_jsonl(ws / "data/buckets/samples.jsonl"):
        shape = (48, 3, 4, 4)
        mean = torch.randn(48, 1, 1, 1, generator=g).expand(shape).contiguous()
        keys[rec["id"]] = key = sample_key(rec, vae, "distribution", "fp32", TI2V)
        meta = {"vae": vae, "sample_id": rec["id"], "bucket": rec["bucket"], "dtype": "fp32", "mode": "distribution",
                **variant_fields(TI2V)}
        atomic_write_bytes(ws / f"data/cache/latents/{key}.safetensors",
                           save({"mean": mean, "logvar": torch.full(shape, -6.0)}, meta))
    atomic_write_json(ws / "data/cache/latents/index.json",
                      {"vae": vae, "mode": "distribution", "dtype": "fp32", **variant_fields(TI2V), "samples": keys})
    return ws


def ti2v_params(root: Path, **sections):
    """`tiny_params` for TI2V 5B: its multistage section left at the defaults (one transformer
    takes no expert settings; tiny_params sets switch_every for the A14B runs)."""
    p = tiny_params(root, **sections)
    return p.model_copy(update={"multistage": type(p.multistage)()})
