"""The live page of a training run, `data/train_live/index.html`: previews next to the losses so far.

Open it in a browser while the run trains: it reloads itself every `RELOAD_S` seconds until the
run has finished, newest preview first, each with its contact sheet (prompts in rows, frames in
columns) and videos whose poster is the first frame; an image-to-video preview shows its start
image above the video it starts. Self-contained like the evaluate report
(inline SVG plots drawn by `wanlora.evaluate.report.svg_plot`, relative links, no JavaScript),
and everything user-written is escaped. No wall-clock figure appears on it, so a resumed run
writes the same page as an uninterrupted one (preview times are in data/train_perf/previews.json).
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from wanlora.evaluate.report import CSS, svg_plot

RELOAD_S = 30
START_CSS = "img.start{width:64px;display:block;margin-bottom:4px;image-rendering:pixelated}"


def loss_curves(history: list[dict[str, float]]) -> dict[str, list[tuple[float, float]]]:
    """(step, loss) per expert from the trainer's history rows (an expert logs only when it steps)."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in history:
        for key in ("loss_high", "loss_low"):
            v = row.get(key)
            if v is not None and math.isfinite(v):
                curves.setdefault(key, []).append((row["step"], v))
    return curves


def render_live_page(prompts: list[str], previews: list[dict[str, Any]],
                     history: list[dict[str, float]], step: int, total: int) -> str:
    """The page as a string; `prompts` label the videos (one each); `previews` are the complete
    previews' result.json, by step, whose `starts` (image-to-video) name each video's start image."""
    running, title = step < total, "wanlora: training"  # not job.name: the train stage does not read it
    h = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
         *([f'<meta http-equiv="refresh" content="{RELOAD_S}">'] if running else []),
         f"<title>{escape(title)}</title><style>{CSS}{START_CSS}</style></head><body>", f"<h1>{escape(title)}</h1>",
         f'<p id="progress" data-step="{step}" data-total="{total}">Step {step} of {total}'
         f"{f' (reloads every {RELOAD_S} s)' if running else ': finished'}. Previews are cheap samples "
         "during training; the evaluate stage samples every checkpoint at full quality.</p>",
         '<section id="curves"><h2>Training loss</h2>', svg_plot(loss_curves(history), "training loss"),
         "</section>", '<section id="previews"><h2>Previews</h2>']
    if not previews:
        h.append("<p>No preview yet: the first comes at the first save.</p>")
    else:
        h.append('<table class="grid"><thead><tr><th>step</th>')
        h += [f'<th class="prompt">{escape(p)}</th>' for p in prompts]
        h.append("</tr></thead><tbody>")
        for r in reversed(previews):
            name = f"previews/step_{r['step']:06d}"
            h.append(f'<tr data-step="{r["step"]}"><th>step {r["step"]}'
                     f'<a href="{name}/contact_sheet.png"><img class="sheet" '
                     f'src="{name}/contact_sheet.png" alt="contact sheet step {r["step"]}"></a></th>')
            for video, start in zip(r["videos"], r.get("starts") or [None] * len(r["videos"])):
                src = f"{name}/{video}"
                image = f'<img class="start" src="{escape(f"{name}/{start}")}" alt="start image">' if start else ""
                h.append(f'<td>{image}<video src="{escape(src)}" poster="{escape(src.removesuffix(".mp4"))}.png" '
                         f'controls loop muted playsinline preload="metadata"></video></td>')
            h.append("</tr>")
        h.append("</tbody></table>")
    h.append("</section></body></html>")
    return "\n".join(h) + "\n"
