"""Stage trim: for every raw clip, the frames worth training on and the picture inside any bars.

Nothing is re-encoded and nothing under the raw folder is touched: the output is a manifest of
time windows (`keep_start`..`keep_end`) and crop boxes that later stages apply when decoding.

Cost per clip does not grow with the clip's middle: the intro is found by decoding forward from
the first frame until motion starts, the outro by seeking near the end and decoding backwards in
growing chunks, both bounded by `max_scan_seconds`; letterbox bars come from a handful of frames
reached by seeking. Motion itself is judged in `wanlora.media.motion`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import track

from wanlora.config import DatasetConfig, TrimConfig
from wanlora.io import atomic_write_text, dataset_file, read_jsonl, write_jsonl
from wanlora.media.decode import iter_frames, keyframe_near
from wanlora.media.letterbox import detect_crop
from wanlora.media.listing import STAGE
from wanlora.media.motion import Analysed, StaticPrefix, StillParams, analyse, analysis_size, static_prefix
from wanlora.media.probe import REENCODE_FIX, MediaError, MediaInfo, probe
from wanlora.report import Problem, console, settle, write_problems

LETTERBOX_SAMPLES = 5
TAIL_CHUNK_SECONDS = 1.0


@dataclass
class KeepRange:
    """The result of scanning both ends of a clip."""

    keep_start: int
    keep_end: int
    frames: int  # frame count as decoded (corrects header estimates)
    intro: StaticPrefix = field(default_factory=StaticPrefix)
    outro: StaticPrefix = field(default_factory=StaticPrefix)
    notes: list[str] = field(default_factory=list)


def find_keep_range(path: Path, info: MediaInfo, cfg: TrimConfig) -> KeepRange:
    """Scan a video from both ends for static intros/outros; raise MediaError if nothing moves."""
    if not cfg.enabled:
        return KeepRange(0, info.frames, info.frames)
    params = StillParams.from_seconds(cfg.black_level, cfg.motion_threshold, cfg.min_static_seconds, info.fps)
    size = analysis_size(info.width, info.height)
    limit = max(1, math.ceil(cfg.max_scan_seconds * info.fps))
    notes: list[str] = []

    head_idx: list[int] = []

    def head() -> Iterator[Analysed]:
        for idx, gray in iter_frames(path, info, 0, limit, gray=True, size=size):
            head_idx.append(idx)
            yield analyse(gray)

    intro = static_prefix(head(), params)
    if not intro.moving_found:
        if len(head_idx) < limit:  # the decode ran out before the limit: the whole clip was seen
            raise _no_motion(f" ({intro.black} black, {intro.fade + intro.still} still frames)")
        notes.append(f"still for the whole first {cfg.max_scan_seconds:g} s scanned; raise trim.max_scan_seconds to look further")
    keep_start = head_idx[intro.frames] if intro.frames < len(head_idx) else head_idx[-1] + 1

    tail = _scan_tail(path, info, params, size, lowest=max(keep_start, info.frames - limit))
    outro, tail_idx, frames = tail
    if not outro.moving_found and tail_idx and tail_idx[-1] > keep_start:
        notes.append(f"still for the whole last {cfg.max_scan_seconds:g} s scanned; raise trim.max_scan_seconds to look further")
    keep_end = tail_idx[outro.frames - 1] if outro.frames else frames
    if keep_end <= keep_start:
        raise _no_motion("")
    return KeepRange(keep_start, keep_end, frames, intro, outro, notes)


def _no_motion(detail: str) -> MediaError:
    return MediaError(
        f"no motion anywhere in the clip{detail}",
        "delete it, or lower datasets.<name>.trim.motion_threshold if it does move",
    )


def _scan_tail(path: Path, info: MediaInfo, params: StillParams, size: tuple[int, int], lowest: int):
    """Static frames at the end: decode the last chunk, extend backwards while it is all still.

    Returns (outro prefix, decoded indices from the end backwards, true frame count).
    """
    chunk = max(params.min_static_frames * 2, math.ceil(TAIL_CHUNK_SECONDS * info.fps))
    start = max(lowest, info.frames - chunk)
    decoded: list[tuple[int, Analysed]] = [
        (idx, analyse(g)) for idx, g in iter_frames(path, info, start, None, gray=True, size=size)
    ]
    if not decoded:
        raise MediaError(
            f"the header promises {info.frames} frames but none near the end can be decoded (file truncated)",
            REENCODE_FIX,
        )
    frames = decoded[-1][0] + 1
    shortfall = info.frames - frames
    if shortfall > max(2, round(0.5 * info.fps)):
        raise MediaError(
            f"the header promises {info.frames} frames but decoding stops at {frames} (file truncated)",
            REENCODE_FIX,
        )
    while True:
        rev = decoded[::-1]
        outro = static_prefix((a for _, a in rev), params)
        if outro.moving_found or start <= lowest:
            return outro, [i for i, _ in rev], frames
        new_start = max(lowest, start - 2 * chunk)
        older = [(idx, analyse(g)) for idx, g in iter_frames(path, info, new_start, start, gray=True, size=size)]
        decoded = older + decoded
        start, chunk = new_start, 2 * chunk


def find_crop(path: Path, info: MediaInfo, keep_start: int, keep_end: int, black_level: float) -> list[int]:
    """Letterbox crop from up to LETTERBOX_SAMPLES full-size frames spread over the kept range.

    Keyframes are used where the kept range has them (cheap to decode); otherwise the exact frame.
    """
    n = min(LETTERBOX_SAMPLES, keep_end - keep_start)
    targets = sorted({keep_start + round(k * (keep_end - 1 - keep_start) / max(1, n - 1)) for k in range(n)})
    grays: dict[int, np.ndarray] = {}
    for t in targets:
        got = keyframe_near(path, info, t, keep_start, keep_end)
        if got is None:
            got = next(iter_frames(path, info, t, keep_end, gray=True), None)
        if got is not None:
            grays[got[0]] = got[1]
    if not grays:
        return [0, 0, info.width, info.height]
    return detect_crop(list(grays.values()), black_level)


# --------------------------------------------------------------------------------- stage
@dataclass
class ClipOutcome:
    record: dict
    problem: Problem | None = None
    keep: KeepRange | None = None


def analyse_file(path: Path, ds: DatasetConfig, base: dict) -> ClipOutcome:
    """Probe, trim and crop one media file; a bad file becomes a skipped record plus a Problem.

    `base` holds the record's identity fields (id, dataset, path, sha256).
    """
    record = {
        **base,
        "kind": None, "fps": None, "frames": None, "width": None, "height": None, "rotation": None,
        "keep_start": None, "keep_end": None, "keep_start_s": None, "keep_end_s": None, "crop": None,
        "status": "ok", "reason": "", "fix": "",
    }  # fmt: skip
    try:
        info = probe(path)
        record.update(kind=info.kind, width=info.width, height=info.height, rotation=info.rotation)
        if info.kind == "image":
            keep = None
            record.update(frames=1, keep_start=0, keep_end=1)
            gray = next(g for _, g in iter_frames(path, info, gray=True))
            crop = detect_crop([gray], ds.trim.black_level) if ds.trim.letterbox else [0, 0, info.width, info.height]
        else:
            keep = find_keep_range(path, info, ds.trim)
            record.update(
                fps=info.fps,
                frames=keep.frames,
                keep_start=keep.keep_start,
                keep_end=keep.keep_end,
                keep_start_s=round(keep.keep_start / info.fps, 4),
                keep_end_s=round(keep.keep_end / info.fps, 4),
            )
            crop = (
                find_crop(path, info, keep.keep_start, keep.keep_end, ds.trim.black_level)
                if ds.trim.letterbox
                else [0, 0, info.width, info.height]
            )
        record["crop"] = crop
        return ClipOutcome(record, None, keep)
    except MediaError as err:
        fix = err.fix.replace("datasets.<name>", f"datasets.{base['dataset']}")  # the key to edit, exactly
        record.update(status="skipped", reason=err.reason, fix=fix)
        return ClipOutcome(record, Problem(base["path"], err.reason, fix, STAGE))


def run_stage(datasets: dict[str, DatasetConfig], workspace: Path, out_dir: Path, index: Path) -> None:
    """Write out_dir/clips.jsonl, report.md and problems.json for the media the scan stage indexed.

    The media list and hashes come from `index` (the scan stage's data/index/media.jsonl), so trim
    depends only on what DVC tracks, and walks and hashes nothing twice: listing problems (orphan
    captions, unsafe links) are scan's to report.
    """
    workspace = Path(workspace)
    rows = read_jsonl(index)
    records: list[dict] = []
    outcomes: dict[str, list[ClipOutcome]] = {}
    problems: dict[str, list[Problem]] = {}
    for name, ds in datasets.items():
        entries = [(dataset_file(workspace, ds.folder, r["path"], f"{index}: {r['id']}"), _identity(r))
                   for r in rows if r["dataset"] == name]
        outcomes[name], problems[name] = [], []
        for path, base in track(entries, description=f"trim {name}", console=console, transient=True):
            outcome = analyse_file(path, ds, base)
            outcomes[name].append(outcome)
            records.append(outcome.record)
            if outcome.problem:
                problems[name].append(outcome.problem)

    out_dir = Path(out_dir)
    write_jsonl(out_dir / "clips.jsonl", records)
    write_problems(out_dir / "problems.json", [p for ps in problems.values() for p in ps])
    atomic_write_text(out_dir / "report.md", render_report(outcomes, problems))
    for name, ds in datasets.items():
        settle(problems[name], ds.on_error, STAGE)


def _identity(row: dict) -> dict:
    """The identity fields of a clips.jsonl record, from a scan index row."""
    return {k: row[k] for k in ("id", "dataset", "path", "sha256")}


def render_report(outcomes: dict[str, list[ClipOutcome]], problems: dict[str, list[Problem]]) -> str:
    """Human-readable trim report: what was cut from each clip and why, and what was skipped."""
    lines = ["# Trim report", ""]
    total_cut = 0.0
    for name, items in outcomes.items():
        ok = [o for o in items if o.record["status"] == "ok"]
        lines += [f"## Dataset `{name}`", "", f"{len(ok)} usable file(s), {len(problems[name])} problem(s).", ""]
        if ok:
            lines += ["| clip | kept (s) | intro cut | outro cut | crop [x, y, w, h] | notes |", "|---|---|---|---|---|---|"]
        for o in ok:
            r = o.record
            if o.keep is None:
                lines.append(f"| {r['id']} | image | - | - | {r['crop']} | |")
                continue
            fps = r["fps"]
            cut = (o.keep.keep_start + o.keep.frames - o.keep.keep_end) / fps
            total_cut += cut
            lines.append(
                f"| {r['id']} | {r['keep_start_s']:.2f}-{r['keep_end_s']:.2f} of {o.keep.frames / fps:.2f} "
                f"| {_describe(o.keep.intro, fps)} | {_describe(o.keep.outro, fps)} | {r['crop']} | {'; '.join(o.keep.notes)} |"
            )
        if problems[name]:
            lines += ["", "### Skipped", ""]
            lines += [f"- `{p.path}`: {p.reason}. Fix: {p.fix}" for p in sorted(problems[name], key=lambda p: p.path)]
        lines.append("")
    lines += [f"Seconds trimmed in total: {total_cut:.2f}", ""]
    return "\n".join(lines)


def _describe(prefix: StaticPrefix, fps: float) -> str:
    if not prefix.frames:
        return "none"
    parts = [f"{n} {kind}" for kind, n in (("black", prefix.black), ("fade", prefix.fade), ("still", prefix.still)) if n]
    return f"{prefix.frames / fps:.2f} s ({', '.join(parts)} frames)"
