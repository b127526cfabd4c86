"""The export stage: one checkpoint pair, written for ComfyUI and for diffusers.

The step is a number, "last", or "best" (lowest validation loss, from the evaluate stage's
metrics.json). Each expert becomes one file per format, named so a user sees at once which file
goes into which loader slot: `<job>_step000500_high_noise.safetensors`. The lineage header is
copied forward unchanged (a checkpoint whose tensors no longer match its recorded hash is refused),
plus what export decided (format, file name, source file and hash), so `wanlora audit` works on
exports too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.console import Console

from wanlora.config import Params
from wanlora.errors import UserError
from wanlora.export import formats
from wanlora.export.imports import read_lora
from wanlora.export.lineage import PREFIX, sidecar_names, tensors_sha256
from wanlora.io import atomic_write_bytes, atomic_write_json, sha256_file

STEP_FILE = re.compile(r"step_(\d+)\.safetensors\Z")
EXPERTS = ("high", "low")
console = Console(stderr=True)


class NoSuchStep(UserError, ValueError):
    """The step asked for has no checkpoint pair; the message lists those that exist."""


class NoCheckpoints(UserError, FileNotFoundError):
    """Nothing to choose from yet (no checkpoints, or no metrics for 'best'); the message says which stage to run."""


def list_checkpoints(lora_dir: Path) -> dict[int, dict[str, Path]]:
    """{step: {expert: file}} of `data/lora/{high,low}/step_NNNNNN.safetensors`."""
    found: dict[int, dict[str, Path]] = {}
    for expert in EXPERTS:
        folder = lora_dir / expert
        for path in sorted(folder.glob("step_*.safetensors")) if folder.is_dir() else []:
            m = STEP_FILE.match(path.name)
            if m:
                found.setdefault(int(m.group(1)), {})[expert] = path
    return dict(sorted(found.items()))


def choose_step(spec: str, available: list[int], metrics_path: Path) -> int:
    """The step `spec` names; errors list the steps that exist."""
    if not available:
        raise NoCheckpoints("no checkpoints in data/lora/{high,low}/: run the train stage first (`dvc repro`)")
    listing = ", ".join(map(str, available))
    if spec == "last":
        return available[-1]
    if spec == "best":
        if not metrics_path.is_file():
            raise NoCheckpoints(
                f"{metrics_path}: missing, so 'best' is unknown; run the evaluate stage, or set export.step "
                f"to 'last' or one of: {listing}"
            )
        best = json.loads(metrics_path.read_text(encoding="utf-8")).get("best_step")
        if best is None:
            raise NoSuchStep(f"{metrics_path}: no best_step (no validation loss); set export.step to one of: {listing}")
        step = int(best)
    else:
        step = int(spec)
    if step not in available:
        raise NoSuchStep(f"no checkpoint for step {step}; available steps: {listing}")
    return step


def export_file(src: Path, fmt: str, dst: Path, output_name: str | None = None) -> Path:
    """Convert one of our checkpoint files to `fmt` ('comfyui' | 'diffusers') at `dst`; with
    `output_name` (the job name) the header gets AI Toolkit's `ss_output_name` too."""
    lora, meta, kind = read_lora(src)
    if kind != "ours":
        raise formats.LoraFormatError(f"{src}: expected a wanlora checkpoint (peft keys), found {kind} keys")
    if meta.get(PREFIX + "tensors_sha256") != tensors_sha256(lora):
        raise formats.LoraFormatError(f"{src}: its tensors do not match the hash its header recorded at save time "
                                      "(altered, or saved by an older wanlora); rerun the train stage")
    carried = {k: v for k, v in meta.items() if k.startswith((PREFIX, "ss_"))}  # lineage, catalogue keys
    if output_name is not None:
        carried["ss_output_name"] = output_name
    # What export itself decided, apart from the training record it carries unchanged.
    carried.update({PREFIX + "format": fmt, PREFIX + "exported_name": dst.name, PREFIX + "exported_from": src.name,
                    PREFIX + "exported_from_sha256": sha256_file(src)})
    if fmt == "comfyui":
        tensors, extra = formats.write_comfy(lora), {}
    elif fmt == "diffusers":
        tensors, extra = formats.write_ours(lora)
    else:
        raise ValueError(f"unknown export format {fmt!r}; use 'comfyui' or 'diffusers'")
    formats.save_safetensors(dst, tensors, {**carried, **extra})
    for name in sidecar_names(meta):  # lineage too large for the header travels beside the file (checked name)
        if not (src.parent / name).is_file():
            raise FileNotFoundError(f"{src.parent / name}: lineage sidecar of {src.name} is missing")
        atomic_write_bytes(dst.parent / name, (src.parent / name).read_bytes())
    return dst


def run_stage(params: Params, workspace: Path, out_dir: Path) -> None:
    """Write the chosen checkpoint pair in every configured format, plus `export.json`."""
    workspace, out_dir = Path(workspace), Path(out_dir)
    checkpoints = list_checkpoints(workspace / "data/lora")
    step = choose_step(params.export.step, list(checkpoints), workspace / "data/eval/metrics.json")
    written = []
    for fmt in params.export.formats:
        for expert, src in sorted(checkpoints[step].items()):
            dst = out_dir / fmt / f"{params.job.name}_step{step:06d}_{expert}_noise.safetensors"
            export_file(src, fmt, dst, output_name=params.job.name)
            written.append({"format": fmt, "expert": expert, "path": dst.relative_to(out_dir).as_posix(),
                            "sha256": sha256_file(dst)})
            console.print(f"export: {fmt} {expert} noise -> {dst}")
    atomic_write_json(out_dir / "export.json", {"step": step, "chosen_by": params.export.step, "files": written})
