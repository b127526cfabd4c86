"""Stage review: one offline page that shows the dataset exactly as it will be trained.

Before anyone spends GPU hours, a person should see every training sample the way the trainer
sees it (frames after trim, crop, bucket resize and flip, decoded by the same `load_frames` the
latent cache uses), where on its clip's timeline the sample sits, the caption it trains with and
where that caption came from (the user's file, the auto caption, the default), its DOP variant,
whether the split stage holds its clip out for validation (shown, but never trained), and every
problem the data stages reported with its fix. The page embeds its frames as PNG data,
so it opens from the workspace folder, offline, and can be mailed as one file.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Collection
from dataclasses import dataclass
from html import escape
from pathlib import Path

import cv2
import numpy as np

from wanlora.data.split import HELD_OUT_REASON
from wanlora.io import atomic_write_text, read_jsonl
from wanlora.models.latents import load_frames
from wanlora.report import problems_html

FRAMES_SHOWN = 3
ORIGINS = {"file": "your caption file", "auto": "auto caption", "default": "default caption",
           "trigger_only": "trigger word only"}

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin:0 0 4px}.muted{color:#666}table{border-collapse:collapse;margin:8px 0 24px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
.sample{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;margin:12px 0}
.frames img{height:96px;image-rendering:pixelated;margin-right:6px;border:1px solid #ccc}
.timeline{position:relative;height:14px;background:#eee;border-radius:3px;margin:6px 0;max-width:600px}
.kept{position:absolute;top:0;height:14px;background:#9cd3a6}
.tick{position:absolute;top:0;width:2px;height:14px;background:#1b6b2d}
.origin{display:inline-block;padding:1px 6px;border-radius:3px;font-size:12px;color:#fff}
.o-file{background:#2b6cb0}.o-auto{background:#b7791f}.o-default{background:#718096}.o-trigger_only{background:#553c9a}
.caption{font-size:15px;margin:6px 0}.warn{color:#b7791f}
.held{border-style:dashed;background:#f3f3f3}.held-note{color:#2c5282;font-weight:bold}
"""


@dataclass(frozen=True)
class Inputs:
    """What the page shows: deps of the stage's `Stage` entry, named by the wiring
    (`wanlora.stages.review.inputs`)."""

    clips: Path
    captions: Path
    samples: Path
    problem_reports: tuple[Path, ...]  # of the data stages, in pipeline order; a missing one is skipped


def _png(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise ValueError("could not encode a review frame as PNG")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def sample_frames(sample: dict, workspace: Path, count: int = FRAMES_SHOWN) -> list[tuple[int, np.ndarray]]:
    """(source frame index, uint8 RGB as trained) for `count` frames spread over the sample."""
    indices = sample["frame_indices"]
    picks = sorted({indices[round(i * (len(indices) - 1) / max(1, count - 1))] for i in range(count)})
    out = []
    for index in picks:
        pixels = load_frames({**sample, "frame_indices": [index], "num_frames": 1}, workspace)
        out.append((index, ((pixels[:, 0].permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)))
    return out


def _timeline(clip: dict, sample: dict) -> str:
    total = max(1, clip.get("frames") or 1)
    start, end = clip.get("keep_start") or 0, clip.get("keep_end") or total
    bar = f'<div class="kept" style="left:{100 * start / total:.2f}%;width:{100 * (end - start) / total:.2f}%"></div>'
    indices = sample["frame_indices"]
    ticks = "".join(f'<div class="tick" style="left:{100 * i / total:.2f}%"></div>' for i in indices)
    return (f'<div class="timeline" title="kept frames {start}-{end} of {total}">{bar}{ticks}</div>'
            f'<div class="muted">kept frames {start}&ndash;{end} of {total}; this sample reads '
            f'{len(indices)} frames from {indices[0]} to {indices[-1]}</div>')


def _problems(reports: tuple[Path, ...]) -> list[dict]:
    rows = []
    for path in reports:
        if path.is_file():
            rows += json.loads(path.read_text(encoding="utf-8"))["problems"]
    return rows


def render(workspace: Path, inputs: Inputs, held_out: Collection[str] = ()) -> str:
    """The review page for the workspace's current data manifests; `held_out` are the clip ids the
    split stage keeps out of training (their samples are shown, marked, and not counted as trained)."""
    clips = {c["id"]: c for c in read_jsonl(inputs.clips)}
    captions = {c["id"]: c for c in read_jsonl(inputs.captions)}
    samples = read_jsonl(inputs.samples)
    problems = _problems(inputs.problem_reports)
    shown = [s for s in samples if s["clip_id"] in captions]
    trained = [s for s in shown if s["clip_id"] not in held_out]
    clip_ids = {s["clip_id"] for s in trained}
    origins: dict[str, int] = {}
    for clip_id in clip_ids:
        origins[captions[clip_id]["origin"]] = origins.get(captions[clip_id]["origin"], 0) + 1
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>wanlora dataset review</title>",
         f"<style>{_CSS}</style></head><body>", "<h1>Dataset review</h1>",
         f"<p class='muted'>{len(trained)} training samples from {len(clip_ids)} clips"
         + (f", and {len(shown) - len(trained)} sample(s) of {len(held_out)} clip(s) {HELD_OUT_REASON}"
            if held_out else "") + "; captions of the training clips: "
         + (", ".join(f"{n} {escape(ORIGINS.get(o, o))}" for o, n in sorted(origins.items())) or "none")
         + f"; {len(problems)} problem(s). To accept an auto caption, copy its .txt from data/autocaptions/ beside "
         "the clip in your dataset folder (edit it first if you like): it becomes your own caption.</p>"]
    h.append(f"<h2 id='problems'>Problems ({len(problems)})</h2>")
    if problems:
        h += problems_html(problems, ("path", "stage", "reason", "fix"), "problems-table")
    else:
        h.append("<p>No problems reported.</p>")
    h.append(f"<h2 id='samples'>Samples ({len(shown)})</h2>")
    for s in shown:
        cap, clip = captions[s["clip_id"]], clips.get(s["clip_id"], {})
        origin = cap["origin"]
        frames = "".join(f'<img alt="frame {i}" title="source frame {i}" src="{_png(rgb)}">'
                         for i, rgb in sample_frames(s, workspace))
        warnings = "".join(f"<div class='warn'>{escape(w)}</div>" for w in cap.get("warnings", []))
        source = "" if origin in ("default", "trigger_only") else f" <span class='muted'>{escape(cap['source'])}</span>"
        held = s["clip_id"] in held_out
        h.append(
            f"<div class='sample{' held' if held else ''}' data-sample='{escape(s['id'], quote=True)}'"
            f"{' data-held-out' if held else ''}><b>{escape(s['id'])}</b> "
            + (f"<span class='held-note'>not trained: {escape(HELD_OUT_REASON)}</span> " if held else "") +
            f"<span class='muted'>bucket {s['width']}x{s['height']}, {s['num_frames']} frames"
            f"{', mirrored' if s.get('flip') else ''}</span>"
            f"<div class='frames'>{frames}</div>{_timeline(clip, s)}"
            f"<div class='caption'>{escape(cap['caption'])}</div>"
            f"<div><span class='origin o-{escape(origin)}'>{escape(ORIGINS.get(origin, origin))}</span>{source}</div>"
            f"<div class='muted'>DOP variant: {escape(cap.get('caption_dop') or '')}</div>{warnings}</div>"
        )
    h.append("</body></html>")
    return "\n".join(h) + "\n"


def run_stage(workspace: Path, inputs: Inputs, out_dir: Path, held_out: Collection[str] = ()) -> None:
    """Write out_dir/index.html."""
    atomic_write_text(out_dir / "index.html", render(workspace, inputs, frozenset(held_out)))
