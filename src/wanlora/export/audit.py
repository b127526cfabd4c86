"""`wanlora audit FILE`: which clips and captions made this LoRA, and do they still match?

Reads only the safetensors header (never tensors, never a pickle), so auditing a 600 MB file
or one of unknown origin is instant and safe. Each sample's source clip is hashed again and
compared with the hash recorded at training time; each caption's source file likewise (the raw
caption file's bytes, as the captions stage recorded them; a default caption is compared with
the default caption in the workspace's params). The result is "unverifiable" (non-zero exit)
when the file has no lineage or its sidecar is missing or altered; changed data is reported,
not an error: it is the answer the user asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from wanlora.config import ParamsError, load_params
from wanlora.export.formats import LoraFormatError, read_header
from wanlora.export.lineage import has_lineage, lineage_fields
from wanlora.io import sha256_file, sha256_text

UNCHANGED, CHANGED, MISSING, UNKNOWN, NONE = "unchanged", "changed", "missing", "unknown", "none"


@dataclass
class SampleCheck:
    id: str
    path: str
    source: str  # unchanged | changed | missing
    caption_source: str | None  # caption file path, "default", or None (no caption recorded)
    caption: str  # unchanged | changed | missing | unknown | none


@dataclass
class ManifestCheck:
    name: str
    path: str
    recorded: str
    status: str


@dataclass
class AuditResult:
    file: Path
    ok: bool  # lineage present and verifiable; the CLI exits non-zero otherwise
    message: str
    lineage: dict[str, str] = field(default_factory=dict)
    samples: list[SampleCheck] = field(default_factory=list)
    manifests: list[ManifestCheck] = field(default_factory=list)

    @property
    def all_unchanged(self) -> bool:
        checks = [s.source for s in self.samples] + [s.caption for s in self.samples if s.caption != NONE]
        return self.ok and all(c == UNCHANGED for c in checks)


class _Hasher:
    """Hashes each workspace file once: many samples (windows) share one clip."""

    def __init__(self, workspace: Path):
        self.workspace = workspace
        self.cache: dict[str, str | None] = {}

    def __call__(self, rel: str) -> str | None:
        if rel not in self.cache:
            path = self.workspace / rel
            self.cache[rel] = sha256_file(path) if path.is_file() else None
        return self.cache[rel]


def _compare(recorded: str | None, current: str | None) -> str:
    if current is None:
        return MISSING
    return UNCHANGED if current == recorded else CHANGED


def _load_samples(file: Path, fields: dict[str, str]) -> tuple[list[dict[str, Any]] | None, str]:
    """The recorded sample list (inline or from the sidecar), or None and why it cannot be read."""
    if "samples" in fields:
        return json.loads(fields["samples"]), ""
    name = fields.get("samples_sidecar")
    if not name:
        return None, "the lineage lists no samples (neither inline nor a sidecar)"
    sidecar = file.parent / name
    if not sidecar.is_file():
        return None, (f"sidecar {name} is missing: copy it from the training run's data/lora/<expert>/ "
                      f"next to {file.name}")
    text = sidecar.read_text(encoding="utf-8")
    if sha256_text(text) != fields.get("samples_sidecar_sha256"):
        return None, f"sidecar {name} does not match the hash in the header: it was altered or belongs to another run"
    return json.loads(text), ""


def _default_caption_hashes(workspace: Path) -> dict[str, str] | None:
    """sha256 of each dataset's default caption in the workspace's params (None: unreadable params)."""
    try:
        params = load_params(workspace / "params.yaml")
    except ParamsError:
        return None
    return {name: sha256_text(ds.captions.default_caption) for name, ds in params.datasets.items()}


def check_samples(records: list[dict[str, Any]], workspace: Path) -> list[SampleCheck]:
    hasher = _Hasher(workspace)
    defaults: dict[str, str] | None = None
    checks = []
    for r in records:
        cap_src = r.get("caption_source")
        if cap_src is None:
            cap = NONE
        elif cap_src == "default":
            if defaults is None:
                defaults = _default_caption_hashes(workspace) or {}
            current = defaults.get(r.get("dataset") or "")
            cap = UNKNOWN if current is None else _compare(r.get("caption_source_sha256"), current)
        else:
            cap = _compare(r.get("caption_source_sha256"), hasher(cap_src))
        checks.append(SampleCheck(r["id"], r["path"], _compare(r["sha256"], hasher(r["path"])), cap_src, cap))
    return checks


def check_manifests(fields: dict[str, str], workspace: Path) -> list[ManifestCheck]:
    out = []
    for name, rec in sorted(json.loads(fields.get("manifests", "{}")).items()):
        path = workspace / rec["path"]
        current = sha256_file(path) if path.is_file() else None
        if rec["sha256"] == "absent":  # the manifest did not exist when the LoRA was made
            status = UNCHANGED if current is None else CHANGED
        else:
            status = _compare(rec["sha256"], current)
        out.append(ManifestCheck(name, rec["path"], rec["sha256"], status))
    return out


def verify(file: Path, workspace: Path) -> AuditResult:
    """The audit without printing (for tests and other callers)."""
    file, workspace = Path(file), Path(workspace)
    try:
        _, metadata = read_header(file)
    except (LoraFormatError, OSError) as err:
        return AuditResult(file, False, f"cannot read {file}: {err}")
    if not has_lineage(metadata):
        return AuditResult(
            file, False,
            f"{file.name} carries no wanlora lineage: it was not trained by wanlora, or a tool that "
            "rewrote it dropped the header metadata; its data cannot be verified",
        )
    fields = lineage_fields(metadata)
    records, why = _load_samples(file, fields)
    if records is None:
        return AuditResult(file, False, f"lineage of {file.name} cannot be verified: {why}", fields)
    samples = check_samples(records, workspace)
    manifests = check_manifests(fields, workspace)
    changed = sum(s.source != UNCHANGED or s.caption not in (UNCHANGED, NONE) for s in samples)
    msg = (f"{len(samples)} sample(s); all sources and captions match the workspace" if not changed
           else f"{changed} of {len(samples)} sample(s) differ from the workspace")
    return AuditResult(file, True, msg, fields, samples, manifests)


_STYLE = {UNCHANGED: "green", CHANGED: "yellow", MISSING: "red", UNKNOWN: "magenta", NONE: "dim"}


def _styled(status: str) -> str:
    return f"[{_STYLE[status]}]{status}[/]"


def render(result: AuditResult, console: Console) -> None:
    if not result.ok:
        console.print(f"[red]{result.message}[/]")
        return
    f = result.lineage
    console.print(
        f"[bold]{result.file.name}[/]: expert {f.get('expert')}, step {f.get('step')}, base {f.get('base_model')}, "
        f"rank {f.get('rank')} alpha {f.get('alpha')}, wanlora {f.get('version')}, "
        f"commit {f.get('git_commit', '')[:12]}{' (dirty)' if f.get('git_dirty') == 'true' else ''}"
    )
    table = Table(title="samples")
    for col in ("sample", "source clip", "clip", "caption source", "caption"):
        table.add_column(col)
    for s in result.samples:
        table.add_row(s.id, s.path, _styled(s.source), s.caption_source or "-", _styled(s.caption))
    console.print(table)
    mt = Table(title="manifests")
    for col in ("manifest", "path", "recorded sha256", "now"):
        mt.add_column(col)
    for m in result.manifests:
        mt.add_row(m.name, m.path, m.recorded[:16], _styled(m.status))
    console.print(mt)
    console.print(("[green]" if result.all_unchanged else "[yellow]") + result.message + "[/]")


def audit(file: Path, workspace: Path, console: Console | None = None) -> AuditResult:
    """Check `file` (a trained or exported LoRA) against `workspace` and print the tables."""
    result = verify(file, workspace)
    render(result, console or Console())
    return result
