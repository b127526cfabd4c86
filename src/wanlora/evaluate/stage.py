"""The evaluate stage: samples per checkpoint, fixed-noise losses, the best checkpoints, the report.

Per checkpoint and expert it measures the fixed-noise loss on the held-out clips and on as many
training clips, at the same timesteps and noise (`wanlora.data.split` says which; `validation`
how), chooses each expert's best checkpoint on the held-out loss (`best`), and writes
`best.json` (what export reads), `metrics.json` (the run's flat summary, `summary`), `val_loss.json`
(rows per checkpoint for `dvc plots`) and `report.html`.

Work is cached per checkpoint in `scratch/eval/<key>/` (git-ignored, outside DVC's outs), keyed
by everything the result depends on: the LoRA files' bytes, the base model's identity, the
sampling or validation settings, and the caches read. DVC deletes `data/eval/` before it reruns
the stage, so the outputs are rebuilt from that cache each run; a new checkpoint costs only its
own samples, and when nothing is missing the base model is not even loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress

from wanlora.config import Params
from wanlora.data.split import BASIS_LABEL, HELD_OUT, Split, read_split
from wanlora.evaluate import media
from wanlora.evaluate.best import choose_best
from wanlora.evaluate.sampling import column_labels, prompt_texts
from wanlora.evaluate.start_images import frames_digest
from wanlora.evaluate.report import ReportRow, dataset_summary, read_train_curves, render_report
from wanlora.evaluate.summary import run_summary
from wanlora.evaluate.validation import ValItem, fixed_noise_losses
from wanlora.export.stage import list_checkpoints
from wanlora.io import atomic_write_json, atomic_write_text, copy_tree, read_jsonl, sha256_file, sha256_json
from wanlora.models.condition import check_last_frame
from wanlora.models.variant import LEGACY_VARIANT, Variant, resolve_variant
from wanlora.report import InputError, console
from wanlora.train import ti2v

EVAL_FORMAT = 2  # bump when cached results would no longer match what this code writes


@dataclass(frozen=True)
class Inputs:
    """What the stage reads: the deps of its `Stage` entry, named by the wiring
    (`wanlora.stages.evaluate.inputs`)."""

    lora: Path  # the train stage's checkpoints
    train_live: Path  # its curves
    text_cache: Path
    latent_cache: Path
    samples: Path
    captions: Path
    split: Path
    histogram: Path  # for the report page's dataset summary
    clips: Path
    caption_problems: Path


def steps_to_sample(steps: list[int], every: int) -> list[int]:
    """Every `every`-th checkpoint (the every-th, 2*every-th, ...) and always the newest.

    Counted from the first, so a new checkpoint does not shift which older ones are sampled."""
    steps = sorted(steps)
    return sorted({s for i, s in enumerate(steps) if (i + 1) % every == 0} | set(steps[-1:]))


def sample_fps(params: Params, variant: Variant) -> int:
    """Frame rate of the written videos: sample.fps, or the model's own (`Variant.fps`) when null."""
    return params.sample.fps or variant.fps


def _hash_or_absent(path: Path) -> str:
    return sha256_file(path) if path.is_file() else "absent"


@dataclass
class Plan:
    """What the stage will do, computed without loading any model."""

    root: Path
    checkpoints: dict[int, dict[str, Path]]
    sampled: list[int]
    split: Split
    base: dict[str, Any]
    variant: Variant
    start_frames: list[Any] | None = None  # I2V: uint8 [H, W, 3] start image per prompt (`start_images`)
    end_frames: list[Any] | None = None  # I2V with train.last_frame: the last frame of each prompt
    _hashes: dict[int, dict[str, str]] = field(default_factory=dict)

    def lora_id(self, step: int | None) -> dict[str, str] | None:
        """sha256 of the checkpoint's files (hashed once: real LoRA pairs are hundreds of MB)."""
        if step is None:
            return None
        if step not in self._hashes:
            self._hashes[step] = {e: sha256_file(p) for e, p in sorted(self.checkpoints[step].items())}
        return self._hashes[step]

    def sample_key(self, params: Params, step: int | None) -> str:
        s = params.sample
        settings = {"prompts": prompt_texts(params), "negative": s.negative_prompt, "steps": s.steps,
                    "guidance": s.guidance_scale, "frames": s.num_frames, "size": [s.width, s.height],
                    "fps": sample_fps(params, self.variant), "seed": s.seed, "walk_seed": s.walk_seed}
        for name, frames in (("start_images", self.start_frames), ("end_images", self.end_frames)):
            if frames is not None:  # what each prompt starts (ends) with, by content
                settings[name] = frames_digest(frames)
        return sha256_json({"kind": "samples", **self.base, "sample": settings, "lora": self.lora_id(step)})[:20]

    def val_key(self, params: Params, step: int | None) -> str:
        s = params.sample
        settings = {"timesteps": s.validation_timesteps, "seed": params.job.seed, "draws": s.validation_noise_draws,
                    "held_out": self.split.validation_samples, "train": self.split.training_samples}
        return sha256_json({"kind": "val", **self.base, "val": settings, "lora": self.lora_id(step)})[:20]


def make_plan(params: Params, workspace: Path, inputs: Inputs) -> Plan:
    """`workspace` roots the start images (`sample.images`, held-out clips' first frames)."""
    from wanlora.models.loading import boundary_ratio, model_identity, resolve_model

    root = resolve_model(params.model.name_or_path, params.model.revision)
    variant = resolve_variant(params.model.variant, root)
    check_last_frame(params.train.last_frame, variant)
    checkpoints = list_checkpoints(inputs.lora)
    if not checkpoints:
        raise FileNotFoundError(f"{inputs.lora}: no checkpoints; run the train stage first")
    ms = params.multistage
    ti2v.check_params(params, variant)
    align = variant.bucket_align
    if params.sample.width % align or params.sample.height % align:  # WanPipeline would round down with a warning
        fit = [max(align, round(v / align) * align) for v in (params.sample.width, params.sample.height)]
        raise InputError(f"sample.width x sample.height is {params.sample.width}x{params.sample.height}, but "
                         f"{variant.label} needs multiples of {align} px (VAE {variant.spatial_factor}x, 2x2 patch). "
                         f"Fix: set sample.width: {fit[0]} and sample.height: {fit[1]}")
    boundary = None if variant.boundary is None else (
        ms.boundary_ratio if ms.boundary_ratio is not None else boundary_ratio(root))
    base = {
        "format": EVAL_FORMAT,
        "model": {p: model_identity(root, p) for p in (*variant.folders, "vae")},
        "dtype": params.model.dtype,
        "quant": {k: v for k, v in params.quantization.model_dump(mode="json").items()
                  if k not in ("cache_dir", "text_encoder")},  # mode, group, fp8 matmuls, recovery
        "boundary": boundary, "shift": params.model.flow_shift,
        "text_cache": _hash_or_absent(inputs.text_cache / "index.json"),
        "latent_cache": _hash_or_absent(inputs.latent_cache / "index.json"),
        "captions": _hash_or_absent(inputs.captions),
        **({} if variant.name == LEGACY_VARIANT else {"variant": variant.name}),  # T2V keys stay as they were
    }
    split = read_split(inputs.split)
    frames = ends = None
    if (variant.image_condition or variant.expand_timesteps) and params.sample.prompts:  # TI2V 5B: both ways
        from wanlora.evaluate.start_images import prompt_frames

        samples = {s["id"]: s for s in read_jsonl(inputs.samples)}
        frames, ends = prompt_frames(params.sample, split, samples, workspace, params.train.last_frame)
    elif params.sample.images:
        raise InputError(f"sample.images lists start images, but {root} holds {variant.describe()}, which "
                         "samples from text alone. Fix: empty sample.images, or use an image-to-video model")
    if params.sample.last_images and not params.train.last_frame:
        raise InputError("sample.last_images lists end frames, but train.last_frame is false, so the LoRA "
                         "never learned to end on one. Fix: empty sample.last_images, or set train.last_frame: true")
    return Plan(root, checkpoints, steps_to_sample(list(checkpoints), params.sample.every_checkpoint),
                split, base, variant, frames, ends)


# ------------------------------------------------------------------------------- the models
@dataclass
class Loaded:
    pipe: Any
    prompt_embeds: list
    negative_embeds: Any
    val_items: dict[str, list[ValItem]]  # "held_out" and "train": the split's scored samples


def load_models(params: Params, workspace: Path, inputs: Inputs, plan: Plan) -> Loaded:
    """Both experts, the VAE, the prompts' cached embeddings and the scored samples."""
    import torch

    from wanlora.evaluate.sampling import build_pipeline
    from wanlora.models.condition import condition_input
    from wanlora.models.latents import load_latents, normalize_latents
    from wanlora.models.expert import load_base
    from wanlora.models.loading import load_vae, load_vae_config, model_identity
    from wanlora.models.text import encoder_identity, load_text_embeds, pad_embeds
    from wanlora.stages._common import resolve_device

    device = resolve_device(params.job.device)
    where = "cpu" if params.model.low_vram else device
    # the base the LoRAs trained against: same cached quantization, recovery and fp8 setting
    experts = {e: load_base(plan.root, e, params, workspace, where, work=device, sampling=True)
               for e in plan.variant.experts}
    vae = load_vae(plan.root, "fp32", where)
    first = experts[plan.variant.experts[0]]
    pipe = build_pipeline(first, experts.get("low"), vae, plan.base["boundary"], params.model.flow_shift,
                          plan.variant)
    if params.model.low_vram and str(device).startswith("cuda"):
        pipe.enable_model_cpu_offload(device=device)

    text_dir, encoder = inputs.text_cache, encoder_identity(plan.root)
    dtype = first.dtype

    def embed(text: str) -> torch.Tensor:
        return pad_embeds([load_text_embeds(text_dir, text, encoder)]).to(dtype)

    prompt_embeds = [embed(t) for t in prompt_texts(params)]
    negative = embed(params.sample.negative_prompt)

    samples = {s["id"]: s for s in read_jsonl(inputs.samples)}
    captions = {c["id"]: c for c in read_jsonl(inputs.captions)}
    vae_config, vae_id = load_vae_config(plan.root), model_identity(plan.root, "vae")

    def item(sid: str) -> ValItem:
        cap = captions.get(samples[sid]["clip_id"]) if sid in samples else None
        if cap is None:
            raise InputError(f"{inputs.split}: sample {sid} is not in the samples or captions "
                             "manifest. Fix: rerun the split stage (`dvc repro split`)")
        last = params.train.last_frame
        cached = load_latents(inputs.latent_cache, sid, vae_id, plan.variant, last)
        z = cached["mean"] if "mean" in cached else cached["latent"]  # the mode: no random draw
        cond = None
        if plan.variant.image_condition:
            cond = condition_input(normalize_latents(cached["condition"].float(), vae_config),
                                   plan.variant.temporal_factor, last)
        return ValItem(sid, normalize_latents(z.float(), vae_config), embed(cap["caption"])[0], cond)

    items = {"held_out": [item(s) for s in plan.split.validation_samples],
             "train": [item(s) for s in plan.split.training_samples]}
    return Loaded(pipe, prompt_embeds, negative, items)


# ------------------------------------------------------------------------------- cache entries
def _finished(entry: Path) -> dict[str, Any] | None:
    result = entry / "result.json"
    return json.loads(result.read_text(encoding="utf-8")) if result.is_file() else None


def _write_samples(entry: Path, videos: list, fps: int) -> dict[str, Any]:
    """mp4 + poster (middle frame) per prompt and the contact sheet; result.json last (= done)."""
    files = []
    for i, v in enumerate(videos):
        media.write_mp4(entry / f"prompt_{i:02d}.mp4", v, fps)
        media.write_png(entry / f"prompt_{i:02d}.png", v[0])  # the first frame, as docs/architecture.md says
        files.append(f"prompt_{i:02d}.mp4")
    media.write_png(entry / "contact_sheet.png", media.contact_sheet(videos))
    result = {"videos": files, "frames": int(videos[0].shape[0]),
              "size": [int(videos[0].shape[2]), int(videos[0].shape[1])]}
    atomic_write_json(entry / "result.json", result)
    return result


def _evaluate_one(params: Params, plan: Plan, step: int | None, get: Any, scratch: Path) -> tuple[Path | None, dict]:
    """Samples (if due) and validation loss of one checkpoint (None: the baseline), cached."""
    from wanlora.evaluate import sampling

    want_samples = bool(params.sample.prompts) and ((step in plan.sampled) if step is not None
                                                     else params.sample.baseline)
    want_val = bool(plan.split.validation_samples or plan.split.training_samples)
    s_entry = scratch / plan.sample_key(params, step) if want_samples else None
    v_entry = scratch / plan.val_key(params, step) if want_val else None
    s_done = _finished(s_entry) if s_entry else None
    v_done = _finished(v_entry) if v_entry else None
    if (s_entry is None or s_done) and (v_entry is None or v_done):
        return s_entry, v_done or {}
    loaded = get()
    name = "baseline" if step is None else f"step_{step:06d}"
    files = {} if step is None else plan.checkpoints[step]
    with sampling.lora_applied(loaded.pipe, files, name, plan.variant):
        if s_entry is not None and not s_done:
            videos = sampling.sample_videos(loaded.pipe, plan.variant, loaded.prompt_embeds, loaded.negative_embeds,
                                            params.sample, plan.start_frames, plan.end_frames)
            _write_samples(s_entry, videos, sample_fps(params, plan.variant))
        if v_entry is not None and not v_done:
            experts = dict(zip(plan.variant.experts, (loaded.pipe.transformer, loaded.pipe.transformer_2)))
            cfg = params.sample
            v_done = {name: fixed_noise_losses(experts, items, cfg.validation_timesteps, plan.base["boundary"],
                                               params.job.seed, cfg.validation_noise_draws)
                      for name, items in loaded.val_items.items()}
            atomic_write_json(v_entry / "result.json", v_done)
    return s_entry, v_done or {}


def _means(terms: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """{"held_out_high": mean, "train_low": ...} of one checkpoint's per-term losses (empty left out)."""
    return {f"{name}_{e}": sum(t) / len(t) for name, by_expert in sorted(terms.items())
            for e, t in sorted(by_expert.items()) if t}


def choose_experts(terms: dict[int, dict[str, dict[str, list[float]]]], split: Split,
                   experts: set[str]) -> dict[str, dict]:
    """Each trained expert's best checkpoint on the held-out terms (on the training-clip terms when
    the split holds nothing out, labelled so)."""
    name, label = ("held_out", "held-out") if split.basis == HELD_OUT else ("train", "training-clip")
    out = {}
    for e in sorted(experts):
        choice = choose_best({step: t.get(name, {}).get(e, []) for step, t in terms.items()}, label)
        if choice is not None:
            out[e] = choice.as_dict()
    return out


def run_stage(params: Params, workspace: Path, inputs: Inputs, out_dir: Path) -> None:
    """DVC stage `evaluate`: writes samples/, best.json, metrics.json, val_loss.json and report.html.

    `workspace` roots the base model's quantization cache and this stage's own `scratch/eval`."""
    workspace, out_dir = Path(workspace), Path(out_dir)
    plan = make_plan(params, workspace, inputs)
    scratch = workspace / "scratch/eval"
    holder: dict[str, Loaded] = {}

    def get() -> Loaded:
        if "x" not in holder:
            console.print("evaluate: loading the base model")
            holder["x"] = load_models(params, workspace, inputs, plan)
        return holder["x"]

    order: list[int | None] = [None, *plan.checkpoints]
    results: dict[int | None, tuple[Path | None, dict]] = {}
    with Progress(console=console) as progress:
        task = progress.add_task("evaluate", total=len(order))
        for step in order:
            results[step] = _evaluate_one(params, plan, step, get, scratch)
            progress.advance(task)

    samples_out = out_dir / "samples"
    if samples_out.exists():
        shutil.rmtree(samples_out)  # our own output: rebuilt from the cache each run
    split = plan.split
    trained = {e for files in plan.checkpoints.values() for e in files}  # one expert may not train
    best = choose_experts({s: t for s, (_, t) in results.items() if s is not None}, split, trained)
    rows: list[ReportRow] = []
    for step, (entry, terms) in results.items():
        label = "baseline" if step is None else f"step_{step:06d}"
        row = ReportRow(label if step is None else f"step {step}", step, [], [], None, _means(terms))
        if entry is not None:
            done = _finished(entry) or {}
            target = samples_out / label
            copy_tree(entry, target)
            row.videos = [f"samples/{label}/{v}" for v in done.get("videos", [])]
            row.posters = [v.removesuffix(".mp4") + ".png" for v in row.videos]
            row.sheet = f"samples/{label}/contact_sheet.png"
        rows.append(row)

    atomic_write_json(out_dir / "best.json", {"basis": split.basis, "basis_label": BASIS_LABEL[split.basis],
                                              "split": split.reason, "held_out_clips": list(split.held_out_clips),
                                              "experts": best})
    train = read_train_curves(inputs.train_live)
    checkpoints = {r.step: r.losses for r in rows if r.step is not None}
    atomic_write_json(out_dir / "metrics.json",
                      run_summary(split.basis, len(split.held_out_clips), best, checkpoints, train))
    # rows for `dvc plots`: the baseline is step 0 (a LoRA's B starts at zero, so it is the untrained start);
    # every key in every row, null where not measured: dvc drops a whole plot when a field is missing
    keys = [f"{name}_{e}" for e in plan.variant.experts for name in ("train", "held_out")]
    atomic_write_json(out_dir / "val_loss.json",
                      [{"step": r.step or 0, **{k: r.losses.get(k) for k in keys}} for r in rows if r.losses])

    curves = {"training loss (per step, random noise)": {k: v for k, v in train.items() if "loss" in k}}
    curves.update({k: {k: v} for k, v in train.items() if "loss" not in k})  # lr, grad norm, ...: own scales
    live = inputs.train_live / "index.html"
    page = render_report(f"{params.job.name}: evaluation", column_labels(params, plan.variant), rows, split, best,
                         curves, dataset_summary(inputs.histogram, inputs.clips, inputs.caption_problems),
                         previews=Path(os.path.relpath(live, out_dir)).as_posix() if live.is_file() else None)
    atomic_write_text(out_dir / "report.html", page)
    picks = ", ".join(f"{e} step {c['step']}" for e, c in best.items()) or "none"
    console.print(f"evaluate: {out_dir / 'report.html'}; best ({BASIS_LABEL[split.basis]}): {picks}")
