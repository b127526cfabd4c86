"""Tiny Wan 2.2 pieces and LoRA files for the export, lineage, audit and evaluate tests.

Everything is random-initialised from configs (no downloads): two 2-layer experts, a tiny VAE,
the flow-match scheduler, and LoRAs whose B matrices are non-zero so they change the output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from wanlora.export.formats import LoraModule, write_ours
from wanlora.tensorfiles import save as save_safetensors
from wanlora.models.geometry import TINY
from wanlora.models.tiny import tiny_vae

ALL_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2",
    "proj_out", "patch_embedding", "time_proj", "linear_1", "linear_2",
]


def tiny_transformer(seed: int, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY, "rope_max_seq_len": 32, **overrides}).eval()


def tiny_pipeline() -> WanPipeline:
    """Two experts (seeds 1 and 2), tiny VAE, shift-5 scheduler; no text encoder (embeddings are given)."""
    return WanPipeline(
        tokenizer=None,
        text_encoder=None,
        transformer=tiny_transformer(1),
        transformer_2=tiny_transformer(2),
        vae=tiny_vae(3),
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


LINEAGE_PARAMS = {"datasets": {"main": {"captions": {"default_caption": "a clip"}}}}


def make_lineage_workspace(root: Path, n_clips: int = 2, uncaptioned: int = 0, params: dict | None = None) -> Path:
    """A workspace with raw clips (bytes only), caption files, the three manifests and params.yaml
    (LINEAGE_PARAMS, or `params`).

    Clip 0..n-2 have caption files; clip n-1 uses the dataset's default caption; `uncaptioned`
    further clips (u0, u1, ...) have no caption at all, so the captions stage left them out of
    its manifest and training skips them.
    """
    import json

    from wanlora.config import dump_params, parse_params
    from wanlora.io import sha256_file, sha256_text, write_jsonl

    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(dump_params(parse_params(params or LINEAGE_PARAMS)))
    raw = root / "data/raw"
    raw.mkdir(parents=True)
    clips, samples, captions = [], [], []
    names = [f"c{i}" for i in range(n_clips)] + [f"u{i}" for i in range(uncaptioned)]
    for i, name in enumerate(names):
        clip = raw / f"{name}.mp4"
        clip.write_bytes(f"video bytes {name}".encode())
        cid, rel = f"main/{name}.mp4", f"data/raw/{name}.mp4"
        has_file = i < n_clips - 1
        if has_file:
            (raw / f"{name}.txt").write_text(f"sks clip number {i}")
        clips.append({"id": cid, "dataset": "main", "path": rel, "sha256": sha256_file(clip),
                      "caption_path": f"data/raw/{name}.txt" if has_file else None, "status": "ok"})
        for k in range(2):
            samples.append({"id": f"{cid}#{k}", "clip_id": cid, "dataset": "main", "path": rel,
                            "sha256": sha256_file(clip), "kind": "video"})
        if i >= n_clips:
            continue
        text = f"sks clip number {i}" if has_file else "sks a clip"
        captions.append({"id": cid, "caption": text, "caption_sha256": sha256_text(text),
                         "origin": "file" if has_file else "default",
                         "source": f"data/raw/{name}.txt" if has_file else "default",
                         "source_sha256": sha256_file(raw / f"{name}.txt") if has_file else sha256_text("a clip")})
    write_jsonl(root / "data/trimmed/clips.jsonl", clips)
    write_jsonl(root / "data/buckets/samples.jsonl", samples)
    write_jsonl(root / "data/captions/captions.jsonl", captions)
    (root / "dvc.lock").write_text(json.dumps({"schema": "2.0"}))
    return root


def captioned_samples(root: Path) -> tuple[list[str], dict[str, str]]:
    """(trained ids, {skipped id: reason}) as the trainer's dataset splits a lineage workspace."""
    from wanlora.io import read_jsonl

    captioned = {r["id"] for r in read_jsonl(root / "data/captions/captions.jsonl")}
    samples = read_jsonl(root / "data/buckets/samples.jsonl")
    return ([s["id"] for s in samples if s["clip_id"] in captioned],
            {s["id"]: "no caption for its clip" for s in samples if s["clip_id"] not in captioned})


def save_checkpoint(root: Path, lora: dict[str, LoraModule], step: int, expert: str, params=None,
                    fingerprint: str = "tiny", **kw) -> Path:
    """`data/lora/<expert>/step_N.safetensors` as the trainer writes it: peft keys, lineage of the
    workspace's captioned samples (params from params.yaml unless given), sealed with the tensor hash."""
    from wanlora.config import load_params
    from wanlora.export import lineage

    params = params or load_params(root / "params.yaml")
    trained, skipped = captioned_samples(root)
    sd, meta = write_ours(lora)
    meta |= lineage.lineage_metadata(params, root, step, expert, fingerprint, trained, skipped, **kw)
    path = root / f"data/lora/{expert}/step_{step:06d}.safetensors"
    save_safetensors(path, sd, lineage.seal(sd, meta))
    return path


EVAL_SAMPLE = {"prompts": ["[trigger] walking", "a red car"], "steps": 2, "guidance_scale": 2.0, "num_frames": 5,
               "width": 32, "height": 32, "fps": 8, "seed": 3, "every_checkpoint": 2,
               "validation_clips": 1, "validation_timesteps": [500, 900]}


def make_eval_workspace(root: Path, steps=(2, 4), n_clips: int = 5) -> Path:
    """A trained workspace on the tiny model: clips, manifests, the split (one of five clips held
    out), real text and latent caches made by the caching stages, checkpoint pairs with non-zero
    LoRAs, dvclive curves, dataset reports."""
    import numpy as np

    from wanlora.config import dump_params, parse_params
    from wanlora.data.split import run_stage as split_stage
    from wanlora.pipeline import CAPTION_MANIFEST, SAMPLES, SPLIT_FILE
    from wanlora.evaluate.media import write_mp4
    from wanlora.io import atomic_write_json, sha256_file, sha256_text, write_jsonl
    from wanlora.models import latents, text
    from wanlora.models.tiny import make_tiny

    params = parse_params({"job": {"name": "tiny", "device": "cpu", "trigger_word": "sks"},
                           "model": {"name_or_path": str(root / "models/tiny"), "dtype": "fp32"},
                           "network": {"rank": 4, "alpha": 2.0}, "sample": EVAL_SAMPLE})
    (root / "params.yaml").write_text(dump_params(params))
    make_tiny(root / "models/tiny", seed=0)
    rng = np.random.default_rng(0)
    clips, samples, captions = [], [], []
    for i in range(n_clips):
        rel = f"data/raw/c{i}.mp4"
        write_mp4(root / rel, rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8), 8)
        cid = f"main/c{i}.mp4"
        clips.append({"id": cid, "dataset": "main", "path": rel, "sha256": sha256_file(root / rel), "status": "ok",
                      "keep_start_s": 0.0, "keep_end_s": 0.75, "caption_path": None})
        samples.append({"id": f"{cid}#0", "clip_id": cid, "dataset": "main", "path": rel,
                        "sha256": sha256_file(root / rel), "kind": "video", "width": 32, "height": 32,
                        "num_frames": 5, "bucket": "32x32x5", "frame_indices": [0, 1, 2, 3, 4],
                        "crop": [0, 0, 32, 32], "flip": False})
        cap = f"sks person number {i}"
        captions.append({"id": cid, "caption": cap, "caption_dop": None, "caption_sha256": sha256_text(cap),
                         "source": "default", "source_sha256": sha256_text(cap), "warnings": []})
    write_jsonl(root / "data/trimmed/clips.jsonl", clips)
    write_jsonl(root / "data/buckets/samples.jsonl", samples)
    write_jsonl(root / "data/captions/captions.jsonl", captions)
    split_stage(params, root / SAMPLES, root / CAPTION_MANIFEST, root / SPLIT_FILE)
    atomic_write_json(root / "data/buckets/histogram.json", [{"bucket": "32x32x5", "count": n_clips}])
    atomic_write_json(root / "data/captions/problems.json", {"count": 1, "problems": [
        {"path": "data/raw/x.mp4", "reason": "no caption <file>", "fix": "write x.txt", "stage": "captions"}]})
    tiny = root / "models/tiny"
    text.run_stage(tiny, root / "data/captions/captions.jsonl", params.sample.prompts, "sks",
                   root / "data/cache/text", "fp32", "none", "cpu", dropout=("sks", "person"))
    latents.run_stage(tiny, root / "data/buckets/samples.jsonl", root, root / "data/cache/latents",
                      "distribution", "fp32", "cpu", {"main"}, {"main": "data/raw"})
    live = root / "data/train_live/plots/metrics"
    live.mkdir(parents=True)
    for name in ("loss_high", "loss_low", "lr"):  # dvclive's layout: step<TAB>name
        rows = "".join(f"{s}\t{1.0 / (s + 1) + (name == 'loss_low') * 0.1}\n" for s in range(1, 7))
        (live / f"{name}.tsv").write_text(f"step\t{name}\n{rows}")
    for step in steps:
        add_checkpoint(root, step)
    return root


def add_checkpoint(root: Path, step: int) -> None:
    """A checkpoint pair as the trainer saves it, with non-zero LoRAs on the default targets."""
    from wanlora.config import DEFAULT_TARGETS

    for expert, seed in (("high", 1), ("low", 2)):
        lora = random_lora(tiny_transformer(seed), seed=step * 7 + seed, rank=4, alpha=2.0,
                           targets=list(DEFAULT_TARGETS))
        save_checkpoint(root, lora, step, expert)  # sealed with lineage: export accepts it
