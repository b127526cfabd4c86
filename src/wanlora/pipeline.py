"""The stage table: one place that says what each DVC stage runs, reads and writes.

`dvc.yaml` and the three-line scripts in `stages/` are generated from this table (`wanlora sync`),
and a test checks the checked-in copies match, so the declared dependencies cannot drift from the
code. Params are listed per leaf key (expanded from the schema), so editing a knob reruns exactly
the stages that read it. Per-dataset keys carry a `{ds}` placeholder expanded for every dataset
in params.yaml; that is why adding a dataset needs `wanlora sync`.

Inside this repository code deps name the package files each stage imports. In a user workspace
(made by `wanlora init` or `wanlora demo`) the package lives in site-packages, so the stage script
itself carries the wanlora version: upgrading wanlora changes the script and reruns the stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from wanlora import __version__
from wanlora.config import Params, SampleConfig
from wanlora.io import atomic_write_text
from wanlora.models.variant import LEGACY_VARIANT, VARIANTS, expert_label

# Imported by every stage through its entry (`wanlora.stages.<name>` and `stages/_common.py`); the
# wiring takes its paths from this module.
BASE_CODE = ("src/wanlora/__init__.py", "src/wanlora/config.py", "src/wanlora/errors.py", "src/wanlora/io.py",
             "src/wanlora/report.py", "src/wanlora/stages/_common.py", "src/wanlora/pipeline.py",
             "src/wanlora/models/__init__.py", "src/wanlora/models/variant.py")

# The files and folders the stages hand each other, each named once (workspace-relative): the Stage
# entries below declare them to DVC, and the stage wiring (`wanlora.stages.<name>`) passes them to
# the code as arguments, so what a stage reads is what DVC reruns it for.
CHECK_MARKER = "data/check.json"  # what the check stage writes; scan depends on it, so it runs first
INDEX = "data/index"
MEDIA_INDEX, CAPTION_INDEX, INDEX_PROBLEMS = f"{INDEX}/media.jsonl", f"{INDEX}/captions.jsonl", f"{INDEX}/problems.json"
TRIMMED = "data/trimmed"
CLIPS, TRIM_PROBLEMS = f"{TRIMMED}/clips.jsonl", f"{TRIMMED}/problems.json"
AUTOCAPTIONS = "data/autocaptions"
AUTOCAPTION_MANIFEST, AUTOCAPTION_PROBLEMS = f"{AUTOCAPTIONS}/captions.jsonl", f"{AUTOCAPTIONS}/problems.json"
BUCKETS = "data/buckets"
SAMPLES, HISTOGRAM, BUCKET_REPORT = f"{BUCKETS}/samples.jsonl", f"{BUCKETS}/histogram.json", f"{BUCKETS}/report.json"
CAPTIONS = "data/captions"
CAPTION_MANIFEST, CAPTION_PROBLEMS = f"{CAPTIONS}/captions.jsonl", f"{CAPTIONS}/problems.json"
SPLIT = "data/split"
SPLIT_FILE = f"{SPLIT}/validation.json"
REVIEW = "data/review"
TEXT_CACHE, LATENT_CACHE = "data/cache/text", "data/cache/latents"
LORA, TRAIN_LIVE, TRAIN_PERF = "data/lora", "data/train_live", "data/train_perf"
EVAL = "data/eval"
BEST, METRICS, VAL_LOSS = f"{EVAL}/best.json", f"{EVAL}/metrics.json", f"{EVAL}/val_loss.json"
EXPORTS = "data/exports"


@dataclass(frozen=True)
class Stage:
    name: str
    doc: str
    deps: tuple[str, ...]
    code: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...] = ()
    # `{e}` in a plot's id stands for each expert of the workspace's model (`plotted_experts`)
    plots: tuple[dict[str, Any], ...] = field(default=())
    dataset_folders: bool = False  # the stage reads every dataset folder (deps on each)
    # Params the stage reads only to show its progress (the train stage's previews): declared to
    # DVC, so an edit reruns the stage and refreshes what it shows, but left out of `stage_values`,
    # so the run key and the LoRA lineage ignore them and the rerun resumes the finished run.
    watch: tuple[str, ...] = ()


MODEL_KEYS = ("model.name_or_path", "model.revision")
# evaluate reads every sample key but the previews' (train's alone: an edit reruns no evaluation)
EVAL_SAMPLE = tuple(f"sample.{k}" for k in SampleConfig.model_fields if not k.startswith("preview"))
STAGES: tuple[Stage, ...] = (
    # DVC decides what to run from the params keys each stage lists, so a key no stage lists (a typo
    # such as train.learning_rate beside train.lr) would never reach a stage's validation. This stage
    # depends on params.yaml as a file: any edit reruns it, and it validates the whole file before
    # anything else runs. Its output does not change with the values, so nothing else reruns for it.
    Stage(
        "check", "validate the whole params.yaml before any other stage runs",
        deps=("params.yaml",), code=("src/wanlora/workspace.py",), params=(),
        outs=(CHECK_MARKER,),
    ),
    Stage(
        "scan", "index raw files and their hashes, media apart from captions",
        deps=(CHECK_MARKER,), code=("src/wanlora/data/scan.py", "src/wanlora/media/listing.py", "src/wanlora/media/probe.py"),
        params=("datasets.{ds}.folder", "datasets.{ds}.captions.extension", "datasets.{ds}.on_error"),
        outs=(INDEX,), dataset_folders=True,
    ),
    Stage(
        "trim", "find static intros/outros and letterbox bars",
        deps=(MEDIA_INDEX,), code=("src/wanlora/media",),
        params=("datasets.{ds}.folder", "datasets.{ds}.trim", "datasets.{ds}.on_error"),
        outs=(TRIMMED,),
    ),
    Stage(
        "autocaption", "caption clips that have no caption file with a vision-language model",
        deps=(CLIPS, CAPTION_INDEX),
        code=("src/wanlora/data/autocaption.py", "src/wanlora/data/captions.py", "src/wanlora/media",
              "src/wanlora/models/captioner.py", "src/wanlora/models/loading.py", "src/wanlora/tensorfiles.py"),
        params=("autocaption", "datasets.{ds}.folder", "datasets.{ds}.captions.extension",
                "datasets.{ds}.captions.max_tokens", "job.device", *MODEL_KEYS),
        outs=(AUTOCAPTIONS,),
    ),
    Stage(
        "bucket", "choose resolution and frame buckets, place frame windows",
        deps=(CLIPS,), code=("src/wanlora/data/buckets.py", "src/wanlora/models/loading.py",
                             "src/wanlora/tensorfiles.py"),
        # the model: its variant sets the frame rate (bucket.fps null) and the side alignment (TI2V 5B: 32 px)
        params=("datasets.{ds}.bucket", "datasets.{ds}.flip_horizontal", "datasets.{ds}.on_error", *MODEL_KEYS,
                "model.variant"),
        outs=(BUCKETS,),
        plots=({"buckets": {"template": "bar_horizontal", "x": "count", "y": {HISTOGRAM: "bucket"}}},),
    ),
    Stage(
        "captions", "validate captions, inject the trigger, write DOP variants",
        deps=(CAPTION_INDEX, CLIPS, SAMPLES, AUTOCAPTIONS),
        code=("src/wanlora/data/captions.py", "src/wanlora/models/loading.py", "src/wanlora/tensorfiles.py"),
        params=("job.trigger_word", "datasets.{ds}.folder", "datasets.{ds}.captions", "datasets.{ds}.on_error",
                "train.dop.preservation_class", "train.unload_text_encoder", *MODEL_KEYS),
        outs=(CAPTIONS,),
    ),
    Stage(
        "split", "hold whole clips out of training for the validation loss",
        deps=(SAMPLES, CAPTION_MANIFEST), code=("src/wanlora/data/split.py",),
        params=("job.seed", "sample.validation_clips", "datasets.{ds}.role", "datasets.{ds}.cache_latents"),
        outs=(SPLIT,),
    ),
    Stage(
        "review", "one offline page of every sample as trained, its caption and origin, every problem",
        deps=(CLIPS, SAMPLES, CAPTIONS, SPLIT_FILE, INDEX_PROBLEMS, TRIM_PROBLEMS, AUTOCAPTION_PROBLEMS, BUCKET_REPORT),
        code=("src/wanlora/data/review.py", "src/wanlora/data/split.py", "src/wanlora/models/latents.py", "src/wanlora/models/cachefiles.py",
              "src/wanlora/models/geometry.py", "src/wanlora/models/loading.py", "src/wanlora/media",
              "src/wanlora/models/condition.py", "src/wanlora/tensorfiles.py"),
        params=(),
        outs=(REVIEW,),
    ),
    Stage(
        "text_cache", "encode captions, DOP variants and prompts with UMT5 once",
        deps=(CAPTION_MANIFEST,),
        code=("src/wanlora/models", "src/wanlora/tensorfiles.py", "src/wanlora/data/captions.py"),
        params=(*MODEL_KEYS, "model.dtype", "quantization.text_encoder", "sample.prompts", "sample.negative_prompt",
                "job.trigger_word", "train.dop.preservation_class", "job.device"),
        outs=(TEXT_CACHE,),
    ),
    Stage(
        "latent_cache", "encode every sample window with the VAE once",
        deps=(MEDIA_INDEX, SAMPLES),
        code=("src/wanlora/models", "src/wanlora/tensorfiles.py", "src/wanlora/media"),
        params=(*MODEL_KEYS, "model.variant", "datasets.{ds}.cache_latents", "datasets.{ds}.folder", "train.latent_mode",
                "train.last_frame",
                "job.device"),  # folder: sample paths must stay inside it (io.dataset_file)
        outs=(LATENT_CACHE,),
    ),
    Stage(
        "train", "train the high-noise and low-noise LoRAs",
        deps=(CAPTION_MANIFEST, SAMPLES, SPLIT_FILE, TEXT_CACHE, LATENT_CACHE),
        code=("src/wanlora/train", "src/wanlora/models", "src/wanlora/media", "src/wanlora/data/dataset.py",
              "src/wanlora/data/captions.py", "src/wanlora/data/split.py", "src/wanlora/export/lineage.py",
              "src/wanlora/export/formats.py", "src/wanlora/export/imports.py", "src/wanlora/evaluate/__init__.py",
              "src/wanlora/evaluate/sampling.py", "src/wanlora/evaluate/media.py", "src/wanlora/evaluate/report.py",
              "src/wanlora/evaluate/start_images.py", "src/wanlora/lock.py", "src/wanlora/tensorfiles.py"),
        params=("job.seed", "job.trigger_word", "job.device", "model", "quantization", "multistage", "network",
                "save", "train", "datasets.{ds}.cache_latents", "datasets.{ds}.folder", "datasets.{ds}.i2v_share"),
        watch=("sample.prompts", "sample.negative_prompt", "sample.seed", "sample.walk_seed", "sample.fps",
               "sample.images", "sample.last_images",  # image-to-video previews start from them
               "sample.preview", "sample.preview_every", "sample.preview_steps", "sample.preview_guidance_scale",
               "sample.preview_num_frames", "sample.preview_width", "sample.preview_height", "sample.preview_lora"),
        outs=(LORA, TRAIN_LIVE, TRAIN_PERF), metrics=(f"{TRAIN_PERF}/summary.json",),
        plots=({f"{TRAIN_LIVE}/plots/metrics": {"x": "step"}},
               {f"{TRAIN_PERF}/perf.json": {"x": "step", "y": ["step_time", "samples_per_s", "peak_mem"]}}),
    ),
    Stage(
        "evaluate", "sample every checkpoint, validation loss, report page",
        deps=(LORA, TRAIN_LIVE, TEXT_CACHE, LATENT_CACHE, SAMPLES, HISTOGRAM, CLIPS, CAPTION_MANIFEST,
              CAPTION_PROBLEMS, SPLIT_FILE),
        code=("src/wanlora/evaluate", "src/wanlora/models", "src/wanlora/train", "src/wanlora/export",
              "src/wanlora/data/split.py", "src/wanlora/tensorfiles.py"),
        params=("job.name", "job.seed", "job.device", "job.trigger_word", *MODEL_KEYS, "model.variant", "model.dtype",
                "model.flow_shift", "model.low_vram", "quantization", "multistage.boundary_ratio", "train.last_frame",
                "datasets.{ds}.i2v_share", *EVAL_SAMPLE),
        outs=(EVAL,), metrics=(METRICS,),
        # per expert, the fixed-noise loss on training clips beside the held-out one: the gap is overfitting
        plots=({"fixed_noise_loss_{e}": {"x": "step", "title": "{expert}: fixed-noise loss",
                                         "y": {VAL_LOSS: ["train_{e}", "held_out_{e}"]}}},),
    ),
    Stage(
        "export", "write the chosen checkpoint for ComfyUI and diffusers",
        deps=(LORA, BEST),
        code=("src/wanlora/export", "src/wanlora/tensorfiles.py"),
        params=("export", "job.name"),
        outs=(EXPORTS,),
    ),
)


def param_value(key: str, params: Params) -> Any:
    """The value at a dotted params key (`datasets.main.trim`, `train.lr`)."""
    node: Any = params
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def leaf_keys(key: str, params: Params) -> list[str]:
    """Expand a section key into its leaf keys (a list or mapping of scalars counts as a leaf)."""
    node = param_value(key, params)
    if isinstance(node, BaseModel):
        return [k for name in type(node).model_fields for k in leaf_keys(f"{key}.{name}", params)]
    return [key]


def stage_params(stage: Stage, params: Params, watched: bool = True) -> list[str]:
    """The leaf keys DVC tracks for the stage; with `watched=False`, only those its outputs' content
    may depend on (not `Stage.watch`)."""
    keys: list[str] = []
    for key in (*stage.params, *stage.watch) if watched else stage.params:
        for ds in params.datasets if "{ds}" in key else [None]:
            keys += leaf_keys(key.format(ds=ds) if ds else key, params)
    return keys


def stage_values(name: str, params: Params) -> dict[str, Any]:
    """Every params leaf the named stage declares, with its value in JSON form (as the LoRA header
    stores it: a tuple becomes a list): what its outputs may depend on.

    Code that keys a stage's own caches on params (the train run key) takes them from here, so the
    key and DVC's rerun decision follow one declaration."""
    stage = next(s for s in STAGES if s.name == name)
    return {key: to_jsonable_python(param_value(key, params)) for key in stage_params(stage, params, watched=False)}


def stage_script(stage: Stage) -> str:
    return (
        f'"""DVC stage {stage.name}: {stage.doc}. Generated by `wanlora sync` (wanlora {__version__})."""\n'
        f"from wanlora.stages import {stage.name}\n"
        f"from wanlora.stages._common import run\n\n"
        f'if __name__ == "__main__":\n'
        f"    run({stage.name}.main)\n"
    )


def plotted_experts(params: Params) -> tuple[str, ...]:
    """The experts whose curves dvc.yaml declares: those of `model.variant`, or with `auto` those of
    the release `model.name_or_path` names by hub id, else T2V A14B's (the default model).

    DVC skips a plot whose fields a file lacks, with a warning per revision, so declaring every
    variant's experts would warn on each `dvc plots` call and one variant's alone would hide the
    others' curves (TI2V 5B's `main` behind `high` and `low`). `auto` with a local folder cannot be
    read here (dvc.yaml follows params.yaml alone); `wanlora init --variant` writes the name."""
    name = params.model.variant
    if name == "auto":
        name = next((v.name for v in VARIANTS.values() if v.hub_id == params.model.name_or_path), LEGACY_VARIANT)
    return VARIANTS[name].experts  # type: ignore[index]


def _for_expert(plot: Any, expert: str) -> Any:
    """A plot declaration with `{e}` replaced by the expert's name and `{expert}` by how messages
    name it (`expert_label`), in every key and string."""
    if isinstance(plot, dict):
        return {_for_expert(k, expert): _for_expert(v, expert) for k, v in plot.items()}
    if isinstance(plot, list):
        return [_for_expert(v, expert) for v in plot]
    return plot.replace("{e}", expert).replace("{expert}", expert_label(expert)) if isinstance(plot, str) else plot


def dvc_yaml(params: Params, in_repo: bool) -> str:
    """dvc.yaml text for these params; `in_repo` adds the package files as code deps."""
    stages: dict[str, Any] = {}
    for stage in STAGES:
        deps = [f"stages/{stage.name}.py"]
        if in_repo:
            deps += [*BASE_CODE, f"src/wanlora/stages/{stage.name}.py", *stage.code]
        if stage.dataset_folders:
            deps += sorted({ds.folder for ds in params.datasets.values()})
        deps += list(stage.deps)
        entry: dict[str, Any] = {
            "cmd": f"python -P stages/{stage.name}.py",  # -P: the stages/ folder must not shadow packages
            "deps": deps,
            **({"params": stage_params(stage, params)} if stage.params else {}),
            "outs": list(stage.outs),
        }
        stages[stage.name] = entry
    # Metrics and plots live inside stage outs, so they are declared at the top level.
    experts = plotted_experts(params)
    plots = [_for_expert(plot, e) for stage in STAGES for plot in stage.plots
             for e in (experts if "{e}" in next(iter(plot)) else ("",))]
    metrics = [m for stage in STAGES for m in stage.metrics]
    header = ("# Generated by `wanlora sync` from src/wanlora/pipeline.py: edit that, then resync.\n" if in_repo else
              "# Generated by `wanlora sync` from wanlora's stage table and the datasets in params.yaml.\n"
              "# Do not edit: after adding or renaming a dataset in params.yaml, run `wanlora sync`.\n")
    return header + yaml.safe_dump({"stages": stages, "metrics": metrics, "plots": plots}, sort_keys=False, width=120)


def ignored_outputs() -> list[str]:
    """.gitignore lines for every stage output, written before the first `dvc repro`.

    DVC adds these entries only after a stage succeeds; until then `git add -A` would commit the
    outputs of a failed run, and DVC then refuses to write them ("already tracked by SCM").
    """
    return [f"/{out}" for stage in STAGES for out in stage.outs]


def _generated(workspace: Path, params: Params, in_repo: bool) -> dict[Path, str]:
    files = {workspace / "dvc.yaml": dvc_yaml(params, in_repo)}
    return files | {workspace / "stages" / f"{s.name}.py": stage_script(s) for s in STAGES}


def stale_files(workspace: Path, params: Params, in_repo: bool) -> list[Path]:
    """The generated files whose text is not what `sync` would write for these params now."""
    return [path for path, text in _generated(workspace, params, in_repo).items()
            if not path.exists() or path.read_text(encoding="utf-8") != text]


def sync(workspace: Path, params: Params, in_repo: bool) -> list[Path]:
    """Write dvc.yaml and stages/*.py for a workspace; returns the files that changed."""
    files = _generated(workspace, params, in_repo)
    changed = stale_files(workspace, params, in_repo)
    for path in changed:
        atomic_write_text(path, files[path])
    return changed


def is_repo_checkout(workspace: Path) -> bool:
    """True inside wanlora's own source tree, where package files are code deps."""
    return (workspace / "src" / "wanlora" / "pipeline.py").is_file()
