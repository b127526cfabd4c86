"""Where a LoRA came from, written into its safetensors header.

A LoRA file travels alone (to ComfyUI folders, model sites, colleagues), so it must carry the
answer to "which clips and captions made this, with which settings?" itself. `wanlora audit`
reads it back and compares it with a workspace.

What the header records is a function of what the train stage declares to DVC and nothing else,
so the same declared inputs give the same bytes (a second copy of a workspace, a rerun after
unrelated commits or runs, a resume): the wanlora version, the values of the params keys the
train stage lists in dvc.yaml, the sha256 of the two manifests it depends on, the samples it
trained (each with its source file's and caption's hashes) and those it skipped with the reason,
the step, expert and base model identity, and a sha256 of the tensor data. Not recorded: the git
commit and `dvc.lock` (they change with things the stage does not depend on: an unrelated commit,
an earlier run of another configuration), the clock, and where files live outside the workspace
(paths are workspace-relative; a model folder outside it is named by its last component and
identified by its content hash; cache folders are left out). `job.name` and the export settings
are not train params: export records what it decided in keys of its own (`exported_*`).

safetensors metadata is str -> str, so structured values are JSON strings. A sample list larger
than 64 KB goes to a content-addressed sidecar JSON beside the LoRA (headers of many MB slow every
loader that parses them); the header keeps its name and hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from wanlora import __version__
from wanlora.config import EXPERTS, Params
from wanlora.export.formats import Lora, read_ours
from wanlora.io import atomic_write_text, read_jsonl, sha256_file, sha256_text
from wanlora.models.variant import LEGACY_VARIANT
from wanlora.pipeline import CAPTION_MANIFEST, LORA, SAMPLES, stage_values

PREFIX = "wanlora."
LINEAGE_VERSION = "2"
INLINE_LIMIT = 64 * 1024
#: The manifests the train stage depends on (its other deps, the caches, are functions of these,
#: the params and the base model, all recorded).
MANIFESTS = {"samples": SAMPLES, "captions": CAPTION_MANIFEST}
#: Params that hold a path (or a hub id): recorded workspace-relative, see `portable_path`.
PATH_KEYS = frozenset({"model.name_or_path", "quantization.recovery.source"})
#: Params that say where caches go, not what is trained: left out of the record.
LOCATION_KEYS = frozenset({"quantization.cache_dir"})
SIDECAR_NAME = re.compile(r"lineage-([0-9a-f]{16})\.json\Z")
EXTERNAL = "external:"


class LineageError(ValueError):
    """A header whose lineage is malformed or forged; the message says what and where."""


# ------------------------------------------------------------------------------------ values
def portable_path(value: str, workspace: Path) -> str:
    """A path param as a header records it: relative to the workspace when it lies inside,
    `external:<last component>` when it lies outside (absolute paths carry user names and
    mount points, which an exported file must not publish, and differ between two copies of
    one workspace); hub ids and keywords ('fitted', 'none') unchanged."""
    if not value or "://" in value:
        return value
    raw = Path(value).expanduser()
    if not raw.is_absolute() and ".." not in PurePosixPath(value.replace("\\", "/")).parts:
        return PurePosixPath(value.replace("\\", "/")).as_posix()
    full = (raw if raw.is_absolute() else Path(workspace) / raw).resolve()
    try:
        return full.relative_to(Path(workspace).resolve()).as_posix()
    except ValueError:
        return EXTERNAL + full.name


def recorded_params(params: Params, workspace: Path) -> dict[str, Any]:
    """{leaf key: value} of every params key the train stage declares in dvc.yaml: exactly what
    DVC reruns training for, so the record cannot go stale while the LoRA stays."""
    return {key: portable_path(value, workspace) if key in PATH_KEYS and isinstance(value, str) else value
            for key, value in stage_values("train", params).items() if key not in LOCATION_KEYS}


def base_model(params: Params, workspace: Path, fingerprint: str) -> str:
    """`<name or workspace-relative path>@<revision>#<content identity>` of the base weights."""
    return f"{portable_path(params.model.name_or_path, workspace)}@{params.model.revision}#{fingerprint}"


# ----------------------------------------------------------------------------------- tensors
def tensors_sha256(lora: Lora) -> str:
    """sha256 of a LoRA's tensor data in the neutral form every format reads into: per module
    (by diffusers name, sorted) its name, down and up (dtype, shape, bytes) and alpha as float32.
    A checkpoint and its ComfyUI and diffusers exports therefore hash alike, while a header
    copied onto other weights does not."""
    h = hashlib.sha256()
    for name in sorted(lora):
        m = lora[name]
        parts = [t.detach().to("cpu").contiguous() for t in (m.down, m.up)]
        h.update(json.dumps([name, *[[str(t.dtype), list(t.shape)] for t in parts]]).encode("utf-8"))
        for t in parts:
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(torch.tensor(m.alpha, dtype=torch.float32).numpy().tobytes())
    return h.hexdigest()


def seal(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """`metadata` plus the sha256 of `tensors` (peft keys, as the trainer saves them; alpha read
    from `metadata` as any loader reads it), the link `audit` checks between header and weights."""
    return {**metadata, PREFIX + "tensors_sha256": tensors_sha256(read_ours(tensors, metadata))}


# ----------------------------------------------------------------------------------- samples
def sample_records(workspace: Path, trained: Collection[str], skipped: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every sample of the manifest: trained ones with their source file's hash and their caption's
    source and hashes (captions are per clip; a window takes its clip's), the others marked
    `trained: false` with the reason training gave (`skipped`), or "not used by training"."""
    samples_path = workspace / MANIFESTS["samples"]
    if not samples_path.is_file():
        raise FileNotFoundError(f"{samples_path}: missing; run the bucket stage before training (`dvc repro bucket`)")
    captions_path = workspace / MANIFESTS["captions"]
    captions = {r["id"]: r for r in read_jsonl(captions_path)} if captions_path.is_file() else {}
    manifest = read_jsonl(samples_path)
    unknown = sorted(set(trained) - {s["id"] for s in manifest})
    if unknown:
        raise ValueError(f"{samples_path}: trained sample(s) not in the manifest: {unknown[:5]}")
    if not trained:
        raise ValueError("no trained samples: a LoRA's lineage must name what it was trained on")
    rows = []
    for s in manifest:
        row: dict[str, Any] = {"id": s["id"], "dataset": s.get("dataset"), "path": s["path"]}
        if s["id"] in trained:
            cap = captions.get(s["clip_id"], {})
            row |= {"trained": True, "sha256": s["sha256"], "caption_origin": cap.get("origin"),  # file/auto/default
                    "caption_source": cap.get("source"), "caption_source_sha256": cap.get("source_sha256"),
                    "caption_sha256": cap.get("caption_sha256")}
        else:
            row |= {"trained": False, "reason": skipped.get(s["id"], "not used by training")}
        rows.append(row)
    return sorted(rows, key=lambda r: r["id"])


def _file_hash(path: Path) -> str:
    return sha256_file(path) if path.is_file() else "absent"


def lineage_metadata(
    params: Params,
    workspace: Path,
    step: int,
    expert: str,
    base_fingerprint: str,
    trained: Collection[str],
    skipped: Mapping[str, str],
    sidecar_dir: Path | None = None,
    variant: str = LEGACY_VARIANT,
) -> dict[str, str]:
    """safetensors metadata for a LoRA of `expert` ('high' | 'low' | 'main') saved at `step`.

    `base_fingerprint` is the content identity of the expert's weights (`model_identity`);
    `trained` the sample ids training used, `skipped` {sample id: why not} for the others. A
    sample list over 64 KB is written to `sidecar_dir` (default: data/lora/<expert>/, where the
    trainer saves) as `lineage-<hash>.json`; exports copy it along. `seal` adds the tensor hash.
    `variant` (`wanlora.models.variant`) is the Wan 2.2 model it fits: evaluate, export and
    `import` refuse it on another one.
    """
    if expert not in EXPERTS:
        raise ValueError(f"expert must be one of {', '.join(EXPERTS)} (main: TI2V 5B's one transformer), got {expert!r}")
    workspace = Path(workspace)
    samples_json = json.dumps(sample_records(workspace, set(trained), skipped), sort_keys=True,
                              separators=(",", ":"))
    meta = {
        "lineage_version": LINEAGE_VERSION,
        "version": __version__,
        "params": json.dumps(recorded_params(params, workspace), sort_keys=True),
        "manifests": json.dumps(
            {name: {"path": rel, "sha256": _file_hash(workspace / rel)} for name, rel in MANIFESTS.items()},
            sort_keys=True,
        ),
        "step": str(int(step)),
        "expert": expert,
        "variant": variant,
        "base_model": base_model(params, workspace, base_fingerprint),
        "rank": str(params.network.rank),
        "alpha": str(params.network.alpha),
        "target_modules": json.dumps(params.network.target_modules),
    }
    if len(samples_json.encode("utf-8")) <= INLINE_LIMIT:
        meta["samples"] = samples_json
    else:
        digest = sha256_text(samples_json)
        name = f"lineage-{digest[:16]}.json"
        target = Path(sidecar_dir) if sidecar_dir else workspace / LORA / expert
        if not (target / name).is_file():
            atomic_write_text(target / name, samples_json)
        meta["samples_sidecar"] = name
        meta["samples_sidecar_sha256"] = digest
    return {PREFIX + k: v for k, v in meta.items()}


def has_lineage(metadata: Mapping[str, str]) -> bool:
    return PREFIX + "lineage_version" in metadata


def lineage_fields(metadata: Mapping[str, str]) -> dict[str, str]:
    """Our entries of a header, without the prefix (other tools' entries left out)."""
    return {k[len(PREFIX) :]: v for k, v in metadata.items() if k.startswith(PREFIX)}


def check_sidecar_name(name: str, sha256: str | None) -> str:
    """A sidecar name read from a header, if it is one we write (`lineage-<first 16 hex of its
    sha256>.json`, a plain name); a forged one (a path, `..`, another file) raises."""
    m = SIDECAR_NAME.match(name)
    if not m or not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256) or m.group(1) != sha256[:16]:
        raise LineageError(f"sidecar name {name!r} is not one wanlora writes (lineage-<16 hex of its sha256>.json); "
                           "the header was altered")
    return name


def sidecar_names(metadata: Mapping[str, str]) -> list[str]:
    """Files a copy of this LoRA must take along for its lineage to stay verifiable (checked names)."""
    name = metadata.get(PREFIX + "samples_sidecar")
    return [check_sidecar_name(name, metadata.get(PREFIX + "samples_sidecar_sha256"))] if name else []
