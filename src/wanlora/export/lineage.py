"""Where a LoRA came from, written into its safetensors header.

A LoRA file travels alone (to ComfyUI folders, model sites, colleagues), so it must carry the
answer to "which clips and captions made this, with which settings and code?" itself: the
wanlora version, the workspace's git commit, the resolved params, hashes of dvc.lock and of the
manifests, and per sample the source file's and caption's hashes. `wanlora audit` reads this back
and compares it with a workspace. safetensors metadata is str -> str, so structured values are
JSON strings. A sample list larger than 64 KB goes to a content-addressed sidecar JSON beside the
LoRA (headers of many MB slow every loader that parses them); the header keeps its name and hash.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from wanlora import __version__
from wanlora.config import Params
from wanlora.io import atomic_write_text, read_jsonl, sha256_file, sha256_text
from wanlora.pipeline import stage_values

PREFIX = "wanlora."
LINEAGE_VERSION = "1"
INLINE_LIMIT = 64 * 1024
MANIFESTS = {
    "clips": "data/trimmed/clips.jsonl",
    "samples": "data/buckets/samples.jsonl",
    "captions": "data/captions/captions.jsonl",
}
UNKNOWN = "unknown"


def git_state(workspace: Path) -> tuple[str, str]:
    """(commit, dirty) of the workspace repository; ("unknown", "unknown") without git or a repo.

    Dirty counts tracked files only: untracked clips or scratch files do not change the recipe.
    """
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True)
        if head.returncode:
            return UNKNOWN, UNKNOWN
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=workspace, capture_output=True, text=True
        )
    except OSError:  # no git executable
        return UNKNOWN, UNKNOWN
    dirty = UNKNOWN if status.returncode else str(bool(status.stdout.strip())).lower()
    return head.stdout.strip(), dirty


def _file_hash(path: Path) -> str:
    return sha256_file(path) if path.is_file() else "absent"


def sample_records(workspace: Path) -> list[dict[str, Any]]:
    """Per training sample: its source file and hash, and its caption's source and hashes.

    Captions are per clip; a sample (a window of a clip) takes its clip's caption. A sample whose
    clip has no caption record gets null caption fields (the captions stage skipped it).
    """
    samples_path = workspace / MANIFESTS["samples"]
    if not samples_path.is_file():
        raise FileNotFoundError(f"{samples_path}: missing; run the bucket stage before training (`dvc repro bucket`)")
    captions_path = workspace / MANIFESTS["captions"]
    captions = {r["id"]: r for r in read_jsonl(captions_path)} if captions_path.is_file() else {}
    rows = []
    for s in read_jsonl(samples_path):
        cap = captions.get(s["clip_id"], {})
        rows.append({
            "id": s["id"],
            "dataset": s.get("dataset"),
            "path": s["path"],
            "sha256": s["sha256"],
            "caption_source": cap.get("source"),
            "caption_source_sha256": cap.get("source_sha256"),
            "caption_sha256": cap.get("caption_sha256"),
        })
    return sorted(rows, key=lambda r: r["id"])


def lineage_metadata(
    params: Params,
    workspace: Path,
    step: int,
    expert: str,
    base_identity: str,
    sidecar_dir: Path | None = None,
) -> dict[str, str]:
    """safetensors metadata for a LoRA of `expert` ('high' | 'low') saved at `step`.

    `base_identity` names the base weights (path or hub id + revision, as the loader resolved
    them). A sample list over 64 KB is written to `sidecar_dir` (default: data/lora/<expert>/,
    where the trainer saves) as `lineage-<hash>.json`; exports copy it along.
    """
    if expert not in ("high", "low"):
        raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")
    workspace = Path(workspace)
    commit, dirty = git_state(workspace)
    samples_json = json.dumps(sample_records(workspace), sort_keys=True, separators=(",", ":"))
    meta = {
        "lineage_version": LINEAGE_VERSION,
        "version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        # The params the train stage declares (leaf key -> value), not the whole file: a LoRA is a
        # function of those alone, and an edit to sample prompts must not change its bytes.
        "params": json.dumps(stage_values("train", params), sort_keys=True),
        "dvc_lock_sha256": _file_hash(workspace / "dvc.lock"),
        "manifests": json.dumps(
            {name: {"path": rel, "sha256": _file_hash(workspace / rel)} for name, rel in MANIFESTS.items()},
            sort_keys=True,
        ),
        "step": str(int(step)),
        "expert": expert,
        "base_model": base_identity,
        "rank": str(params.network.rank),
        "alpha": str(params.network.alpha),
        "target_modules": json.dumps(params.network.target_modules),
    }
    if len(samples_json.encode("utf-8")) <= INLINE_LIMIT:
        meta["samples"] = samples_json
    else:
        digest = sha256_text(samples_json)
        name = f"lineage-{digest[:16]}.json"
        target = Path(sidecar_dir) if sidecar_dir else workspace / "data/lora" / expert
        if not (target / name).is_file():
            atomic_write_text(target / name, samples_json)
        meta["samples_sidecar"] = name
        meta["samples_sidecar_sha256"] = digest
    return {PREFIX + k: v for k, v in meta.items()}


def has_lineage(metadata: dict[str, str]) -> bool:
    return PREFIX + "lineage_version" in metadata


def lineage_fields(metadata: dict[str, str]) -> dict[str, str]:
    """Our entries of a header, without the prefix (other tools' entries left out)."""
    return {k[len(PREFIX) :]: v for k, v in metadata.items() if k.startswith(PREFIX)}


def sidecar_names(metadata: dict[str, str]) -> list[str]:
    """Files a copy of this LoRA must take along for its lineage to stay verifiable."""
    name = metadata.get(PREFIX + "samples_sidecar")
    return [name] if name else []
