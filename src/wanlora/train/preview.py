"""Previews while training: the sample prompts rendered with the live LoRAs at every save.

A long run shows what it is learning as it goes, as AI Toolkit's samples every N steps do: at
every `sample.preview_every` steps (default: every `save.every`) the prompts go through the
evaluate stage's sampler (`wanlora.evaluate.sampling.sample_videos`, the variant's diffusers
pipeline itself, so the boundary routes each timestep to its expert) with the experts already in
memory: the expert being trained carries its live LoRA, the other its latest one. I2V A14B
previews start from the start images evaluate uses (`sample.images`, else held-out clips' first
frames: `wanlora.evaluate.start_images`) at the preview size, written beside the videos; TI2V 5B
previews, like its evaluation, render each prompt from text alone and then from its start image,
with its one transformer. Seeds are the sample seeds, so successive previews differ only by
training. Size, frames, steps and guidance are the preview_* params, small by default;
`sample.preview_lora` stacks a user's step-distilled LoRA (a 4-step LightX2V file) as a second
peft adapter for the preview only, removed before training goes on.

Training never sees a preview: the global torch RNG state is forked around it (the sampler draws
from its own seeded generators anyway), the experts go back to train mode, and placement is put
back on demand by the next step's `ExpertPlacer.activate`. Previews are written to the run's
state folder first (`scratch/train/<key>/previews/<settings>/step_NNNNNN/`, result.json last
means complete; its wall-clock time waits in `timings/` beside it), then published into
`data/train_live/previews/` file by file, by renames from temp files in the state folder
(`monitor.PUBLISH_TEMP`), and the live page last: a kill at any moment leaves only whole files in data/train_live and a page that
shows the previews published before it. DVC deletes data/train_live before it reruns the stage,
and a resumed or finished run republishes what it already rendered. A kill during a preview
leaves an incomplete folder in the state that the resumed run renders again.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wanlora.config import Params, SampleConfig
from wanlora.io import atomic_write_json, atomic_write_text, copy_tree, read_jsonl, sha256_json, sweep_temps
from wanlora.pipeline import SAMPLES, SPLIT_FILE, TEXT_CACHE, TRAIN_LIVE, TRAIN_PERF
from wanlora.report import InputError, console
from wanlora.train.monitor import PUBLISH_TEMP

if TYPE_CHECKING:
    from wanlora.train.loop import Trainer

PREVIEW_ADAPTER = "preview"
TIMINGS = "timings"  # beside the previews in the state folder: wall-clock, so published apart (train_perf)


def preview_config(params: Params) -> SampleConfig:
    """The evaluate sampler's settings for a preview: the sample prompts, start images and seeds at
    the preview size, length, steps and guidance."""
    s = params.sample
    return SampleConfig(prompts=s.prompts, negative_prompt=s.negative_prompt, seed=s.seed, walk_seed=s.walk_seed,
                        images=s.images, last_images=s.last_images,
                        steps=s.preview_steps, guidance_scale=s.preview_guidance_scale, fps=s.fps,
                        num_frames=s.preview_num_frames, width=s.preview_width, height=s.preview_height)


def preview_due(params: Params, previous: int, step: int) -> bool:
    """Whether the optimizer step that went from `previous` to `step` ends at a preview."""
    s, every = params.sample, params.preview_every
    return s.preview and bool(s.prompts) and (step // every > previous // every or step >= params.train.steps)


@dataclass
class Previewer:
    """What a preview needs beyond the trainer: the sampling pipeline around its experts (built at
    the first preview), the prompts' cached embeddings, their start (end) frames for an
    image-to-video model, and where results go."""

    params: Params
    store: Path  # state folder of these preview settings
    out: Path  # data/train_live
    perf: Path  # data/train_perf
    temp: Path  # temp files of the publishes (io.atomic_open's temp_dir), in the run's state
    cfg: SampleConfig
    prompts: list[str]
    labels: list[str]  # one per video (`sampling.column_labels`): TI2V 5B renders each prompt twice
    starts: list[np.ndarray] | None = None  # uint8 [H, W, 3] per prompt; None: text-to-video only
    ends: list[np.ndarray] | None = None  # I2V with train.last_frame
    pipe: Any = None
    embeds: list[torch.Tensor] = field(default_factory=list)
    negative: torch.Tensor | None = None


def make_previewer(tr: Trainer) -> Previewer | None:
    """A previewer for this process, or None when previews are off or cannot run here: they need
    every expert of the model in this one process (a run training one A14B expert, or split over
    ranks, has the other expert nowhere to route to). Start images are read now, so a missing
    one stops the run before it trains, not at the first preview."""
    from wanlora.evaluate.sampling import column_labels, prompt_texts

    p = tr.params
    if not (p.sample.preview and p.sample.prompts):
        return None
    if set(tr.experts) != set(tr.variant.experts) or tr.env.world > 1:
        console.print("[yellow]train:[/] no previews: they need both experts in one process "
                      "(this run trains one expert, or runs on several ranks); evaluate samples after training")
        return None
    for e, f in p.sample.preview_lora.items():  # now, not hours in at the first preview
        if e not in tr.variant.experts:
            raise InputError(f"sample.preview_lora.{e}: {tr.variant.label} has no {e}-noise expert (one "
                             "transformer). Fix: remove sample.preview_lora")
        if not (tr.workspace / f).is_file() or not f.endswith(".safetensors"):
            raise InputError(f"sample.preview_lora.{e}: {tr.workspace / f} is not a .safetensors file. "
                             "Fix: give the path of the step-distilled LoRA for that expert, or remove the key")
    cfg = preview_config(p)
    starts, ends, digests = _start_frames(tr, cfg)
    key = sha256_json({"sample": cfg.model_dump(mode="json"), "lora": dict(p.sample.preview_lora),
                       "prompts": prompt_texts(p), **digests})[:16]
    temp = tr.state_dir / PUBLISH_TEMP
    sweep_temps(temp)
    return Previewer(p, tr.state_dir / "previews" / key, tr.workspace / TRAIN_LIVE, tr.workspace / TRAIN_PERF,
                     temp, cfg, prompt_texts(p), column_labels(p, tr.variant),
                     starts, ends)


def _start_frames(tr: Trainer, cfg: SampleConfig) -> tuple[list[np.ndarray] | None, list[np.ndarray] | None,
                                                            dict[str, list[str]]]:
    """Start and end frames of the prompts at the preview size, as evaluate chooses them, and their
    digests for the preview key (empty for a text-to-video model, whose key stays as it was)."""
    if not (tr.variant.image_condition or tr.variant.expand_timesteps):
        return None, None, {}
    from wanlora.data.split import read_split
    from wanlora.evaluate.start_images import frames_digest, prompt_frames

    samples = {s["id"]: s for s in read_jsonl(tr.workspace / SAMPLES)}
    starts, ends = prompt_frames(cfg, read_split(tr.workspace / SPLIT_FILE), samples, tr.workspace,
                                 tr.params.train.last_frame)
    digests = {"start_images": frames_digest(starts), **({"end_images": frames_digest(ends)} if ends else {})}
    return starts, ends, digests


def _pipeline(tr: Trainer, pv: Previewer) -> Any:
    """The variant's pipeline around the trainer's own experts, the VAE (the trainer holds none)
    and the prompts' embeddings from the text cache; built once."""
    if pv.pipe is None:
        from wanlora.evaluate.sampling import build_pipeline
        from wanlora.models.loading import boundary_ratio, load_vae, resolve_model
        from wanlora.models.text import load_text_embeds, pad_embeds

        p = tr.params
        root = resolve_model(p.model.name_or_path, p.model.revision)
        boundary = None if tr.variant.boundary is None else (
            p.multistage.boundary_ratio if p.multistage.boundary_ratio is not None else boundary_ratio(root))
        vae = load_vae(root, "fp32", str(tr.device))
        pv.pipe = build_pipeline(tr.experts[tr.variant.experts[0]], tr.experts.get("low"), vae, boundary,
                                 p.model.flow_shift, tr.variant)
        text = tr.workspace / TEXT_CACHE

        def embed(s: str) -> torch.Tensor:
            return pad_embeds([load_text_embeds(text, s, tr.expect_encoder)]).to(tr.dtype)

        pv.embeds, pv.negative = [embed(s) for s in pv.prompts], embed(p.sample.negative_prompt)
    return pv.pipe


@contextlib.contextmanager
def _routed(tr: Trainer) -> Iterator[list[int]]:
    """Each expert is placed on the device when the sampler calls it (`ExpertPlacer.activate`);
    yields a one-item list that counts the placement moves (expert switches) made meanwhile."""
    moves, mover = [0], tr.placer.mover

    def counting(model: torch.nn.Module, where: str, non_blocking: bool) -> None:
        moves[0] += 1
        mover(model, where, non_blocking)

    def place(expert: str) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            tr.placer.activate(expert)
        return hook

    tr.placer.mover = counting
    hooks = [m.register_forward_pre_hook(place(e)) for e, m in tr.experts.items()]
    try:
        yield moves
    finally:
        for h in hooks:
            h.remove()
        tr.placer.mover = mover
        for off in tr.offloads:
            off.release()


@contextlib.contextmanager
def _preview_lora(tr: Trainer, pipe: Any) -> Iterator[None]:
    """Stack `sample.preview_lora` beside the training adapter: diffusers loads a second adapter
    active beside the first (a test pins the sum against merged weights), and deleting it after
    leaves the training adapter active and trainable (the LoRA bytes test pins that)."""
    from wanlora.evaluate.sampling import lora_applied

    files = {e: tr.workspace / f for e, f in tr.params.sample.preview_lora.items()}
    if not files:
        yield
        return
    with lora_applied(pipe, files, PREVIEW_ADAPTER):
        yield


def render_preview(tr: Trainer, pv: Previewer) -> Path:
    """Render the prompts at the trainer's current step into the state folder, then publish."""
    from wanlora.evaluate import media, sampling

    started = time.perf_counter()
    pipe = _pipeline(tr, pv)
    devices = [tr.device] if tr.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _routed(tr) as moves, _preview_lora(tr, pipe):
        for m in tr.experts.values():
            m.eval()
        try:
            videos = sampling.sample_videos(pipe, tr.variant, pv.embeds, pv.negative, pv.cfg, pv.starts, pv.ends)
        finally:
            for m in tr.experts.values():
                m.train()
    entry = pv.store / f"step_{tr.step:06d}"
    files = []
    for i, v in enumerate(videos):
        media.write_mp4(entry / f"prompt_{i:02d}.mp4", v, pv.cfg.fps or tr.variant.fps)  # sample.fps null: the model's own
        media.write_png(entry / f"prompt_{i:02d}.png", v[0])
        files.append(f"prompt_{i:02d}.mp4")
    media.write_png(entry / "contact_sheet.png", media.contact_sheet(videos))
    result: dict[str, Any] = {"step": tr.step, "videos": files}
    if pv.starts is not None:  # the last len(starts) videos start from them (TI2V 5B: the first ones from text)
        for i, frame in enumerate(pv.starts):
            media.write_png(entry / f"start_{i:02d}.png", frame)
        names = [f"start_{i:02d}.png" for i in range(len(pv.starts))]
        result["starts"] = [None] * (len(videos) - len(names)) + names
    seconds = time.perf_counter() - started
    timing = {"seconds": round(seconds, 3), "switches": moves[0]}
    atomic_write_json(pv.store / TIMINGS / f"{entry.name}.json", timing)
    atomic_write_json(entry / "result.json", result)
    console.print(f"train: preview at step {tr.step} in {seconds:.1f}s ({moves[0]} expert moves): "
                  f"{pv.out / 'previews' / entry.name}")
    publish_previews(pv, tr.history)
    return entry


def finished_previews(store: Path) -> list[dict[str, Any]]:
    """result.json of every complete preview in `store`, by step."""
    done = [json.loads(p.read_text(encoding="utf-8")) for p in store.glob("step_*/result.json")]
    return sorted(done, key=lambda r: r["step"])


def publish_previews(pv: Previewer, history: list[dict[str, float]]) -> None:
    """Copy every complete preview into data/train_live/previews/, then data/train_perf/previews.json
    (step, seconds, expert moves: the preview time, beside the step times of perf.json; measurements,
    apart from what same inputs, same bytes covers), then the live page."""
    from wanlora.train.livepage import render_live_page

    done = finished_previews(pv.store)
    target = pv.out / "previews"
    keep = {f"step_{r['step']:06d}" for r in done}
    for stale in sorted(target.glob("step_*")) if target.is_dir() else []:
        if stale.name not in keep:  # rendered under other preview settings
            shutil.rmtree(stale)
    timings = []
    for r in done:
        name = f"step_{r['step']:06d}"
        copy_tree(pv.store / name, target / name, pv.temp)
        timings.append({"step": r["step"], **json.loads((pv.store / TIMINGS / f"{name}.json").read_text("utf-8"))})
    atomic_write_json(pv.perf / "previews.json", timings, pv.temp)
    total = pv.params.train.steps
    step = int(history[-1]["step"]) if history else 0
    atomic_write_text(pv.out / "index.html", render_live_page(pv.labels, done, history, step, total), pv.temp)
