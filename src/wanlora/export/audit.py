"""`wanlora audit FILE`: is this workspace still the one that made this LoRA?

What audit proves is consistency: the file's tensors are the ones its header describes (a sha256
of the tensor data recorded at save time, the same for a checkpoint and its exports), and the
workspace still holds what that header records: every trained sample's source clip and caption
source (hashed again), the same sample list (none added, none gone), the two manifests training
read, the params the train stage declares, and the checkpoint `data/lora/<expert>/step_N` with
the same tensors. Samples training skipped (no caption, ...) are listed as "not trained" with the
reason and never count as matches. What it cannot prove is authenticity: the header is not
signed, so whoever can write the file can write a consistent lie; sign or checksum files you
publish if that matters.

Exit status (the CLI): 0 everything matches; 1 the workspace differs (a changed or missing clip,
caption, manifest, checkpoint, sample or param: the answer the user asked for); 2 the file cannot
be vouched for (no lineage, an older lineage without a tensor hash, tensors that do not match
the header, an empty sample list, a missing or altered sidecar, a forged path or name).

Only safetensors is read (never a pickle). Everything read from a header is untrusted: paths
must be workspace-relative without `..`, the sidecar name must be one we write, sizes are capped
to what we write and malformed or deeply nested JSON is an error, not a crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wanlora.config import EXPERTS, ParamsError, load_params
from wanlora.export.formats import LoraFormatError
from wanlora.export.imports import read_lora
from wanlora.export.lineage import (
    LINEAGE_VERSION,
    MANIFESTS,
    LineageError,
    check_sidecar_name,
    has_lineage,
    lineage_fields,
    recorded_params,
    tensors_sha256,
)
from wanlora.io import read_jsonl, sha256_file, sha256_text
from wanlora.pipeline import LORA
from wanlora.tensorfiles import read_header

UNCHANGED, CHANGED, MISSING, UNKNOWN, NONE = "unchanged", "changed", "missing", "unknown", "none"
NOT_TRAINED = "not trained"
NEW = "new"  # a sample of the workspace's manifest that the lineage does not list
GONE = "gone"  # a sample the lineage lists that the workspace's manifest no longer does
#: Largest sidecar read (~200,000 samples); what we write for 800 samples is ~200 KB.
MAX_SIDECAR_BYTES = 64 * 1024 * 1024


@dataclass
class SampleCheck:
    id: str
    path: str
    source: str  # unchanged | changed | missing | not trained | new | gone
    caption_source: str | None  # caption file path, "default", or None (no caption recorded)
    caption: str  # unchanged | changed | missing | unknown | none
    note: str = ""  # why it was not trained, or how the manifest lists it now
    trained: bool = True

    @property
    def matches(self) -> bool:
        if self.source == NOT_TRAINED:
            return True
        return self.source == UNCHANGED and self.caption in (UNCHANGED, NONE)


@dataclass
class ManifestCheck:
    name: str
    path: str
    recorded: str
    status: str


@dataclass
class ParamCheck:
    key: str
    recorded: Any
    now: Any


@dataclass
class AuditResult:
    file: Path
    ok: bool  # the lineage is present, well formed and belongs to these tensors; exit 2 otherwise
    message: str
    lineage: dict[str, str] = field(default_factory=dict)
    samples: list[SampleCheck] = field(default_factory=list)
    manifests: list[ManifestCheck] = field(default_factory=list)
    params: list[ParamCheck] = field(default_factory=list)  # only the keys that differ
    checkpoint: ManifestCheck | None = None

    @property
    def all_unchanged(self) -> bool:
        """The workspace is consistent with the recorded lineage in every respect audit checks."""
        return (self.ok and all(s.matches for s in self.samples) and not self.params
                and all(m.status == UNCHANGED for m in self.manifests)
                and self.checkpoint is not None and self.checkpoint.status == UNCHANGED)


# ------------------------------------------------------------------------ untrusted values
def _json(text: Any, what: str) -> Any:
    """Parse a JSON string from a header; malformed or too deeply nested input is a LineageError."""
    if not isinstance(text, str):
        raise LineageError(f"{what} is not a JSON string")
    try:
        return json.loads(text)
    except RecursionError:
        raise LineageError(f"{what} is nested too deeply to be lineage wanlora writes") from None
    except json.JSONDecodeError as err:
        raise LineageError(f"{what} is not valid JSON ({err.msg} at {err.pos})") from None


def confined(rel: Any, what: str) -> str:
    """A path from a header, if it names a place inside the workspace: relative, no `..`, no
    drive or backslash. A forged header must not make audit hash or read files elsewhere."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise LineageError(f"{what} {rel!r} is not a path")
    if (PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive
            or "\\" in rel or ".." in PurePosixPath(rel).parts or rel.startswith("~")):
        raise LineageError(f"{what} {rel!r} leaves the workspace (absolute or with '..'); "
                           "wanlora records workspace-relative paths only, so the header was altered")
    return rel


def _check_record(r: Any, i: int) -> dict[str, Any]:
    """One recorded sample, its paths confined; anything else in it is left as data."""
    if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not isinstance(r.get("trained"), bool):
        raise LineageError(f"sample record {i} is not one wanlora writes (id, path, trained)")
    confined(r.get("path"), f"sample {r['id']!r}: path")
    src = r.get("caption_source")
    if r["trained"] and src not in (None, "default"):
        confined(src, f"sample {r['id']!r}: caption_source")
    return r


def _load_samples(file: Path, fields: dict[str, str]) -> list[dict[str, Any]]:
    """The recorded sample list (inline or from the sidecar), validated; raises LineageError."""
    if "samples" in fields:
        records = _json(fields["samples"], "wanlora.samples")
    elif "samples_sidecar" in fields:
        name = check_sidecar_name(fields["samples_sidecar"], fields.get("samples_sidecar_sha256"))
        sidecar = file.parent / name
        if not sidecar.is_file():
            raise LineageError(f"sidecar {name} is missing: copy it from the training run's data/lora/<expert>/ "
                               f"next to {file.name}")
        if sidecar.stat().st_size > MAX_SIDECAR_BYTES:
            raise LineageError(f"sidecar {name} is larger than {MAX_SIDECAR_BYTES >> 20} MiB; wanlora writes none so large")
        text = sidecar.read_text(encoding="utf-8")
        if sha256_text(text) != fields["samples_sidecar_sha256"]:
            raise LineageError(f"sidecar {name} does not match the hash in the header: it was altered or "
                               "belongs to another run")
        records = _json(text, f"sidecar {name}")
    else:
        raise LineageError("the lineage lists no samples (neither inline nor a sidecar)")
    if not isinstance(records, list):
        raise LineageError("the recorded samples are not a list")
    records = [_check_record(r, i) for i, r in enumerate(records)]
    if not any(r["trained"] for r in records):
        raise LineageError("the lineage lists no trained sample, so nothing ties this file to any data")
    return records


# ---------------------------------------------------------------------------------- checks
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


def _default_caption_hashes(workspace: Path) -> dict[str, str] | None:
    """sha256 of each dataset's default caption in the workspace's params (None: unreadable params)."""
    try:
        params = load_params(workspace / "params.yaml")
    except ParamsError:
        return None
    return {name: sha256_text(ds.captions.default_caption) for name, ds in params.datasets.items()}


def _manifest_ids(workspace: Path) -> dict[str, str] | None:
    """{sample id: path} of the workspace's samples manifest (None when it is missing)."""
    path = workspace / MANIFESTS["samples"]
    return {r["id"]: r.get("path", "") for r in read_jsonl(path)} if path.is_file() else None


def check_samples(records: list[dict[str, Any]], workspace: Path) -> list[SampleCheck]:
    """Each recorded sample against the workspace, then the manifest's samples the lineage lacks."""
    hasher = _Hasher(workspace)
    defaults: dict[str, str] | None = None
    listed = _manifest_ids(workspace)
    checks = []
    for r in records:
        gone = listed is not None and r["id"] not in listed
        if not r["trained"]:
            checks.append(SampleCheck(r["id"], r["path"], GONE if gone else NOT_TRAINED, None, NONE,
                                      str(r.get("reason", "")), trained=False))
            continue
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
        source = GONE if gone else _compare(r.get("sha256"), hasher(r["path"]))
        checks.append(SampleCheck(r["id"], r["path"], source, cap_src, cap,
                                  f"no longer in {MANIFESTS['samples']}" if gone else ""))
    recorded = {r["id"] for r in records}
    for sid, path in sorted((listed or {}).items()):
        if sid not in recorded:
            checks.append(SampleCheck(sid, path, NEW, None, NONE, "in the workspace's manifest, not in this lineage",
                                      trained=False))
    return checks


def check_manifests(fields: dict[str, str], workspace: Path) -> list[ManifestCheck]:
    """The manifests training read, by our own paths (the header's are only compared, never opened)."""
    recorded = _json(fields.get("manifests", "{}"), "wanlora.manifests")
    if not isinstance(recorded, dict) or set(recorded) != set(MANIFESTS):
        raise LineageError(f"wanlora.manifests must record exactly {sorted(MANIFESTS)}")
    out = []
    for name, rel in sorted(MANIFESTS.items()):
        rec = recorded[name]
        if not isinstance(rec, dict) or rec.get("path") != rel or not isinstance(rec.get("sha256"), str):
            raise LineageError(f"wanlora.manifests: {name} must be recorded as {rel} with its sha256")
        path = workspace / rel
        current = sha256_file(path) if path.is_file() else None
        if rec["sha256"] == "absent":  # the manifest did not exist when the LoRA was made
            status = UNCHANGED if current is None else CHANGED
        else:
            status = _compare(rec["sha256"], current)
        out.append(ManifestCheck(name, rel, rec["sha256"], status))
    return out


def check_params(fields: dict[str, str], workspace: Path) -> list[ParamCheck]:
    """The train stage's params as recorded against the workspace's params.yaml; only differences."""
    recorded = _json(fields.get("params", ""), "wanlora.params")
    if not isinstance(recorded, dict):
        raise LineageError("wanlora.params is not a mapping of params keys")
    try:
        # compared as the header holds them: JSON values (a tuple would read back as a list)
        now = json.loads(json.dumps(recorded_params(load_params(workspace / "params.yaml"), workspace)))
    except ParamsError as err:
        return [ParamCheck("params.yaml", "readable", f"unreadable: {str(err).splitlines()[0]}")]
    missing = object()
    return [ParamCheck(k, recorded.get(k, "(not recorded)"), now.get(k, "(not a param now)"))
            for k in sorted(set(recorded) | set(now)) if recorded.get(k, missing) != now.get(k, missing)]


def _digest(file: Path) -> str:
    try:
        lora, _, _ = read_lora(file)
    except (LoraFormatError, OSError) as err:
        raise LineageError(f"its tensors cannot be read: {err}") from None
    return tensors_sha256(lora)


def check_checkpoint(file: Path, fields: dict[str, str], workspace: Path) -> ManifestCheck:
    """The workspace's own checkpoint of this expert and step must hold the same tensors."""
    expert, step = fields.get("expert"), fields.get("step", "")
    if expert not in EXPERTS or not step.isdigit():
        raise LineageError(f"expert {expert!r} / step {step!r} are not what wanlora writes")
    rel = f"{LORA}/{expert}/step_{int(step):06d}.safetensors"
    path = workspace / rel
    recorded = fields["tensors_sha256"]
    if not path.is_file():
        return ManifestCheck("checkpoint", rel, recorded, MISSING)
    if path.resolve() == file.resolve():
        return ManifestCheck("checkpoint", rel, recorded, UNCHANGED)
    try:
        theirs = lineage_fields(read_header(path, LoraFormatError)[1]).get("tensors_sha256")
        same = theirs == recorded and _digest(path) == recorded
    except (LoraFormatError, LineageError, OSError):
        same = False
    return ManifestCheck("checkpoint", rel, recorded, UNCHANGED if same else CHANGED)


def _summary(samples: list[SampleCheck], manifests: list[ManifestCheck], params: list[ParamCheck],
             checkpoint: ManifestCheck) -> str:
    trained = [s for s in samples if s.trained]
    skipped = [s for s in samples if not s.trained and s.source != NEW]
    head = f"{len(trained)} trained sample(s)" + (f", {len(skipped)} not trained" if skipped else "")
    issues = []
    if differ := sum(not s.matches for s in trained):
        issues.append(f"{differ} of {len(trained)} trained sample(s) differ from the workspace")
    if gone := sum(s.source == GONE for s in skipped):
        issues.append(f"{gone} sample(s) training skipped are no longer in {MANIFESTS['samples']}")
    if new := sum(s.source == NEW for s in samples):
        issues.append(f"{new} sample(s) in the workspace are not in the lineage")
    issues += [f"manifest {m.path} is {m.status}" for m in manifests if m.status != UNCHANGED]
    if params:
        issues.append("params differ: " + ", ".join(p.key for p in params[:8]) + (" ..." if len(params) > 8 else ""))
    if checkpoint.status != UNCHANGED:
        issues.append(f"checkpoint {checkpoint.path} is {checkpoint.status}")
    if not issues:
        return f"{head}; all sources, captions, manifests, params and the checkpoint match the workspace"
    return f"{head}; " + "; ".join(issues)


def carries_lineage(file: Path) -> bool:
    """Whether `file` has a readable header with wanlora lineage: only then is there a workspace to
    compare it with (a file that cannot be vouched for is reported as such wherever it is audited)."""
    try:
        return has_lineage(read_header(Path(file), LoraFormatError)[1])
    except (LoraFormatError, OSError):
        return False


def verify(file: Path, workspace: Path) -> AuditResult:
    """The audit without printing (for tests and other callers)."""
    file, workspace = Path(file), Path(workspace)
    try:
        _, metadata = read_header(file, LoraFormatError)
    except (LoraFormatError, OSError) as err:
        return AuditResult(file, False, f"cannot read {file}: {err}")
    if not has_lineage(metadata):
        return AuditResult(
            file, False,
            f"{file.name} carries no wanlora lineage: it was not trained by wanlora, or a tool that "
            "rewrote it dropped the header metadata; its data cannot be verified",
        )
    fields = lineage_fields(metadata)
    try:
        if fields["lineage_version"] != LINEAGE_VERSION or "tensors_sha256" not in fields:
            raise LineageError(f"lineage version {fields['lineage_version']!r} records no tensor hash (this wanlora "
                               f"writes version {LINEAGE_VERSION}); retrain or re-export with this version")
        if _digest(file) != fields["tensors_sha256"]:
            raise LineageError("its tensors are not the ones the header describes (the header was copied onto "
                               "other weights, or the weights were edited)")
        records = _load_samples(file, fields)
        samples = check_samples(records, workspace)
        manifests = check_manifests(fields, workspace)
        params = check_params(fields, workspace)
        checkpoint = check_checkpoint(file, fields, workspace)
    except LineageError as err:
        return AuditResult(file, False, f"lineage of {file.name} cannot be verified: {err}", fields)
    return AuditResult(file, True, _summary(samples, manifests, params, checkpoint), fields, samples,
                       manifests, params, checkpoint)


_STYLE = {UNCHANGED: "green", CHANGED: "yellow", MISSING: "red", UNKNOWN: "magenta", NONE: "dim",
          NOT_TRAINED: "dim", NEW: "red", GONE: "red"}


def _styled(status: str) -> str:
    return f"[{_STYLE[status]}]{status}[/]"


def render(result: AuditResult, console: Console) -> None:
    if not result.ok:
        console.print(f"[red]{escape(result.message)}[/]")
        return
    f = result.lineage
    console.print(escape(
        f"{result.file.name}: expert {f.get('expert')}, step {f.get('step')}, base {f.get('base_model')}, "
        f"rank {f.get('rank')} alpha {f.get('alpha')}, wanlora {f.get('version')}, "
        f"tensors {f.get('tensors_sha256', '')[:16]}"
    ))
    table = Table(title="samples")
    for col in ("sample", "source clip", "clip", "caption source", "caption", "note"):
        table.add_column(col)
    for s in result.samples:
        table.add_row(escape(s.id), escape(s.path), _styled(s.source), escape(s.caption_source or "-"),
                      _styled(s.caption), escape(s.note))
    console.print(table)
    mt = Table(title="manifests and checkpoint")
    for col in ("what", "path", "recorded sha256", "now"):
        mt.add_column(col)
    for m in [*result.manifests, *([result.checkpoint] if result.checkpoint else [])]:
        mt.add_row(m.name, m.path, escape(m.recorded[:16]), _styled(m.status))
    console.print(mt)
    if result.params:
        pt = Table(title="params that differ")
        for col in ("key", "recorded", "now"):
            pt.add_column(col)
        for p in result.params:
            pt.add_row(escape(p.key), escape(json.dumps(p.recorded)), escape(json.dumps(p.now)))
        console.print(pt)
    console.print(("[green]" if result.all_unchanged else "[yellow]") + escape(result.message) + "[/]")


def audit(file: Path, workspace: Path, console: Console | None = None) -> AuditResult:
    """Check `file` (a trained or exported LoRA) against `workspace` and print the tables."""
    result = verify(file, workspace)
    render(result, console or Console())
    return result
