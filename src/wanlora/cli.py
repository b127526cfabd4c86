"""The `wanlora` command: what a person does by hand. Each command wraps one library function.

Heavy imports (torch, diffusers, cv2) happen inside the commands so `wanlora --help` is instant,
and each command reads and validates params.yaml before them, so a typo is reported at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from wanlora import __version__
from wanlora.config import Params, load_params
from wanlora.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n")[0])
# Piped into a file or CI log, rich would cut tables at 80 columns; paths need more.
console = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=True)

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="Folder holding params.yaml and dvc.yaml.")]


def _params(workspace: Path) -> Params:
    """Validated params of the workspace; a folder that is none says where the workspace is."""
    from wanlora.workspace import require

    return load_params(require(workspace) / "params.yaml")


def _version(value: bool) -> None:
    if value:
        console.print(f"wanlora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Raw video clips in, Wan 2.2 LoRAs out, through a DVC pipeline."""


@app.command()
def init(
    recipe: Annotated[str, typer.Option(help="character, style or motion; smoke: a CPU check of the whole "
                                              "path with the tiny model of `wanlora make-tiny`.")] = "character",
    vram: Annotated[int, typer.Option(help="GPU memory in GB: 24, 48, 80 or 141 (TI2V 5B: 12, 16 or 24).")] = 24,
    model: Annotated[Optional[str], typer.Option(help="Local diffusers folder or hub id.")] = None,
    trigger: Annotated[Optional[str], typer.Option(help="Trigger word.")] = None,
    variant: Annotated[str, typer.Option(help="Wan 2.2 model: t2v-a14b, i2v-a14b or ti2v-5b.")] = "t2v-a14b",
    workspace: WorkspaceOpt = Path("."),
    force: Annotated[bool, typer.Option(help="Overwrite an existing params.yaml.")] = False,
) -> None:
    """Write params.yaml from a recipe and hardware tier, plus dvc.yaml and stages/."""
    from wanlora.presets import init_header, make_params, write_params
    from wanlora.workspace import check_model, commit, has_commit, prepare

    target = workspace / "params.yaml"
    if target.exists() and not force:
        raise typer.BadParameter(f"{target} exists; pass --force to overwrite it")
    params = make_params(recipe, vram, model=model, trigger=trigger, variant=variant)  # type: ignore[arg-type]
    note = check_model(model, workspace) if model is not None else None
    prepare(workspace, params)
    write_params(target, params, init_header(recipe, vram, variant))  # type: ignore[arg-type]
    if (workspace / ".git").is_dir() and not has_commit(workspace):
        commit(workspace, f"wanlora init --recipe {recipe} --vram {vram}")  # dvclive needs a revision
    if note:
        console.print(escape(note))
    console.print(f"wrote {target}, dvc.yaml and stages/; put clips in {params.datasets['main'].folder} and run `dvc repro`")


@app.command()
def sync(workspace: WorkspaceOpt = Path(".")) -> None:
    """Regenerate dvc.yaml and stages/ after adding or renaming datasets in params.yaml."""
    from wanlora.pipeline import is_repo_checkout
    from wanlora.pipeline import sync as do_sync

    changed = do_sync(workspace, _params(workspace), is_repo_checkout(workspace))
    console.print("\n".join(f"updated {p}" for p in changed) or "dvc.yaml and stages/ are up to date")


@app.command()
def demo(
    folder: Annotated[Path, typer.Argument(help="New folder for the demo workspace.")],
    steps: Annotated[int, typer.Option(help="Training steps of the tiny model.")] = 120,
    run: Annotated[bool, typer.Option(help="Run `dvc repro` after setting up.")] = True,
    variant: Annotated[str, typer.Option(help="Wan 2.2 model of the tiny demo: t2v-a14b, i2v-a14b or ti2v-5b.")] = "t2v-a14b",
) -> None:
    """Generate clips and a tiny model in a new workspace, then run the whole pipeline there."""
    from wanlora.demo import make_demo
    from wanlora.workspace import dvc_repro

    make_demo(folder, steps=steps, variant=variant)
    console.print(f"demo workspace ready in {folder}")
    if run:
        dvc_repro(folder)
        console.print(f"done: see {folder}/data/eval/report.html, the previews of training in "
                      f"{folder}/data/train_live/index.html, and {folder}/data/exports/")


@app.command("make-tiny")
def make_tiny(
    out: Annotated[Path, typer.Argument(help="Folder to write the tiny model to.")],
    seed: int = 0,
    variant: Annotated[str, typer.Option(help="t2v-a14b, i2v-a14b or ti2v-5b.")] = "t2v-a14b",
) -> None:
    """Write a tiny random Wan 2.2 model of one variant in the real diffusers layout (tests, demo)."""
    from wanlora.models.tiny import make_tiny as build

    console.print(f"tiny {variant} model written to {build(out, seed=seed, variant=variant)}")


@app.command("import-aitk")
def import_aitk(
    config: Annotated[Path, typer.Argument(help="AI Toolkit job config (.yaml or .json).")],
    out: Annotated[Path, typer.Option(help="params.yaml to write.")] = Path("params.yaml"),
    force: bool = False,
) -> None:
    """Convert an AI Toolkit job config into params.yaml; lists every key it could not map."""
    from wanlora.aitk import import_config
    from wanlora.presets import write_params

    if out.exists() and not force:
        raise typer.BadParameter(f"{out} exists; pass --force to overwrite it")
    params, unmapped = import_config(config)
    write_params(out, params, f"wanlora import-aitk {config}")
    console.print(f"wrote {out}")
    for line in unmapped:
        console.print(f"[yellow]not mapped:[/] {escape(line)}")


@app.command()
def plan(
    gpu_gib: Annotated[Optional[float], typer.Option(
        "--gpu-gib", help="GPU memory in GiB; default: the --vram params.yaml was made for, else 24.")] = None,
    gpus: Annotated[Optional[int], typer.Option(
        "--gpus", min=1, help="GPUs of the launch (train.sequence_parallel of them share each sample); "
        "default: train.gpus, else 1.")] = None,
    workspace: WorkspaceOpt = Path("."),
) -> None:
    """Predict peak memory per GPU and step time for params.yaml on GPUs of this size (and, once the
    bucket stage has run, the cost of one epoch over its samples).

    Exit status: 0 it fits (or job.device is cpu), 1 it does not fit.
    """
    from wanlora.presets import init_vram

    params = _params(workspace)  # before the planner's torch import: a params typo is reported at once
    if gpu_gib is None:
        gpu_gib = float(init_vram(workspace / "params.yaml") or 24)
    from wanlora.io import read_jsonl
    from wanlora.plan import epoch, render
    from wanlora.plan import plan as predict

    from wanlora.pipeline import SAMPLES

    samples = workspace / SAMPLES
    epoch_plan = epoch(params, read_jsonl(samples)) if samples.is_file() else None
    try:
        result = predict(params, gpu_gib, gpus=gpus or params.train.gpus or 1)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    console.print(render(result, epoch_plan), highlight=False)
    raise typer.Exit(0 if result.fits or result.device == "cpu" else 1)


@app.command()
def audit(
    file: Annotated[Path, typer.Argument(help="A LoRA or exported .safetensors file.")],
    workspace: WorkspaceOpt = Path("."),
) -> None:
    """Which clips and captions made this file, and do they still match the workspace?

    Exit status: 0 the workspace matches the file's lineage; 1 it differs (a clip, caption, manifest,
    params key, sample or checkpoint changed or missing); 2 the file cannot be vouched for (no lineage,
    tensors that do not match it, an empty sample list, a sidecar missing or altered, a forged path).
    """
    from wanlora.export.audit import audit as run_audit
    from wanlora.export.audit import carries_lineage
    from wanlora.workspace import require

    if file.suffix.lower() == ".safetensors" and file.is_file() and carries_lineage(file):
        workspace = require(workspace)  # only lineage needs a workspace to compare with
    result = run_audit(file, workspace, console)
    raise typer.Exit(0 if result.all_unchanged else 1 if result.ok else 2)


@app.command("import-lora")
def import_lora(
    file: Annotated[Path, typer.Argument(help="A LoRA made by AI Toolkit, musubi-tuner, ComfyUI or diffusers.")],
    out: Annotated[Path, typer.Argument(help="Where to write it in wanlora's format.")],
    expert: Annotated[Optional[str], typer.Option(help="high or low, for files that hold both experts.")] = None,
    workspace: WorkspaceOpt = Path("."),
) -> None:
    """Convert a peer's LoRA into ours, checking every key and shape against the base model."""
    from wanlora.export.formats import load_base_config
    from wanlora.export.imports import import_to_file

    params = _params(workspace)
    local = workspace / params.model.name_or_path  # a relative folder means the workspace's, as in the stages
    name = str(local) if local.is_dir() else params.model.name_or_path
    base = load_base_config(name, params.model.revision)
    console.print(f"wrote {import_to_file(file, out, base, expert)}")


@app.command()
def export(
    step: Annotated[str, typer.Option(help="'best', 'last' or a step number.")] = "best",
    out: Annotated[Optional[Path], typer.Option(
        help="Write a copy here instead, outside DVC; default: data/exports/ through the export stage.")] = None,
    workspace: WorkspaceOpt = Path("."),
) -> None:
    """Write a checkpoint pair as ComfyUI and diffusers files.

    Without --out this is the export stage: `--step` becomes export.step in params.yaml and
    `dvc repro --single-item export` rewrites data/exports/, so the export a git commit pins
    and the one `wanlora audit` reads are the same file, recorded in dvc.lock.
    """
    from wanlora.config import parse_params
    from wanlora.export.stage import choose_steps, list_checkpoints, run_stage
    from wanlora.pipeline import BEST, LORA
    from wanlora.workspace import dvc_repro, set_param

    params = _params(workspace)
    chosen = parse_params({**params.model_dump(mode="json"), "export": {**params.export.model_dump(), "step": step}},
                          "--step")
    choose_steps(chosen.export.step, list_checkpoints(workspace / LORA), workspace / BEST)
    if out is not None:
        run_stage(chosen, workspace / LORA, workspace / BEST, out)
        return
    if chosen.export.step != params.export.step:
        set_param(workspace / "params.yaml", ("export", "step"), chosen.export.step)
        console.print(f"params.yaml: export.step {params.export.step} -> {chosen.export.step}")
    dvc_repro(workspace, "--single-item", "export")


def main() -> None:
    """Console entry: errors a person fixes print as a readable message, not a traceback."""
    try:
        app()
    except UserError as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
