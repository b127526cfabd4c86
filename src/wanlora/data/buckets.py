"""Stage bucket: which resolution, frame count and source frames each training sample uses.

Samples in one batch must share a shape, and Wan needs sides divisible by 16 and 4n+1 frames, so
every clip is assigned a bucket `W x H x F`. The math lives in small pure functions, tested directly:

- `bucket_sizes(area)`: the 16-px-aligned sizes of (at most) a target area over a range of aspect
  ratios, each the largest such size for its width.
- `choose_bucket(w, h, resolutions, allow_upscale)`: the size whose aspect ratio is closest to the
  (cropped) source, at the largest resolution that does not upscale the source. A source smaller
  than every resolution keeps its own area, as AI Toolkit's `get_bucket_for_image_size` does
  (target pixels = min(source, resolution^2)); AI Toolkit scales to the bucket and crops the
  centre, and so do we, except that the centre crop is written here as a source box.
- `frame_indices(...)`: `spread` spaces the frames over the whole kept range (AI Toolkit's video
  default); `window` takes contiguous windows resampled to the model's frame rate by time.

The sample's `crop` is the region of the displayed source frame that is resized to exactly
width x height: the letterbox crop from the trim stage, centre-cropped to the bucket's aspect.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Literal

from wanlora.config import BucketConfig, DatasetConfig
from wanlora.io import atomic_write_json, read_jsonl, write_jsonl
from wanlora.report import Problem, settle, write_problems

STAGE = "bucket"
STEP = 16
MAX_ASPECT = 3.0  # 2.39:1 cinema and 9:16 phone clips fit; beyond this a centre crop is better than a sliver bucket


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


def choose_bucket(width: int, height: int, resolutions: list[int], allow_upscale: bool) -> tuple[int, int] | None:
    """Bucket (w, h) for a source of width x height; None if it is smaller than 16 px on a side."""
    if width < STEP or height < STEP:
        return None
    for res in sorted(resolutions, reverse=True):
        w, h = _nearest_aspect(bucket_sizes(res * res), width, height)
        if allow_upscale or (w <= width and h <= height):
            return w, h
    # smaller than every resolution: aligned sizes inside the source, not much below the largest one
    inside = [
        (w, h)
        for w in range(STEP, width + 1, STEP)
        for h in range(STEP, height + 1, STEP)
        if max(w / h, h / w) <= MAX_ASPECT
    ]
    most = max(w * h for w, h in inside)
    fitting = [(w, h) for w, h in inside if 2 * w * h >= most]
    return _nearest_aspect(fitting, width, height)


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


def frames_needed(count: int, mode: Literal["spread", "window"], source_fps: float, target_fps: float) -> int:
    return count if mode == "spread" else window_span(count, source_fps, target_fps)


def frame_indices(
    keep_start: int,
    keep_end: int,
    source_fps: float,
    count: int,
    mode: Literal["spread", "window"],
    *,
    target_fps: float = 16.0,
    windows: int = 1,
) -> list[list[int]]:
    """Source frame indices of each sample of a clip's kept range [keep_start, keep_end).

    spread: one sample, `count` frames evenly spaced from the first kept frame to the last.
    window: up to `windows` samples of `count` frames at target_fps (frame i at time i/target_fps
    after the window start, rounded to the nearest source frame), starts spread uniformly over the
    kept range; windows that would coincide are merged. Raises ValueError if the range is too short.
    """
    n = keep_end - keep_start
    need = frames_needed(count, mode, source_fps, target_fps)
    if count < 1 or n < need:
        raise ValueError(f"{n} kept frames cannot hold {count} frames in {mode} mode (needs {need})")
    if mode == "spread":
        if count == 1:
            return [[keep_start + (n - 1) // 2]]
        return [[keep_start + _round(i * (n - 1) / (count - 1)) for i in range(count)]]
    last_start = keep_end - need
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
def plan_clip(clip: dict, ds: DatasetConfig) -> tuple[list[dict], Problem | None]:
    """Samples of one ok clip record, or a Problem saying why it fits no bucket."""
    cfg = ds.bucket
    crop = clip["crop"] or [0, 0, clip["width"], clip["height"]]
    size = choose_bucket(crop[2], crop[3], cfg.resolutions, cfg.allow_upscale)
    if size is None:
        return [], Problem(
            clip["path"],
            f"picture {crop[2]}x{crop[3]} px is smaller than the smallest bucket side ({STEP} px)",
            "use a larger source, or check the letterbox crop in data/trimmed/report.md",
            STAGE,
        )
    if clip["kind"] == "image":
        count, windows = 1, [[0]]
    else:
        count = choose_frames(clip["keep_start"], clip["keep_end"], clip["fps"], cfg)
        if count is None:
            return [], _too_short(clip, cfg)
        windows = frame_indices(
            clip["keep_start"], clip["keep_end"], clip["fps"], count, cfg.frame_sampling,
            target_fps=cfg.fps, windows=cfg.windows_per_clip,
        )  # fmt: skip
    w, h = size
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
    samples = []
    for k, indices in enumerate(windows):
        samples.append({**base, "id": f"{clip['id']}#{k}", "frame_indices": indices, "flip": False})
        if ds.flip_horizontal:
            samples.append({**base, "id": f"{clip['id']}#{k}#f", "frame_indices": indices, "flip": True})
    return samples, None


def _too_short(clip: dict, cfg: BucketConfig) -> Problem:
    kept = clip["keep_end"] - clip["keep_start"]
    smallest = cfg.num_frames[0]
    need = frames_needed(smallest, cfg.frame_sampling, clip["fps"], cfg.fps)
    at = "" if cfg.frame_sampling == "spread" else f" at {cfg.fps:g} fps"
    fits = max(c for c in range(1, smallest, 4) if frames_needed(c, cfg.frame_sampling, clip["fps"], cfg.fps) <= kept)
    return Problem(
        clip["path"],
        f"too short: {kept} kept frames ({kept / clip['fps']:.2f} s at {clip['fps']:g} fps), but the smallest "
        f"bucket, {smallest} frames{at}, needs {need}",
        f"use a longer clip, check its trim in data/trimmed/report.md, or add {fits} to "
        f"datasets.{clip['dataset']}.bucket.num_frames",
        STAGE,
    )


def run_stage(datasets: dict[str, DatasetConfig], clips_manifest: Path, out_dir: Path) -> None:
    """Write out_dir/samples.jsonl, histogram.json and report.json from the trim manifest."""
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
        got, problem = plan_clip(clip, ds)
        samples += got
        if problem:
            problems[clip["dataset"]].append(problem)
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "samples.jsonl", samples)
    counts = Counter(s["bucket"] for s in samples)
    atomic_write_json(out_dir / "histogram.json", [{"bucket": b, "count": counts[b]} for b in sorted(counts, key=_bucket_key)])
    write_problems(out_dir / "report.json", [p for ps in problems.values() for p in ps])
    for name, ds in datasets.items():
        settle(problems[name], ds.on_error, STAGE)


def _bucket_key(bucket: str) -> tuple[int, ...]:
    return tuple(int(v) for v in bucket.split("x"))
