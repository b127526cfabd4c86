"""Tiny Wan 2.2 pieces and LoRA files for the export, lineage, audit and evaluate tests.

Everything is random-initialised from configs (no downloads): two 2-layer experts, a tiny VAE,
the flow-match scheduler, and LoRAs whose B matrices are non-zero so they change the output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from wanlora.export.formats import LoraModule, save_safetensors, write_ours
from wanlora.models.geometry import TINY

ALL_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2",
    "proj_out", "patch_embedding", "time_proj", "linear_1", "linear_2",
]


def tiny_transformer(seed: int, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY, "rope_max_seq_len": 32, **overrides}).eval()


def tiny_vae(seed: int = 3) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def tiny_pipeline() -> WanPipeline:
    """Two experts (seeds 1 and 2), tiny VAE, shift-5 scheduler; no text encoder (embeddings are given)."""
    return WanPipeline(
        tokenizer=None,
        text_encoder=None,
        transformer=tiny_transformer(1),
        transformer_2=tiny_transformer(2),
        vae=tiny_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        boundary_ratio=0.875,
    )


def random_lora(model: WanTransformer3DModel, seed: int, rank: int = 4, alpha: float = 8.0,
                targets: list[str] | None = None) -> dict[str, LoraModule]:
    """A LoRA for `model` in our neutral form, with B non-zero (peft initialises B to zero)."""
    model = tiny_transformer(0, **{k: v for k, v in model.config.items() if k in TINY})
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or ALL_TARGETS))
    gen = torch.Generator().manual_seed(seed)
    sd = get_peft_model_state_dict(model)
    lora = {}
    for key, down in sd.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            up = sd[module + ".lora_B.weight"]
            lora[module] = LoraModule(
                down=torch.randn(down.shape, generator=gen) * 0.3,
                up=torch.randn(up.shape, generator=gen) * 0.3,
                alpha=alpha,
            )
    return lora


def save_ours(path: Path, lora: dict[str, LoraModule], extra_meta: dict[str, str] | None = None) -> Path:
    """Write a LoRA as the trainer does: peft keys with `transformer.`, rank/alpha in the header."""
    sd, meta = write_ours(lora)
    save_safetensors(path, sd, {**meta, **(extra_meta or {})})
    return path


def forward(model: WanTransformer3DModel, seed: int = 0, timestep: float = 500.0) -> torch.Tensor:
    """One transformer call on fixed random inputs (2 latent frames, 4x4 latent pixels)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 4, generator=gen)
    text = torch.randn(1, 7, TINY["text_dim"], generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([timestep]), text, return_dict=False)[0]


def merged(model: WanTransformer3DModel, lora: dict[str, LoraModule]) -> WanTransformer3DModel:
    """A copy of `model` with W += (alpha/rank) * up @ down: the LoRA's meaning, by plain math."""
    import copy

    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name, m in lora.items():
            w = modules[name].weight
            delta = m.up.float().flatten(1) @ m.down.float().flatten(1)
            w += (m.scale * delta).reshape(w.shape).to(w.dtype)
    return out


def make_lineage_workspace(root: Path, n_clips: int = 2) -> Path:
    """A workspace with raw clips (bytes only), caption files, the three manifests and params.yaml.

    Clip 0..n-2 have caption files; the last clip uses the dataset's default caption.
    """
    import json

    from wanlora.config import dump_params, parse_params
    from wanlora.io import sha256_file, sha256_text, write_jsonl

    params = parse_params({"datasets": {"main": {"captions": {"default_caption": "a clip"}}}})
    (root / "params.yaml").write_text(dump_params(params))
    raw = root / "data/raw"
    raw.mkdir(parents=True)
    clips, samples, captions = [], [], []
    for i in range(n_clips):
        clip = raw / f"c{i}.mp4"
        clip.write_bytes(f"video bytes {i}".encode())
        cid, rel = f"main/c{i}.mp4", f"data/raw/c{i}.mp4"
        has_file = i < n_clips - 1
        if has_file:
            (raw / f"c{i}.txt").write_text(f"sks clip number {i}")
        clips.append({"id": cid, "dataset": "main", "path": rel, "sha256": sha256_file(clip),
                      "caption_path": f"data/raw/c{i}.txt" if has_file else None, "status": "ok"})
        for k in range(2):
            samples.append({"id": f"{cid}#{k}", "clip_id": cid, "dataset": "main", "path": rel,
                            "sha256": sha256_file(clip), "kind": "video"})
        text = f"sks clip number {i}" if has_file else "sks a clip"
        captions.append({"id": cid, "caption": text, "caption_sha256": sha256_text(text),
                         "source": f"data/raw/c{i}.txt" if has_file else "default",
                         "source_sha256": sha256_file(raw / f"c{i}.txt") if has_file else sha256_text("a clip")})
    write_jsonl(root / "data/trimmed/clips.jsonl", clips)
    write_jsonl(root / "data/buckets/samples.jsonl", samples)
    write_jsonl(root / "data/captions/captions.jsonl", captions)
    (root / "dvc.lock").write_text(json.dumps({"schema": "2.0"}))
    return root
