"""The export stage: one checkpoint per expert, written for ComfyUI and for diffusers.

The step is a number, "last", or "best": per expert, what the evaluate stage chose on the
held-out loss (`data/eval/best.json`, `wanlora.evaluate.best`), so the high- and low-noise files
may come from different steps. Each expert becomes one file per format, named so a user sees at
once which file goes into which loader slot and from which step: `<job>_step000500_high_noise.safetensors`
(TI2V 5B's one transformer: `<job>_step000500.safetensors`, one file as AI Toolkit writes it).
The lineage header is copied forward unchanged (a checkpoint whose tensors no longer match its
recorded hash is refused), plus what export decided (format, file name, source file and hash, and
why that step: `wanlora.export_choice`), so `wanlora audit` works on exports too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from wanlora import tensorfiles
from wanlora.config import EXPERTS, Params
from wanlora.errors import UserError
from wanlora.export import formats
from wanlora.export.imports import read_lora
from wanlora.export.lineage import PREFIX, sidecar_names, tensors_sha256
from wanlora.io import atomic_write_bytes, atomic_write_json, sha256_file
from wanlora.models.variant import expert_label
from wanlora.pipeline import LORA
from wanlora.report import console

STEP_FILE = re.compile(r"step_(\d+)\.safetensors\Z")


def export_name(job: str, step: int, expert: str) -> str:
    """File name of an export: the loader slot it goes to (high / low noise) and its step."""
    return f"{job}_step{step:06d}" + ("" if expert == "main" else f"_{expert}_noise") + ".safetensors"


class NoSuchStep(UserError, ValueError):
    """The step asked for has no checkpoint pair; the message lists those that exist."""


class NoCheckpoints(UserError, FileNotFoundError):
    """Nothing to choose from yet (no checkpoints, or no metrics for 'best'); the message says which stage to run."""


def list_checkpoints(lora_dir: Path) -> dict[int, dict[str, Path]]:
    """{step: {expert: file}} of `data/lora/{high,low,main}/step_NNNNNN.safetensors`."""
    found: dict[int, dict[str, Path]] = {}
    for expert in EXPERTS:
        folder = lora_dir / expert
        for path in sorted(folder.glob("step_*.safetensors")) if folder.is_dir() else []:
            m = STEP_FILE.match(path.name)
            if m:
                found.setdefault(int(m.group(1)), {})[expert] = path
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class Pick:
    """One expert's exported step and why: written into the file's header and export.json."""

    step: int
    by: str  # the export.step setting
    basis: str  # what the loss was measured on (held_out | training_clips), or "" when no loss chose it
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "by": self.by, "basis": self.basis, "reason": self.reason}


def choose_steps(spec: str, checkpoints: dict[int, dict[str, Path]], best_path: Path) -> dict[str, Pick]:
    """The step each expert's file comes from; errors list the steps that exist."""
    if not checkpoints:
        raise NoCheckpoints(f"no checkpoints in {LORA}/{{high,low}}/: run the train stage first (`dvc repro`)")
    listing = ", ".join(map(str, checkpoints))
    experts = sorted({e for files in checkpoints.values() for e in files})
    if spec == "last":
        return {e: Pick(max(s for s, f in checkpoints.items() if e in f), spec, "", "the last checkpoint")
                for e in experts}
    if spec != "best":
        step = int(spec)
        if step not in checkpoints:
            raise NoSuchStep(f"no checkpoint for step {step}; available steps: {listing}")
        return {e: Pick(step, spec, "", f"export.step is {step}") for e in sorted(checkpoints[step])}
    if not best_path.is_file():
        raise NoCheckpoints(f"{best_path}: missing, so 'best' is unknown; run the evaluate stage, or set "
                            f"export.step to 'last' or one of: {listing}")
    record = json.loads(best_path.read_text(encoding="utf-8"))
    picks = {}
    for e in experts:
        choice = record.get("experts", {}).get(e)
        if choice is None:
            raise NoSuchStep(f"{best_path}: no fixed-noise loss for the {expert_label(e)} (sample.validation_clips "
                             f"is 0, or no sample.validation_timesteps in its band); set export.step to one of: "
                             f"{listing}")
        step = int(choice["step"])
        if e not in checkpoints.get(step, {}):
            raise NoSuchStep(f"{best_path}: best {expert_label(e)} step {step} has no checkpoint (rerun the evaluate "
                             f"stage); available steps: {listing}")
        picks[e] = Pick(step, spec, record["basis"], choice["reason"])
    return picks


def export_file(src: Path, fmt: str, dst: Path, output_name: str | None = None, pick: Pick | None = None) -> Path:
    """Convert one of our checkpoint files to `fmt` ('comfyui' | 'diffusers') at `dst`. With
    `output_name` (the job name) the header gets AI Toolkit's `ss_output_name` too, with `pick`
    why this step (`wanlora.export_choice`)."""
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
    if pick is not None:
        carried[PREFIX + "export_choice"] = json.dumps(pick.as_dict(), sort_keys=True)
    if fmt == "comfyui":
        tensors, extra = formats.write_comfy(lora), {}
    elif fmt == "diffusers":
        tensors, extra = formats.write_ours(lora)
    else:
        raise ValueError(f"unknown export format {fmt!r}; use 'comfyui' or 'diffusers'")
    tensorfiles.save(dst, tensors, {**carried, **extra})
    for name in sidecar_names(meta):  # lineage too large for the header travels beside the file (checked name)
        if not (src.parent / name).is_file():
            raise FileNotFoundError(f"{src.parent / name}: lineage sidecar of {src.name} is missing")
        atomic_write_bytes(dst.parent / name, (src.parent / name).read_bytes())
    return dst


def run_stage(params: Params, lora_dir: Path, best_path: Path, out_dir: Path) -> None:
    """Write each expert's chosen checkpoint in every configured format, plus `export.json`."""
    out_dir = Path(out_dir)
    checkpoints = list_checkpoints(lora_dir)
    picks = choose_steps(params.export.step, checkpoints, best_path)
    written = []
    for fmt in params.export.formats:
        for expert, pick in sorted(picks.items()):
            dst = out_dir / fmt / export_name(params.job.name, pick.step, expert)
            export_file(checkpoints[pick.step][expert], fmt, dst, output_name=params.job.name, pick=pick)
            written.append({"format": fmt, "expert": expert, "step": pick.step,
                            "path": dst.relative_to(out_dir).as_posix(), "sha256": sha256_file(dst)})
            console.print(f"export: {fmt} {expert_label(expert)}, step {pick.step} -> {dst}")
    for expert, pick in sorted(picks.items()):
        console.print(f"export: {expert_label(expert)} step {pick.step}: {pick.reason}")
    atomic_write_json(out_dir / "export.json", {"chosen_by": params.export.step,
                                                "experts": {e: p.as_dict() for e, p in sorted(picks.items())},
                                                "files": written})
