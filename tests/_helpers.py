"""Helpers shared by the tests: stage inputs built the way the pipeline builds them, tiny models
(`wanlora.models.tiny`) and trainable workspaces around them, media files, LoRAs.

The distributed scenarios (`_dist_helpers.py`, `_sp_helpers.py`), the stage probe and the
real-footage corpus stay apart: each is also run as a program or holds one test file's world.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import av
import cv2
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save

from wanlora.config import DEFAULT_TARGETS, DatasetConfig, Params, dump_params, load_params, parse_params
from wanlora.data.scan import run_stage as scan_stage
from wanlora.data.split import run_stage as split_stage
from wanlora.evaluate.media import write_mp4
from wanlora.export import lineage
from wanlora.export.formats import LoraModule, write_ours
from wanlora.io import atomic_write_bytes, atomic_write_json, read_jsonl, sha256_file, sha256_text, write_jsonl
from wanlora.models.geometry import TINY
from wanlora.models.latents import run_stage as latent_cache
from wanlora.models.latents import sample_key, variant_fields
from wanlora.models.loading import model_identity
from wanlora.models.text import run_stage as text_cache
from wanlora.models.tiny import make_tiny, tiny_expert, tiny_vae
from wanlora.models.variant import VARIANTS
from wanlora.pipeline import CAPTION_MANIFEST, INDEX, MEDIA_INDEX, SAMPLES, SPLIT_FILE
from wanlora.tensorfiles import save as save_safetensors


def scan_index(datasets: dict[str, DatasetConfig], workspace: Path) -> Path:
    """Run the scan stage into the workspace's data/index and return its media index: what the
    trim stage reads (trim never walks a dataset folder itself)."""
    scan_stage(datasets, workspace, workspace / INDEX)
    return workspace / MEDIA_INDEX


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (links not followed), to prove a run modified nothing."""
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def write_audio_only(path: Path, seconds: float = 0.5) -> None:
    """An .mp4 holding only an AAC track: opens as a container, has no video."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=44100)
        n = int(44100 * seconds)
        samples = (np.sin(np.arange(n) / 20.0) * 0.2).astype(np.float32)[None, :]
        for start in range(0, n, 1024):
            frame = av.AudioFrame.from_ndarray(samples[:, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = 44100
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records}


# ---------------------------------------------------------------- tiny models
_SHARED: dict[tuple[int, str], Path] = {}


def shared_tiny_model(tmp_path_factory, seed: int = 0, variant: str = "t2v-a14b") -> Path:
    """A tiny model folder built once per process, seed and variant (tests must not modify it:
    `tiny_model` builds one of their own, `copy_model` copies this one to damage)."""
    if (seed, variant) not in _SHARED:
        _SHARED[seed, variant] = make_tiny(tmp_path_factory.mktemp(f"tiny_{variant}_{seed}") / "model", seed, variant)
    return _SHARED[seed, variant]


def tiny_model(folder: Path, variant: str = "t2v-a14b", **expert) -> Path:
    """The project's tiny model of `variant` in `folder` (built unless already there); `expert`
    overrides its transformers' config (`wanlora.models.tiny.make_tiny`).

    The overfit tests use patch_size [1, 1, 1]: with the tiny width (32) a [1, 2, 2] patch (64
    values) cannot pass through the model, so no training could drive the loss near zero.
    """
    if not (folder / "model_index.json").is_file():
        make_tiny(folder, variant=variant, expert=expert)
    return folder


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_captions(path: Path, captions: dict[str, tuple[str, str | None]]) -> Path:
    """captions.jsonl with id -> (caption, caption_dop) as the captions stage writes it."""
    write_jsonl(path, [{"id": k, "caption": c, "caption_dop": d} for k, (c, d) in captions.items()])
    return path


def clip_frames(n: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """n RGB uint8 frames of smooth moving gradients (survive lossy coding without noise)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for t in range(n):
        r = 127 + 100 * np.sin((x + 3 * t + seed) / 9.0)
        g = 127 + 100 * np.cos((y - 2 * t) / 7.0)
        b = 127 + 100 * np.sin((x + y + t) / 11.0)
        frames.append(np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8))
    return np.stack(frames)


def write_clip(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Write RGB frames as an mp4v .mp4 (PyAV and OpenCV both read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


# ---------------------------------------------------------------- trainable workspaces
BUCKET = "32x32x5"
LATENT_SHAPE = (16, 2, 4, 4)  # 5 frames at 32x32 through the Wan VAE


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
    root = tiny_model(model_dir, variant, **({"patch_size": patch} if patch else {}))
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


TI2V_BUCKET = "64x64x9"  # 3 latent frames of 4x4 through the 16x Wan 2.2 VAE
TI2V = VARIANTS["ti2v-5b"]


def ti2v_workspace(ws: Path, model: Path, n_clips: int = 2, patch: list[int] | None = None) -> Path:
    """Manifests, text cache and a 48-channel latent cache (smooth: one value per channel) as the
    stages write them for TI2V 5B."""
    # with a patch, 64 wide: room for the 48 channels it packs per token
    root = tiny_model(model, "ti2v-5b", **({"patch_size": patch, "attention_head_dim": 32} if patch else {}))
    ws.mkdir(parents=True, exist_ok=True)
    write_inputs(ws, n_clips, [TI2V_BUCKET] * n_clips)
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


# ---------------------------------------------------------------- LoRAs and evaluation
ALL_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2",
    "proj_out", "patch_embedding", "time_proj", "linear_1", "linear_2",
]


def tiny_pipeline() -> WanPipeline:
    """Two experts (seeds 1 and 2), tiny VAE, shift-5 scheduler; no text encoder (embeddings are given)."""
    return WanPipeline(
        tokenizer=None,
        text_encoder=None,
        transformer=tiny_expert(1),
        transformer_2=tiny_expert(2),
        vae=tiny_vae(3),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        boundary_ratio=0.875,
    )


def random_lora(model: WanTransformer3DModel, seed: int, rank: int = 4, alpha: float = 8.0,
                targets: list[str] | None = None) -> dict[str, LoraModule]:
    """A LoRA for `model` in our neutral form, with B non-zero (peft initialises B to zero)."""
    model = tiny_expert(0, **{k: v for k, v in model.config.items() if k in TINY})
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
    captioned = {r["id"] for r in read_jsonl(root / "data/captions/captions.jsonl")}
    samples = read_jsonl(root / "data/buckets/samples.jsonl")
    return ([s["id"] for s in samples if s["clip_id"] in captioned],
            {s["id"]: "no caption for its clip" for s in samples if s["clip_id"] not in captioned})


def save_checkpoint(root: Path, lora: dict[str, LoraModule], step: int, expert: str, params=None,
                    fingerprint: str = "tiny", **kw) -> Path:
    """`data/lora/<expert>/step_N.safetensors` as the trainer writes it: peft keys, lineage of the
    workspace's captioned samples (params from params.yaml unless given), sealed with the tensor hash."""
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
    text_cache(tiny, root / "data/captions/captions.jsonl", params.sample.prompts, "sks",
               root / "data/cache/text", "fp32", "none", "cpu", dropout=("sks", "person"))
    latent_cache(tiny, root / "data/buckets/samples.jsonl", root, root / "data/cache/latents",
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
    for expert, seed in (("high", 1), ("low", 2)):
        lora = random_lora(tiny_expert(seed), seed=step * 7 + seed, rank=4, alpha=2.0,
                           targets=list(DEFAULT_TARGETS))
        save_checkpoint(root, lora, step, expert)  # sealed with lineage: export accepts it
