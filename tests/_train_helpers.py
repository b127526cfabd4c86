"""A tiny trainable workspace: tiny Wan model, two clips' manifests, text and latent caches."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save

from wanlora.config import Params, parse_params
from wanlora.data.split import run_stage as split_stage
from wanlora.io import atomic_write_bytes, atomic_write_json, read_jsonl, write_jsonl
from wanlora.models.latents import sample_key, variant_fields
from wanlora.models.loading import model_identity
from wanlora.models.text import run_stage as text_cache
from wanlora.models.geometry import TINY_CONFIGS, build_transformer
from wanlora.models.tiny import make_tiny
from wanlora.models.variant import VARIANTS
from wanlora.pipeline import CAPTION_MANIFEST, SAMPLES, SPLIT_FILE

BUCKET = "32x32x5"
LATENT_SHAPE = (16, 2, 4, 4)  # 5 frames at 32x32 through the Wan VAE


def tiny_model(folder: Path, patch: list[int] | None = None, variant: str = "t2v-a14b") -> Path:
    """The project's tiny model (of `variant`); with `patch`, both experts rebuilt with that patch size.

    The overfit test uses patch [1, 1, 1]: with the tiny width (32) a [1, 2, 2] patch (64 values)
    cannot pass through the model, so no training could drive the loss near zero.
    """
    if not (folder / "model_index.json").is_file():
        make_tiny(folder, variant=variant)
        if patch is not None:
            for seed, part in enumerate(("transformer", "transformer_2")):
                shutil.rmtree(folder / part)
                build_transformer({**TINY_CONFIGS[variant], "patch_size": patch}, torch.float32, "cpu",
                                  seed).save_pretrained(folder / part)
    return folder


def write_inputs(ws: Path, n_clips: int = 2, buckets: list[str] | None = None) -> None:
    """Manifests for `n_clips` clips (one sample each) in the given buckets."""
    buckets = buckets or [BUCKET] * n_clips
    captions, samples = [], []
    for i in range(n_clips):
        cid = f"main/clip{i}.mp4"
        cap = f"sks person walking in the park {i}"
        captions.append({"id": cid, "caption": cap, "caption_dop": cap.replace("sks", "person"),
                         "caption_sha256": "", "source": "default", "source_sha256": "", "warnings": []})
        w, h, f = (int(x) for x in buckets[i].split("x"))
        samples.append({"id": f"{cid}#0", "clip_id": cid, "dataset": "main", "path": f"data/raw/clip{i}.mp4",
                        "sha256": f"{i:064d}", "kind": "video", "width": w, "height": h, "num_frames": f,
                        "bucket": buckets[i], "frame_indices": list(range(f)), "crop": [0, 0, w, h], "flip": False})
    write_jsonl(ws / "data/captions/captions.jsonl", captions)
    write_jsonl(ws / "data/buckets/samples.jsonl", samples)
    split_stage(parse_params({"sample": {"validation_clips": 0}}), ws / SAMPLES, ws / CAPTION_MANIFEST, ws / SPLIT_FILE)  # nothing held out unless a test says so


def write_latents(ws: Path, root: Path, vae: str | None = None, seed: int = 0, scale: float = 2.0,
                  smooth: bool = False, mean_of: Callable[[dict, torch.Generator], torch.Tensor] | None = None,
                  variant: str = "t2v-a14b") -> None:
    """A latent cache as the latent_cache stage writes it (distribution mode, index.json). With
    `smooth`, each sample's latent is one random vector per channel, constant over space and time;
    `mean_of(record, generator)` gives that vector ([16, 1, 1, 1]) instead of a random one. An I2V
    `variant` adds each sample's `condition` (its first latent frame, then the latent of zeros:
    random as well) and the variant tags the stage writes."""
    v = VARIANTS[variant]
    tag = variant_fields(v)
    g = torch.Generator().manual_seed(seed)
    vae = vae or model_identity(root, "vae")
    keys = {}
    for rec in read_jsonl(ws / "data/buckets/samples.jsonl"):
        w, h, f = (int(x) for x in rec["bucket"].split("x"))
        shape = (16, (f - 1) // 4 + 1, h // 8, w // 8)
        if mean_of is not None:
            mean = mean_of(rec, g).expand(shape).contiguous()
        elif smooth:
            mean = (torch.randn(16, 1, 1, 1, generator=g) * scale).expand(shape).contiguous()
        else:
            mean = torch.randn(shape, generator=g) * scale
        tensors = {"mean": mean, "logvar": torch.full(shape, -6.0)}
        if v.image_condition:
            tensors["condition"] = torch.cat([mean[:, :1], torch.randn(16, shape[1] - 1, *shape[2:], generator=g)], 1)
        keys[rec["id"]] = key = sample_key(rec, vae, "distribution", "fp32", v)
        meta = {"vae": vae, "sample_id": rec["id"], "bucket": rec["bucket"], "dtype": "fp32", "mode": "distribution",
                **tag}
        atomic_write_bytes(ws / f"data/cache/latents/{key}.safetensors", save(tensors, meta))
    atomic_write_json(ws / "data/cache/latents/index.json",
                      {"vae": vae, "mode": "distribution", "dtype": "fp32", **tag, "samples": keys})


def make_workspace(ws: Path, model_dir: Path, n_clips: int = 2, patch: list[int] | None = None,
                   scale: float = 2.0, smooth: bool = False, buckets: list[str] | None = None,
                   variant: str = "t2v-a14b") -> Path:
    root = tiny_model(model_dir, patch, variant)
    ws.mkdir(parents=True, exist_ok=True)
    write_inputs(ws, n_clips, buckets)
    text_cache(root=root, captions_manifest=ws / "data/captions/captions.jsonl", prompts=[], trigger="sks",
               dropout=("sks", "person"), out_dir=ws / "data/cache/text", dtype="fp32", quant="none", device="cpu")
    write_latents(ws, root, scale=scale, smooth=smooth, variant=variant)
    return ws


def tiny_params(root: Path, **sections) -> Params:
    """Params for fast CPU runs; `sections` override whole leaf values, e.g. train={'steps': 5}."""
    base = {
        "job": {"device": "cpu", "seed": 3},
        "model": {"name_or_path": str(root), "dtype": "fp32"},
        "network": {"rank": 4, "alpha": 4},
        "train": {"steps": 6, "optimizer": "adamw", "lr": 1e-3, "caption_dropout": 0.0,
                  "gradient_checkpointing": False},
        "multistage": {"switch_every": 2},
        "save": {"every": 2, "keep_last": 2, "dtype": "fp32"},
        "sample": {"preview": False},  # on in tests/test_train_preview.py
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return parse_params(base)


def copy_workspace(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def crash_at_step(monkeypatch, step: int) -> None:
    """Make the trainer raise KeyboardInterrupt (a simulated kill) when it builds a batch at
    global step `step`; `monkeypatch.undo()` lifts it."""
    from wanlora.train import loop

    real = loop.make_batch

    def make_batch(tr, indices, expert, g):
        if tr.step == step:
            raise KeyboardInterrupt("simulated kill")
        return real(tr, indices, expert, g)

    monkeypatch.setattr(loop, "make_batch", make_batch)
