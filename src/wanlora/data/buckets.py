"""Stage bucket: which resolution, frame count and source frames each training sample uses.

Samples in one batch must share a shape, and Wan needs sides divisible by 16 (TI2V 5B: 32, its VAE
compresses 16x before the 2x2 patch) and 4n+1 frames, so every clip is assigned a bucket `W x H x F`.
The math lives in small pure functions, tested directly:

- `bucket_sizes(area, step)`: the `step`-aligned sizes of (at most) a target area over a range of
  aspect ratios, each the largest such size for its width (`step` is the variant's `bucket_align`).
- `choose_buckets(w, h, resolutions, allow_upscale, every)`: for each listed resolution, the size
  whose aspect ratio is closest to the (cropped) source; every resolution the source reaches
  without upscaling gets one (AI Toolkit trains each clip at every resolution in its list), or only
  the largest with `every=False`. A source smaller than every resolution keeps its own area, as AI
  Toolkit's `get_bucket_for_image_size` does (target pixels = min(source, resolution^2)); AI
  Toolkit scales to the bucket and crops the centre, and so do we, except that the centre crop is
  written here as a source box.
- `frame_indices(...)`: `window` takes contiguous windows resampled to the model's frame rate by
  time, as many as cover the kept range; `spread` spaces the frames over the whole kept range (AI
  Toolkit's video default, which plays a clip longer than the bucket too fast: an 8-s clip spread
  over 33 frames is 4 frames a second, motion 4x too fast at 16 fps); `auto` (the default) spreads
  only where that stays within SPREAD_TOLERANCE of true speed, and takes windows otherwise.

Every sample records its `effective_fps` (source frames per second of real time it samples) and
`time_scale` (real seconds per second played at the model's rate: 1 is true speed); the report
lists them and warns beyond SPREAD_TOLERANCE.

The sample's `crop` is the region of the displayed source frame that is resized to exactly
width x height: the letterbox crop from the trim stage, centre-cropped to the bucket's aspect.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from wanlora.config import BucketConfig, DatasetConfig
from rich.markup import escape

from wanlora.io import atomic_write_json, atomic_write_text, read_jsonl, write_jsonl
from wanlora.report import Problem, console, settle, write_problems

STAGE = "bucket"
STEP = 16
MAX_ASPECT = 3.0  # 2.39:1 cinema and 9:16 phone clips fit; beyond this a centre crop is better than a sliver bucket
SPREAD_TOLERANCE = 0.25  # how far from true speed a sample may play before `auto` takes windows (and the report warns)
Sampling = Literal["auto", "window", "spread"]


def bucket_sizes(area: int, step: int = STEP, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """(w, h) sizes, multiples of `step`, with w*h <= area and aspect within 1/max_aspect..max_aspect."""
    sizes = []
    for w in range(step, int(math.sqrt(area * max_aspect)) + step, step):
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_aspect:
            sizes.append((w, h))
    return sizes


def _nearest_aspect(sizes: list[tuple[int, int]], width: int, height: int) -> tuple[int, int] | None:
    target = math.log(width / height)
    return min(sizes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - target), 9), -s[0] * s[1]), default=None)


def choose_buckets(
    width: int, height: int, resolutions: list[int], allow_upscale: bool, every: bool = True, step: int = STEP
) -> list[tuple[int, int]]:
    """Bucket sizes (w, h), multiples of `step`, for a source of width x height, largest first; []
    if it is smaller than `step` px on a side. `every`: one per resolution it reaches; otherwise
    the largest only."""
    if width < step or height < step:
        return []
    sizes = []
    for res in sorted(resolutions, reverse=True):
        w, h = _nearest_aspect(bucket_sizes(res * res, step), width, height)
        if allow_upscale or (w <= width and h <= height):
            sizes.append((w, h))
            if not every:
                break
    if sizes:
        return sizes
    # smaller than every resolution: aligned sizes inside the source, not much below the largest one
    inside = [
        (w, h)
        for w in range(step, width + 1, step)
        for h in range(step, height + 1, step)
        if max(w / h, h / w) <= MAX_ASPECT
    ]
    most = max(w * h for w, h in inside)
    fitting = [(w, h) for w, h in inside if 2 * w * h >= most]
    return [_nearest_aspect(fitting, width, height)]


def choose_bucket(width: int, height: int, resolutions: list[int], allow_upscale: bool) -> tuple[int, int] | None:
    """The largest bucket (w, h) of `choose_buckets`; None if the source is under 16 px on a side."""
    return next(iter(choose_buckets(width, height, resolutions, allow_upscale, every=False)), None)


def fit_crop(crop: list[int], width: int, height: int) -> list[int]:
    """Centre-crop box `crop` [x, y, w, h] to the aspect ratio width:height (the bucket's)."""
    x, y, w, h = crop
    if w * height > h * width:  # source wider than the bucket: trim the sides
        new_w = max(1, round(h * width / height))
        return [x + (w - new_w) // 2, y, new_w, h]
    new_h = max(1, round(w * height / width))
    return [x, y + (h - new_h) // 2, w, new_h]


def _round(x: float) -> int:
    """Round half up: Python's round() goes to even, which spaces resampled frames unevenly."""
    return math.floor(x + 0.5)


def window_span(count: int, source_fps: float, target_fps: float) -> int:
    """Source frames covered by `count` frames taken at target_fps (first to last, inclusive)."""
    return _round((count - 1) * source_fps / target_fps) + 1


def time_scale(first: int, last: int, count: int, source_fps: float, target_fps: float) -> float:
    """Real seconds a sample spans per second it plays at target_fps: 1 is true speed, 2 twice too fast."""
    if count < 2:
        return 1.0
    return ((last - first) / source_fps) / ((count - 1) / target_fps)


def _spread_fits(n: int, count: int, source_fps: float, target_fps: float) -> bool:
    """Does `count` spread over n kept frames play within SPREAD_TOLERANCE of true speed?"""
    return abs(time_scale(0, n - 1, count, source_fps, target_fps) - 1) <= SPREAD_TOLERANCE + 1e-9


def frames_needed(count: int, mode: Sampling, source_fps: float, target_fps: float) -> int:
    """Kept frames a sample of `count` frames needs in `mode`."""
    window = window_span(count, source_fps, target_fps)
    if mode == "window":
        return window
    if mode == "spread":
        return count
    # auto: a spread may play up to SPREAD_TOLERANCE slower than true speed, but never repeats frames
    return next((n for n in range(count, window) if _spread_fits(n, count, source_fps, target_fps)), window)


def resolved_mode(n: int, count: int, mode: Sampling, source_fps: float, target_fps: float) -> Literal["spread", "window"]:
    """How `count` frames are taken from n kept frames: `auto` spreads only near true speed."""
    if mode != "auto":
        return mode
    near = count == 1 or (n >= count and _spread_fits(n, count, source_fps, target_fps))
    return "spread" if near else "window"


def frame_indices(
    keep_start: int,
    keep_end: int,
    source_fps: float,
    count: int,
    mode: Sampling,
    *,
    target_fps: float = 16.0,
    windows: int | None = None,
) -> list[list[int]]:
    """Source frame indices of each sample of a clip's kept range [keep_start, keep_end).

    spread: one sample, `count` frames evenly spaced from the first kept frame to the last.
    window: samples of `count` frames at target_fps (frame i at time i/target_fps after the window
    start, rounded to the nearest source frame): as many as cover the kept range, at most `windows`
    where given, starts spread evenly over it; windows that would coincide are merged.
    auto: spread where that plays within SPREAD_TOLERANCE of true speed, else window.
    Raises ValueError if the range is too short.
    """
    n = keep_end - keep_start
    need = frames_needed(count, mode, source_fps, target_fps)
    if count < 1 or n < need:
        raise ValueError(f"{n} kept frames cannot hold {count} frames in {mode} mode (needs {need})")
    if resolved_mode(n, count, mode, source_fps, target_fps) == "spread":
        if count == 1:
            return [[keep_start + (n - 1) // 2]]
        return [[keep_start + _round(i * (n - 1) / (count - 1)) for i in range(count)]]
    span = window_span(count, source_fps, target_fps)
    cover = math.ceil(n / span)
    windows = cover if windows is None else min(windows, cover)
    last_start = keep_end - span
    if windows == 1:
        starts = [keep_start + (last_start - keep_start) // 2]
    else:
        starts = sorted({keep_start + _round(k * (last_start - keep_start) / (windows - 1)) for k in range(windows)})
    ratio = source_fps / target_fps
    return [[s + _round(i * ratio) for i in range(count)] for s in starts]


def choose_frames(
    keep_start: int, keep_end: int, source_fps: float, cfg: BucketConfig
) -> int | None:
    """The largest allowed frame count that fits the kept range, or None if none does."""
    n = keep_end - keep_start
    fitting = [c for c in cfg.num_frames if frames_needed(c, cfg.frame_sampling, source_fps, cfg.fps) <= n]
    return max(fitting, default=None)


# --------------------------------------------------------------------------------- stage
def plan_clip(clip: dict, ds: DatasetConfig, align: int = STEP, fps: float = 16.0) -> tuple[list[dict], Problem | None]:
    """Samples of one ok clip record (resolutions x windows x flips) with sides multiples of
    `align`, or a Problem saying why it fits no bucket; `fps` is the model's frame rate, used
    where `ds.bucket.fps` is null."""
    cfg = resolved_bucket(ds, fps)
    crop = clip["crop"] or [0, 0, clip["width"], clip["height"]]
    sizes = choose_buckets(crop[2], crop[3], cfg.resolutions, cfg.allow_upscale, cfg.every_resolution, align)
    if not sizes:
        return [], Problem(
            clip["path"],
            f"picture {crop[2]}x{crop[3]} px is smaller than the smallest bucket side ({align} px)",
            "use a larger source, or check the letterbox crop in data/trimmed/report.md",
            STAGE,
        )
    if clip["kind"] == "image":
        count, windows, fps = 1, [[0]], None
    else:
        count = choose_frames(clip["keep_start"], clip["keep_end"], clip["fps"], cfg)
        if count is None:
            return [], _too_short(clip, cfg)
        fps = clip["fps"]
        windows = frame_indices(
            clip["keep_start"], clip["keep_end"], fps, count, cfg.frame_sampling,
            target_fps=cfg.fps, windows=cfg.windows_per_clip,
        )  # fmt: skip
    samples = []
    for w, h in sizes:
        tag = f"@{w}x{h}" if len(sizes) > 1 else ""
        base = {
            "clip_id": clip["id"],
            "dataset": clip["dataset"],
            "path": clip["path"],
            "sha256": clip["sha256"],
            "kind": clip["kind"],
            "width": w,
            "height": h,
            "num_frames": count,
            "bucket": f"{w}x{h}x{count}",
            "crop": fit_crop(crop, w, h),
        }
        for k, indices in enumerate(windows):
            pace = _pace(indices, count, fps, cfg.fps)
            sid = f"{clip['id']}{tag}#{k}"
            samples.append({**base, "id": sid, "frame_indices": indices, "flip": False, **pace})
            if ds.flip_horizontal:
                samples.append({**base, "id": f"{sid}#f", "frame_indices": indices, "flip": True, **pace})
    return samples, None


def _pace(indices: list[int], count: int, source_fps: float | None, target_fps: float) -> dict:
    """The sample's effective frame rate and time scale (None for images: no time)."""
    if source_fps is None or count < 2:
        return {"effective_fps": None, "time_scale": None}
    scale = time_scale(indices[0], indices[-1], count, source_fps, target_fps)
    return {"effective_fps": round(target_fps / scale, 3), "time_scale": round(scale, 3)}


def _too_short(clip: dict, cfg: BucketConfig) -> Problem:
    kept = clip["keep_end"] - clip["keep_start"]
    smallest = cfg.num_frames[0]
    need = frames_needed(smallest, cfg.frame_sampling, clip["fps"], cfg.fps)
    at = "" if cfg.frame_sampling == "spread" else f" at {cfg.fps:g} fps"
    fits = max(c for c in range(1, smallest, 4) if frames_needed(c, cfg.frame_sampling, clip["fps"], cfg.fps) <= kept)
    return Problem(
        clip["path"],
        f"too short: {kept} kept frames ({kept / clip['fps']:.2f} s at {clip['fps']:g} fps), but the smallest "
        f"bucket, {smallest} frames{at}, needs {need}; {fits} frames would fit (AI Toolkit would repeat frames; "
        "we skip the clip rather than train on a stretched one)",
        f"use a longer clip, check its trim in data/trimmed/report.md, or add {fits} to "
        f"datasets.{clip['dataset']}.bucket.num_frames",
        STAGE,
    )


def resolved_bucket(ds: DatasetConfig, fps: float) -> BucketConfig:
    """`ds.bucket` with `fps: null` set to the model's frame rate `fps` (the variant's: 16 for the
    A14B models, 24 for TI2V 5B); an explicit fps is kept."""
    return ds.bucket if ds.bucket.fps is not None else ds.bucket.model_copy(update={"fps": float(fps)})


def run_stage(datasets: dict[str, DatasetConfig], clips_manifest: Path, out_dir: Path, *,
              fps: float = 16.0, align: int = STEP) -> None:
    """Write out_dir/samples.jsonl, histogram.json, report.json (problems) and report.md (every
    sample's bucket and time scale, with warnings) from the trim manifest. `fps` is the model's
    frame rate (for datasets that leave `bucket.fps` null) and `align` the multiple every bucket
    side is: both the variant's (`Variant.fps`, `Variant.bucket_align`)."""
    clips = read_jsonl(clips_manifest)
    samples: list[dict] = []
    problems: dict[str, list[Problem]] = {name: [] for name in datasets}
    for clip in clips:
        if clip["status"] != "ok":
            continue  # reported by the trim stage
        ds = datasets.get(clip["dataset"])
        if ds is None:
            raise ValueError(
                f"{clips_manifest}: clip {clip['id']} belongs to dataset '{clip['dataset']}', which params.yaml "
                f"no longer defines ({', '.join(datasets)}); rerun the trim stage"
            )
        got, problem = plan_clip(clip, ds, align, fps)
        samples += got
        if problem:
            problems[clip["dataset"]].append(problem)
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "samples.jsonl", samples)
    atomic_write_json(out_dir / "histogram.json", histogram(samples))
    write_problems(out_dir / "report.json", [p for ps in problems.values() for p in ps])
    off_pace = [s for s in samples if _off_pace(s)]
    atomic_write_text(out_dir / "report.md", render_report(samples, off_pace, problems))
    for s in off_pace:
        console.print(f"[yellow]{STAGE}: warning[/] {escape(_pace_warning(s))}")
    for name, ds in datasets.items():
        settle(problems[name], ds.on_error, STAGE)


def histogram(samples: list[dict]) -> list[dict]:
    """Samples per bucket with the range of their time scales (1 = true speed; null for images)."""
    by_bucket: dict[str, list[float | None]] = {}
    for s in samples:
        by_bucket.setdefault(s["bucket"], []).append(s["time_scale"])
    rows = []
    for b in sorted(by_bucket, key=_bucket_key):
        scales = [v for v in by_bucket[b] if v is not None]
        rows.append({
            "bucket": b,
            "count": len(by_bucket[b]),
            "time_scale_min": min(scales, default=None),
            "time_scale_max": max(scales, default=None),
        })  # fmt: skip
    return rows


def _off_pace(sample: dict) -> bool:
    return sample["time_scale"] is not None and abs(sample["time_scale"] - 1) > SPREAD_TOLERANCE + 1e-9


def _pace_warning(s: dict) -> str:
    how = "fast" if s["time_scale"] > 1 else "slow"
    return (
        f"{s['path']}: sample {s['id']} plays its motion {s['time_scale']:g}x {how} ({s['effective_fps']:g} source "
        f"frames a second at the model's rate); use frame_sampling auto or window to keep true speed"
    )


def render_report(samples: list[dict], off_pace: list[dict], problems: dict[str, list[Problem]]) -> str:
    """Human-readable bucket report: counts per bucket, every sample's time scale, warnings, skips."""
    lines = ["# Bucket report", ""]
    clips = len({s["clip_id"] for s in samples})
    lines += [f"{len(samples)} sample(s) from {clips} clip(s) and image(s).", ""]
    lines += ["| bucket | samples | time scale (1 = true speed) |", "|---|---|---|"]
    for row in histogram(samples):
        lo, hi = row["time_scale_min"], row["time_scale_max"]
        scale = "image" if lo is None else (f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}")
        lines.append(f"| {row['bucket']} | {row['count']} | {scale} |")
    lines.append("")
    if off_pace:
        lines += [f"## Warnings: {len(off_pace)} sample(s) more than {SPREAD_TOLERANCE:.0%} off true speed", ""]
        lines += [f"- {_pace_warning(s)}" for s in off_pace]
        lines.append("")
    lines += ["## Samples", "", "| sample | bucket | source frames | effective fps | time scale |", "|---|---|---|---|---|"]
    for s in samples:
        idx = s["frame_indices"]
        pace = ("-", "-") if s["time_scale"] is None else (f"{s['effective_fps']:g}", f"{s['time_scale']:g}")
        lines.append(f"| {s['id']} | {s['bucket']} | {idx[0]}-{idx[-1]} | {pace[0]} | {pace[1]} |")
    skipped = [p for ps in problems.values() for p in ps]
    if skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- `{p.path}`: {p.reason}. Fix: {p.fix}" for p in sorted(skipped, key=lambda p: p.path)]
    lines.append("")
    return "\n".join(lines)


def _bucket_key(bucket: str) -> tuple[int, ...]:
    return tuple(int(v) for v in bucket.split("x"))
